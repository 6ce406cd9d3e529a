"""Loading models: diffusers folders, single files with our export, pickles, and the errors users see."""

from __future__ import annotations

import json
import shutil
import socket

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_core import Img2ImgPipeline
from sd_core.families import detect_family
from sd_core.tiny import make_tiny_model
from tests.conftest import diffusers_images, make_images

PROMPTS = ["a watercolour fox", "a city street in the rain"]
KWARGS = dict(strength=0.75, guidance_scale=7.5, num_inference_steps=8, seeds=[3, 4], output_type="np")


def run_oracle(oracle, images) -> np.ndarray:
    """diffusers' img2img with the same settings as KWARGS."""
    return diffusers_images(
        oracle, images, PROMPTS, KWARGS["seeds"], strength=0.75, guidance_scale=7.5, num_inference_steps=8
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a non-loopback connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_single_file_export_loads_in_diffusers_and_ours_with_equal_output(
    model_dirs, tmp_path, no_network, family
):
    folder = model_dirs[family]
    images = make_images(2, seed=9)
    reference = Img2ImgPipeline.from_pretrained(folder)
    expected = reference(images, PROMPTS, **KWARGS)
    path = tmp_path / "model.safetensors"
    reference.save_single_file(path)

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert detect_family({k: tuple(load_file(str(path))[k].shape) for k in keys}) == family
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    text_prefix = "cond_stage_model.transformer." if family == "v1" else "cond_stage_model.model."
    assert any(k.startswith(text_prefix) for k in keys)

    ours = Img2ImgPipeline.from_pretrained(path)
    assert np.abs(ours(images, PROMPTS, **KWARGS) - expected).max() <= 1e-4
    with_config = Img2ImgPipeline.from_pretrained(path, config=folder)
    assert np.abs(with_config(images, PROMPTS, **KWARGS) - expected).max() <= 1e-4

    oracle = diffusers.StableDiffusionImg2ImgPipeline.from_single_file(
        str(path), config=str(folder), safety_checker=None, local_files_only=True
    )
    scheduler_cls = diffusers.PNDMScheduler if family == "v1" else diffusers.DDIMScheduler
    oracle.scheduler = scheduler_cls.from_config(oracle.scheduler.config)
    got = run_oracle(oracle, images)
    assert np.abs(got - expected).max() <= 1e-4


def test_tiny_model_maker_writes_a_folder_diffusers_loads(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny", family="v2")
    oracle = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None)
    ours = Img2ImgPipeline.from_pretrained(folder)
    assert oracle.scheduler.config.prediction_type == "v_prediction"
    assert oracle.tokenizer.pad_token == "!" and ours.tokenizer.pad_token == "!"
    images = make_images(2, seed=2)
    expected = run_oracle(oracle, images)
    assert np.abs(ours(images, PROMPTS, **KWARGS) - expected).max() <= 1e-4


def test_save_pretrained_round_trips(model_dirs, tmp_path):
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    pipe.save_pretrained(tmp_path / "copy")
    again = Img2ImgPipeline.from_pretrained(tmp_path / "copy")
    images = make_images(2)
    assert np.abs(pipe(images, PROMPTS, **KWARGS) - again(images, PROMPTS, **KWARGS)).max() == 0


def _pickle_copy(src, dst):
    """The folder with its UNet weights as a pickled diffusion_pytorch_model.bin instead."""
    shutil.copytree(src, dst)
    weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), dst / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return dst


def test_pickle_weights_refused_by_default(model_dirs, tmp_path):
    folder = _pickle_copy(model_dirs["v1"], tmp_path / "pickled")
    with pytest.raises(ValueError, match=r"pickle file.*allow_pickle=True"):
        Img2ImgPipeline.from_pretrained(folder)


def test_pickle_weights_load_with_opt_in(model_dirs, tmp_path):
    folder = _pickle_copy(model_dirs["v1"], tmp_path / "pickled")
    images = make_images(2)
    expected = Img2ImgPipeline.from_pretrained(model_dirs["v1"])(images, PROMPTS, **KWARGS)
    got = Img2ImgPipeline.from_pretrained(folder, allow_pickle=True)(images, PROMPTS, **KWARGS)
    assert np.abs(got - expected).max() == 0


def test_pickle_single_file_refused_by_default(model_dirs, tmp_path):
    path = tmp_path / "model.safetensors"
    Img2ImgPipeline.from_pretrained(model_dirs["v1"]).save_single_file(path)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    with pytest.raises(ValueError, match="pickle file"):
        Img2ImgPipeline.from_pretrained(ckpt)
    trusted = Img2ImgPipeline.from_pretrained(ckpt, allow_pickle=True, config=model_dirs["v1"])
    assert trusted.family.name == "v1"


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_named(model_dirs, tmp_path, component):
    folder = tmp_path / "broken"
    shutil.copytree(model_dirs["v1"], folder)
    shutil.rmtree(folder / component)
    with pytest.raises(FileNotFoundError, match=f"lacks {component}/"):
        Img2ImgPipeline.from_pretrained(folder)


def test_missing_weights_file_is_named(model_dirs, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(model_dirs["v1"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights for 'vae'"):
        Img2ImgPipeline.from_pretrained(folder)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Img2ImgPipeline.from_pretrained(tmp_path / "nope")


def test_weights_that_do_not_fit_the_config_are_refused(model_dirs, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(model_dirs["v1"], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["layers_per_block"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="UNet weights do not match its config"):
        Img2ImgPipeline.from_pretrained(folder)
