"""Our Img2ImgPipeline against diffusers' StableDiffusionImg2ImgPipeline: same folder, seeds, scheduler."""

from __future__ import annotations

import copy
import types

import diffusers
import numpy as np
import pytest

from sd_core import Img2ImgPipeline
from sd_core.tiny_configs import TINY_CONFIGS
from tests.conftest import diffusers_images, make_images
from tests.diffusers_models import write_diffusers_model

ORACLE_SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
}
PROMPTS = ["a photo of a cat", "an oil painting of a harbour at night"]
NEGATIVES = ["blurry", "low quality, jpeg artifacts"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def oracles(model_dirs):
    """diffusers pipelines loaded from the same folders (clip_skip patched for transformers 5)."""
    pipes = {}
    for family, folder in model_dirs.items():
        pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None)
        text_encoder = pipe.text_encoder
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5 flattened.
        alias = types.SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
        object.__setattr__(text_encoder, "text_model", alias)
        pipes[family] = (pipe, dict(pipe.scheduler.config))
    return pipes


@pytest.fixture(scope="module")
def ours(model_dirs):
    return {family: Img2ImgPipeline.from_pretrained(folder) for family, folder in model_dirs.items()}


def run_oracle(oracle, scheduler: str, images, seeds, **kwargs) -> np.ndarray:
    """The diffusers pipeline with `scheduler` built from the model's own scheduler config."""
    pipe, model_scheduler_config = oracle
    cls, overrides = ORACLE_SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(model_scheduler_config, **overrides)
    return diffusers_images(pipe, images, kwargs.pop("prompt"), seeds, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", list(ORACLE_SCHEDULERS))
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_matches_diffusers(ours, oracles, family, scheduler, strength, guidance, clip_skip):
    images = make_images(2, width=64, height=48)
    seeds = [11, 12]
    common = dict(strength=strength, guidance_scale=guidance, num_inference_steps=10, eta=0.0)
    expected = run_oracle(
        oracles[family],
        scheduler,
        images,
        seeds,
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        clip_skip=clip_skip,
        **common,
    )
    pipe = ours[family]
    pipe.set_scheduler(scheduler)
    got = pipe(
        images,
        PROMPTS,
        negative_prompts=NEGATIVES,
        seeds=seeds,
        clip_skip=clip_skip,
        output_type="np",
        **common,
    )
    assert got.shape == expected.shape == (2, 48, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_matches_diffusers_without_clip_skip_or_negative_prompt(ours, oracles, family):
    images = make_images(2, width=48, height=64, seed=3)
    kwargs = dict(strength=0.6, guidance_scale=5.0, num_inference_steps=12)
    expected = run_oracle(oracles[family], "euler_a", images, [5, 6], prompt=PROMPTS, **kwargs)
    pipe = ours[family]
    pipe.set_scheduler("euler_a")
    got = pipe(images, PROMPTS, seeds=[5, 6], output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.fixture(scope="module")
def clip_sample_models(tmp_path_factory) -> dict:
    """{clip_sample: (ours, oracle)} on the case diffusers' DDIM clip_sample exposed: a 3-level UNet with
    per-block heads 2/4/4 whose model ships a PNDM scheduler config. Without the clip_sample key there,
    DDIMScheduler.from_config falls back to clip_sample=True (and diffusers' pipeline only patches the
    scheduler it is constructed with, not one set afterwards)."""
    models = {}
    for clip_sample in (True, False):
        configs = copy.deepcopy(TINY_CONFIGS["v1"])
        configs["unet"]["attention_head_dim"] = [2, 4, 4]
        configs["scheduler"].pop("clip_sample")
        if not clip_sample:
            configs["scheduler"]["clip_sample"] = False
        folder = write_diffusers_model(tmp_path_factory.mktemp(f"clip-{clip_sample}"), configs)
        oracle = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None)
        models[clip_sample] = (Img2ImgPipeline.from_pretrained(folder, scheduler="ddim"), oracle)
    return models


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 7.0])
@pytest.mark.parametrize(("eta", "strength"), [(0.0, 0.6), (0.5, 0.9), (0.0, 1.0), (0.5, 0.3)])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddim_clip_sample_matches_diffusers(clip_sample_models, clip_sample, eta, strength, guidance):
    """DDIM is the one sampler with clip_sample: x0 clamped to [-1, 1] removes the cancellation that
    hides float rounding elsewhere, so any difference in how the VAE and UNet round (memory layout,
    batched encoding) grows a hundredfold; it must be none."""
    ours, oracle = clip_sample_models[clip_sample]
    oracle.scheduler = diffusers.DDIMScheduler.from_config(oracle.scheduler.config)
    assert oracle.scheduler.config.clip_sample is ours.scheduler.config.clip_sample is clip_sample
    images = make_images(3, width=64, height=48, seed=12)
    prompts = [*PROMPTS, "a red bicycle"]
    negatives = [*NEGATIVES, ""]
    kwargs = dict(strength=strength, guidance_scale=guidance, num_inference_steps=12, eta=eta)
    expected = diffusers_images(oracle, images, prompts, [4, 5, 6], negative_prompt=negatives, **kwargs)
    got = ours(images, prompts, negative_prompts=negatives, seeds=[4, 5, 6], output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_ddim_eta_matches_diffusers(ours, oracles):
    images = make_images(2, seed=4)
    kwargs = dict(strength=0.8, guidance_scale=7.5, num_inference_steps=10, eta=0.7)
    expected = run_oracle(oracles["v1"], "ddim", images, [1, 2], prompt=PROMPTS, **kwargs)
    ours["v1"].set_scheduler("ddim")
    got = ours["v1"](images, PROMPTS, seeds=[1, 2], output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_pil_sizes_not_divisible_by_8_are_floored_like_diffusers(ours, oracles):
    images = make_images(2, width=70, height=53, seed=5)
    kwargs = dict(strength=0.5, guidance_scale=7.5, num_inference_steps=8)
    expected = run_oracle(oracles["v1"], "pndm", images, [7, 8], prompt=PROMPTS, **kwargs)
    ours["v1"].set_scheduler("pndm")
    got = ours["v1"](images, PROMPTS, seeds=[7, 8], output_type="np", **kwargs)
    assert got.shape == (2, 48, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler_a", "ddim", "dpmpp_2m"])
def test_row_output_does_not_depend_on_its_batch(ours, scheduler):
    pipe = ours["v1"]
    pipe.set_scheduler(scheduler)
    images = make_images(4, seed=6)
    prompts = ["one", "two", "three", "four"]
    kwargs = dict(strength=0.75, num_inference_steps=10, eta=0.5, output_type="np")
    batch = pipe(images, prompts, seeds=[10, 20, 30, 40], guidance_scale=[7.5, 3.0, 1.0, 9.0], **kwargs)
    alone = pipe(images[1:2], prompts[1:2], seeds=[20], guidance_scale=3.0, **kwargs)
    assert np.abs(batch[1] - alone[0]).max() <= 1e-5


def test_per_row_guidance_equals_separate_calls(ours):
    pipe = ours["v2"]
    pipe.set_scheduler("unipc")
    images = make_images(2, seed=7)
    kwargs = dict(strength=0.7, num_inference_steps=10, output_type="np")
    together = pipe(images, PROMPTS, seeds=[1, 2], guidance_scale=[2.0, 9.0], **kwargs)
    first = pipe(images[:1], PROMPTS[:1], seeds=[1], guidance_scale=2.0, **kwargs)
    second = pipe(images[1:], PROMPTS[1:], seeds=[2], guidance_scale=9.0, **kwargs)
    assert np.abs(together - np.concatenate([first, second])).max() <= 1e-5


def test_vae_tiling_matches_diffusers_tiling(ours, oracles):
    """An image larger than the VAE tile (64 px for the tiny model) goes through the tiled paths."""
    oracle, _ = oracles["v1"]
    images = make_images(2, width=128, height=96, seed=8)
    kwargs = dict(strength=0.6, guidance_scale=7.5, num_inference_steps=6)
    oracle.vae.enable_tiling()
    pipe = ours["v1"]
    pipe.enable_vae_tiling()
    try:
        expected = run_oracle(oracles["v1"], "euler", images, [1, 2], prompt=PROMPTS, **kwargs)
        pipe.set_scheduler("euler")
        got = pipe(images, PROMPTS, seeds=[1, 2], output_type="np", **kwargs)
    finally:
        oracle.vae.disable_tiling()
        pipe.enable_vae_tiling(False)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_variants_of_one_image_match_diffusers(ours, oracles):
    """Rows repeating an image (an input's variants) are VAE-encoded once, and still match diffusers,
    which encodes every row: each row keeps its own posterior sample and noise."""
    first, second = make_images(2, seed=9)
    images = [first, second, first, first]
    prompts = PROMPTS + PROMPTS
    seeds = [21, 22, 23, 24]
    kwargs = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=8)
    expected = run_oracle(oracles["v1"], "ddim", images, seeds, prompt=prompts, **kwargs)
    pipe = ours["v1"]
    pipe.set_scheduler("ddim")
    got = pipe(images, prompts, seeds=seeds, output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got[0] - got[2]).max() > 1e-3  # same image, different seeds: different outputs


@pytest.mark.slow
def test_compiled_unet_matches_diffusers(model_dirs, oracles):
    """torch.compile of the UNet (static shapes, whole graph) on CPU, with channels-last and VAE slicing
    on too: the same images as diffusers at parity tolerance, twice (the second call reuses the graph)."""
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"], scheduler="euler", channels_last=True)
    pipe.compile_unet()
    pipe.enable_vae_slicing(1)
    images = make_images(2, seed=10)
    kwargs = dict(strength=0.6, guidance_scale=7.5, num_inference_steps=6)
    expected = run_oracle(oracles["v1"], "euler", images, [3, 4], prompt=PROMPTS, **kwargs)
    for _ in range(2):
        got = pipe(images, PROMPTS, seeds=[3, 4], output_type="np", **kwargs)
        assert np.abs(got - expected).max() <= TOLERANCE
