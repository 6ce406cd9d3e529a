"""Edited images -> PNG / JPEG / WebP bytes carrying AUTOMATIC1111's generation parameters (infotext).

The settings travel where A1111 and ComfyUI look for them: the PNG text chunk `parameters` (tEXt, or
iTXt when the text is not Latin-1), and for JPEG / WebP the EXIF UserComment in A1111's
"UNICODE" (UTF-16BE) encoding. A PNG may carry more text chunks; JPEG and WebP carry only what A1111's do.
The text's layout is A1111 1.10's `create_infotext` (`modules/processing.py`); which keys go in is the
caller's choice.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Literal

import PIL.Image
import PIL.PngImagePlugin

ImageFormat = Literal["png", "jpeg", "webp"]
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"


def encode_image(
    image: PIL.Image.Image,
    fmt: ImageFormat,
    quality: int = 95,
    parameters: str | None = None,
    png_texts: Mapping[str, str] | None = None,
) -> bytes:
    """Encode an RGB image; `quality` (1-100) applies to JPEG and WebP, `parameters` is A1111 infotext,
    `png_texts` more PNG text chunks (name -> text) after it, which JPEG and WebP leave out."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}; got {fmt!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"image quality must be an int from 1 to 100; got {quality!r}")
    if image.mode != "RGB":
        raise ValueError(f"encode_image expects an RGB image; got mode {image.mode!r}. Convert it first")
    buffer = io.BytesIO()
    if fmt == "png":
        info = PIL.PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        for name, text in (png_texts or {}).items():
            info.add_text(name, text)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = PIL.Image.Exif()
        if parameters is not None:
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
        image.save(buffer, format=fmt.upper(), quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    denoising_strength: float | None,
    model_hash: str | None = None,
    extra: Mapping[str, object] | None = None,
    *,
    schedule_type: str | None = None,
    model_name: str | None = None,
) -> str:
    """A1111's infotext: prompt, `Negative prompt:` line, then `Key: value, ...` in `create_infotext`'s
    order (`extra` last, in its own order); None values omitted, the whole text stripped as A1111 does."""
    fields: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Denoising strength": denoising_strength,
        **(extra or {}),
    }
    settings = ", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{settings}".strip()


def _quote(value: str) -> str:
    """A1111's `infotext_utils.quote`: JSON-quote values that would break the `Key: value, ` layout."""
    if any(c in value for c in ",\n:"):
        return json.dumps(value, ensure_ascii=False)
    return value
