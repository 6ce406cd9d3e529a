"""Weights written by older tools still load: legacy VAE attention names, prefixed text-encoder keys."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sd_core import Img2ImgPipeline
from tests.conftest import make_images

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def test_vae_with_legacy_attention_names_loads(model_dirs, tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(model_dirs["v1"], folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    renamed = {}
    for key, value in weights.items():
        for new, old in LEGACY.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(path))
    images = make_images(2)
    kwargs = dict(strength=0.5, num_inference_steps=4, seeds=[1, 2], output_type="np")
    expected = Img2ImgPipeline.from_pretrained(model_dirs["v1"])(images, ["a", "b"], **kwargs)
    got = Img2ImgPipeline.from_pretrained(folder)(images, ["a", "b"], **kwargs)
    assert np.abs(got - expected).max() == 0


def test_text_encoder_saved_before_transformers_5_loads(model_dirs, tmp_path):
    """transformers < 5 wrote `text_model.`-prefixed keys (and position_ids); transformers 5 is flat."""
    folder = tmp_path / "old-text-encoder"
    shutil.copytree(model_dirs["v2"], folder)
    path = folder / "text_encoder" / "model.safetensors"
    weights = load_file(str(path))
    assert not any(k.startswith("text_model.") for k in weights)
    legacy = {f"text_model.{k}": v for k, v in weights.items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(legacy, str(path))
    images = make_images(2)
    kwargs = dict(strength=0.5, num_inference_steps=4, seeds=[1, 2], output_type="np")
    expected = Img2ImgPipeline.from_pretrained(model_dirs["v2"])(images, ["a", "b"], **kwargs)
    got = Img2ImgPipeline.from_pretrained(folder)(images, ["a", "b"], **kwargs)
    assert np.abs(got - expected).max() == 0
