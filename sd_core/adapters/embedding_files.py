"""Textual-inversion embedding files: the A1111, diffusers, SDXL and bare-tensor formats, read safely.

Formats (the file's stored name is the token unless `token=` overrides it):
- A1111 `.pt`: `{"string_to_param": {"*": [k, d]}, "name": ..., ...}` (diffusers' rule: token = `name`).
- `emb_params` files (A1111 / kohya `.safetensors`): `{"emb_params": [k, d]}`; they carry no name, so
  the token is the file stem (A1111's convention; diffusers would call the token "emb_params").
- diffusers `learned_embeds.safetensors` / `.bin`: `{token: [k, d] or [d]}`.
- a pickled bare tensor: no name at all, so `token=` is required.
- SDXL (kohya `sdxl_train_textual_inversion.py`, A1111, ComfyUI): `{"clip_l": [k, 768], "clip_g": [k, 1280]}`
  in one file, one tensor per text tower (`TextTower.embedding_key`); no name, so the token is the file
  stem.
The vectors are kept by embedding key: None for the one-tensor formats (SD 1.x / 2.x), "clip_l" /
"clip_g" for SDXL's. Pickles need `allow_pickle=True` and are then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from sd_core.loading import PICKLE_SUFFIXES, refuse_pickle

DIFFUSERS_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
SDXL_KEYS = ("clip_l", "clip_g")  # the towers' tensors in an SDXL file (TextTower.embedding_key)


@dataclass(frozen=True, eq=False)
class LoadedEmbedding:
    """A textual-inversion embedding read from a file, with the token it will be added under."""

    name: str | None  # the name stored in (or implied by) the file; None for a bare tensor
    token: str  # the token prompts use: `token=` if given, else `name`
    # [k, d] float32 on CPU by embedding key: {None: ...} (one-tensor formats), {"clip_l": ..., "clip_g": ...}
    vectors: dict[str | None, torch.Tensor] = field(repr=False)
    sha256: str  # of the file's bytes
    format: str  # "a1111", "emb_params", "diffusers", "tensor" or "sdxl"
    source: str  # the file it was read from

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str | None, int]:
        """The vectors' width by embedding key."""
        return {key: vectors.shape[1] for key, vectors in self.vectors.items()}

    @property
    def tokens(self) -> list[str]:
        """The tokens added for it: `tok tok_1 … tok_{k-1}` for k vectors (diffusers' naming)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]


def _resolve_file(path: Path) -> Path:
    """A file, or the diffusers `learned_embeds.*` inside a folder."""
    if path.is_dir():
        for name in DIFFUSERS_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds no textual-inversion file ({' or '.join(DIFFUSERS_FILE_NAMES)})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"textual-inversion file not found: {path}")
    return path


def _read_content(path: Path, data: bytes, allow_pickle: bool) -> object:
    if path.suffix == ".safetensors":
        try:
            return load_safetensors_bytes(data)
        except SafetensorError as err:
            raise ValueError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: unknown embedding format {path.suffix!r}; expected .safetensors (or .pt / .bin)"
        )
    if not allow_pickle:
        refuse_pickle(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) (corrupt, or holds objects "
            f"other than tensors): {err}"
        ) from err


def _name_and_tensors(content: object, path: Path) -> tuple[str | None, dict[str | None, object], str]:
    """(stored name, raw embeddings by embedding key, format) from a file's content."""
    if isinstance(content, torch.Tensor):
        return None, {None: content}, "tensor"
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a textual-inversion embedding")
    if any(key in content for key in SDXL_KEYS):
        return path.stem, {key: content[key] for key in SDXL_KEYS if key in content}, "sdxl"
    if "string_to_param" in content:
        params = content["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise ValueError(f"{path}: A1111 embedding without a string_to_param['*'] tensor")
        name = content.get("name")
        return (name if isinstance(name, str) else path.stem), {None: params["*"]}, "a1111"
    if "emb_params" in content:
        return path.stem, {None: content["emb_params"]}, "emb_params"
    if len(content) == 1:
        ((name, tensor),) = content.items()
        return str(name), {None: tensor}, "diffusers"
    raise ValueError(
        f"{path} is not a textual-inversion embedding: expected one {{token: tensor}} entry (diffusers), "
        f"string_to_param (A1111) or emb_params; found keys {sorted(map(str, content))[:8]}"
    )


def _as_vectors(raw: object, where: str) -> torch.Tensor:
    """[k, d] float32: a [d] vector becomes one row, as in diffusers."""
    if not isinstance(raw, torch.Tensor) or not raw.is_floating_point() or raw.dim() not in (1, 2):
        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"{where}: an embedding must be a float tensor [d] or [k, d], got {shape}")
    vectors = raw.detach().to("cpu", torch.float32).reshape(-1, raw.shape[-1]).contiguous()
    if vectors.numel() == 0:
        raise ValueError(f"{where}: the embedding is empty (shape {tuple(raw.shape)})")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{where}: the embedding contains NaN or Inf values")
    return vectors


def _vectors_by_key(raw: dict[str | None, object], path: Path) -> dict[str | None, torch.Tensor]:
    """Each key's [k, d] vectors; the towers of one token must have as many vectors each."""
    vectors = {
        key: _as_vectors(value, f"{path}" + (f" ({key})" if key else "")) for key, value in raw.items()
    }
    counts = ", ".join(f"{key} {v.shape[0]}" for key, v in vectors.items())
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise ValueError(
            f"{path}: its tensors hold different numbers of vectors ({counts}); every text tower needs "
            "as many vectors as the token has"
        )
    return vectors


def load_embedding_file(
    path: str | Path, token: str | None = None, allow_pickle: bool = False
) -> LoadedEmbedding:
    """Read a textual-inversion file (or a folder holding learned_embeds.*); `token` overrides its name."""
    file = _resolve_file(Path(path))
    data = file.read_bytes()
    name, raw, fmt = _name_and_tensors(_read_content(file, data, allow_pickle), file)
    chosen = token if token is not None else name
    if chosen is None:
        raise ValueError(f"{file} holds a bare tensor with no token name: pass token='<your-token>'")
    if not chosen.strip():
        raise ValueError(f"{file}: the token must not be empty or blank, got {chosen!r}")
    return LoadedEmbedding(
        name=name,
        token=chosen,
        vectors=_vectors_by_key(raw, file),
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        source=str(file),
    )
