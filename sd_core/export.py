"""Writing a pipeline back out: a diffusers folder, or one CompVis/SGM-layout single-file checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from sd_core.checkpoint_keys import join_single_file
from sd_core.families import ModelFamily
from sd_core.loading import CONFIG_METADATA_KEY
from sd_core.model_files import TEXT_FOLDERS, WEIGHT_STEMS
from sd_core.tokenizer import clip_vocab_and_merges

_TEXT_CLASSES = {False: "CLIPTextModel", True: "CLIPTextModelWithProjection"}


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


def model_index(family: ModelFamily, scheduler_class: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The model_index.json diffusers' `save_pretrained` writes for the family's img2img pipeline."""
    sdxl = family.time_ids is not None
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if sdxl else "StableDiffusionImg2ImgPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    towers = {tower.component: tower for tower in family.towers}
    for component, tokenizer in TEXT_FOLDERS.items():
        tower = towers.get(component)
        if tower is None and not sdxl:
            continue
        index[component] = ["transformers", _TEXT_CLASSES[tower.projection]] if tower else [None, None]
        index[tokenizer] = ["transformers", "CLIPTokenizer"] if tower else [None, None]
    if sdxl:
        index.update(flags)
    else:
        index.update({"requires_safety_checker": False, "safety_checker": [None, None]})
    return index


def write_diffusers_folder(
    folder: Path,
    family: ModelFamily,
    configs: Mapping[str, dict],
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    tokenizers: Mapping[str, CLIPTokenizer],
    flags: Mapping[str, Any] | None = None,
) -> None:
    """The layout of diffusers' `save_pretrained` (safetensors weights, no safety checker)."""
    scheduler_class = configs["scheduler"].get("_class_name", "PNDMScheduler")
    _write_json(folder / "model_index.json", model_index(family, scheduler_class, flags or {}))
    for name in family.components:
        _write_json(folder / name / "config.json", configs[name])
        path = folder / name / f"{WEIGHT_STEMS[name]}.safetensors"
        save_file(dict(weights[name]), str(path), metadata={"format": "pt"})
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    for tower in family.towers:
        tokenizers[tower.tokenizer].save_pretrained(str(folder / tower.tokenizer))


def added_tokens(tokenizer: CLIPTokenizer) -> list[str]:
    """Tokens added on top of the CLIP vocabulary (textual inversion), in id order."""
    base = len(clip_vocab_and_merges()[0])
    return [
        tok for tok, i in sorted(tokenizer.added_tokens_encoder.items(), key=lambda kv: kv[1]) if i >= base
    ]


def pipeline_configs(pipe) -> dict[str, dict]:
    configs = {
        "unet": pipe.unet.config.to_dict(),
        "vae": pipe.vae.config.to_dict(),
        "scheduler": dict(pipe.scheduler_config),
    }
    for component, model in pipe.text_encoders.items():
        # textual inversion grows the embedding matrix (and config.vocab_size) past the original config's
        configs[component] = {**pipe.configs[component], "vocab_size": model.config.vocab_size}
    return configs


def _weights(pipe, dtype: torch.dtype | None) -> dict[str, dict[str, torch.Tensor]]:
    weights = {"unet": _tensors(pipe.unet, dtype), "vae": _tensors(pipe.vae, dtype)}
    weights.update({name: _tensors(model, dtype) for name, model in pipe.text_encoders.items()})
    return weights


def save_diffusers_folder(pipe, folder: Path, dtype: torch.dtype | None = None) -> None:
    configs, weights = pipeline_configs(pipe), _weights(pipe, dtype)
    write_diffusers_folder(folder, pipe.family, configs, weights, pipe.tokenizers, pipe.pipeline_flags)


def save_single_file(pipe, path: Path, dtype: torch.dtype | None = None) -> None:
    """CompVis/SGM layout; our configs ride along in the safetensors metadata so the file reloads exactly,
    even for non-standard architectures. Other tools ignore that metadata."""
    configs = pipeline_configs(pipe)
    state = join_single_file(_weights(pipe, dtype), pipe.family, configs)
    for name, tokenizer in pipe.tokenizers.items():
        configs[name] = {"pad_token": tokenizer.pad_token, "added_tokens": added_tokens(tokenizer)}
    configs["pipeline"] = dict(pipe.pipeline_flags)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(configs)})
