"""Tiny random Stable Diffusion models written in the real diffusers folder layout.

Used by `make demo` and the tests: same architectures and file formats as SD1.x / SD2.x, a few
million parameters, so everything runs on a laptop CPU without downloading weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sd_core.export import write_diffusers_folder
from sd_core.tiny_configs import TINY_CONFIGS
from sd_core.tokenizer import bundled_tokenizer
from sd_core.unet import UNet, UNetConfig
from sd_core.vae import AutoencoderKL, VAEConfig


def make_tiny_model(folder: str | Path, family: str = "v1", seed: int = 0) -> Path:
    """Write a tiny random SD1-style ("v1") or SD2-style ("v2") model to `folder`; returns the folder."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"family must be one of {sorted(TINY_CONFIGS)}; got {family!r}")
    return write_random_model(folder, TINY_CONFIGS[family], seed)


def write_random_model(folder: str | Path, configs: dict, seed: int = 0) -> Path:
    """A seeded random model of `configs` (diffusers config.json dicts by component) in the diffusers
    folder layout; returns the folder."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.from_dict(configs["unet"]))
    vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
    text_fields = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    text_model = CLIPTextModel(CLIPTextConfig(**text_fields))
    folder = Path(folder)
    write_diffusers_folder(
        folder,
        {
            "unet": unet.config.to_dict(),
            "vae": vae.config.to_dict(),
            "text_encoder": configs["text_encoder"],
            "scheduler": configs["scheduler"],
        },
        {
            "unet": {k: v.contiguous() for k, v in unet.state_dict().items()},
            "vae": {k: v.contiguous() for k, v in vae.state_dict().items()},
            "text_encoder": {k: v.contiguous() for k, v in text_model.state_dict().items()},
        },
        bundled_tokenizer(configs["tokenizer"]["pad_token"]),
    )
    return folder
