"""Reading Stable Diffusion weights: diffusers folders and CompVis/A1111 single files, safetensors first.

Pickle files (.ckpt, .bin, .pt, .pth) can run arbitrary code when unpickled, so they are refused
unless the caller opts in; then they are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sd_core.checkpoint_keys import split_single_file
from sd_core.families import detect_family
from sd_core.model_files import (  # the "X as X" names are re-exported: other modules import them from here
    COMPONENTS,
    WEIGHT_STEMS,
    check_weight_format,
    component_weight_file,
    single_file_configs,
)
from sd_core.model_files import CONFIG_METADATA_KEY as CONFIG_METADATA_KEY
from sd_core.model_files import PICKLE_SUFFIXES as PICKLE_SUFFIXES
from sd_core.model_files import family_of_text_config as family_of_text_config
from sd_core.model_files import refuse_pickle as refuse_pickle
from sd_core.tokenizer import bundled_tokenizer, load_tokenizer
from sd_core.vae import rename_legacy_vae_keys


@dataclass
class ModelParts:
    """Everything needed to build a pipeline, read from disk but not yet turned into modules."""

    family: str  # "v1" (OpenAI CLIP text encoder) or "v2" (OpenCLIP)
    configs: dict[str, dict]  # unet / vae / text_encoder / scheduler config.json dicts
    weights: dict[str, dict[str, torch.Tensor]]  # unet / vae / text_encoder state dicts
    tokenizer: CLIPTokenizer
    source: str


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
    """diffusers' img2img pipeline forces steps_offset=1 and clip_sample=False on load: do the same."""
    patched = dict(config)
    patched["steps_offset"] = 1
    if patched.get("clip_sample", patched.get("_class_name") in ("DDIMScheduler", "DDPMScheduler")):
        patched["clip_sample"] = False
    return patched


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return json.loads(path.read_text())


def read_folder_configs(folder: Path) -> dict[str, dict]:
    """The unet / vae / text_encoder / scheduler config dicts of a diffusers folder, scheduler patched."""
    configs = {name: _read_json(folder / name / "config.json") for name in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = patch_scheduler_config(_read_json(folder / "scheduler" / "scheduler_config.json"))
    return configs


def _component_weights(folder: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    sub = folder / name
    chosen = sub / component_weight_file(folder, name, [p.name for p in sub.iterdir() if p.is_file()])
    if chosen.name.endswith(".index.json"):
        shards = sorted(set(_read_json(chosen)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(sub / shard)).items()}
    return read_weights(chosen, allow_pickle)


def load_diffusers_folder(folder: Path, allow_pickle: bool = False) -> ModelParts:
    """A diffusers `save_pretrained` folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model folder {folder} lacks {', '.join(m + '/' for m in missing)}; "
            "a diffusers Stable Diffusion "
            f"folder holds {', '.join(c + '/' for c in COMPONENTS)} (as written by save_pretrained)"
        )
    configs = read_folder_configs(folder)
    weights = {name: _component_weights(folder, name, allow_pickle) for name in WEIGHT_STEMS}
    weights["vae"] = rename_legacy_vae_keys(weights["vae"])
    return ModelParts(
        family=family_of_text_config(configs["text_encoder"]),
        configs=configs,
        weights=weights,
        tokenizer=load_tokenizer(folder / "tokenizer"),
        source=str(folder),
    )


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_single_file(path: Path, allow_pickle: bool = False, config: Path | None = None) -> ModelParts:
    """A CompVis/A1111 checkpoint. Configs come from, in order: `config` (a diffusers folder), the
    configs sdbatch embeds when exporting, or the bundled standard config of the detected family."""
    state = read_weights(path, allow_pickle)
    family = detect_family({k: tuple(v.shape) for k, v in state.items()})
    if config is not None:
        configs = read_folder_configs(config)
        tokenizer = load_tokenizer(config / "tokenizer")
    else:
        configs = single_file_configs(family, _safetensors_metadata(path))
        tokenizer_config = configs.get("tokenizer", {})
        tokenizer = bundled_tokenizer(tokenizer_config.get("pad_token", "<|endoftext|>"))
        tokenizer.add_tokens(tokenizer_config.get("added_tokens", []))  # textual inversion baked in
    configs = {k: configs[k] for k in ("unet", "vae", "text_encoder", "scheduler")}
    configs["scheduler"] = patch_scheduler_config(configs["scheduler"])
    weights = split_single_file(
        state, family, configs["text_encoder"], unet_config=configs["unet"], vae_config=configs["vae"]
    )
    return ModelParts(family=family, configs=configs, weights=weights, tokenizer=tokenizer, source=str(path))


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
