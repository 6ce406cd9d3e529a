"""Single-file (CompVis / SGM) checkpoints of SD 1.x, SD 2.x and SDXL base and refiner: key maps checked
against diffusers' own converters (`diffusers.loaders.single_file_utils`), family detection from key
shapes, and the bundled full-size configs. Full-size models are built on the meta device: the real key
layout and shapes, no memory."""

from __future__ import annotations

import re
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_core.checkpoint_keys import join_single_file, split_single_file
from sd_core.families import (
    ModelFamily,
    TextTower,
    bundled_config,
    detect_family,
    family_named,
    read_header_shapes,
)
from sd_core.ldm_keys import UNetLayout, VAELayout
from sd_core.tiny_configs import TINY_CONFIGS

FAMILIES = ["v1", "v2", "xl_base", "xl_refiner"]
FULL_UNET_PARAMS = {
    "v1": 859_520_964,
    "v2": 865_910_724,
    "xl_base": 2_567_463_684,
    "xl_refiner": 2_259_526_660,
}
# Where the text towers sit in a single file (families.md §1.7); the refiner has one embedder only.
TEXT_PREFIXES = {
    "v1": ("cond_stage_model.transformer.text_model.",),
    "v2": ("cond_stage_model.model.",),
    "xl_base": ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."),
    "xl_refiner": ("conditioner.embedders.0.model.",),
}
UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT_ROOTS = ("cond_stage_model.", "conditioner.")

StateDict = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


@dataclass
class Parts:
    """A model's configs and component state dicts (diffusers keys; transformers 5 keys for the towers)."""

    family: ModelFamily
    configs: dict
    weights: dict[str, StateDict]  # unet / vae / each tower's component
    text_models: dict[str, CLIPTextModel | CLIPTextModelWithProjection]

    def join(self) -> StateDict:
        return join_single_file(self.weights, self.family, self.configs)

    def split(self, ldm: StateDict) -> dict[str, StateDict]:
        return split_single_file(ldm, self.family, self.configs)


def build_parts(family_name: str, configs: dict, device: str) -> Parts:
    family = family_named(family_name)
    with torch.device(device):
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
        }
        for tower in family.towers:
            model_class = CLIPTextModelWithProjection if tower.projection else CLIPTextModel
            models[tower.component] = model_class(CLIPTextConfig(**configs[tower.component]))
    weights = {name: _distinct(model.state_dict(), seed) for seed, (name, model) in enumerate(models.items())}
    return Parts(family, configs, weights, {t.component: models[t.component] for t in family.towers})


def _distinct(state_dict: StateDict, seed: int) -> StateDict:
    """Random values everywhere, so a swapped or mis-sliced tensor cannot pass for the right one."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value if value.is_meta else torch.randn(value.shape, generator=generator)
        for key, value in state_dict.items()
    }


# Unlike any release: one resnet per level, attention in the middle levels only with transformer depths
# 1-3-2-1, a 2-level VAE.
ODD_LAYOUT = {
    "unet": {
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 4,
        "transformer_layers_per_block": [1, 3, 2, 1],
    },
    "vae": {
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
    },
}


@cache
def model_parts(size: str, family: str) -> Parts:
    """tiny: CPU models whose values are checked; odd: the same with an unusual layout; full: the released
    architectures from the bundled configs, on the meta device."""
    if size == "full":
        return build_parts(family, bundled_config(family), "meta")
    configs = dict(TINY_CONFIGS[family])
    if size == "odd":
        configs |= {name: {**configs[name], **ODD_LAYOUT[name]} for name in ODD_LAYOUT}
    return build_parts(family, configs, "cpu")


@cache
def full_join(family: str) -> StateDict:
    """A released model's single file (meta tensors)."""
    return model_parts("full", family).join()


def full_shapes(family: str) -> Shapes:
    """The key -> shape map of a released model's single file (a fresh dict)."""
    return shapes_of(full_join(family))


@pytest.fixture(params=FAMILIES)
def tiny(request) -> Parts:
    return model_parts("tiny", request.param)


SIZES_AND_FAMILIES = [(size, family) for size in ("tiny", "odd", "full") for family in FAMILIES]


