"""Fitting an image to the model's size with AUTOMATIC1111's three resize modes (modules/images.py)."""

from __future__ import annotations

from typing import Literal

import PIL.Image

ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill"]
RESIZE_MODES: tuple[str, ...] = ("just_resize", "crop_and_resize", "resize_and_fill")
MULTIPLE = 8  # the VAE's downscale factor: latent cells are 8x8 pixels


def round_to_multiple(x: int, multiple: int = MULTIPLE) -> int:
    """`x` rounded down to a multiple of `multiple`, never below `multiple`."""
    if x < 1 or multiple < 1:
        raise ValueError(f"round_to_multiple needs positive sizes; got x={x}, multiple={multiple}")
    return max(multiple, x - x % multiple)


def target_size(
    image_size: tuple[int, int], width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """The model size for an image: given sides kept, a missing side follows the image's aspect ratio.

    Given sides must be multiples of 8; derived ones are rounded down to multiples of 8 (minimum 8).
    """
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            _check_side(name, side)
    image_width, image_height = image_size
    if width is None and height is None:
        return round_to_multiple(image_width), round_to_multiple(image_height)
    if width is None:
        return round_to_multiple(max(1, round(height * image_width / image_height))), height
    if height is None:
        return width, round_to_multiple(max(1, round(width * image_height / image_width)))
    return width, height


def resize_for_model(image: PIL.Image.Image, width: int, height: int, mode: ResizeMode) -> PIL.Image.Image:
    """`image` at exactly `width` x `height` (multiples of 8), fitted as A1111's resize mode `mode` does.

    just_resize stretches; crop_and_resize scales to cover and crops the centre; resize_and_fill scales to
    fit, centres, and fills the bands by stretching the image's edge rows or columns outwards.
    """
    _check_side("width", width)
    _check_side("height", height)
    if mode == "just_resize":
        return _lanczos(image, width, height)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    covers = mode == "crop_and_resize"
    if (width / height > image.width / image.height) == covers:
        scaled_width, scaled_height = width, max(1, image.height * width // image.width)
    else:
        scaled_width, scaled_height = max(1, image.width * height // image.height), height
    scaled = _lanczos(image, scaled_width, scaled_height)
    left, top = width // 2 - scaled_width // 2, height // 2 - scaled_height // 2
    canvas = PIL.Image.new(image.mode, (width, height))
    canvas.paste(scaled, (left, top))
    if not covers:
        _fill_bands(canvas, scaled, left, top)
    return canvas


def _fill_bands(canvas: PIL.Image.Image, scaled: PIL.Image.Image, left: int, top: int) -> None:
    """Stretch `scaled`'s outer rows (or columns) over the empty bands around it, in place."""
    right, bottom = left + scaled.width, top + scaled.height
    bands = [
        ((0, 0, scaled.width, 1), (0, 0, canvas.width, top)),
        ((0, scaled.height - 1, scaled.width, scaled.height), (0, bottom, canvas.width, canvas.height)),
        ((0, 0, 1, scaled.height), (0, 0, left, canvas.height)),
        ((scaled.width - 1, 0, scaled.width, scaled.height), (right, 0, canvas.width, canvas.height)),
    ]
    for edge, (x0, y0, x1, y1) in bands:
        if x1 > x0 and y1 > y0:
            canvas.paste(scaled.crop(edge).resize((x1 - x0, y1 - y0), PIL.Image.Resampling.NEAREST), (x0, y0))


def _lanczos(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    return (
        image
        if image.size == (width, height)
        else image.resize((width, height), PIL.Image.Resampling.LANCZOS)
    )


def _check_side(name: str, side: int) -> None:
    if side < MULTIPLE or side % MULTIPLE:
        raise ValueError(
            f"target {name} must be a positive multiple of {MULTIPLE} (the VAE's latent cell); got {side}. "
            "Round it with round_to_multiple() (rounds down, minimum 8)"
        )
