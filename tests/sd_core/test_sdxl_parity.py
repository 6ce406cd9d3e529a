"""SDXL base and refiner against diffusers' StableDiffusionXLImg2ImgPipeline: same folders, seeds and
scheduler; two text towers, micro-conditioning, guidance rescale, clip_skip and the base -> refiner
hand-off."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from sd_core import Img2ImgPipeline
from tests.conftest import diffusers_images, make_images
from tests.sd_core.test_pipeline_parity import ORACLE_SCHEDULERS, TOLERANCE

PROMPTS = ["a photo of a cat", "an oil painting of a harbour at night"]
PROMPTS_2 = ["sharp, detailed", "impressionist brushwork"]
NEGATIVES = ["blurry", "low quality, jpeg artifacts"]
NEGATIVES_2 = ["grainy", "oversaturated"]
# Micro-conditioning other than the defaults (the image's size, crop (0, 0), aesthetic 6.0 / 2.5).
BASE_CONDITIONING = dict(original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(64, 80))
REFINER_CONDITIONING = dict(
    original_size=(80, 96), crops_coords_top_left=(4, 0), aesthetic_score=7.5, negative_aesthetic_score=3.0
)


@pytest.fixture(scope="module")
def oracles(xl_model_dirs):
    pipes = {}
    for family, folder in xl_model_dirs.items():
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder))
        pipes[family] = (pipe, dict(pipe.scheduler.config))
    return pipes


@pytest.fixture(scope="module")
def ours(xl_model_dirs):
    return {family: Img2ImgPipeline.from_pretrained(folder) for family, folder in xl_model_dirs.items()}


def oracle_with(oracles, family: str, scheduler: str):
    pipe, config = oracles[family]
    cls, overrides = ORACLE_SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(config, **overrides)
    return pipe


def family_arguments(family: str) -> tuple[dict, dict]:
    """(ours, diffusers') keyword arguments that only the family takes, with values other than defaults."""
    if family == "xl_base":
        ours = dict(prompts_2=PROMPTS_2, negative_prompts_2=NEGATIVES_2, **BASE_CONDITIONING)
        theirs = dict(prompt_2=PROMPTS_2, negative_prompt_2=NEGATIVES_2, **BASE_CONDITIONING)
        return ours, theirs
    return dict(REFINER_CONDITIONING), dict(REFINER_CONDITIONING)


def test_families_are_detected_from_the_folders(ours):
    assert ours["xl_base"].family.name == "xl_base"
    assert ours["xl_refiner"].family.name == "xl_refiner"
    assert list(ours["xl_refiner"].text_encoders) == ["text_encoder_2"]


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", list(ORACLE_SCHEDULERS))
@pytest.mark.parametrize("family", ["xl_base", "xl_refiner"])
def test_matches_diffusers(ours, oracles, family, scheduler, strength, guidance):
    images = make_images(2, width=64, height=48)
    common = dict(strength=strength, guidance_scale=guidance, num_inference_steps=10)
    our_extra, their_extra = family_arguments(family)
    rescale = 0.7 if guidance > 1 else 0.0
    expected = diffusers_images(
        oracle_with(oracles, family, scheduler),
        images,
        PROMPTS,
        [11, 12],
        negative_prompt=NEGATIVES,
        guidance_rescale=rescale,
        **their_extra,
        **common,
    )
    pipe = ours[family]
    pipe.set_scheduler(scheduler)
    got = pipe(
        images,
        PROMPTS,
        negative_prompts=NEGATIVES,
        seeds=[11, 12],
        guidance_rescale=rescale,
        output_type="np",
        **our_extra,
        **common,
    )
    assert got.shape == expected.shape == (2, 48, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("family", ["xl_base", "xl_refiner"])
def test_clip_skip_matches_diffusers(ours, oracles, family, clip_skip):
    """SDXL indexes from the penultimate layer: clip_skip=k takes hidden_states[-(k + 2)], no LayerNorm."""
    images = make_images(2, width=48, height=64, seed=2)
    kwargs = dict(strength=0.6, guidance_scale=5.0, num_inference_steps=8, clip_skip=clip_skip)
    expected = diffusers_images(
        oracle_with(oracles, family, "euler"), images, PROMPTS, [3, 4], negative_prompt=NEGATIVES, **kwargs
    )
    pipe = ours[family]
    pipe.set_scheduler("euler")
    got = pipe(images, PROMPTS, negative_prompts=NEGATIVES, seeds=[3, 4], output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE
    default = pipe(images, PROMPTS, negative_prompts=NEGATIVES, seeds=[3, 4], output_type="np",
                   **{**kwargs, "clip_skip": None})
    assert np.abs(got - default).max() > 1e-3


@pytest.mark.parametrize("family", ["xl_base", "xl_refiner"])
def test_without_negative_prompts_matches_diffusers(ours, oracles, family):
    """No negative prompt: zeros for the base (force_zeros_for_empty_prompt), "" encoded for the refiner."""
    images = make_images(2, seed=3)
    kwargs = dict(strength=0.7, guidance_scale=6.0, num_inference_steps=8)
    expected = diffusers_images(oracle_with(oracles, family, "dpmpp_2m"), images, PROMPTS, [5, 6], **kwargs)
    pipe = ours[family]
    pipe.set_scheduler("dpmpp_2m")
    got = pipe(images, PROMPTS, seeds=[5, 6], output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE
    empty = pipe(images, PROMPTS, negative_prompts="", seeds=[5, 6], output_type="np", **kwargs)
    assert (np.abs(got - empty).max() > 1e-3) == (family == "xl_base")


def test_a_row_without_negative_is_zeros_beside_a_row_with_one(ours):
    """Per-row negatives (our extension): None rows get the zeros diffusers gives negative_prompt=None."""
    pipe = ours["xl_base"]
    pipe.set_scheduler("euler")
    images = make_images(2, seed=4)
    kwargs = dict(strength=0.7, guidance_scale=6.0, num_inference_steps=6, output_type="np")
    mixed = pipe(images, PROMPTS, negative_prompts=[None, "blurry"], seeds=[1, 2], **kwargs)
    zero = pipe(images[:1], PROMPTS[:1], negative_prompts=None, seeds=[1], **kwargs)
    blurry = pipe(images[1:], PROMPTS[1:], negative_prompts="blurry", seeds=[2], **kwargs)
    assert np.abs(mixed - np.concatenate([zero, blurry])).max() <= 1e-5


@pytest.mark.parametrize("scheduler", list(ORACLE_SCHEDULERS))
def test_base_to_refiner_hand_off_matches_diffusers(ours, oracles, scheduler):
    """diffusers' ensemble of experts: base with denoising_end and latent output, refiner with
    denoising_start on those latents (no noise added): same N-step schedule split between them."""
    images = make_images(2, width=64, height=48, seed=5)
    steps, split = 12, 0.75
    base, refiner = ours["xl_base"], ours["xl_refiner"]
    base.set_scheduler(scheduler)
    refiner.set_scheduler(scheduler)
    latents = base(images, PROMPTS, negative_prompts=NEGATIVES, seeds=[7, 8], strength=0.9,
                   guidance_scale=5.0, num_inference_steps=steps, denoising_end=split, output_type="latent")
    assert latents.shape == (2, 4, 6, 8)
    got = refiner(latents, PROMPTS, negative_prompts=NEGATIVES, seeds=[7, 8], guidance_scale=5.0,
                  num_inference_steps=steps, denoising_start=split, output_type="np")
    strength_run = base.scheduler.start(steps, 0.9)  # the steps strength 0.9 selects, split in two
    assert base.last_call.steps_run + refiner.last_call.steps_run == strength_run.num_steps

    their_base = oracle_with(oracles, "xl_base", scheduler)
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    their_latents = their_base(image=images, prompt=PROMPTS, negative_prompt=NEGATIVES, generator=generators,
                               strength=0.9, guidance_scale=5.0, num_inference_steps=steps,
                               denoising_end=split, output_type="latent").images
    assert torch.abs(latents - their_latents).max() <= TOLERANCE
    expected = diffusers_images(oracle_with(oracles, "xl_refiner", scheduler), their_latents, PROMPTS, [7, 8],
                                negative_prompt=NEGATIVES, guidance_scale=5.0, num_inference_steps=steps,
                                denoising_start=split)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_refiner_on_a_finished_image_is_plain_img2img(ours, oracles):
    """Without denoising_start the refiner is an img2img model like any other (strength path)."""
    images = make_images(2, seed=6)
    kwargs = dict(strength=0.3, guidance_scale=5.0, num_inference_steps=10)
    oracle = oracle_with(oracles, "xl_refiner", "unipc")
    expected = diffusers_images(oracle, images, PROMPTS, [1, 2], **kwargs)
    pipe = ours["xl_refiner"]
    pipe.set_scheduler("unipc")
    got = pipe(images, PROMPTS, seeds=[1, 2], output_type="np", **kwargs)
    assert np.abs(got - expected).max() <= TOLERANCE


def batch_and_alone(pipe, scheduler: str) -> tuple[np.ndarray, np.ndarray]:
    """Row 1 of a batch of 4 (mixed guidance, rescale and micro-conditioning), and the same row alone."""
    pipe.set_scheduler(scheduler)
    images = make_images(4, seed=7)
    prompts = ["one", "two", "three", "four"]
    sizes = [(64, 64), (96, 128), None, (48, 64)]
    kwargs = dict(strength=0.75, num_inference_steps=10, eta=0.5, output_type="np")
    batch = pipe(images, prompts, seeds=[10, 20, 30, 40], guidance_scale=[7.5, 3.0, 1.0, 9.0],
                 guidance_rescale=[0.0, 0.5, 0.0, 0.2], original_size=sizes, **kwargs)
    alone = pipe(images[1:2], prompts[1:2], seeds=[20], guidance_scale=3.0, guidance_rescale=0.5,
                 original_size=sizes[1], **kwargs)
    return batch[1], alone[0]


@pytest.mark.parametrize(
    ("family", "scheduler"),
    [("xl_base", "euler_a"), ("xl_base", "ddim"), ("xl_base", "dpmpp_2m"), ("xl_refiner", "euler_a"),
     ("xl_refiner", "dpmpp_2m")],
)
def test_row_output_does_not_depend_on_its_batch(ours, family, scheduler):
    """As for SD1: a row alone and in a batch of 4 agree to float32 rounding."""
    in_batch, alone = batch_and_alone(ours[family], scheduler)
    assert np.abs(in_batch - alone).max() <= 1e-5


@pytest.fixture(scope="module")
def float64_pipes(xl_model_dirs):
    return {f: Img2ImgPipeline.from_pretrained(d, dtype=torch.float64) for f, d in xl_model_dirs.items()}


@pytest.mark.parametrize("scheduler", list(ORACLE_SCHEDULERS))
@pytest.mark.parametrize("family", ["xl_base", "xl_refiner"])
def test_in_float64_a_row_is_exactly_independent_of_its_batch(float64_pipes, family, scheduler):
    """Batched float32 kernels round differently from unbatched ones, and a random tiny model can grow
    those 1e-7 differences past 1e-5 (the refiner's UNet does, a step amplifying them 20x); float64
    shows that nothing but rounding connects a row to its batchmates."""
    in_batch, alone = batch_and_alone(float64_pipes[family], scheduler)
    assert np.abs(in_batch - alone).max() <= 1e-10


def test_per_row_micro_conditioning_equals_separate_calls(float64_pipes):
    pipe = float64_pipes["xl_refiner"]
    pipe.set_scheduler("euler")
    images = make_images(2, seed=8)
    kwargs = dict(strength=0.7, guidance_scale=5.0, num_inference_steps=6, output_type="np")
    together = pipe(images, PROMPTS, seeds=[1, 2], aesthetic_score=[2.0, 9.0],
                    crops_coords_top_left=[(0, 0), (16, 8)], **kwargs)
    first = pipe(images[:1], PROMPTS[:1], seeds=[1], aesthetic_score=2.0, **kwargs)
    second = pipe(images[1:], PROMPTS[1:], seeds=[2], aesthetic_score=9.0, crops_coords_top_left=(16, 8),
                  **kwargs)
    assert np.abs(together - np.concatenate([first, second])).max() <= 1e-10
    assert pipe.last_call.micro_conditioning["aesthetic_score"] == [9.0]
    assert pipe.last_call.micro_conditioning["crops_coords_top_left"] == [(16, 8)]
    assert np.abs(first - pipe(images[:1], PROMPTS[:1], seeds=[1], **kwargs)).max() > 1e-3  # 2.0 vs 6.0


def test_non_square_sizes_not_divisible_by_8_are_floored_like_diffusers(ours, oracles):
    images = make_images(2, width=70, height=53, seed=9)
    kwargs = dict(strength=0.5, guidance_scale=5.0, num_inference_steps=8)
    expected = diffusers_images(oracle_with(oracles, "xl_base", "pndm"), images, PROMPTS, [7, 8], **kwargs)
    pipe = ours["xl_base"]
    pipe.set_scheduler("pndm")
    got = pipe(images, PROMPTS, seeds=[7, 8], output_type="np", **kwargs)
    assert got.shape == (2, 48, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert pipe.last_call.micro_conditioning["original_size"] == [(48, 64), (48, 64)]


@pytest.mark.parametrize(
    ("family", "argument", "value", "message"),
    [
        ("v1", "prompts_2", "x", r"prompts_2 does not apply to this SD 1\.x model \(v1\)"),
        ("v1", "original_size", (64, 64), r"original_size does not apply to this SD 1\.x model"),
        ("xl_refiner", "prompts_2", "x", r"prompts_2 does not apply to this SDXL refiner"),
        ("xl_refiner", "target_size", (64, 64), r"target_size does not apply to this SDXL refiner"),
        ("xl_base", "aesthetic_score", 6.0, r"aesthetic_score does not apply to this SDXL base"),
        ("xl_base", "negative_crops_coords_top_left", (0, 0), "does not apply to this SDXL base"),
    ],
)
def test_an_argument_of_another_family_is_refused_by_name(ours, model_dirs, family, argument, value, message):
    pipe = ours[family] if family in ours else Img2ImgPipeline.from_pretrained(model_dirs[family])
    with pytest.raises(ValueError, match=message):
        pipe(make_images(1), "a cat", num_inference_steps=4, **{argument: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(original_size=(64,)), r"original_size must be a pair of integers >= 1 \(height, width\)"),
        (dict(crops_coords_top_left=(-1, 0)), r"crops_coords_top_left must be a pair of integers >= 0"),
        (dict(original_size=[(64, 64), (64, 64)]), "original_size has 2 entries but there are 1 prompts"),
        (dict(denoising_start=1), "denoising_start must be None or a float strictly between 0 and 1"),
        (dict(denoising_start=0.4, denoising_end=0.2), "must be below denoising_end"),
        (dict(guidance_rescale=1.5), r"guidance_rescale\[0\] must lie in \[0.0, 1.0\]"),
    ],
)
def test_bad_sdxl_arguments_are_refused(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours["xl_base"](make_images(1), "a cat", num_inference_steps=4, **kwargs)


def test_float16_keeps_an_upcasting_vae_in_float32(xl_model_dirs, tmp_path):
    """diffusers runs SDXL's VAE in float32 when its config says force_upcast (the original SDXL VAE
    overflows in float16); a VAE made for float16 (force_upcast false) stays float16."""
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"], dtype=torch.float16)
    assert pipe.vae_dtype == torch.float32 and pipe.unet.conv_in.weight.dtype == torch.float16
    images = pipe(make_images(1), "a cat", seeds=[1], strength=0.5, num_inference_steps=4, output_type="np")
    assert np.isfinite(images).all()
    import shutil

    folder = tmp_path / "fp16-vae"
    shutil.copytree(xl_model_dirs["xl_base"], folder)
    config_path = folder / "vae" / "config.json"
    config_path.write_text(config_path.read_text().replace('"force_upcast": true', '"force_upcast": false'))
    assert Img2ImgPipeline.from_pretrained(folder, dtype=torch.float16).vae_dtype == torch.float16


@pytest.mark.parametrize(("strength", "steps"), [(0.9, 12), (0.2, 12), (1.0, 3)])
def test_expert_ensemble_equals_the_two_calls(ours, strength, steps):
    """ExpertEnsemble is the hand-off above in one call; where the strength starts below the switch the
    refiner runs all of it, and where no step falls below it the base does."""
    from sd_core.ensemble import ExpertEnsemble

    base, refiner = ours["xl_base"], ours["xl_refiner"]
    ensemble = ExpertEnsemble(base, refiner, 0.75)
    ensemble.set_scheduler("dpmpp_2m")
    images = make_images(2, seed=10)
    common = dict(negative_prompts=NEGATIVES, seeds=[7, 8], guidance_scale=5.0, num_inference_steps=steps)
    got = ensemble(images, PROMPTS, strength=strength, output_type="np", aesthetic_score=7.0,
                   prompts_2=PROMPTS_2, **common)
    base_steps, refiner_steps = ensemble.split_steps(steps, strength)
    if base_steps and refiner_steps:
        latents = base(images, PROMPTS, strength=strength, denoising_end=0.75, output_type="latent",
                       prompts_2=PROMPTS_2, **common)
        expected = refiner(latents, PROMPTS, denoising_start=0.75, output_type="np", aesthetic_score=7.0,
                           **common)
    elif refiner_steps:
        expected = refiner(images, PROMPTS, strength=strength, output_type="np", aesthetic_score=7.0,
                           **common)
    else:
        expected = base(images, PROMPTS, strength=strength, output_type="np", prompts_2=PROMPTS_2, **common)
    assert np.abs(got - expected).max() == 0
    assert ensemble.last_call.steps_run == base_steps + refiner_steps
    assert (base_steps > 0, refiner_steps > 0) == {0.9: (True, True), 0.2: (False, True), 1.0: (True, False)}[
        strength
    ]


def test_expert_ensemble_refuses_what_neither_model_takes(ours, model_dirs):
    from sd_core.ensemble import ExpertEnsemble

    base_twice = ExpertEnsemble(ours["xl_base"], ours["xl_base"], 0.8)  # a base may refine itself
    with pytest.raises(ValueError, match="aesthetic_score applies to neither model"):
        base_twice(make_images(1), "a", num_inference_steps=4, aesthetic_score=6.0)
    with pytest.raises(ValueError, match="denoising_end is the ensemble's own"):
        base_twice(make_images(1), "a", num_inference_steps=4, denoising_end=0.5)
    sd1 = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    with pytest.raises(ValueError, match="reads latents other than the base's"):
        ExpertEnsemble(ours["xl_base"], sd1, 0.8)
