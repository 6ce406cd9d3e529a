"""Random Stable Diffusion models written by diffusers itself (the format's reference writer).

Shared by the test fixtures and the benchmarks; no import-time side effects (tests/conftest.py pins
torch to one thread, which a benchmark must not inherit).
"""

from __future__ import annotations

from pathlib import Path


def write_diffusers_model(folder: str | Path, configs: dict, seed: int = 0) -> Path:
    """diffusers' from_config with seeded default init for `configs` (config.json dicts by component),
    saved by its img2img pipeline's `save_pretrained` as safetensors (SDXL's when `configs` has a
    text_encoder_2); returns the folder."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_core.tokenizer import bundled_tokenizer

    torch.manual_seed(seed)
    scheduler_class = getattr(diffusers, configs["scheduler"]["_class_name"])
    components = {
        "unet": diffusers.UNet2DConditionModel.from_config(configs["unet"]),
        "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
        "scheduler": scheduler_class.from_config(configs["scheduler"]),
    }
    for name, tokenizer, model_class in (
        ("text_encoder", "tokenizer", CLIPTextModel),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
    ):
        fields = {k: v for k, v in configs.get(name, {}).items() if not k.startswith("_")}
        components[name] = model_class(CLIPTextConfig(**fields)) if fields else None
        components[tokenizer] = bundled_tokenizer(configs[tokenizer]["pad_token"]) if fields else None
    if "text_encoder_2" in configs:
        flags = configs.get("pipeline", {})
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**components, add_watermarker=False, **flags)
    else:
        del components["text_encoder_2"], components["tokenizer_2"]
        pipe = diffusers.StableDiffusionImg2ImgPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
