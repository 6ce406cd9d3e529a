"""A CompVis/SGM single-file checkpoint <-> the state dicts of our UNet, VAE and text towers.

UNet and VAE keys are diffusers' (`UNet2DConditionModel`, `AutoencoderKL`); text towers use transformers
5's keys (a flat CLIPTextModel; CLIPTextModelWithProjection's `text_model.*` + `text_projection.weight`).
Where each tower sits in the file and in which layout (transformers' own, or OpenCLIP's with fused q/k/v
and the projection stored transposed) is its family's `TextTower`. `join_single_file` is the exact
inverse of `split_single_file`. The UNet/VAE layouts come from their configs when given, else from the
key names being converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sd_core.clip_keys import clip_to_flat, flat_to_clip, flat_to_openclip, openclip_to_flat
from sd_core.families import UNET_PREFIX, VAE_PREFIX, ModelFamily, TextTower
from sd_core.ldm_keys import UNetLayout, VAELayout, unet_key_map, vae_key_map

StateDict = Mapping[str, torch.Tensor]
Config = Mapping[str, Any]

OPENCLIP_PROJECTION = "text_projection"  # [width, projection], applied as x @ P
HF_PROJECTION = "text_projection.weight"  # its transpose, a Linear's weight
_NESTED = "text_model."


def split_single_file(
    ldm_state_dict: StateDict, family: ModelFamily, configs: Mapping[str, Config] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet", "vae", <each tower's component>} state dicts.

    Keys outside the family's prefixes (EMA copies, DDPM schedule buffers) are ignored; so are position-id
    buffers, OpenCLIP's contrastive head where the tower has no projection, and text blocks past the
    tower config's `num_hidden_layers` (diffusers' SD2 uses 23 of 24)."""
    configs = configs or {}
    unet, vae = _under(ldm_state_dict, UNET_PREFIX), _under(ldm_state_dict, VAE_PREFIX)
    unet_layout, vae_layout = _layouts(configs, unet, vae, UNetLayout.from_ldm_keys, VAELayout.from_ldm_keys)
    parts = {
        "unet": unet_key_map(unet_layout).to_diffusers(unet),
        "vae": vae_key_map(vae_layout).to_diffusers(vae),
    }
    for tower in family.towers:
        text = _under(ldm_state_dict, tower.checkpoint_prefix)
        parts[tower.component] = _tower_from_ldm(text, tower, configs.get(tower.component))
    return parts


def join_single_file(
    weights: Mapping[str, StateDict], family: ModelFamily, configs: Mapping[str, Config] | None = None
) -> dict[str, torch.Tensor]:
    """One CompVis/SGM-layout state dict, as A1111, ComfyUI and diffusers' `from_single_file` read them."""
    configs = configs or {}
    unet_sd, vae_sd = weights["unet"], weights["vae"]
    unet_layout, vae_layout = _layouts(
        configs, unet_sd, vae_sd, UNetLayout.from_diffusers_keys, VAELayout.from_diffusers_keys
    )
    joined = _prefixed(UNET_PREFIX, unet_key_map(unet_layout).to_ldm(unet_sd))
    joined |= _prefixed(VAE_PREFIX, vae_key_map(vae_layout).to_ldm(vae_sd))
    for tower in family.towers:
        joined |= _prefixed(tower.checkpoint_prefix, _tower_to_ldm(weights[tower.component], tower))
    return joined


def _layouts(
    configs: Mapping[str, Config], unet: StateDict, vae: StateDict, unet_from_keys, vae_from_keys
) -> tuple[UNetLayout, VAELayout]:
    """The UNet and VAE layouts from their configs, or else from the key names of their state dicts."""
    unet_layout = UNetLayout.from_config(configs["unet"]) if "unet" in configs else unet_from_keys(unet)
    vae_layout = VAELayout.from_config(configs["vae"]) if "vae" in configs else vae_from_keys(vae)
    return unet_layout, vae_layout


def _tower_from_ldm(text: StateDict, tower: TextTower, config: Config | None) -> dict[str, torch.Tensor]:
    """A tower's single-file keys -> the keys its transformers model class loads."""
    if tower.checkpoint_layout == "clip":
        flat = clip_to_flat(text)
    else:
        num_layers = config["num_hidden_layers"] if config else _openclip_blocks(text)
        flat = openclip_to_flat(text, num_layers)
        if tower.projection:
            flat[HF_PROJECTION] = text[OPENCLIP_PROJECTION].T.contiguous()
    if not tower.projection:
        return flat
    return {key if key == HF_PROJECTION else _NESTED + key: value for key, value in flat.items()}


def _tower_to_ldm(state_dict: StateDict, tower: TextTower) -> dict[str, torch.Tensor]:
    flat = {key.removeprefix(_NESTED): value for key, value in state_dict.items()}
    projection = flat.pop(HF_PROJECTION, None)
    if tower.checkpoint_layout == "clip":
        return flat_to_clip(flat)
    ldm = flat_to_openclip(flat)
    if projection is not None:
        ldm[OPENCLIP_PROJECTION] = projection.T.contiguous()
    return ldm


def _openclip_blocks(text: StateDict) -> int:
    """How many transformer blocks an OpenCLIP tower holds (all of them are used without a config)."""
    blocks = {key.split(".")[2] for key in text if key.startswith("transformer.resblocks.")}
    return len(blocks)


def _under(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def _prefixed(prefix: str, state_dict: StateDict) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}
