"""Bad arguments get clear errors that say what is wrong and how to fix it, before any work is done."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_core import Img2ImgPipeline
from tests.conftest import make_images


@pytest.fixture(scope="module")
def pipe(model_dirs):
    return Img2ImgPipeline.from_pretrained(model_dirs["v1"])


def call(pipe, **overrides):
    kwargs = dict(
        images=make_images(2), prompts=["a", "b"], num_inference_steps=4, seeds=[1, 2], output_type="np"
    )
    kwargs.update(overrides)
    return pipe(**kwargs)


def test_unknown_scheduler_lists_the_valid_names(pipe):
    with pytest.raises(ValueError, match=r"euler_a.*unipc|unipc.*euler_a"):
        pipe.set_scheduler("k_heun_turbo")


def test_unknown_scheduler_at_load(model_dirs):
    with pytest.raises(ValueError, match="k_heun_turbo"):
        Img2ImgPipeline.from_pretrained(model_dirs["v1"], scheduler="k_heun_turbo")


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_unit_interval(pipe, strength):
    with pytest.raises(ValueError, match=r"strength must lie in \[0.0, 1.0\]"):
        call(pipe, strength=strength)


def test_strength_times_steps_below_one_runs_no_step(pipe):
    with pytest.raises(
        ValueError, match=r"would run no denoising step.*raise strength or num_inference_steps"
    ):
        call(pipe, strength=0.2, num_inference_steps=4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prompts=["only one"], seeds=[1]), "got 2 images but 1 prompts"),
        (dict(seeds=[1, 2, 3]), "seeds has 3 entries but there are 2 prompts"),
        (dict(guidance_scale=[7.5]), "guidance_scale has 1 entries but there are 2 prompts"),
        (dict(negative_prompts=["x", "y", "z"]), "negative_prompts has 3 entries but there are 2 prompts"),
    ],
)
def test_mismatched_list_lengths(pipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        call(pipe, **overrides)


def test_tensor_sides_not_divisible_by_8(pipe):
    with pytest.raises(ValueError, match=r"not divisible by 8; crop or resize it to 64x48"):
        call(pipe, images=torch.rand(2, 3, 50, 70))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(2, 3, 48, 64) * 255, r"values must lie in \[0, 1\]"),
        (torch.rand(2, 3, 48, 64) * 2 - 1, r"values must lie in \[0, 1\]"),
        (torch.rand(2, 5, 48, 64), r"shape \[B, 3, H, W\]"),
        (torch.rand(3, 48, 64), r"shape \[B, 3, H, W\]"),
        (torch.zeros(2, 3, 48, 64, dtype=torch.uint8), "floating point"),
    ],
)
def test_wrong_tensor_range_or_shape(pipe, images, message):
    with pytest.raises(ValueError, match=message):
        call(pipe, images=images)


def test_images_of_different_sizes_in_one_batch(pipe):
    images = make_images(1, 64, 48) + make_images(1, 48, 64)
    with pytest.raises(ValueError, match="must share a size"):
        call(pipe, images=images)


@pytest.mark.parametrize("clip_skip", [-1, 3, 1.5])
def test_clip_skip_out_of_range(pipe, clip_skip):
    with pytest.raises(ValueError, match=r"clip_skip must be None or an integer in \[0, 2\]"):
        call(pipe, clip_skip=clip_skip)


@pytest.mark.parametrize("seed", [-1, 2**64, "7", 1.0])
def test_bad_seed(pipe, seed):
    with pytest.raises(ValueError, match=r"seeds\[0\] must be an integer"):
        call(pipe, seeds=[seed, 2])


def test_bad_output_type(pipe):
    with pytest.raises(ValueError, match="output_type must be one of pil, np, pt, latent"):
        call(pipe, output_type="jpeg")


def test_tensor_input_equals_pil_input(pipe):
    images = make_images(2)
    as_tensor = torch.stack([torch.from_numpy(np.array(im)) for im in images]).permute(0, 3, 1, 2) / 255
    assert abs(call(pipe, images=images) - call(pipe, images=as_tensor)).max() <= 1e-5


def test_output_types(pipe):
    pil = call(pipe, output_type="pil")
    pt = call(pipe, output_type="pt")
    latent = call(pipe, output_type="latent")
    assert [im.size for im in pil] == [(64, 48)] * 2
    assert pt.shape == (2, 3, 48, 64) and 0 <= pt.min() and pt.max() <= 1
    assert latent.shape == (2, 4, 6, 8)


def test_same_seed_same_image(pipe):
    assert (call(pipe) == call(pipe)).all()
    assert not (call(pipe) == call(pipe, seeds=[1, 3])).all()


def test_nan_weights_raise_a_clear_error(model_dirs):
    broken = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    with torch.no_grad():
        next(broken.vae.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(
        Exception, match=r"the VAE decoder produced NaN/Inf or black output for rows \[0, 1\]"
    ):
        call(broken)


def test_attention_slicing_gives_the_same_images(pipe):
    expected = call(pipe)
    pipe.enable_attention_slicing(1)
    try:
        got = call(pipe)
    finally:
        pipe.enable_attention_slicing(None)
    assert abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_with_an_fp32_vae(model_dirs, dtype):
    half = Img2ImgPipeline.from_pretrained(model_dirs["v1"], dtype=dtype, vae_dtype=torch.float32)
    assert half.unet.conv_in.weight.dtype == dtype and half.vae.decoder.conv_in.weight.dtype == torch.float32
    full = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    assert abs(call(half) - call(full)).max() < 0.1


def test_prediction_type_override(model_dirs):
    forced = Img2ImgPipeline.from_pretrained(model_dirs["v1"], prediction_type="v_prediction")
    assert forced.scheduler.prediction_type == "v_prediction"
    forced.set_scheduler("euler")
    assert forced.scheduler.prediction_type == "v_prediction"


def test_negative_prompt_embeddings_are_computed_once(pipe):
    encoder = pipe.prompt_encoder
    encoder.clear_cache()
    texts_encoded = []
    hook = encoder.towers[0].model.register_forward_hook(
        lambda module, args, out: texts_encoded.append(args[0].shape[0])
    )
    try:
        call(pipe, negative_prompts="blurry")
        call(pipe, negative_prompts="blurry")
        call(pipe, negative_prompts=["blurry", "grainy"])
    finally:
        hook.remove()
    # per call: the prompts; a batch's negatives as diffusers encodes them (all rows at once), only when
    # that batch of negatives is new: the second call reuses the first's
    assert texts_encoded == [2, 2, 2, 2, 2]
