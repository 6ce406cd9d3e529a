"""Single-file (CompVis/A1111) checkpoints: key maps checked against diffusers' own converters,
family detection from key shapes, and the bundled SD1.5 / SD2.1 configs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sd_core.checkpoint_keys import join_single_file, split_single_file
from sd_core.families import bundled_config, detect_family, read_header_shapes
from sd_core.ldm_keys import UNetLayout, VAELayout
from sd_core.tiny_configs import TINY_CONFIGS

FAMILIES = ["v1", "v2"]
FULL_UNET_PARAMS = {"v1": 859_520_964, "v2": 865_910_724}


@dataclass
class Parts:
    """A model's configs and component state dicts (diffusers / flat transformers 5 keys)."""

    family: str
    configs: dict
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    text_model: CLIPTextModel

    def join(self) -> dict[str, torch.Tensor]:
        return join_single_file(self.unet, self.vae, self.text, self.family, **self.model_configs())

    def split(self, ldm: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return split_single_file(ldm, self.family, self.configs["text_encoder"], **self.model_configs())

    def model_configs(self) -> dict:
        return {"unet_config": self.configs["unet"], "vae_config": self.configs["vae"]}


def build_parts(family: str, configs: dict, device: str) -> Parts:
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_model = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return Parts(family, configs, *(_distinct(m.state_dict()) for m in (unet, vae, text_model)), text_model)


def _distinct(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random values everywhere, so a swapped or mis-sliced tensor cannot pass for the right one."""
    generator = torch.Generator().manual_seed(len(state_dict))
    return {
        key: value if value.is_meta else torch.randn(value.shape, generator=generator)
        for key, value in state_dict.items()
    }


# Unlike any SD release: one resnet per level, attention in the middle levels only, a 2-level VAE.
ODD_LAYOUT = {
    "unet": {
        **TINY_CONFIGS["v1"]["unet"],
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "vae": {
        **TINY_CONFIGS["v1"]["vae"],
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
    },
}


@cache
def model_parts(size: str, family: str) -> Parts:
    """tiny: CPU models whose values are checked; odd: the same with an unusual layout; full: SD1.5 / SD2.1
    from the bundled configs on the meta device (the real key layout, shapes only, no memory)."""
    if size == "full":
        return build_parts(family, bundled_config(family), "meta")
    configs = TINY_CONFIGS[family] | (ODD_LAYOUT if size == "odd" else {})
    return build_parts(family, configs, "cpu")


@pytest.fixture(params=FAMILIES)
def tiny(request) -> Parts:
    return model_parts("tiny", request.param)


@pytest.fixture(params=FAMILIES)
def full(request) -> Parts:
    return model_parts("full", request.param)


@pytest.fixture(
    params=[("tiny", "v1"), ("tiny", "v2"), ("odd", "v1"), ("full", "v1"), ("full", "v2")], ids="-".join
)
def parts(request) -> Parts:
    return model_parts(*request.param)


@pytest.fixture
def full_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {family: shapes_of(model_parts("full", family).join()) for family in FAMILIES}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if not value.is_meta:
            assert torch.equal(actual[key], value), key


def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def diffusers_text(parts: Parts, ldm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if parts.family == "v1":
        converted = convert_ldm_clip_checkpoint(ldm)
    else:
        converted = convert_open_clip_checkpoint(parts.text_model, ldm)
    return {key.removeprefix("text_model."): value for key, value in converted.items()}


# ---- key maps ------------------------------------------------------------------------------------------


def test_text_state_dict_is_flat(tiny):
    assert "embeddings.token_embedding.weight" in tiny.text
    assert not any(key.startswith("text_model.") for key in tiny.text)


def test_join_is_what_diffusers_converters_read(parts):
    ldm = parts.join()
    assert_same(convert_ldm_unet_checkpoint(ldm, parts.configs["unet"]), parts.unet)
    assert_same(convert_ldm_vae_checkpoint(ldm, parts.configs["vae"]), parts.vae)
    assert_same(diffusers_text(parts, ldm), parts.text)


def test_split_inverts_join(parts):
    split = parts.split(parts.join())
    assert sorted(split) == ["text_encoder", "unet", "vae"]
    assert_same(split["unet"], parts.unet)
    assert_same(split["vae"], parts.vae)
    assert_same(split["text_encoder"], parts.text)


def test_join_uses_compvis_names(tiny):
    ldm = tiny.join()
    text_prefix = {"v1": "cond_stage_model.transformer.text_model.", "v2": "cond_stage_model.model."}
    prefixes = ("model.diffusion_model.", "first_stage_model.", text_prefix[tiny.family])
    assert all(key.startswith(prefixes) for key in ldm)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1x1 conv
    assert not any("position_ids" in key for key in ldm)
    if tiny.family == "v2":
        width = tiny.configs["text_encoder"]["hidden_size"]
        fused = ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert fused.shape == (3 * width, width)


def test_split_ignores_what_our_models_do_not_hold(tiny):
    ldm = tiny.join()
    extras = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.rand(1000)}
    if tiny.family == "v1":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # real SD2 files hold one more block than diffusers uses, and OpenCLIP's head
        prefix = "cond_stage_model.model."
        layers = tiny.configs["text_encoder"]["num_hidden_layers"]
        last = f"{prefix}transformer.resblocks.{layers - 1}."
        extras |= {
            key.replace(last, f"{prefix}transformer.resblocks.{layers}."): value + 1
            for key, value in ldm.items()
            if key.startswith(last)
        }
        extras |= {prefix + name: torch.rand(3) for name in ("text_projection", "logit_scale", "attn_mask")}
    split = tiny.split(ldm | extras)
    assert_same(split["unet"], tiny.unet)
    assert_same(split["vae"], tiny.vae)
    assert_same(split["text_encoder"], tiny.text)


def test_split_reads_v1_text_without_text_model_level():
    parts = model_parts("tiny", "v1")
    old_layout = {
        key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
        for key, value in parts.join().items()
    }
    assert_same(parts.split(old_layout)["text_encoder"], parts.text)


def test_split_rejects_keys_outside_the_config(tiny):
    ldm = tiny.join() | {"model.diffusion_model.input_blocks.42.0.in_layers.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"UNet keys do not fit .*input_blocks\.42"):
        tiny.split(ldm)


def test_layouts_inferred_from_key_names_match_the_configs(parts):
    ldm = parts.join()
    unet_ldm = {k.removeprefix("model.diffusion_model."): v for k, v in ldm.items()}
    vae_ldm = {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}
    unet_layout = UNetLayout.from_config(parts.configs["unet"])
    assert UNetLayout.from_diffusers_keys(parts.unet) == unet_layout == UNetLayout.from_ldm_keys(unet_ldm)
    vae_layout = VAELayout.from_config(parts.configs["vae"])
    assert VAELayout.from_diffusers_keys(parts.vae) == vae_layout == VAELayout.from_ldm_keys(vae_ldm)


def test_split_and_join_without_configs(parts):
    ldm = join_single_file(parts.unet, parts.vae, parts.text, parts.family)
    assert sorted(ldm) == sorted(parts.join())
    split = split_single_file(ldm, parts.family, parts.configs["text_encoder"])
    assert_same(split["unet"], parts.unet)
    assert_same(split["vae"], parts.vae)


def test_unknown_family_is_rejected(tiny):
    with pytest.raises(ValueError, match="unknown family 'sdxl'"):
        split_single_file(tiny.join(), "sdxl", tiny.configs["text_encoder"])


# ---- family detection ------------------------------------------------------------------------------


def test_detects_family(parts):
    assert detect_family(shapes_of(parts.join())) == parts.family


def test_detects_family_from_safetensors_header(tiny, tmp_path):
    ldm = {key: value.contiguous() for key, value in tiny.join().items()}
    path = tmp_path / "model.safetensors"
    save_file(ldm, path)
    shapes = read_header_shapes(path)
    assert shapes == shapes_of(ldm)
    assert detect_family(shapes) == tiny.family


def test_full_size_v2_file_with_its_24th_block_is_v2(full):
    shapes = shapes_of(full.join())
    if full.family == "v2":
        extra_block = "cond_stage_model.model.transformer.resblocks.23.ln_1.weight"
        shapes[extra_block] = (1024,)
    assert detect_family(shapes) == full.family


def _rejected(shapes: dict[str, tuple[int, ...]], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as error:
        detect_family(shapes)
    assert "supported: 'v1'" in str(error.value)


def test_rejects_sdxl():
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    }
    _rejected(sdxl, r"SDXL-style checkpoint \(conditioner\.embedders\.\*\)")


def test_rejects_inpainting(full_shapes):
    shapes = dict(full_shapes["v1"]) | {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    _rejected(shapes, r"UNet takes 9 input channels \(inpainting\)")


def test_rejects_checkpoint_without_unet(full_shapes):
    shapes = {k: v for k, v in full_shapes["v1"].items() if not k.startswith("model.diffusion_model.")}
    _rejected(shapes, r"no UNet keys .*\['cond_stage_model', 'first_stage_model'\]")


def test_rejects_transformer_denoiser():
    shapes = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}
    _rejected(shapes, r"not an SD1/SD2 UNet")


def test_rejects_missing_or_doubled_text_encoder(full_shapes):
    unet_only = {k: v for k, v in full_shapes["v1"].items() if not k.startswith("cond_stage_model.")}
    _rejected(unet_only, "no text encoder keys")
    v2_text = {k: v for k, v in full_shapes["v2"].items() if k.startswith("cond_stage_model.")}
    _rejected(full_shapes["v1"] | v2_text, r"transformer\.\* and cond_stage_model\.model\.\*")


def test_rejects_text_encoder_that_contradicts_the_unet(full_shapes):
    v1_text = {k: v for k, v in full_shapes["v1"].items() if k.startswith("cond_stage_model.")}
    v2_unet = {k: v for k, v in full_shapes["v2"].items() if not k.startswith("cond_stage_model.")}
    _rejected(v2_unet | v1_text, r"looks v1 \(768 wide\) but the UNet cross-attends to 1024-wide text")


def test_rejects_linear_projections_with_a_v1_text_encoder(full_shapes):
    shapes = {
        key: shape[:2] if key.endswith(("proj_in.weight", "proj_out.weight")) else shape
        for key, shape in full_shapes["v1"].items()
    }
    _rejected(shapes, "proj_in is a Linear, which v1 never uses")


# ---- bundled configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bundled_configs_build_the_models(family):
    configs = bundled_config(family)
    assert sorted(configs) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        AutoencoderKL.from_config(configs["vae"])
    assert sum(p.numel() for p in unet.parameters()) == FULL_UNET_PARAMS[family]
    text_config = CLIPTextConfig(**configs["text_encoder"])
    assert text_config.hidden_size == configs["unet"]["cross_attention_dim"]
    assert configs["vae"]["scaling_factor"] == 0.18215
    scheduler = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(configs["scheduler"])
    assert scheduler.config.prediction_type == {"v1": "epsilon", "v2": "v_prediction"}[family]
    assert configs["tokenizer"]["pad_token"] == {"v1": "<|endoftext|>", "v2": "!"}[family]


def test_bundled_text_encoders_are_sd_shapes():
    v1, v2 = (CLIPTextConfig(**bundled_config(family)["text_encoder"]) for family in FAMILIES)
    assert (v1.num_hidden_layers, v1.hidden_size, v1.hidden_act) == (12, 768, "quick_gelu")
    assert (v2.num_hidden_layers, v2.hidden_size, v2.num_attention_heads) == (23, 1024, 16)
    assert (v2.intermediate_size, v2.hidden_act) == (4096, "gelu")


def test_bundled_config_returns_fresh_copies():
    bundled_config("v1")["unet"]["in_channels"] = 9
    assert bundled_config("v1")["unet"]["in_channels"] == 4
    with pytest.raises(ValueError, match="unknown family"):
        bundled_config("sdxl")
