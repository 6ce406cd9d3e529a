"""Reading models: diffusers folders and CompVis/SGM (A1111, ComfyUI) single files, safetensors first.

Pickle files (.ckpt, .bin, .pt, .pth) can run arbitrary code when unpickled, so they are refused
unless the caller opts in; then they are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sd_core.checkpoint_keys import split_single_file
from sd_core.families import ModelFamily, bundled_config, detect_family, family_named, family_of_configs
from sd_core.model_files import CONFIG_METADATA_KEY as CONFIG_METADATA_KEY
from sd_core.model_files import PICKLE_SUFFIXES as PICKLE_SUFFIXES
from sd_core.model_files import (  # the "X as X" names are re-exported: other modules import them from here
    REQUIRED_FOLDERS,
    check_weight_format,
    component_weight_file,
    present_text_folders,
    single_file_configs,
)
from sd_core.model_files import refuse_pickle as refuse_pickle
from sd_core.tokenizer import bundled_tokenizer, load_tokenizer
from sd_core.unet import UNetConfig
from sd_core.vae import rename_legacy_vae_keys

PIPELINE_FLAGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")  # model_index.json's


@dataclass
class ModelParts:
    """Everything needed to build a pipeline, read from disk but not yet turned into modules."""

    family: ModelFamily
    configs: dict[str, dict]  # unet / vae / scheduler / each tower's config.json dict
    weights: dict[str, dict[str, torch.Tensor]]  # unet / vae / each tower's state dict
    tokenizers: dict[str, CLIPTokenizer]  # "tokenizer" / "tokenizer_2"
    source: str
    flags: dict[str, Any] = field(default_factory=dict)  # model_index.json's pipeline flags

    @property
    def zero_negatives(self) -> bool:
        """diffusers' force_zeros_for_empty_prompt: the model's own setting, else the family's."""
        return bool(self.flags.get("force_zeros_for_empty_prompt", self.family.zero_negatives))


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a pickle when `allow_pickle` is set."""
    check_weight_format(path, allow_pickle)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def patch_scheduler_config(config: dict) -> dict:
    """diffusers' img2img pipelines force steps_offset=1 and clip_sample=False on load: do the same."""
    patched = dict(config)
    patched["steps_offset"] = 1
    if patched.get("clip_sample", patched.get("_class_name") in ("DDIMScheduler", "DDPMScheduler")):
        patched["clip_sample"] = False
    return patched


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return json.loads(path.read_text())


def read_folder_configs(folder: Path) -> tuple[ModelFamily, dict[str, dict]]:
    """The family of a diffusers folder and its unet / vae / scheduler / text-encoder configs (scheduler
    patched as diffusers' pipelines patch it)."""
    missing = [name for name in REQUIRED_FOLDERS if not (folder / name).is_dir()]
    model_index = _model_index(folder)
    text_folders = present_text_folders((p.name for p in folder.iterdir() if p.is_dir()), model_index)
    if missing or not text_folders:
        needed = [*missing, *([] if text_folders else ["text_encoder"])]
        raise FileNotFoundError(
            f"model folder {folder} lacks {', '.join(m + '/' for m in needed)}; a diffusers Stable "
            "Diffusion folder holds unet/, vae/, scheduler/ and text_encoder/ + tokenizer/ (SDXL also "
            "text_encoder_2/ + tokenizer_2/; SDXL's refiner only those), as written by save_pretrained"
        )
    configs = {name: _read_json(folder / name / "config.json") for name in ("unet", "vae", *text_folders)}
    configs["scheduler"] = patch_scheduler_config(_read_json(folder / "scheduler" / "scheduler_config.json"))
    family = family_of_configs(configs["unet"], {name: configs[name] for name in text_folders})
    return family, configs


def _model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _pipeline_flags(family: ModelFamily, model_index: dict[str, Any]) -> dict[str, Any]:
    flags = dict(bundled_config(family.name).get("pipeline", {}))
    flags.update({key: model_index[key] for key in PIPELINE_FLAGS if key in model_index})
    return flags


def _component_weights(folder: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    sub = folder / name
    chosen = sub / component_weight_file(folder, name, [p.name for p in sub.iterdir() if p.is_file()])
    if chosen.name.endswith(".index.json"):
        shards = sorted(set(_read_json(chosen)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(sub / shard)).items()}
    return read_weights(chosen, allow_pickle)


def _folder_tokenizers(folder: Path, family: ModelFamily) -> dict[str, CLIPTokenizer]:
    tokenizers = {}
    for tower in family.towers:
        if not (folder / tower.tokenizer).is_dir():
            raise FileNotFoundError(
                f"model folder {folder} lacks {tower.tokenizer}/, the tokenizer of its {tower.component}/; "
                f"a {family.label} folder needs both"
            )
        tokenizers[tower.tokenizer] = load_tokenizer(folder / tower.tokenizer)
    return tokenizers


def load_diffusers_folder(folder: Path, allow_pickle: bool = False) -> ModelParts:
    """A diffusers `save_pretrained` folder: unet/, vae/, scheduler/ and the family's text encoders."""
    family, configs = read_folder_configs(folder)
    weights = {name: _component_weights(folder, name, allow_pickle) for name in family.components}
    weights["vae"] = rename_legacy_vae_keys(weights["vae"])
    parts = ModelParts(
        family=family,
        configs=configs,
        weights=weights,
        tokenizers=_folder_tokenizers(folder, family),
        source=str(folder),
        flags=_pipeline_flags(family, _model_index(folder)),
    )
    check_text_time(parts)
    return parts


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_single_file(path: Path, allow_pickle: bool = False, config: Path | None = None) -> ModelParts:
    """A CompVis/SGM checkpoint. Configs come from, in order: `config` (a diffusers folder), the configs
    sdbatch embeds when exporting, or the bundled standard configs of the detected family."""
    state = read_weights(path, allow_pickle)
    return single_file_parts(state, str(path), _safetensors_metadata(path), config)


def single_file_parts(
    state: Mapping[str, torch.Tensor],
    source: str,
    metadata: Mapping[str, str] | None = None,
    config: Path | None = None,
) -> ModelParts:
    """`load_single_file` once the file is read: `state` is its CompVis/SGM state dict (its tensors may be
    on the meta device), `metadata` its safetensors metadata."""
    family = family_named(detect_family({k: tuple(v.shape) for k, v in state.items()}))
    if config is not None:
        folder_family, configs = read_folder_configs(config)
        if folder_family != family:
            raise ValueError(
                f"config folder {config} is a {folder_family.label} model but {source} is {family.label}; "
                "give the config folder of this checkpoint's family"
            )
        tokenizers = _folder_tokenizers(config, family)
        flags = _pipeline_flags(family, _model_index(config))
    else:
        configs = single_file_configs(family.name, metadata or {})
        tokenizers = {t.tokenizer: _bundled_tokenizer(configs.get(t.tokenizer, {})) for t in family.towers}
        flags = _pipeline_flags(family, configs.get("pipeline", {}))
    configs = {k: configs[k] for k in ("unet", "vae", "scheduler", *(t.component for t in family.towers))}
    configs["scheduler"] = patch_scheduler_config(configs["scheduler"])
    weights = split_single_file(state, family, configs)
    parts = ModelParts(family, configs, weights, tokenizers, source, flags)
    check_text_time(parts)
    return parts


def _bundled_tokenizer(config: dict[str, Any]) -> CLIPTokenizer:
    tokenizer = bundled_tokenizer(config.get("pad_token", "<|endoftext|>"))
    tokenizer.add_tokens(config.get("added_tokens", []))  # textual inversion baked in
    return tokenizer


def check_text_time(parts: ModelParts) -> None:
    """An SDXL UNet's added embedding must read the pooled vector plus the family's micro-conditioning
    (6 values for the base: sizes and crop; 5 for the refiner: crop, original size, aesthetic score)."""
    time_ids = parts.family.time_ids
    if time_ids is None:
        return
    unet = UNetConfig.from_dict(parts.configs["unet"])
    pooled = parts.configs[parts.family.pooled_tower.component]["projection_dim"]
    found = unet.time_id_width(pooled)
    if found != time_ids.width:
        raise ValueError(
            f"{parts.source}: its UNet's added embedding reads {found} micro-conditioning values but a "
            f"{parts.family.label} passes {time_ids.width} ({', '.join(time_ids.positive)}); the UNet "
            "belongs to another SDXL model (requires_aesthetics_score in model_index.json?)"
        )
    expected_flag = parts.family.name == "xl_refiner"
    if parts.flags.get("requires_aesthetics_score", expected_flag) != expected_flag:
        raise ValueError(
            f"{parts.source}: model_index.json says requires_aesthetics_score="
            f"{parts.flags['requires_aesthetics_score']}, but a {parts.family.label}'s UNet reads "
            f"{', '.join(time_ids.positive)}"
        )


def load_model_parts(
    path: str | Path, allow_pickle: bool = False, config: str | Path | None = None
) -> ModelParts:
    """Read a model from a diffusers folder or a single checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, allow_pickle)
    if path.is_file():
        return load_single_file(path, allow_pickle, Path(config) if config else None)
    raise FileNotFoundError(
        f"model path {path} does not exist; give a diffusers folder (model_index.json, unet/, vae/, ...) "
        "or a single .safetensors checkpoint"
    )
