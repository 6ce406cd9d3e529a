"""Image bytes <-> RGB images: decoding policies, A1111 resize modes, encoding with parameters."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from connectors.image_decode import DecodeOptions, ImageDecodeError, decode_image
from connectors.image_encode import a1111_parameters, encode_image
from connectors.image_resize import resize_for_model, round_to_multiple, target_size

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
SOURCE = "s3://bucket/images/row-7.png"


def saved(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def halves(width: int, height: int, left=RED, right=BLUE) -> PIL.Image.Image:
    """Left half `left`, right half `right`."""
    image = PIL.Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def pixel(image: PIL.Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image)[y, x].astype(int)


def close(actual: np.ndarray, expected, tol: int = 6) -> bool:
    return bool(np.all(np.abs(actual - np.asarray(expected)) <= tol))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- decode ----------------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied():
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = saved(halves(32, 16), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, SOURCE, DecodeOptions())
    assert image.size == (16, 32)
    assert close(pixel(image, 8, 4), RED, 20)  # the stored left (red) half is now on top
    assert close(pixel(image, 8, 28), BLUE, 20)


def test_palette_transparency_is_composited_on_the_background():
    image = PIL.Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))
    data = saved(image, "PNG", transparency=0)
    decoded = decode_image(data, SOURCE, DecodeOptions(background=GREEN))
    assert decoded.mode == "RGB"
    assert tuple(pixel(decoded, 2, 2)) == GREEN
    assert tuple(pixel(decoded, 12, 2)) == RED


def test_la_alpha_is_blended_on_white_by_default():
    image = PIL.Image.new("LA", (16, 16), (100, 255))
    image.paste((100, 0), (0, 0, 8, 16))
    image.paste((0, 128), (0, 8, 16, 16))
    decoded = decode_image(saved(image, "PNG"), SOURCE, DecodeOptions())
    assert tuple(pixel(decoded, 2, 2)) == (255, 255, 255)
    assert tuple(pixel(decoded, 12, 2)) == (100, 100, 100)
    assert close(pixel(decoded, 12, 12), (127, 127, 127), 1)


def test_cmyk_jpeg_becomes_rgb():
    data = saved(PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    decoded = decode_image(data, SOURCE, DecodeOptions())
    assert decoded.mode == "RGB"
    assert close(pixel(decoded, 8, 8), RED)


def test_16_bit_png_is_scaled_not_clipped():
    levels = np.full((16, 16), 32768, dtype=np.uint16)
    levels[:, 8:] = 65535
    data = saved(PIL.Image.fromarray(levels), "PNG")
    decoded = decode_image(data, SOURCE, DecodeOptions())
    assert tuple(pixel(decoded, 2, 2)) == (128, 128, 128)
    assert tuple(pixel(decoded, 12, 2)) == (255, 255, 255)


def test_grayscale_becomes_rgb():
    decoded = decode_image(saved(PIL.Image.new("L", (16, 16), 77), "PNG"), SOURCE, DecodeOptions())
    assert decoded.mode == "RGB" and tuple(pixel(decoded, 3, 3)) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data_names_the_source(fmt):
    data = saved(PIL.Image.effect_noise((64, 64), 50).convert("RGB"), fmt)
    with pytest.raises(ImageDecodeError, match=f"{SOURCE}: .*truncated or corrupt"):
        decode_image(data[: len(data) // 2], SOURCE, DecodeOptions())


def test_non_image_bytes():
    with pytest.raises(ImageDecodeError, match=f"{SOURCE}: not an image"):
        decode_image(b"<html>403 Forbidden</html>", SOURCE, DecodeOptions())


def test_empty_bytes():
    with pytest.raises(ImageDecodeError, match=f"{SOURCE}: the file is empty"):
        decode_image(b"", SOURCE, DecodeOptions())


def test_too_small_image():
    with pytest.raises(ImageDecodeError, match="4x20, smaller than the minimum side of 8"):
        decode_image(saved(PIL.Image.new("RGB", (4, 20)), "PNG"), SOURCE, DecodeOptions())


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_decoding():
    data = saved(PIL.Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageDecodeError, match="64x64 = 4096 pixels; limit 4000"):
        decode_image(data, SOURCE, DecodeOptions(max_pixels=4000))
    # A header claiming 10000x10000 over a tiny body: the limit fires, not a truncation error.
    forged = data[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0)) + data[33:]
    with pytest.raises(ImageDecodeError, match=f"{SOURCE}: image too large .*10000x10000"):
        decode_image(forged, SOURCE, DecodeOptions())


def test_pillow_global_bomb_limit_is_reported_the_same_way():
    data = saved(PIL.Image.new("RGB", (8, 8)), "PNG")
    forged = (
        data[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + data[33:]
    )
    with pytest.raises(ImageDecodeError, match=f"{SOURCE}: image too large"):
        decode_image(forged, SOURCE, DecodeOptions(max_pixels=10**11))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_real_sparse_bomb_png_is_refused():
    side = 10_000  # 100 MP of 1-bit zeros: 1.6 KB on disk
    rows = zlib.compress(bytes(side * (1 + side // 8)), 9)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + png_chunk(b"IDAT", rows)
        + png_chunk(b"IEND", b"")
    )
    with pytest.raises(ImageDecodeError, match="100000000 pixels; limit 64000000"):
        decode_image(data, SOURCE, DecodeOptions())


def test_animated_gif_is_refused_unless_allowed():
    frames = [PIL.Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE)]
    data = saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageDecodeError, match=f"{SOURCE}: animated GIF.*allow_animated=True"):
        decode_image(data, SOURCE, DecodeOptions())
    first = decode_image(data, SOURCE, DecodeOptions(allow_animated=True))
    assert first.size == (16, 16) and tuple(pixel(first, 8, 8)) == RED


def test_decode_options_are_validated():
    with pytest.raises(ValueError, match="background"):
        DecodeOptions(background=(0, 0, 300))


# --- resize ----------------------------------------------------------------------------------------


def test_just_resize_stretches():
    resized = resize_for_model(halves(64, 32), 32, 64, "just_resize")
    assert resized.size == (32, 64)
    assert close(pixel(resized, 4, 32), RED) and close(pixel(resized, 28, 32), BLUE)


def test_crop_and_resize_keeps_the_centre():
    image = PIL.Image.new("RGB", (96, 32), GREEN)  # red | blue | green thirds; blue is the centre
    image.paste(RED, (0, 0, 32, 32))
    image.paste(BLUE, (32, 0, 64, 32))
    resized = resize_for_model(image, 32, 64, "crop_and_resize")
    assert resized.size == (32, 64)
    arr = np.asarray(resized).astype(int)
    assert close(arr[:, 4:28], BLUE, 12)


def test_resize_and_fill_stretches_edges_into_the_bands():
    image = PIL.Image.new("RGB", (32, 32), BLUE)  # red top row, green bottom row
    image.paste(RED, (0, 0, 32, 1))
    image.paste(GREEN, (0, 31, 32, 32))
    resized = resize_for_model(image, 32, 72, "resize_and_fill")
    assert resized.size == (32, 72)
    arr = np.asarray(resized).astype(int)
    assert close(arr[:20], RED, 40) and close(arr[53:], GREEN, 40)  # bands: 20 rows each side
    assert close(arr[30:42], BLUE, 12)
    sideways = resize_for_model(halves(32, 32), 80, 32, "resize_and_fill")
    arr = np.asarray(sideways).astype(int)
    assert close(arr[:, :24], RED, 12) and close(arr[:, 56:], BLUE, 12)
    odd = resize_for_model(PIL.Image.new("RGB", (33, 32), BLUE), 64, 56, "resize_and_fill")
    assert close(np.asarray(odd).astype(int), BLUE, 12)  # an odd leftover leaves no black seam


def test_resize_rejects_bad_sizes_and_modes():
    image = halves(16, 16)
    with pytest.raises(ValueError, match="width must be a positive multiple of 8 .*; got 30"):
        resize_for_model(image, 30, 16, "just_resize")
    with pytest.raises(ValueError, match="resize mode must be one of"):
        resize_for_model(image, 16, 16, "stretch")


def test_round_to_multiple_and_target_size():
    assert [round_to_multiple(x) for x in (1, 8, 15, 16, 517)] == [8, 8, 8, 16, 512]
    assert target_size((517, 389)) == (512, 384)
    assert target_size((1000, 500), width=512) == (512, 256)
    assert target_size((1000, 500), height=200) == (400, 200)
    assert target_size((1000, 10), width=64) == (64, 8)
    assert target_size((300, 300), width=64, height=128) == (64, 128)
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        target_size((300, 300), height=100)


# --- encode ----------------------------------------------------------------------------------------

PARAMETERS = a1111_parameters(
    "a watercolour fox, 🦊", "blurry", 20, "Euler a", 7.5, 1, 512, 512, 0.75, model_hash="abc123"
)


def test_a1111_parameters_layout():
    assert PARAMETERS == (
        "a watercolour fox, 🦊\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: abc123, "
        "Denoising strength: 0.75"
    )
    bare = a1111_parameters(
        "p", None, 30, "DPM++ 2M", 5.0, 9, 64, 128, None, extra={"Lora": "a: 1, b"}, schedule_type="Karras"
    )
    assert bare == (
        "p\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 9, Size: 64x128, "
        'Lora: "a: 1, b"'
    )
    named = a1111_parameters(" ", None, 1, "Euler", 7.0, 1, 8, 8, 0.5, model_hash="h", model_name="sd15")
    assert named == (  # A1111 strips the whole text: a blank prompt leaves no leading space
        "Steps: 1, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 8x8, Model hash: h, Model: sd15, "
        "Denoising strength: 0.5"
    )


def test_png_round_trip_carries_parameters():
    image = halves(32, 16)
    data = encode_image(image, "png", parameters=PARAMETERS)
    decoded = PIL.Image.open(io.BytesIO(data))
    assert decoded.text["parameters"] == PARAMETERS
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_round_trip_carries_parameters_in_exif(fmt):
    data = encode_image(halves(32, 16), fmt, quality=90, parameters=PARAMETERS)
    decoded = PIL.Image.open(io.BytesIO(data))
    assert decoded.format == fmt.upper() and decoded.size == (32, 16)
    assert close(pixel(decoded.convert("RGB"), 4, 8), RED, 30)
    comment = decoded.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\x00" + PARAMETERS.encode("utf-16-be")


def test_encode_rejects_bad_format_and_quality():
    image = halves(16, 16)
    with pytest.raises(ValueError, match="format must be one of png, jpeg, webp; got 'gif'"):
        encode_image(image, "gif")
    with pytest.raises(ValueError, match="quality must be an int from 1 to 100; got 0"):
        encode_image(image, "jpeg", quality=0)
