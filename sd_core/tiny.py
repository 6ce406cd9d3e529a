"""Tiny random Stable Diffusion models written in the real diffusers folder layout.

Used by `make demo` and the tests: same architectures and file formats as SD1.x / SD2.x / SDXL, a few
million parameters, so everything runs on a laptop CPU without downloading weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_core.export import write_diffusers_folder
from sd_core.families import family_of_configs
from sd_core.model_files import TEXT_FOLDERS
from sd_core.tiny_configs import TINY_CONFIGS
from sd_core.tokenizer import bundled_tokenizer
from sd_core.unet import UNet, UNetConfig
from sd_core.vae import AutoencoderKL, VAEConfig


def make_tiny_model(folder: str | Path, family: str = "v1", seed: int = 0) -> Path:
    """Write a tiny random model of `family` ("v1", "v2", "xl_base", "xl_refiner") to `folder`."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"family must be one of {sorted(TINY_CONFIGS)}; got {family!r}")
    return write_random_model(folder, TINY_CONFIGS[family], seed)


def write_random_model(folder: str | Path, configs: dict, seed: int = 0) -> Path:
    """A seeded random model of `configs` (diffusers config.json dicts by component, plus tokenizer pad
    tokens and pipeline flags) in the diffusers folder layout; returns the folder."""
    text_components = [name for name in TEXT_FOLDERS if name in configs]
    family = family_of_configs(configs["unet"], {name: configs[name] for name in text_components})
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.from_dict(configs["unet"]))
    vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
    models = {"unet": unet, "vae": vae}
    written = {"unet": unet.config.to_dict(), "vae": vae.config.to_dict(), "scheduler": configs["scheduler"]}
    for tower in family.towers:
        fields = {k: v for k, v in configs[tower.component].items() if not k.startswith("_")}
        model_class = CLIPTextModelWithProjection if tower.projection else CLIPTextModel
        models[tower.component] = model_class(CLIPTextConfig(**fields))
        written[tower.component] = configs[tower.component]
    tokenizers = {t.tokenizer: bundled_tokenizer(configs[t.tokenizer]["pad_token"]) for t in family.towers}
    weights = {name: {k: v.contiguous() for k, v in m.state_dict().items()} for name, m in models.items()}
    folder = Path(folder)
    write_diffusers_folder(folder, family, written, weights, tokenizers, configs.get("pipeline"))
    return folder
