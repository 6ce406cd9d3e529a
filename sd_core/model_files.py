"""Which files the loader reads for a model, and whether it may, decided from file names and headers alone.

No torch here: `sd_core.loading` makes these decisions when it loads a model, and a job's driver makes the
same ones before any work starts (jobs/preflight.py) without importing torch or reading a weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from os import PathLike
from pathlib import PurePosixPath
from typing import Any, NoReturn

from sd_core.families import bundled_config

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
CONFIG_METADATA_KEY = "sdbatch_config"
REQUIRED_FOLDERS = ("unet", "vae", "scheduler")  # every family's; text encoders vary (SDXL's refiner: one)
TEXT_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # encoder -> its tokenizer
WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
PICKLE_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "pytorch_model",
    "text_encoder_2": "pytorch_model",
}
SAFETENSORS_LENGTH_BYTES = 8  # a safetensors file opens with its JSON header's length, little-endian


class PickleRefused(ValueError):
    """A pickle file was given without opting in to reading pickles."""


def refuse_pickle(path: str | PathLike[str]) -> NoReturn:
    raise PickleRefused(
        f"{path} is a pickle file: unpickling can run arbitrary code, so sdbatch refuses it by default. "
        "Convert it to .safetensors, or pass allow_pickle=True if you trust the file "
        "(it is then read with torch.load(weights_only=True))."
    )


def check_weight_format(path: str | PathLike[str], allow_pickle: bool = False) -> None:
    """Raise ValueError unless `read_weights` may read `path`: .safetensors, or a pickle with opt-in.
    `path` may be a URI (only its suffix is looked at)."""
    suffix = PurePosixPath(str(path)).suffix
    if suffix == ".safetensors":
        return
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format {suffix!r}; expected .safetensors")
    if not allow_pickle:
        refuse_pickle(path)


def component_weight_file(folder: str | PathLike[str], name: str, file_names: Iterable[str]) -> str:
    """The file of a diffusers folder's `name/` (unet, vae or text_encoder) that the loader reads, given
    the names of the files there: a safetensors index (its shards are read), else the safetensors file,
    else the pickled .bin. FileNotFoundError when there is none."""
    present = set(file_names)
    stem = WEIGHT_STEMS[name]
    if f"{stem}.safetensors.index.json" in present:
        return f"{stem}.safetensors.index.json"
    variants = sorted(n for n in present if fnmatchcase(n, f"{stem}.*.safetensors"))
    safetensors_files = [n for n in [f"{stem}.safetensors", *variants] if n in present]
    if safetensors_files:
        return safetensors_files[0]
    if f"{PICKLE_STEMS[name]}.bin" in present:
        return f"{PICKLE_STEMS[name]}.bin"
    raise FileNotFoundError(
        f"model folder {folder} has no weights for {name!r}: expected {folder}/{name}/{stem}.safetensors"
    )


def single_file_configs(family: str, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The configs of a single-file checkpoint given no config folder: those sdbatch embeds in the
    safetensors metadata when exporting, else the bundled standard configs of the detected family."""
    text = metadata.get(CONFIG_METADATA_KEY)
    return json.loads(text) if text else bundled_config(family)


def present_text_folders(folder_entries: Iterable[str], model_index: Mapping[str, Any]) -> list[str]:
    """The text-encoder folders a diffusers folder holds: present, and not declared empty in
    model_index.json (diffusers writes `"text_encoder": [null, null]` for SDXL's refiner)."""
    present = set(folder_entries)
    return [name for name in TEXT_FOLDERS if name in present and model_index.get(name, [True])[0] is not None]


def safetensors_header_length(opening: bytes) -> int:
    """The length of the JSON header that follows a safetensors file's first 8 bytes."""
    if len(opening) < SAFETENSORS_LENGTH_BYTES:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    return int.from_bytes(opening[:SAFETENSORS_LENGTH_BYTES], "little")


def parse_safetensors_header(header: bytes) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) from a safetensors file's JSON header; no tensor is read."""
    entries = json.loads(header)
    metadata = entries.pop("__metadata__", None) or {}
    return {key: tuple(entry["shape"]) for key, entry in entries.items()}, metadata
