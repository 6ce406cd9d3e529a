"""Models, adapters and datasets the job benchmarks share.

`mid_model()` is the tiny SD1-style architecture scaled up (wider UNet, VAE and text encoder) so that
one 256x256 image takes about a second on a CPU thread: compute dominates, as the job-efficiency
acceptance asks, while the whole benchmark still runs in minutes. Models are written once into a
cache folder (`$SDBATCH_BENCH_CACHE`, else `<tmp>/sdbatch-bench`) and reused.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image

from sd_core.tiny import write_random_model
from sd_core.tiny_configs import TINY_V1

MID_V1 = copy.deepcopy(TINY_V1)
MID_V1["unet"].update(
    block_out_channels=[64, 128, 128],
    layers_per_block=2,
    cross_attention_dim=128,
    attention_head_dim=8,
    sample_size=32,
)
MID_V1["vae"].update(block_out_channels=[32, 64, 128, 128], sample_size=256)
MID_V1["text_encoder"].update(
    hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, projection_dim=128
)

# One image of the job benchmarks: 256x256 input, 10 scheduler steps at strength 0.4 (4 run), CFG on.
MID_SIZE = 256
MID_STEPS = 10
MID_STRENGTH = 0.4


def cache_dir() -> Path:
    root = os.environ.get("SDBATCH_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "sdbatch-bench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def mid_model() -> Path:
    """The mid-sized model's folder (written on first use)."""
    digest = hashlib.sha256(json.dumps(MID_V1, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / f"mid-v1-{digest}"  # a changed config gets a new folder
    if not (folder / "model_index.json").exists():
        write_random_model(folder, MID_V1)
    return folder


def tiny_model() -> Path:
    """The tests' tiny SD1-style model's folder (written on first use)."""
    from sd_core.tiny import make_tiny_model

    folder = cache_dir() / "tiny-v1"
    if not (folder / "model_index.json").exists():
        make_tiny_model(folder, "v1")
    return folder


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def png_bytes(seed: int, width: int, height: int) -> bytes:
    """A random RGB PNG."""
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
