"""Writing a pipeline back out: a diffusers folder, or one CompVis-layout single-file checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from sd_core.checkpoint_keys import join_single_file
from sd_core.loading import CONFIG_METADATA_KEY
from sd_core.tokenizer import clip_vocab_and_merges


def _tensors(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_diffusers_folder(
    folder: Path,
    configs: dict[str, dict],
    weights: dict[str, dict[str, torch.Tensor]],
    tokenizer: CLIPTokenizer,
) -> None:
    """The layout of diffusers' `save_pretrained` (safetensors weights, no safety checker)."""
    scheduler_class = configs["scheduler"].get("_class_name", "PNDMScheduler")
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionImg2ImgPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    for name, weight_file in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        _write_json(folder / name / "config.json", configs[name])
        save_file(weights[name], str(folder / name / f"{weight_file}.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def added_tokens(tokenizer: CLIPTokenizer) -> list[str]:
    """Tokens added on top of the CLIP vocabulary (textual inversion), in id order."""
    base = len(clip_vocab_and_merges()[0])
    return [
        tok for tok, i in sorted(tokenizer.added_tokens_encoder.items(), key=lambda kv: kv[1]) if i >= base
    ]


def pipeline_configs(pipe) -> dict[str, dict]:
    return {
        "unet": pipe.unet.config.to_dict(),
        "vae": pipe.vae.config.to_dict(),
        # textual inversion grows the embedding matrix (and config.vocab_size) past the original config's
        "text_encoder": {**pipe.text_config, "vocab_size": pipe.text_encoder.config.vocab_size},
        "scheduler": dict(pipe.scheduler_config),
    }


def save_diffusers_folder(pipe, folder: Path, dtype: torch.dtype | None = None) -> None:
    weights = {
        "unet": _tensors(pipe.unet, dtype),
        "vae": _tensors(pipe.vae, dtype),
        "text_encoder": _tensors(pipe.text_encoder, dtype),
    }
    write_diffusers_folder(folder, pipeline_configs(pipe), weights, pipe.tokenizer)


def save_single_file(pipe, path: Path, dtype: torch.dtype | None = None) -> None:
    """CompVis/A1111 layout; our configs ride along in the safetensors metadata so the file reloads
    exactly, even for non-standard architectures. Other tools ignore that metadata."""
    configs = pipeline_configs(pipe)
    state = join_single_file(
        _tensors(pipe.unet, dtype),
        _tensors(pipe.vae, dtype),
        _tensors(pipe.text_encoder, dtype),
        pipe.family,
        unet_config=configs["unet"],
        vae_config=configs["vae"],
    )
    configs["tokenizer"] = {
        "pad_token": pipe.tokenizer.pad_token,
        "added_tokens": added_tokens(pipe.tokenizer),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(configs)})
