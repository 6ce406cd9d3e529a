"""A model with adapters pinned can be shipped baked: its diffusers folder and single file give the same
images as base + adapters, and the adapters' identity is exposed for the run's metadata. For SD 1.x and
SDXL base (a LoRA on the UNet and both text towers, an SDXL embedding: every tokenizer carries the token)."""

from __future__ import annotations

import hashlib

import diffusers
import numpy as np
import pytest

from sd_core import Img2ImgPipeline
from tests.conftest import diffusers_images, make_images
from tests.sd_core.test_lora import KOHYA_UNET_MODULES, pick, weight_shapes, write_kohya
from tests.sd_core.test_sdxl_adapters import write_xl_kohya
from tests.sd_core.test_textual_inversion import vectors, write_safetensors

PROMPTS = ["a photo of <toy> on a table", "<toy> in the snow, watercolour"]
KWARGS = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=6, seeds=[5, 6], output_type="np")


ORACLES = {
    "v1": diffusers.StableDiffusionImg2ImgPipeline,
    "xl_base": diffusers.StableDiffusionXLImg2ImgPipeline,
}


@pytest.fixture(scope="module")
def folders(model_dirs, xl_model_dirs):
    return {**model_dirs, **xl_model_dirs}


@pytest.fixture(scope="module", params=["v1", "xl_base"])
def adapted(request, folders, tmp_path_factory):
    """(pipeline with a kohya LoRA and a 3-vector TI pinned, its images, the adapter files)."""
    family = request.param
    root = tmp_path_factory.mktemp("adapters")
    pipe = Img2ImgPipeline.from_pretrained(folders[family])
    lora = root / "style.safetensors"
    if family == "v1":
        shapes = weight_shapes(pipe)
        write_kohya(lora, shapes, pick(shapes, KOHYA_UNET_MODULES), lambda m: 2.0, lambda m: 4, seed=3)
        embedding = write_safetensors(root / "toy.safetensors", {"<toy>": vectors(3, 32, seed=4)})
    else:
        write_xl_kohya(lora, pipe, seed=3)
        tensors = {"clip_l": vectors(3, 32, seed=4), "clip_g": vectors(3, 64, seed=5)}
        embedding = write_safetensors(root / "<toy>.safetensors", tensors)
    pipe.load_lora(lora, scale=0.8, text_encoder_scale=1.2)
    pipe.load_textual_inversion(embedding)
    return pipe, pipe(make_images(2), PROMPTS, **KWARGS), {"lora": lora, "ti": embedding}


def test_adapters_are_listed_with_hashes_and_scales(adapted):
    pipe, _, files = adapted
    lora, ti = pipe.adapters
    scales = {"unet": 0.8} | dict.fromkeys(pipe.text_encoders, 1.2)
    assert (lora.kind, lora.name, lora.scales) == ("lora", "style", scales)
    assert lora.sha256 == hashlib.sha256(files["lora"].read_bytes()).hexdigest()
    assert (ti.kind, ti.name, ti.tokens) == ("textual_inversion", "<toy>", ("<toy>", "<toy>_1", "<toy>_2"))
    assert ti.sha256 == hashlib.sha256(files["ti"].read_bytes()).hexdigest()


def test_adapters_change_the_images(folders, adapted):
    pipe, images, _ = adapted
    base = Img2ImgPipeline.from_pretrained(folders[pipe.family.name])(make_images(2), PROMPTS, **KWARGS)
    assert np.abs(images - base).max() > 1e-3


def test_baked_folder_gives_the_same_images_here_and_in_diffusers(adapted, tmp_path):
    pipe, expected, _ = adapted
    pipe.save_pretrained(tmp_path / "baked")
    baked = Img2ImgPipeline.from_pretrained(tmp_path / "baked")
    assert baked.adapters == []  # nothing left to apply: it is all in the weights and tokenizer
    assert np.abs(baked(make_images(2), PROMPTS, **KWARGS) - expected).max() <= 1e-5

    oracle = ORACLES[pipe.family.name].from_pretrained(str(tmp_path / "baked"))
    settings = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=6)
    got = diffusers_images(oracle, make_images(2), PROMPTS, KWARGS["seeds"], **settings)
    assert np.abs(got - expected).max() <= 1e-4


def test_baked_single_file_gives_the_same_images(adapted, tmp_path):
    pipe, expected, _ = adapted
    pipe.save_single_file(tmp_path / "baked.safetensors")
    baked = Img2ImgPipeline.from_pretrained(tmp_path / "baked.safetensors")
    for name, tokenizer in pipe.tokenizers.items():  # every tower's tokenizer carries the added tokens
        assert baked.tokenizers[name].convert_tokens_to_ids("<toy>_2") == tokenizer.convert_tokens_to_ids(
            "<toy>_2"
        )
    assert np.abs(baked(make_images(2), PROMPTS, **KWARGS) - expected).max() <= 1e-5


def test_save_lora_without_a_lora_says_so(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        Img2ImgPipeline.from_pretrained(model_dirs["v1"]).save_lora(tmp_path / "x.safetensors")
