"""Which family a single-file checkpoint is, from its key names and shapes alone.

Detection reads only a safetensors header (`read_header_shapes`), so it costs nothing on multi-GB files.
A family is recognised by where its text towers sit (ComfyUI and diffusers look at the same prefixes),
then checked against the UNet's own shapes, so a contradictory file is refused rather than misloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

from safetensors import safe_open

from sd_core.families.catalog import FAMILIES, SUPPORTED, bundled_config
from sd_core.families.family import ModelFamily

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
ADDED_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's add_embedding.linear_1

Shapes = Mapping[str, tuple[int, ...]]

# key prefix -> what a checkpoint holding it is; none of them fits the families' key maps
_UNSUPPORTED_MARKERS = {
    "control_model.": "a ControlNet (control_model.*)",
    "edm_mean": "Playground v2.5 (an EDM-trained SDXL: edm_mean / edm_std)",
    "denoiser.sigmas": "an EDM / v-prediction SDXL variant (denoiser.sigmas)",
}
# UNet input channels -> the variant that has them (plain UNets take the 4 latent channels)
_INPUT_CHANNEL_VARIANTS = {5: "depth-to-image", 7: "x4 upscaler", 8: "instruct-pix2pix", 9: "inpainting"}
_UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"


def read_header_shapes(path: str | PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a .safetensors file, from its header; no tensor is read."""
    with safe_open(path, framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def detect_family(shapes: Shapes) -> str:
    """The family name ('v1', 'v2', 'xl_base', 'xl_refiner') of a CompVis/SGM-layout checkpoint's
    key -> shape map; ValueError naming what it is instead for anything else."""
    for prefix, what in _UNSUPPORTED_MARKERS.items():
        if any(key.startswith(prefix) for key in shapes):
            raise ValueError(f"checkpoint is {what}; {SUPPORTED}")
    _check_is_unet(shapes)
    family = _family_by_towers(shapes)
    _check_unet(shapes, family)
    _check_widths(shapes, family)
    return family.name


def _family_by_towers(shapes: Shapes) -> ModelFamily:
    prefixes = {prefix for family in FAMILIES.values() for prefix in _tower_prefixes(family)}
    present = {prefix for prefix in prefixes if any(key.startswith(prefix) for key in shapes)}
    found = [f for f in FAMILIES.values() if set(_tower_prefixes(f)) == present]
    if len(found) == 1:
        return found[0]
    if ADDED_EMBEDDING in shapes and not any(key.startswith("conditioner.") for key in shapes):
        raise ValueError(
            f"checkpoint is a class-conditioned UNet ({UNET_PREFIX}label_emb.* without SDXL's "
            f"conditioner.embedders.*: unCLIP); {SUPPORTED}"
        )
    what = " and ".join(f"{p}*" for p in sorted(present)) if present else "no text encoder keys"
    raise ValueError(f"cannot tell the family: checkpoint holds {what}; {SUPPORTED}")


def _tower_prefixes(family: ModelFamily) -> tuple[str, ...]:
    return tuple(tower.checkpoint_prefix for tower in family.towers)


def _check_is_unet(shapes: Shapes) -> None:
    """Before the towers are looked for: a DiT file (SD3, Flux) keeps its text encoders elsewhere."""
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        top = sorted({key.split(".")[0] for key in shapes})
        raise ValueError(f"no UNet keys ({UNET_PREFIX}*); top-level names in the file: {top}; {SUPPORTED}")
    if _UNET_CONV_IN not in shapes:
        examples = sorted(key for key in shapes if key.startswith(UNET_PREFIX))[:3]
        raise ValueError(
            f"{UNET_PREFIX}* holds no {_UNET_CONV_IN}, so it is not a UNet "
            f"(e.g. a DiT such as SD3 or Flux); found {examples}; {SUPPORTED}"
        )


def _check_unet(shapes: Shapes, family: ModelFamily) -> None:
    in_channels = shapes[_UNET_CONV_IN][1]
    if in_channels != 4:
        variant = _INPUT_CHANNEL_VARIANTS.get(in_channels, "an unknown variant")
        raise ValueError(
            f"UNet takes {in_channels} input channels ({family.label} {variant}); only the 4-channel "
            f"text-to-image UNets run img2img here; {SUPPORTED}"
        )
    if (ADDED_EMBEDDING in shapes) != (family.time_ids is not None):
        has = "has" if ADDED_EMBEDDING in shapes else "lacks"
        raise ValueError(
            f"contradictory checkpoint: its text encoders look {family.label} but its UNet {has} the added "
            f"embedding ({ADDED_EMBEDDING}) that {family.label} UNets "
            f"{'have' if family.time_ids else 'never have'}; {SUPPORTED}"
        )
    linear_proj_in = len(_first_shape(shapes, UNET_PREFIX, "proj_in.weight")) == 2
    if linear_proj_in != bundled_config(family.name)["unet"]["use_linear_projection"]:
        kind = "Linear" if linear_proj_in else "1x1 conv"
        raise ValueError(
            f"contradictory checkpoint: its text encoder looks {family.label} but the UNet's transformer "
            f"proj_in is a {kind}, which {family.label} never uses; {SUPPORTED}"
        )


def _check_widths(shapes: Shapes, family: ModelFamily) -> None:
    """The UNet cross-attends to the towers' concatenated width, and SDXL's added embedding reads the
    pooled vector plus its micro-conditioning."""
    widths = [_first_shape(shapes, t.checkpoint_prefix, "token_embedding.weight")[1] for t in family.towers]
    cross_width = _first_shape(shapes, UNET_PREFIX, "attn2.to_k.weight")[1]
    if cross_width != sum(widths):
        raise ValueError(
            f"contradictory checkpoint: its text encoders look {family.label} ({' + '.join(map(str, widths))}"
            f" wide) but the UNet cross-attends to {cross_width}-wide text; {SUPPORTED}"
        )
    if family.time_ids is None:
        return
    pooled_width = _first_shape(shapes, family.pooled_tower.checkpoint_prefix, "text_projection")[-1]
    # the time-embedding width of each value (256 in SDXL) is no weight's shape, so only divisibility shows
    added_width, values = shapes[ADDED_EMBEDDING][1], family.time_ids.width
    if added_width <= pooled_width or (added_width - pooled_width) % values:
        raise ValueError(
            f"contradictory checkpoint: {family.label}'s added embedding reads the pooled text "
            f"({pooled_width}) + {values} micro-conditioning values x a time-embedding width, but "
            f"{ADDED_EMBEDDING} takes {added_width}; {SUPPORTED}"
        )


def _first_shape(shapes: Shapes, prefix: str, suffix: str) -> tuple[int, ...]:
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith(suffix):
            return tuple(shape)
    raise ValueError(f"checkpoint has no {prefix}*{suffix}; {SUPPORTED}")
