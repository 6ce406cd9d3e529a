"""Our plain-PyTorch UNet and VAE against diffusers: same state dicts, same outputs, same configs."""

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from sd_core.diffusers_config import as_tuples  # noqa: E402
from sd_core.tiny_configs import TINY_CONFIGS, TINY_V1  # noqa: E402
from sd_core.unet import UNet, UNetConfig  # noqa: E402
from sd_core.vae import AutoencoderKL, VAEConfig, rename_legacy_vae_keys  # noqa: E402

TOL = 1e-5

# Every supported UNet option away from its default: per-block lists, kernels, scale factors, padding 0...
TINY_ODD_UNET = {
    **TINY_V1["unet"],
    "layers_per_block": [1, 2, 1],
    "transformer_layers_per_block": [1, 2, 2],
    "attention_head_dim": [1, 2, 4],
    "cross_attention_dim": [32, 32, 32],
    "center_input_sample": True,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "conv_in_kernel": 1,
    "conv_out_kernel": 1,
    "mid_block_scale_factor": 1.5,
    "downsample_padding": 0,
    "norm_eps": 1e-6,
    "act_fn": "mish",
    "use_linear_projection": True,
    "upcast_attention": True,
    "in_channels": 5,
    "out_channels": 3,
}
# ...and for the VAE: no attention in the mid block, no quant convs, two levels.
TINY_ODD_VAE = {
    **TINY_V1["vae"],
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 2,
    "latent_channels": 3,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
UNET_CONFIGS = {"v1": TINY_V1["unet"], "v2": TINY_CONFIGS["v2"]["unet"], "odd": TINY_ODD_UNET}
VAE_CONFIGS = {"sd": TINY_V1["vae"], "odd": TINY_ODD_VAE}

SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": SD_UP,
}
SD21_UNET = {
    **SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_VAE = {**SD15_VAE, "_diffusers_version": "0.10.0.dev0", "sample_size": 768}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def context_dim(cfg: dict) -> int:
    dim = cfg["cross_attention_dim"]
    return dim if isinstance(dim, int) else dim[0]


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def unets(request):
    """(ours, diffusers', config dict) with diffusers' seeded random weights loaded into ours."""
    cfg = UNET_CONFIGS[request.param]
    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(cfg).eval()
    ours = UNet(UNetConfig.from_dict(cfg)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, cfg


@pytest.fixture(scope="module", params=sorted(VAE_CONFIGS))
def vaes(request):
    cfg = VAE_CONFIGS[request.param]
    torch.manual_seed(0)
    theirs = DiffusersAutoencoderKL.from_config(cfg).eval()
    ours = AutoencoderKL(VAEConfig.from_dict(cfg)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, cfg


def unet_inputs(cfg: dict, size: tuple[int, int] = (8, 6), batch: int = 2):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, cfg["in_channels"], *size, generator=g)
    context = torch.randn(batch, 7, context_dim(cfg), generator=g)
    return sample, context


# ---------------------------------------------------------------- UNet


@pytest.mark.parametrize("size", [(8, 6), (8, 8)])
@pytest.mark.parametrize(
    "timestep", [torch.tensor(501.5), torch.tensor([7, 981]), 250.0], ids=["float-0d", "int-B", "python"]
)
@torch.no_grad()
def test_unet_matches_diffusers(unets, size, timestep):
    ours, theirs, cfg = unets
    sample, context = unet_inputs(cfg, size)
    expected = theirs(sample, timestep, context).sample
    got = ours(sample, timestep, context)
    assert isinstance(got, torch.Tensor) and got.shape == (2, cfg["out_channels"], *size)
    assert max_diff(got, expected) <= TOL


@torch.no_grad()
def test_unet_rows_are_batch_invariant(unets):
    ours, _, cfg = unets
    sample, context = unet_inputs(cfg, batch=3)
    t = torch.tensor([10.0, 500.0, 990.0])
    batched = ours(sample, t, context)
    for i in range(3):
        alone = ours(sample[i : i + 1], t[i : i + 1], context[i : i + 1])
        assert max_diff(batched[i : i + 1], alone) <= TOL
    # Nothing flows between rows: changing row 0 leaves the others bit for bit the same.
    other = ours(
        torch.cat([-sample[:1], sample[1:]]),
        torch.tensor([1.0, 500.0, 990.0]),
        torch.cat([context[:1] * 3, context[1:]]),
    )
    assert torch.equal(other[1:], batched[1:])


@pytest.mark.parametrize("slice_size", [1, 3])
@torch.no_grad()
def test_unet_attention_slicing_matches_default(unets, slice_size):
    ours, _, cfg = unets
    sample, context = unet_inputs(cfg)
    t = torch.tensor(300)
    default = ours(sample, t, context)
    ours.set_attention_slice(slice_size)
    try:
        sliced = ours(sample, t, context)
    finally:
        ours.set_attention_slice(None)
    assert max_diff(sliced, default) <= 1e-6


@torch.no_grad()
def test_unet_channels_last(unets):
    ours, _, cfg = unets
    sample, context = unet_inputs(cfg)
    expected = ours(sample, torch.tensor(300), context)
    cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    got = cl(sample.to(memory_format=torch.channels_last), torch.tensor(300), context)
    assert max_diff(got, expected) <= TOL


@torch.no_grad()
def test_our_state_dict_loads_into_diffusers(unets):
    ours, _, cfg = unets
    torch.manual_seed(123)  # different weights, then overwritten by ours
    theirs = UNet2DConditionModel.from_config(cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    sample, context = unet_inputs(cfg)
    t = torch.tensor(42)
    assert max_diff(ours(sample, t, context), theirs(sample, t, context).sample) <= TOL


def test_unet_config_round_trip(unets):
    ours, theirs, cfg = unets
    written = ours.config.to_dict()
    assert written["_class_name"] == "UNet2DConditionModel"
    assert UNetConfig.from_dict(written) == ours.config
    rebuilt = UNet2DConditionModel.from_config(written)
    assert shapes(rebuilt) == shapes(ours)
    # diffusers' own full config (every key, defaults included) reads back to the same config.
    assert UNetConfig.from_dict(dict(theirs.config)) == ours.config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_low_precision_forward_runs(dtype):
    cfg = TINY_CONFIGS["v2"]
    unet = UNet(UNetConfig.from_dict(cfg["unet"])).eval().to(dtype)
    sample, context = unet_inputs(cfg["unet"])
    out = unet(sample.to(dtype), torch.tensor(500), context.to(dtype))
    assert out.dtype == dtype and out.shape == sample.shape and out.isfinite().all()
    vae = AutoencoderKL(VAEConfig.from_dict(cfg["vae"])).eval().to(dtype)
    image = vae.decode(torch.randn(2, 4, 8, 6, dtype=dtype))
    assert image.dtype == dtype and image.shape == (2, 3, 64, 48) and image.isfinite().all()
    latents = vae.encode(image).sample_rows([torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.dtype == dtype and latents.isfinite().all()


# ---------------------------------------------------------------- VAE


def images(batch: int = 2, height: int = 64, width: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(2)) * 2 - 1


@torch.no_grad()
def test_vae_matches_diffusers(vaes):
    ours, theirs, cfg = vaes
    x = images()
    expected, got = theirs.encode(x).latent_dist, ours.encode(x)
    assert max_diff(got.mean, expected.mean) <= TOL
    assert max_diff(got.std, expected.std) <= TOL
    assert max_diff(got.mode(), expected.mode()) <= TOL
    z = torch.randn(2, cfg["latent_channels"], 8, 6, generator=torch.Generator().manual_seed(3))
    assert max_diff(ours.decode(z), theirs.decode(z).sample) <= TOL
    assert ours.scale_factor_spatial == 2 ** (len(cfg["block_out_channels"]) - 1)


@torch.no_grad()
def test_posterior_sampling_matches_diffusers(vaes):
    ours, theirs, _ = vaes
    x = images()
    posterior = ours.encode(x)
    # One generator for the whole batch: diffusers' DiagonalGaussianDistribution.sample.
    expected = theirs.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    assert max_diff(posterior.sample(torch.Generator().manual_seed(5)), expected) <= TOL
    # One generator per row: diffusers encoding image[i:i+1] and sampling with generator[i].
    seeds = [11, 12]
    per_row = torch.cat(
        [
            theirs.encode(x[i : i + 1]).latent_dist.sample(generator=torch.Generator().manual_seed(s))
            for i, s in enumerate(seeds)
        ]
    )
    rows = posterior.sample_rows([torch.Generator().manual_seed(s) for s in seeds])
    assert max_diff(rows, per_row) <= TOL
    # A row's latent does not depend on its neighbours.
    alone = ours.encode(x[1:]).sample_rows([torch.Generator().manual_seed(seeds[1])])
    assert max_diff(rows[1:], alone) <= TOL
    with pytest.raises(ValueError, match="one generator per row"):
        posterior.sample_rows([torch.Generator()])


@torch.no_grad()
def test_vae_tiling_matches_diffusers(vaes):
    ours, theirs, cfg = vaes
    tile = 32
    theirs.enable_tiling()
    theirs.tile_sample_min_size = tile
    theirs.tile_latent_min_size = tile // ours.scale_factor_spatial
    ours.enable_tiling(tile_sample_size=tile)
    try:
        x = images(height=80, width=56)
        expected, got = theirs.encode(x).latent_dist, ours.encode(x)
        assert max_diff(got.mean, expected.mean) <= TOL
        assert max_diff(got.std, expected.std) <= TOL
        z = expected.mean
        decoded = ours.decode(z)
        assert decoded.shape == (2, 3, 80, 56)
        assert max_diff(decoded, theirs.decode(z).sample) <= TOL
    finally:
        theirs.disable_tiling()
        ours.disable_tiling()
    assert max_diff(decoded, ours.decode(z)) > 1e-4  # tiling really happened


@torch.no_grad()
def test_vae_attention_slicing_matches_default(vaes):
    ours, _, _ = vaes
    x = images()
    mean = ours.encode(x).mean
    decoded = ours.decode(mean)
    ours.set_attention_slice(1)
    try:
        assert max_diff(ours.encode(x).mean, mean) <= 1e-6
        assert max_diff(ours.decode(mean), decoded) <= 1e-6
    finally:
        ours.set_attention_slice(None)


@torch.no_grad()
def test_vae_rows_are_batch_invariant(vaes):
    ours, _, _ = vaes
    x = images(batch=3)
    mean = ours.encode(x).mean
    decoded = ours.decode(mean)
    for i in range(3):
        assert max_diff(ours.encode(x[i : i + 1]).mean, mean[i : i + 1]) <= TOL
        # CPU conv/GEMM kernels are picked by batch size, and their rounding differs; through the decoder's
        # depth that reaches ~1e-5 (diffusers' own decoder shows the same). Rows still never mix:
        assert max_diff(ours.decode(mean[i : i + 1]), decoded[i : i + 1]) <= 2 * TOL
    other_x = torch.cat([-x[:1], x[1:]])
    assert torch.equal(ours.encode(other_x).mean[1:], mean[1:])
    assert torch.equal(ours.decode(torch.cat([mean[:1] * 2, mean[1:]]))[1:], decoded[1:])


def test_vae_config_round_trip(vaes):
    ours, theirs, _ = vaes
    written = ours.config.to_dict()
    assert written["_class_name"] == "AutoencoderKL"
    assert VAEConfig.from_dict(written) == ours.config
    assert shapes(DiffusersAutoencoderKL.from_config(written)) == shapes(ours)
    assert VAEConfig.from_dict(dict(theirs.config)) == ours.config


def test_legacy_vae_attention_keys_load():
    vae = AutoencoderKL(VAEConfig.from_dict(TINY_V1["vae"]))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in vae.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    vae.load_state_dict(rename_legacy_vae_keys(legacy), strict=True)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "model, key, value",
    [
        ("unet", "addition_embed_type", "text_time"),
        ("unet", "class_embed_type", "timestep"),
        ("unet", "time_cond_proj_dim", 256),
        ("unet", "num_class_embeds", 10),
        ("unet", "encoder_hid_dim", 768),
        ("unet", "resnet_time_scale_shift", "scale_shift"),
        ("unet", "dual_cross_attention", True),
        ("unet", "only_cross_attention", True),
        ("unet", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("unet", "down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"]),
        ("unet", "transformer_layers_per_block", [[1, 2], [1, 2], [1, 2]]),
        ("unet", "norm_num_groups", None),
        ("unet", "a_key_from_the_future", 1),
        ("vae", "latents_mean", [0.1, 0.2, 0.3, 0.4]),
        ("vae", "shift_factor", 0.1159),
        ("vae", "down_block_types", ["AttnDownEncoderBlock2D"] * 4),
    ],
)
def test_unsupported_config_raises(model, key, value):
    config_cls = UNetConfig if model == "unet" else VAEConfig
    with pytest.raises(ValueError, match=key) as error:
        config_cls.from_dict({**TINY_V1[model], key: value})
    message = str(error.value)
    assert repr(value) in message or repr(as_tuples(value)) in message
    assert "supported" in message


def test_defaults_and_head_count_naming():
    # Keys at diffusers' defaults are accepted; dropout only matters for training.
    cfg = UNetConfig.from_dict(
        {
            **TINY_V1["unet"],
            "class_embed_type": None,
            "dropout": 0.1,
            "only_cross_attention": [False] * 3,
            "mid_block_only_cross_attention": None,
        }
    )
    assert cfg == UNetConfig.from_dict(TINY_V1["unet"])
    # attention_head_dim is the head count, unless num_attention_heads says so.
    assert UNetConfig.from_dict(TINY_V1["unet"]).num_attention_heads == 8
    four_heads = UNetConfig.from_dict({**TINY_V1["unet"], "num_attention_heads": 4})
    assert four_heads.num_attention_heads == 4 and four_heads.to_dict()["attention_head_dim"] == 4


@pytest.mark.parametrize(
    "ours_cls, config_cls, theirs_cls, cfg, num_params",
    [
        (UNet, UNetConfig, UNet2DConditionModel, SD15_UNET, 859_520_964),
        (UNet, UNetConfig, UNet2DConditionModel, SD21_UNET, 865_910_724),
        (AutoencoderKL, VAEConfig, DiffusersAutoencoderKL, SD15_VAE, 83_653_863),
        (AutoencoderKL, VAEConfig, DiffusersAutoencoderKL, SD21_VAE, 83_653_863),
    ],
    ids=["sd15-unet", "sd21-unet", "sd15-vae", "sd21-vae"],
)
def test_real_sd_configs_match_diffusers_on_meta(ours_cls, config_cls, theirs_cls, cfg, num_params):
    with torch.device("meta"):
        ours = ours_cls(config_cls.from_dict(cfg))
        theirs = theirs_cls.from_config(cfg)
    assert shapes(ours) == shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == num_params  # the published checkpoints' sizes
    with torch.device("meta"):
        assert shapes(theirs_cls.from_config(ours.config.to_dict())) == shapes(ours)