@pytest.fixture(params=SIZES_AND_FAMILIES, ids="-".join)
def parts(request) -> Parts:
    return model_parts(*request.param)


def assert_same(actual: StateDict, expected: StateDict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if not value.is_meta:
            assert torch.equal(actual[key], value), key


def shapes_of(state_dict: StateDict) -> Shapes:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def under(state_dict: dict, *prefixes: str) -> dict:
    return {key: value for key, value in state_dict.items() if key.startswith(prefixes)}


def outside(state_dict: dict, *prefixes: str) -> dict:
    return {key: value for key, value in state_dict.items() if not key.startswith(prefixes)}


def diffusers_text(parts: Parts, tower: TextTower, ldm: StateDict) -> StateDict:
    """diffusers' conversion of one tower, keyed as transformers 5 keys its model class."""
    if tower.checkpoint_layout == "clip":
        converted = convert_ldm_clip_checkpoint(ldm, remove_prefix=tower.checkpoint_prefix)
    else:
        text_model = parts.text_models[tower.component]
        converted = convert_open_clip_checkpoint(text_model, ldm, prefix=tower.checkpoint_prefix)
    if tower.projection:
        return converted
    return {key.removeprefix("text_model."): value for key, value in converted.items()}


# ---- key maps ------------------------------------------------------------------------------------------


def test_tower_state_dicts_use_transformers_5_keys(tiny):
    for tower in tiny.family.towers:
        keys = set(tiny.weights[tower.component])
        if tower.projection:  # CLIPTextModelWithProjection keeps the text_model level
            assert "text_projection.weight" in keys
            assert all(key.startswith("text_model.") for key in keys - {"text_projection.weight"})
        else:  # CLIPTextModel is flat
            assert "embeddings.token_embedding.weight" in keys
            assert not any(key.startswith("text_model.") for key in keys)


def test_join_is_what_diffusers_converters_read(parts):
    ldm = parts.join()
    assert_same(convert_ldm_unet_checkpoint(ldm, parts.configs["unet"]), parts.weights["unet"])
    assert_same(convert_ldm_vae_checkpoint(ldm, parts.configs["vae"]), parts.weights["vae"])
    for tower in parts.family.towers:
        assert_same(diffusers_text(parts, tower, ldm), parts.weights[tower.component])


def test_split_inverts_join(parts):
    split = parts.split(parts.join())
    assert sorted(split) == sorted(parts.family.components)
    for component, weights in parts.weights.items():
        assert_same(split[component], weights)


def test_join_uses_sgm_names(tiny):
    ldm = tiny.join()
    text_prefixes = TEXT_PREFIXES[tiny.family.name]
    assert all(key.startswith((UNET, VAE, *text_prefixes)) for key in ldm)
    assert all(under(ldm, prefix) for prefix in text_prefixes)
    assert ldm[VAE + "encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1x1 conv
    assert not any("position_ids" in key for key in ldm)
    sdxl = tiny.family.time_ids is not None
    added = {UNET + f"label_emb.0.{i}.{param}" for i in (0, 2) for param in ("weight", "bias")}
    assert (added <= set(ldm)) == sdxl
    assert not any("add_embedding" in key for key in ldm)


def test_refiner_holds_its_one_embedder_only():
    ldm = model_parts("tiny", "xl_refiner").join()
    assert sorted({".".join(key.split(".")[:4]) for key in under(ldm, "conditioner.")}) == [
        "conditioner.embedders.0.model"
    ]


@pytest.mark.parametrize("family", ["v2", "xl_base", "xl_refiner"])
def test_openclip_towers_fuse_qkv_and_store_the_projection_transposed(family):
    parts = model_parts("tiny", family)
    ldm = parts.join()
    for tower in parts.family.towers:
        if tower.checkpoint_layout != "open_clip":
            continue
        weights = {k.removeprefix("text_model."): v for k, v in parts.weights[tower.component].items()}
        for param in ("weight", "bias"):
            fused = ldm[f"{tower.checkpoint_prefix}transformer.resblocks.1.attn.in_proj_{param}"]
            thirds = [weights[f"encoder.layers.1.self_attn.{name}_proj.{param}"] for name in "qkv"]
            assert torch.equal(fused, torch.cat(thirds))
        projection = ldm.get(tower.checkpoint_prefix + "text_projection")
        if tower.projection:  # OpenCLIP applies x @ P: [width 64, projection 32] here
            assert projection.shape == (64, 32)
            assert torch.equal(projection, weights["text_projection.weight"].T)
        else:
            assert projection is None


def test_split_ignores_what_our_models_do_not_hold(tiny):
    ldm = tiny.join()
    extras = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.rand(1000)}
    for tower in tiny.family.towers:
        prefix = tower.checkpoint_prefix
        if tower.checkpoint_layout == "clip":
            extras[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
            continue
        extras |= {prefix + name: torch.rand(3) for name in ("logit_scale", "attn_mask")}
        if not tower.projection:  # real SD2 files hold one more block than diffusers uses, and its head
            layers = tiny.configs[tower.component]["num_hidden_layers"]
            last = f"{prefix}transformer.resblocks.{layers - 1}."
            extras |= {
                key.replace(last, f"{prefix}transformer.resblocks.{layers}."): value + 1
                for key, value in under(ldm, last).items()
            }
            extras[prefix + "text_projection"] = torch.rand(3)
    split = tiny.split(ldm | extras)
    for component, weights in tiny.weights.items():
        assert_same(split[component], weights)


def test_big_g_keeps_all_its_blocks_and_sd2_drops_its_24th():
    sd2 = model_parts("full", "v2")
    block = "cond_stage_model.model.transformer.resblocks."
    ldm = sd2.join()
    last = under(ldm, block + "22.")
    ldm |= {key.replace(f"{block}22.", f"{block}23."): value for key, value in last.items()}
    assert _text_layers(sd2.split(ldm)) == {"text_encoder": 23}
    assert _text_layers(model_parts("full", "xl_base").split(full_join("xl_base"))) == {
        "text_encoder": 12,
        "text_encoder_2": 32,
    }


def _text_layers(split: dict[str, StateDict]) -> dict[str, int]:
    """How many transformer layers each tower of a split checkpoint holds."""
    return {
        component: len({match[1] for key in state if (match := re.search(r"encoder\.layers\.(\d+)\.", key))})
        for component, state in split.items()
        if component.startswith("text_encoder")
    }


def test_split_reads_v1_text_without_text_model_level():
    parts = model_parts("tiny", "v1")
    old_layout = {
        key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
        for key, value in parts.join().items()
    }
    assert_same(parts.split(old_layout)["text_encoder"], parts.weights["text_encoder"])


def test_split_rejects_keys_outside_the_config(tiny):
    ldm = tiny.join() | {UNET + "input_blocks.42.0.in_layers.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"UNet keys do not fit .*input_blocks\.42"):
        tiny.split(ldm)


def test_layouts_inferred_from_key_names_match_the_configs(parts):
    ldm = parts.join()
    unet_ldm = {k.removeprefix(UNET): v for k, v in under(ldm, UNET).items()}
    vae_ldm = {k.removeprefix(VAE): v for k, v in under(ldm, VAE).items()}
    unet_layout = UNetLayout.from_config(parts.configs["unet"])
    assert unet_layout.added_embedding == (parts.family.time_ids is not None)
    unet = parts.weights["unet"]
    assert UNetLayout.from_diffusers_keys(unet) == unet_layout == UNetLayout.from_ldm_keys(unet_ldm)
    vae_layout = VAELayout.from_config(parts.configs["vae"])
    vae = parts.weights["vae"]
    assert VAELayout.from_diffusers_keys(vae) == vae_layout == VAELayout.from_ldm_keys(vae_ldm)


def test_split_and_join_without_configs(parts):
    ldm = join_single_file(parts.weights, parts.family)
    assert sorted(ldm) == sorted(parts.join())
    split = split_single_file(ldm, parts.family)
    for component, weights in parts.weights.items():
        assert_same(split[component], weights)


def test_unknown_family_name_is_rejected():
    with pytest.raises(ValueError, match=r"unknown model family 'sdxl'; supported: 'v1'"):
        family_named("sdxl")


# ---- family detection ------------------------------------------------------------------------------


def test_detects_family(parts):
    assert detect_family(shapes_of(parts.join())) == parts.family.name


def test_detects_family_from_safetensors_header(tiny, tmp_path):
    ldm = {key: value.contiguous() for key, value in tiny.join().items()}
    path = tmp_path / "model.safetensors"
    save_file(ldm, path)
    shapes = read_header_shapes(path)
    assert shapes == shapes_of(ldm)
    assert detect_family(shapes) == tiny.family.name


def test_full_size_v2_file_with_its_24th_block_is_v2():
    shapes = full_shapes("v2") | {"cond_stage_model.model.transformer.resblocks.23.ln_1.weight": (1024,)}
    assert detect_family(shapes) == "v2"


def _rejected(shapes: Shapes, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as error:
        detect_family(shapes)
    assert "supported: 'v1'" in str(error.value)


def test_base_and_refiner_are_told_apart_by_where_big_g_sits():
    refiner = full_shapes("xl_refiner")
    moved = {key.replace("embedders.0.model.", "embedders.1.model."): shape for key, shape in refiner.items()}
    only_big_g = r"cannot tell the family: checkpoint holds conditioner\.embedders\.1\.model\.\*;"
    _rejected(moved, only_big_g)
    _rejected(outside(full_shapes("xl_base"), "conditioner.embedders.0."), only_big_g)


@pytest.mark.parametrize("family", ["v1", "v2", "xl_base"])
def test_rejects_inpainting_by_name(family):
    shapes = full_shapes(family) | {UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}
    label = {"v1": r"SD 1\.x", "v2": r"SD 2\.x", "xl_base": "SDXL base"}[family]
    _rejected(shapes, rf"UNet takes 9 input channels \({label} inpainting\)")


@pytest.mark.parametrize(("channels", "variant"), [(5, "depth-to-image"), (8, "instruct-pix2pix")])
def test_rejects_other_unet_variants_by_name(channels, variant):
    shapes = full_shapes("v1") | {UNET + "input_blocks.0.0.weight": (320, channels, 3, 3)}
    _rejected(shapes, rf"UNet takes {channels} input channels \(SD 1\.x {variant}\)")


def test_rejects_controlnet():
    controlnet = {
        "control_model.time_embed.0.weight": (1280, 320),
        "control_model.input_hint_block.0.weight": (16, 3, 3, 3),
        "control_model.zero_convs.0.0.weight": (320, 320, 1, 1),
    }
    _rejected(controlnet, r"checkpoint is a ControlNet \(control_model\.\*\)")
    _rejected(full_shapes("v1") | controlnet, r"checkpoint is a ControlNet")


def test_rejects_playground_v2_5():
    shapes = full_shapes("xl_base") | {"edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)}
    _rejected(shapes, r"checkpoint is Playground v2\.5 \(an EDM-trained SDXL: edm_mean / edm_std\)")


def test_rejects_checkpoint_without_unet():
    _rejected(outside(full_shapes("v1"), UNET), r"no UNet keys .*\['cond_stage_model', 'first_stage_model'\]")


@pytest.mark.parametrize(
    "dit",
    [
        {  # SD3 Medium: an MMDiT, its text encoders under text_encoders.*
            UNET + "x_embedder.proj.weight": (1536, 16, 2, 2),
            UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
            UNET + "pos_embed": (1, 36864, 1536),
            VAE + "encoder.conv_in.weight": (128, 3, 3, 3),
            "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        },
        {  # Flux
            UNET + "img_in.weight": (3072, 64),
            UNET + "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        },
    ],
    ids=["sd3", "flux"],
)
def test_rejects_transformer_denoiser(dit):
    _rejected(dit, r"so it is not a UNet \(e\.g\. a DiT such as SD3 or Flux\)")


def test_rejects_missing_or_doubled_text_encoder():
    _rejected(outside(full_shapes("v1"), *TEXT_ROOTS), "no text encoder keys")
    v2_text = under(full_shapes("v2"), *TEXT_ROOTS)
    _rejected(full_shapes("v1") | v2_text, r"holds cond_stage_model\.model\.\* and cond_stage_model\.trans")


@pytest.mark.parametrize(
    ("towers_of", "unet_of", "message"),
    [
        ("v1", "v2", r"SD 1\.x but the UNet's transformer proj_in is a Linear"),
        ("xl_base", "xl_refiner", r"SDXL base \(768 \+ 1280 wide\) but the UNet cross-attends to 1280-wide"),
        ("xl_refiner", "xl_base", r"SDXL refiner \(1280 wide\) but the UNet cross-attends to 2048-wide"),
        ("xl_base", "v2", r"SDXL base but its UNet lacks the added embedding"),
        ("v2", "xl_refiner", r"SD 2\.x but its UNet has the added embedding"),
    ],
)
def test_rejects_text_encoders_that_contradict_the_unet(towers_of, unet_of, message):
    shapes = outside(full_shapes(unet_of), *TEXT_ROOTS) | under(full_shapes(towers_of), *TEXT_ROOTS)
    _rejected(shapes, "contradictory checkpoint: its text encoders? looks? " + message)


def test_rejects_a_base_whose_added_embedding_reads_the_refiners_conditioning():
    shapes = full_shapes("xl_base") | {UNET + "label_emb.0.0.weight": (1280, 1280 + 5 * 256)}
    _rejected(shapes, r"SDXL base's added embedding reads the pooled text \(1280\) \+ 6 micro-conditioning")


def test_rejects_linear_projections_with_a_v1_text_encoder():
    shapes = {
        key: shape[:2] if key.endswith(("proj_in.weight", "proj_out.weight")) else shape
        for key, shape in full_shapes("v1").items()
    }
    _rejected(shapes, r"proj_in is a Linear, which SD 1\.x never uses")


# ---- bundled configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bundled_configs_build_the_models(family):
    configs, towers = bundled_config(family), family_named(family).towers
    assert sorted(configs) == sorted(
        ["scheduler", "unet", "vae"]
        + [name for tower in towers for name in (tower.component, tower.tokenizer)]
        + (["pipeline"] if family.startswith("xl_") else [])
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        AutoencoderKL.from_config(configs["vae"])
    assert sum(p.numel() for p in unet.parameters()) == FULL_UNET_PARAMS[family]
    widths = [CLIPTextConfig(**configs[tower.component]).hidden_size for tower in towers]
    assert configs["unet"]["cross_attention_dim"] == sum(widths)
    assert configs["vae"]["scaling_factor"] == (0.13025 if family.startswith("xl_") else 0.18215)
    scheduler = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(configs["scheduler"])
    assert scheduler.config.prediction_type == ("v_prediction" if family == "v2" else "epsilon")
    assert [configs[tower.tokenizer]["pad_token"] for tower in towers] == [t.pad_token for t in towers]


@pytest.mark.parametrize(("family", "micro_conditioning"), [("xl_base", 6), ("xl_refiner", 5)])
def test_bundled_sdxl_added_embedding_reads_pooled_text_and_micro_conditioning(family, micro_conditioning):
    configs = bundled_config(family)
    pooled = configs["text_encoder_2"]["projection_dim"]
    added = pooled + micro_conditioning * configs["unet"]["addition_time_embed_dim"]
    assert configs["unet"]["projection_class_embeddings_input_dim"] == added
    assert added == {"xl_base": 2816, "xl_refiner": 2560}[family]
    assert configs["pipeline"]["requires_aesthetics_score"] == (family == "xl_refiner")


def test_bundled_text_encoders_are_the_released_shapes():
    def shape(family: str, component: str) -> tuple:
        config = CLIPTextConfig(**bundled_config(family)[component])
        return (
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.hidden_act,
        )

    clip_l = (12, 768, 12, 3072, "quick_gelu")
    assert shape("v1", "text_encoder") == shape("xl_base", "text_encoder") == clip_l
    assert shape("v2", "text_encoder") == (23, 1024, 16, 4096, "gelu")
    big_g = (32, 1280, 20, 5120, "gelu")
    assert shape("xl_base", "text_encoder_2") == shape("xl_refiner", "text_encoder_2") == big_g
    assert bundled_config("xl_base")["text_encoder_2"]["projection_dim"] == 1280


def test_bundled_config_returns_fresh_copies():
    bundled_config("v1")["unet"]["in_channels"] = 9
    assert bundled_config("v1")["unet"]["in_channels"] == 4
    with pytest.raises(ValueError, match="unknown model family"):
        bundled_config("sdxl")
