"""The core's speed settings change no image: channels-last weights, VAE decode in slices, repeated rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_core import Img2ImgPipeline
from sd_core.speed import distinct_rows
from tests.conftest import make_images
from tests.sd_core.test_lora import pick, weight_shapes, write_kohya

KWARGS = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=6, output_type="np")


@pytest.fixture(scope="module")
def pipes(model_dirs):
    return {
        layout: Img2ImgPipeline.from_pretrained(model_dirs["v1"], scheduler="ddim", channels_last=layout)
        for layout in (False, True)
    }


def test_channels_last_is_opt_in_and_gives_the_same_images(model_dirs, pipes):
    default = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    assert not default.channels_last
    assert default.unet.conv_in.weight.is_contiguous()
    assert pipes[True].unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = make_images(2, seed=1)
    nchw, nhwc = (pipes[layout](images, ["a", "b"], seeds=[1, 2], **KWARGS) for layout in (False, True))
    assert np.abs(nchw - nhwc).max() <= 1e-5


def test_channels_last_survives_a_lora(model_dirs, tmp_path):
    """LoRA deltas are added in place, so fused conv weights stay NHWC (no silent fall back to NCHW)."""
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"], scheduler="ddim", channels_last=True)
    shapes = weight_shapes(pipe)
    path = tmp_path / "lora.safetensors"
    write_kohya(path, shapes, pick(shapes, ("conv_in", "down_blocks.0.")), lambda m: 4.0, lambda m: 4, seed=1)
    pipe.load_lora(path, scale=0.5)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_slicing_gives_the_same_images(pipes):
    pipe = pipes[True]
    images = make_images(3, seed=2)
    whole = pipe(images, ["a", "b", "c"], seeds=[1, 2, 3], **KWARGS)
    pipe.enable_vae_slicing(2)
    try:
        sliced = pipe(images, ["a", "b", "c"], seeds=[1, 2, 3], **KWARGS)
    finally:
        pipe.enable_vae_slicing(None)
    assert np.abs(whole - sliced).max() <= 1e-5
    with pytest.raises(ValueError, match="positive int"):
        pipe.enable_vae_slicing(0)


def test_distinct_rows_finds_repeats_exactly():
    a, b = torch.rand(2, 3, 8, 8)
    batch = torch.stack([a, b, a, a])
    distinct, index = distinct_rows(batch)
    assert distinct.shape[0] == 2
    assert torch.equal(distinct[index], batch)
    nearly = torch.stack([a, a + 1e-7 * (a == a.max())])  # one element differs in its last bits
    assert distinct_rows(nearly)[1] is None
    assert distinct_rows(batch[:1])[1] is None


def test_float16_vae_overflow_is_decoded_again_in_float32(model_dirs):
    """A float16 VAE decoder that overflows (made to here by scaling its first conv: GroupNorm undoes the
    scale in float32) gives NaN rows; those rows are decoded again by a float32 copy, not raised."""
    pipes = {
        vae_dtype: Img2ImgPipeline.from_pretrained(
            model_dirs["v1"], scheduler="ddim", dtype=torch.float16, vae_dtype=vae_dtype
        )
        for vae_dtype in (torch.float16, torch.float32)
    }
    for pipe in pipes.values():
        with torch.no_grad():
            pipe.vae.decoder.conv_in.weight.mul_(1e5)
            pipe.vae.decoder.conv_in.bias.mul_(1e5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    assert not torch.isfinite(pipes[torch.float16].decode(latents)).all()  # it does overflow
    images = make_images(2, seed=3)
    safe, reference = (
        pipes[vae_dtype](images, ["a", "b"], seeds=[1, 2], **KWARGS)
        for vae_dtype in (torch.float16, torch.float32)
    )
    assert np.isfinite(safe).all()
    assert np.abs(safe - reference).max() <= 0.02  # the same but for float16 VAE encoding
