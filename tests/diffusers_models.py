"""Random Stable Diffusion models written by diffusers itself (the format's reference writer).

Shared by the test fixtures and the benchmarks; no import-time side effects (tests/conftest.py pins
torch to one thread, which a benchmark must not inherit).
"""

from __future__ import annotations

from pathlib import Path


def write_diffusers_model(folder: str | Path, configs: dict, seed: int = 0) -> Path:
    """diffusers' from_config with seeded default init for `configs` (config.json dicts by component),
    saved by `StableDiffusionImg2ImgPipeline.save_pretrained` as safetensors; returns the folder."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_core.tokenizer import bundled_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    vae = diffusers.AutoencoderKL.from_config(configs["vae"])
    text_fields = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_fields))
    scheduler_cls = getattr(diffusers, configs["scheduler"]["_class_name"])
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=bundled_tokenizer(configs["tokenizer"]["pad_token"]),
        unet=unet,
        scheduler=scheduler_cls.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
