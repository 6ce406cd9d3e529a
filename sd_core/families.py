"""Which Stable Diffusion family a single-file checkpoint is, from its key names and shapes alone.

Detection reads only a safetensors header (`read_header_shapes`), so it costs nothing on multi-GB files.
Each family ships its diffusers/transformers configs under `sd_core/configs/<family>/` (`bundled_config`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from typing import Any

from safetensors import safe_open

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

BUNDLED_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    text_prefix: str  # where the text encoder lives in a CompVis checkpoint
    token_embedding: str  # text key whose shape[1] is the text width = the UNet's cross-attention width
    linear_proj_in: bool  # SD2 trained its UNet transformers with Linear proj_in/proj_out, SD1 with 1x1 convs


FAMILIES = {
    family.name: family
    for family in (
        Family(
            "v1",
            "SD 1.x (CLIP ViT-L/14 text encoder under cond_stage_model.transformer.*)",
            "cond_stage_model.transformer.",
            "embeddings.token_embedding.weight",
            linear_proj_in=False,
        ),
        Family(
            "v2",
            "SD 2.x (OpenCLIP ViT-H text encoder under cond_stage_model.model.*)",
            "cond_stage_model.model.",
            "token_embedding.weight",
            linear_proj_in=True,
        ),
    )
}
SUPPORTED = "supported: " + "; ".join(f"'{f.name}' = {f.description}" for f in FAMILIES.values())

# key prefix -> what a checkpoint holding it is; none of them fits the SD1/SD2 key maps
_UNSUPPORTED_MARKERS = {
    "conditioner.embedders.": "an SDXL-style checkpoint (conditioner.embedders.*)",
    UNET_PREFIX + "label_emb.": "a class-conditioned UNet (model.diffusion_model.label_emb.*: unCLIP)",
    "control_model.": "a ControlNet (control_model.*)",
}
# UNet input channels -> the variant that has them (plain SD UNets take the 4 latent channels)
_INPUT_CHANNEL_VARIANTS = {5: "depth-to-image", 7: "x4 upscaler", 8: "instruct-pix2pix", 9: "inpainting"}
_UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"


def read_header_shapes(path: str | PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a .safetensors file, from its header; no tensor is read."""
    with safe_open(path, framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'v1' or 'v2' for a CompVis-layout checkpoint's key -> shape map; ValueError for anything else."""
    for prefix, what in _UNSUPPORTED_MARKERS.items():
        if any(key.startswith(prefix) for key in shapes):
            raise ValueError(f"checkpoint is {what}; {SUPPORTED}")
    _check_unet(shapes)
    family = _text_family(shapes)

    text_width = _first_shape(shapes, family.text_prefix, family.token_embedding)[1]
    cross_width = _first_shape(shapes, UNET_PREFIX, "attn2.to_k.weight")[1]
    if cross_width != text_width:
        raise ValueError(
            f"contradictory checkpoint: its text encoder looks {family.name} ({text_width} wide) "
            f"but the UNet cross-attends to {cross_width}-wide text (SD1: 768, SD2: 1024); {SUPPORTED}"
        )
    linear_proj_in = len(_first_shape(shapes, UNET_PREFIX, "proj_in.weight")) == 2
    if linear_proj_in != family.linear_proj_in:
        kind = "Linear" if linear_proj_in else "1x1 conv"
        raise ValueError(
            f"contradictory checkpoint: its text encoder looks {family.name} but the UNet's transformer "
            f"proj_in is a {kind}, which {family.name} never uses; {SUPPORTED}"
        )
    return family.name


def _check_unet(shapes: Mapping[str, tuple[int, ...]]) -> None:
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        prefixes = sorted({key.split(".")[0] for key in shapes})
        raise ValueError(
            f"no UNet keys ({UNET_PREFIX}*); the checkpoint's top-level names: {prefixes}; {SUPPORTED}"
        )
    if _UNET_CONV_IN not in shapes:
        examples = sorted(key for key in shapes if key.startswith(UNET_PREFIX))[:3]
        raise ValueError(
            f"{UNET_PREFIX}* holds no {_UNET_CONV_IN}, so it is not an SD1/SD2 UNet "
            f"(e.g. a DiT such as SD3 or Flux); found {examples}; {SUPPORTED}"
        )
    in_channels = shapes[_UNET_CONV_IN][1]
    if in_channels != 4:
        variant = _INPUT_CHANNEL_VARIANTS.get(in_channels, "an unknown variant")
        raise ValueError(
            f"UNet takes {in_channels} input channels ({variant}); only the 4-channel text-to-image UNets "
            f"of SD1/SD2 run img2img here; {SUPPORTED}"
        )


def _text_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    found = [f for f in FAMILIES.values() if any(key.startswith(f.text_prefix) for key in shapes)]
    if len(found) != 1:
        what = " and ".join(f"{f.text_prefix}*" for f in found) if found else "no text encoder keys"
        raise ValueError(f"cannot tell the family: checkpoint holds {what}; {SUPPORTED}")
    return found[0]


def _first_shape(shapes: Mapping[str, tuple[int, ...]], prefix: str, suffix: str) -> tuple[int, ...]:
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith(suffix):
            return tuple(shape)
    raise ValueError(f"checkpoint has no {prefix}*{suffix}; {SUPPORTED}")


def bundled_config(family: str) -> dict[str, dict[str, Any]]:
    """Fresh copies of the family's diffusers/transformers configs, keyed by component."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; {SUPPORTED}")
    folder = resources.files("sd_core").joinpath("configs").joinpath(family)
    return {name: json.loads(folder.joinpath(f"{name}.json").read_text()) for name in BUNDLED_COMPONENTS}
