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


def write_model(folder: Path, configs: dict, seed: int = 0) -> Path:
    """A random model of `configs` in the diffusers folder layout (as sd_core.tiny does for its configs)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_core.export import write_diffusers_folder
    from sd_core.tokenizer import bundled_tokenizer
    from sd_core.unet import UNet, UNetConfig
    from sd_core.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    unet = UNet(UNetConfig.from_dict(configs["unet"]))
    vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]))
    text_fields = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    text_model = CLIPTextModel(CLIPTextConfig(**text_fields))
    write_diffusers_folder(
        folder,
        {
            "unet": unet.config.to_dict(),
            "vae": vae.config.to_dict(),
            "text_encoder": configs["text_encoder"],
            "scheduler": configs["scheduler"],
        },
        {
            "unet": {k: v.contiguous() for k, v in unet.state_dict().items()},
            "vae": {k: v.contiguous() for k, v in vae.state_dict().items()},
            "text_encoder": {k: v.contiguous() for k, v in text_model.state_dict().items()},
        },
        bundled_tokenizer(configs["tokenizer"]["pad_token"]),
    )
    return folder


def mid_model() -> Path:
    """The mid-sized model's folder (written on first use)."""
    digest = hashlib.sha256(json.dumps(MID_V1, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / f"mid-v1-{digest}"  # a changed config gets a new folder
    if not (folder / "model_index.json").exists():
        write_model(folder, MID_V1)
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
