"""The families sdbatch runs, and which one a diffusers folder or a name is.

Sources for the SDXL entries: Stability's sgm configs (`sd_xl_base.yaml`, `sd_xl_refiner.yaml`) and
diffusers 0.42's `StableDiffusionXLImg2ImgPipeline` (text encoding, `_get_add_time_ids`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from sd_core.families.family import ModelFamily, TextTower, TimeIds

CLIP_PAD = "<|endoftext|>"
OPENCLIP_PAD = "!"

_SD_TOWER = dict(component="text_encoder", tokenizer="tokenizer", projection=False, layer_offset=0)
SD1 = ModelFamily(
    name="v1",
    label="SD 1.x",
    towers=(
        TextTower(
            **_SD_TOWER,
            hidden_act="quick_gelu",
            final_layer_norm=True,
            checkpoint_prefix="cond_stage_model.transformer.",
            checkpoint_layout="clip",
            pad_token=CLIP_PAD,
            kohya_prefixes=("lora_te_",),
            embedding_key=None,
        ),
    ),
)
SD2 = ModelFamily(
    name="v2",
    label="SD 2.x",
    towers=(
        TextTower(
            **_SD_TOWER,
            hidden_act="gelu",
            final_layer_norm=True,
            checkpoint_prefix="cond_stage_model.model.",
            checkpoint_layout="open_clip",
            pad_token=OPENCLIP_PAD,
            kohya_prefixes=("lora_te_",),
            embedding_key=None,
        ),
    ),
)

_XL_PENULTIMATE = dict(layer_offset=1, final_layer_norm=False)
_XL_CLIP_L = TextTower(
    component="text_encoder",
    tokenizer="tokenizer",
    hidden_act="quick_gelu",
    projection=False,
    **_XL_PENULTIMATE,
    checkpoint_prefix="conditioner.embedders.0.transformer.",
    checkpoint_layout="clip",
    pad_token=CLIP_PAD,
    kohya_prefixes=("lora_te1_",),
    embedding_key="clip_l",
)
_XL_BIG_G = dict(
    component="text_encoder_2",
    tokenizer="tokenizer_2",
    hidden_act="gelu",
    projection=True,
    **_XL_PENULTIMATE,
    checkpoint_layout="open_clip",
    pad_token=OPENCLIP_PAD,
    embedding_key="clip_g",
)
SDXL_BASE = ModelFamily(
    name="xl_base",
    label="SDXL base",
    towers=(
        _XL_CLIP_L,
        TextTower(
            **_XL_BIG_G, checkpoint_prefix="conditioner.embedders.1.model.", kohya_prefixes=("lora_te2_",)
        ),
    ),
    time_ids=TimeIds(
        positive=("original_size", "crops_coords_top_left", "target_size"),
        negative=("negative_original_size", "crops_coords_top_left", "negative_target_size"),
    ),
    zero_negatives=True,
    vae_force_upcast=True,
)
SDXL_REFINER = ModelFamily(
    name="xl_refiner",
    label="SDXL refiner",
    # ComfyUI names a refiner's one text encoder lora_te_, diffusers text_encoder_2 (kohya's lora_te2_)
    towers=(
        TextTower(
            **_XL_BIG_G,
            checkpoint_prefix="conditioner.embedders.0.model.",
            kohya_prefixes=("lora_te2_", "lora_te_"),
        ),
    ),
    time_ids=TimeIds(
        positive=("original_size", "crops_coords_top_left", "aesthetic_score"),
        negative=("negative_original_size", "negative_crops_coords_top_left", "negative_aesthetic_score"),
    ),
    vae_force_upcast=True,
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SD2, SDXL_BASE, SDXL_REFINER)}
SUPPORTED = "supported: " + "; ".join(f"'{f.name}' = {f.description}" for f in FAMILIES.values())


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; {SUPPORTED}")
    return FAMILIES[name]


def family_of_configs(
    unet_config: Mapping[str, Any], text_configs: Mapping[str, Mapping[str, Any]]
) -> ModelFamily:
    """The family of a diffusers folder from its UNet config and the configs of the text encoders it holds
    (component -> config.json dict): which towers are there, what each is, and whether the UNet takes
    SDXL's added embedding."""
    text_time = unet_config.get("addition_embed_type") == "text_time"
    present = {component: config.get("hidden_act") for component, config in text_configs.items()}
    for family in FAMILIES.values():
        towers = {tower.component: tower.hidden_act for tower in family.towers}
        if towers == present and (family.time_ids is not None) == text_time:
            return family
    held = ", ".join(f"{c} ({act})" for c, act in sorted(present.items())) or "no text encoder"
    kind = "an SDXL-style UNet (addition_embed_type 'text_time')" if text_time else "an SD1/SD2-style UNet"
    raise ValueError(f"a model folder with {kind} and {held} is no family sdbatch knows; {SUPPORTED}")


def bundled_config(family: str) -> dict[str, dict[str, Any]]:
    """Fresh copies of the family's standard configs (diffusers / transformers config.json dicts, plus the
    tokenizers' pad tokens and the pipeline flags), keyed by component."""
    folder = resources.files("sd_core").joinpath("configs").joinpath(family_named(family).name)
    return {
        entry.name.removesuffix(".json"): json.loads(entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }
