"""A CompVis/A1111 single-file checkpoint <-> the UNet, VAE and text-encoder state dicts our modules load.

UNet and VAE keys are diffusers' (`UNet2DConditionModel`, `AutoencoderKL`); text-encoder keys are
transformers 5 CLIPTextModel's flat ones. `join_single_file` is the exact inverse of `split_single_file`.
The UNet/VAE layouts come from their diffusers configs when given, else from the key names being converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sd_core.clip_keys import clip_to_flat, flat_to_clip, flat_to_openclip, openclip_to_flat
from sd_core.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, Family
from sd_core.ldm_keys import UNetLayout, VAELayout, unet_key_map, vae_key_map

StateDict = Mapping[str, torch.Tensor]
Config = Mapping[str, Any]


def split_single_file(
    ldm_state_dict: StateDict,
    family: str,
    text_config: Config,
    *,
    unet_config: Config | None = None,
    vae_config: Config | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet", "vae", "text_encoder"} state dicts.

    Keys outside the three prefixes (EMA copies, DDPM schedule buffers) are ignored; so are position-id
    buffers, OpenCLIP's projection head, and text blocks past `text_config["num_hidden_layers"]`.
    """
    text_prefix = _family(family).text_prefix
    unet, vae, text = (_under(ldm_state_dict, prefix) for prefix in (UNET_PREFIX, VAE_PREFIX, text_prefix))
    unet_layout = UNetLayout.from_config(unet_config) if unet_config else UNetLayout.from_ldm_keys(unet)
    vae_layout = VAELayout.from_config(vae_config) if vae_config else VAELayout.from_ldm_keys(vae)
    return {
        "unet": unet_key_map(unet_layout).to_diffusers(unet),
        "vae": vae_key_map(vae_layout).to_diffusers(vae),
        "text_encoder": (
            clip_to_flat(text) if family == "v1" else openclip_to_flat(text, text_config["num_hidden_layers"])
        ),
    }


def join_single_file(
    unet_sd: StateDict,
    vae_sd: StateDict,
    text_sd: StateDict,
    family: str,
    *,
    unet_config: Config | None = None,
    vae_config: Config | None = None,
) -> dict[str, torch.Tensor]:
    """One CompVis-layout state dict, as A1111 and diffusers' `from_single_file` read them."""
    text_prefix = _family(family).text_prefix
    unet_layout = (
        UNetLayout.from_config(unet_config) if unet_config else UNetLayout.from_diffusers_keys(unet_sd)
    )
    vae_layout = VAELayout.from_config(vae_config) if vae_config else VAELayout.from_diffusers_keys(vae_sd)
    text = flat_to_clip(text_sd) if family == "v1" else flat_to_openclip(text_sd)
    return (
        _prefixed(UNET_PREFIX, unet_key_map(unet_layout).to_ldm(unet_sd))
        | _prefixed(VAE_PREFIX, vae_key_map(vae_layout).to_ldm(vae_sd))
        | _prefixed(text_prefix, text)
    )


def _family(family: str) -> Family:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def _under(state_dict: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def _prefixed(prefix: str, state_dict: StateDict) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}
