"""Images in and out of the model's pixel space ([-1, 1], NCHW), with diffusers' exact conversions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _pil_to_array(image: PIL.Image.Image, scale_factor: int) -> np.ndarray:
    """RGB float array in [0, 1], size floored to a multiple of `scale_factor` (diffusers' rule)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    width, height = (d - d % scale_factor for d in image.size)
    if width == 0 or height == 0:
        raise ValueError(
            f"image of size {image.size[0]}x{image.size[1]} is smaller than the model's "
            f"{scale_factor}-pixel latent cell; use images at least {scale_factor}x{scale_factor}"
        )
    image = image.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def images_to_tensor(images: Sequence[PIL.Image.Image] | torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Pipeline input -> float32 tensor [B, 3, H, W] in [-1, 1].

    PIL images are converted to RGB and their sides floored to a multiple of `scale_factor` with a
    Lanczos resize, exactly as diffusers' `VaeImageProcessor` does; all must end up the same size.
    Tensors must already be [B, 3, H, W] floats in [0, 1] with sides divisible by `scale_factor`.
    """
    if isinstance(images, torch.Tensor):
        return _check_tensor(images, scale_factor) * 2.0 - 1.0
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if not images or not all(isinstance(im, PIL.Image.Image) for im in images):
        raise TypeError(
            "images must be a non-empty list of PIL images or a float tensor [B, 3, H, W] in [0, 1]"
        )
    arrays = [_pil_to_array(im, scale_factor) for im in images]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise ValueError(
            f"images in one batch must share a size after flooring to multiples of {scale_factor}; "
            f"got {shown}. "
            "Resize them first, or call the pipeline once per size."
        )
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch * 2.0 - 1.0


def _check_tensor(images: torch.Tensor, scale_factor: int) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"image tensor must have shape [B, 3, H, W] (or be latents [B, 4, h, w]); "
            f"got {list(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"image tensor must be floating point in [0, 1]; got dtype {images.dtype}")
    height, width = images.shape[-2:]
    if height % scale_factor or width % scale_factor:
        raise ValueError(
            f"image tensor size {width}x{height} is not divisible by {scale_factor}; crop or resize it to "
            f"{width - width % scale_factor}x{height - height % scale_factor}"
        )
    low, high = float(images.min()), float(images.max())
    if not (low >= 0.0 and high <= 1.0):
        raise ValueError(
            f"image tensor values must lie in [0, 1]; got [{low:.3g}, {high:.3g}]. "
            "Divide uint8 images by 255; map [-1, 1] images with (x + 1) / 2."
        )
    return images.float()  # in its own memory layout, as diffusers keeps it (it changes the rounding)


def tensor_to_output(pixels: torch.Tensor, output_type: str):
    """Decoded [-1, 1] pixels -> 'pt' tensor [B,3,H,W], 'np' array [B,H,W,3] or 'pil' images, in [0, 1]."""
    images = (pixels / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(img) for img in (array * 255).round().astype("uint8")]
