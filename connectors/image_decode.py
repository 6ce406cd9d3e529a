"""Image bytes from a dataset -> an 8-bit RGB PIL image, with every failure named by its source.

Policies:
- EXIF orientation is applied, so the image is upright as viewers show it.
- Transparency (alpha bands, palette or grayscale `tRNS`) is composited on `background`, not dropped.
- 16-bit images are scaled to 8 bits (value / 257), not clipped; CMYK and grayscale become RGB.
  Embedded ICC profiles are not applied: pixel values are taken as sRGB.
- Animated images (GIF / APNG / WebP with more than one frame) are refused unless `allow_animated`,
  in which case the first frame is used.
- The pixel count is checked from the header, before any pixel is decoded. Pillow's own global bomb
  limit (`PIL.Image.MAX_IMAGE_PIXELS`, 2x of it refuses) still applies and is reported the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """Bytes that cannot become an image for the model; the message names the source and the fix."""


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int = 64_000_000
    min_side: int = 8
    background: tuple[int, int, int] = (255, 255, 255)
    allow_animated: bool = False

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"DecodeOptions.max_pixels must be positive; got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"DecodeOptions.min_side must be positive; got {self.min_side}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(
                f"DecodeOptions.background must be an (r, g, b) triple of 0-255 ints; got {self.background}"
            )


def decode_image(data: bytes, source: str, options: DecodeOptions = DecodeOptions()) -> PIL.Image.Image:
    """Decode `data` (read from `source`, used only in error messages) to an upright 8-bit RGB image."""
    if not data:
        raise ImageDecodeError(f"{source}: the file is empty (0 bytes); check the upload or drop the row")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as exc:
        raise _bomb_error(source, str(exc), options) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        cause = "unrecognised format" if isinstance(exc, PIL.UnidentifiedImageError) else str(exc)
        raise ImageDecodeError(
            f"{source}: not an image Pillow can read ({cause}; {len(data)} bytes starting {data[:16]!r}); "
            "check that the data is a PNG/JPEG/WebP/GIF/BMP/TIFF file"
        ) from exc
    _check_header(image, source, options)
    try:
        image.seek(0)
        image.load()
    except PIL.Image.DecompressionBombError as exc:
        raise _bomb_error(source, str(exc), options) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(
            f"{source}: the {image.format} data is truncated or corrupt ({exc}); "
            "re-export or re-upload the file, or drop the row"
        ) from exc
    try:
        upright = PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as exc:
        raise ImageDecodeError(
            f"{source}: the {image.format} EXIF orientation data is corrupt ({exc}); "
            "strip the EXIF block (e.g. re-save the image) or drop the row"
        ) from exc
    try:
        return to_rgb(upright, options.background)
    except ValueError as exc:
        raise ImageDecodeError(
            f"{source}: {image.format} colour mode {upright.mode!r} cannot be converted to RGB ({exc}); "
            "convert the file to 8-bit RGB first"
        ) from exc


def _check_header(image: PIL.Image.Image, source: str, options: DecodeOptions) -> None:
    width, height = image.size
    if width * height > options.max_pixels:
        raise _bomb_error(source, f"header says {width}x{height} = {width * height} pixels", options)
    if min(width, height) < options.min_side:
        raise ImageDecodeError(
            f"{source}: image is {width}x{height}, smaller than the minimum side of {options.min_side} "
            "pixels; upscale it first, drop the row, or lower DecodeOptions.min_side"
        )
    if getattr(image, "is_animated", False) and not options.allow_animated:
        raise ImageDecodeError(
            f"{source}: animated {image.format} (more than one frame); img2img edits still images. "
            "Extract a frame first, or set DecodeOptions(allow_animated=True) to use the first frame"
        )


def _bomb_error(source: str, detail: str, options: DecodeOptions) -> ImageDecodeError:
    return ImageDecodeError(
        f"{source}: image too large to decode safely ({detail}; limit {options.max_pixels} pixels); "
        "downscale it before the job, or raise DecodeOptions.max_pixels if it is genuine"
    )


def to_rgb(image: PIL.Image.Image, background: tuple[int, int, int]) -> PIL.Image.Image:
    """Any PIL image -> 8-bit RGB, compositing transparency on `background` and scaling 16-bit data."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = PIL.Image.fromarray(np.round(levels).astype(np.uint8))
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")
