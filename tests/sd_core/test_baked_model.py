"""A model with adapters pinned can be shipped baked: its diffusers folder and single file give the same
images as base + adapters, and the adapters' identity is exposed for the run's metadata."""

from __future__ import annotations

import hashlib

import diffusers
import numpy as np
import pytest

from sd_core import Img2ImgPipeline
from tests.conftest import diffusers_images, make_images
from tests.sd_core.test_lora import KOHYA_UNET_MODULES, pick, weight_shapes, write_kohya
from tests.sd_core.test_textual_inversion import vectors, write_safetensors

PROMPTS = ["a photo of <toy> on a table", "<toy> in the snow, watercolour"]
KWARGS = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=6, seeds=[5, 6], output_type="np")


@pytest.fixture(scope="module")
def adapted(model_dirs, tmp_path_factory):
    """(pipeline with a kohya LoRA and a 3-vector TI pinned, its images, the adapter files)."""
    root = tmp_path_factory.mktemp("adapters")
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    lora = root / "style.safetensors"
    shapes = weight_shapes(pipe)
    write_kohya(lora, shapes, pick(shapes, KOHYA_UNET_MODULES), lambda m: 2.0, lambda m: 4, seed=3)
    embedding = write_safetensors(root / "toy.safetensors", {"<toy>": vectors(3, 32, seed=4)})
    pipe.load_lora(lora, scale=0.8, text_encoder_scale=1.2)
    pipe.load_textual_inversion(embedding)
    return pipe, pipe(make_images(2), PROMPTS, **KWARGS), {"lora": lora, "ti": embedding}


def test_adapters_are_listed_with_hashes_and_scales(adapted):
    pipe, _, files = adapted
    lora, ti = pipe.adapters
    assert (lora.kind, lora.name, lora.scales) == ("lora", "style", {"unet": 0.8, "text_encoder": 1.2})
    assert lora.sha256 == hashlib.sha256(files["lora"].read_bytes()).hexdigest()
    assert (ti.kind, ti.name, ti.tokens) == ("textual_inversion", "<toy>", ("<toy>", "<toy>_1", "<toy>_2"))
    assert ti.sha256 == hashlib.sha256(files["ti"].read_bytes()).hexdigest()


def test_adapters_change_the_images(model_dirs, adapted):
    _, images, _ = adapted
    base = Img2ImgPipeline.from_pretrained(model_dirs["v1"])(make_images(2), PROMPTS, **KWARGS)
    assert np.abs(images - base).max() > 1e-3


def test_baked_folder_gives_the_same_images_here_and_in_diffusers(adapted, tmp_path):
    pipe, expected, _ = adapted
    pipe.save_pretrained(tmp_path / "baked")
    baked = Img2ImgPipeline.from_pretrained(tmp_path / "baked")
    assert baked.adapters == []  # nothing left to apply: it is all in the weights and tokenizer
    assert np.abs(baked(make_images(2), PROMPTS, **KWARGS) - expected).max() <= 1e-5

    oracle = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        str(tmp_path / "baked"), safety_checker=None
    )
    settings = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=6)
    got = diffusers_images(oracle, make_images(2), PROMPTS, KWARGS["seeds"], **settings)
    assert np.abs(got - expected).max() <= 1e-4


def test_baked_single_file_gives_the_same_images(adapted, tmp_path):
    pipe, expected, _ = adapted
    pipe.save_single_file(tmp_path / "baked.safetensors")
    baked = Img2ImgPipeline.from_pretrained(tmp_path / "baked.safetensors")
    assert baked.tokenizer.convert_tokens_to_ids("<toy>_2") == pipe.tokenizer.convert_tokens_to_ids("<toy>_2")
    assert np.abs(baked(make_images(2), PROMPTS, **KWARGS) - expected).max() <= 1e-5


def test_save_lora_without_a_lora_says_so(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        Img2ImgPipeline.from_pretrained(model_dirs["v1"]).save_lora(tmp_path / "x.safetensors")
