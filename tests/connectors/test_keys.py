"""Row ids → output key segments: hostile ids stay inside one segment; distinct ids never collide."""

from __future__ import annotations

import re

import pytest

from connectors.keys import image_key, safe_segment

HOSTILE = [
    "../../x",
    "/abs",
    "a/b",
    "a\\b",
    "\\",
    "\x00",
    "a\x00b",
    "tab\there",
    "line\nbreak",
    "\x7f",
    ".",
    "..",
    "...",
    ".hidden",
    "trailing.",
    "CON",
    "con",
    "nul.txt",
    "com1",
    "LPT9.png",
    "x" * 10_000,
    "é" * 5_000,
    "café",
    "cafe\u0301",
    "日本語の画像",
    "emoji 🦊",
    "\ud800",
    "with space",
    "a:b",
    "a*b?c",
    '"quoted"',
    "<tag>",
    "a|b",
    "%2F",
    "~",
    "x~0123456789abcdef0123456789abcdef",
]
SAFE_SEGMENT = re.compile(r"[a-z0-9_-][a-z0-9._~-]*")


def tricky_ids() -> list[str]:
    """Plain ids, their case variants, near-misses and escapes of each other."""
    stems = ["a", "A", "img_001", "IMG_001", "Img_001", "a.b", "a_b", "a-b", "a b", "a/b", "a\\b", "a~b"]
    ids = set(HOSTILE) | set(stems)
    ids |= {f"{s}{suffix}" for s in stems for suffix in ("", ".", "..", "/", "_", "~", "\x00", "é", "E")}
    ids |= {"x" * n for n in (99, 100, 101, 200)} | {"X" * n for n in (99, 100, 101)}
    ids |= {safe_segment(i) for i in list(ids)}  # escaped forms used as ids themselves
    ids |= {chr(c) for c in range(1, 256)}
    return sorted(ids)


@pytest.mark.parametrize("row_id", HOSTILE, ids=lambda i: repr(i[:20]))
def test_hostile_ids_become_one_safe_segment(row_id):
    segment = safe_segment(row_id)
    assert SAFE_SEGMENT.fullmatch(segment), segment
    assert segment not in (".", "..")
    assert not segment.endswith(".")
    assert len(segment.encode()) <= 200
    assert segment.split(".")[0] not in {"con", "prn", "aux", "nul", "com1", "lpt9"}


@pytest.mark.parametrize(
    "row_id", ["a", "img_001", "2026-11-25.row-7", "x" * 100, "-dash", "_under", "con_x"]
)
def test_plain_ids_are_kept(row_id):
    assert safe_segment(row_id) == row_id


def test_escaped_ids_keep_a_readable_slug():
    assert safe_segment("Photos/Fox Cub.JPG").startswith("photos_fox_cub_jpg~")
    assert safe_segment("café").startswith("cafe~")
    assert safe_segment("CON").startswith("con~")


def test_distinct_ids_never_collide():
    ids = tricky_ids()
    segments = [safe_segment(i) for i in ids]
    assert len(set(segments)) == len(ids)


def test_ids_differing_only_by_case_do_not_collide_case_insensitively():
    ids = tricky_ids()
    folded = {safe_segment(i).casefold() for i in ids}
    assert len(folded) == len(ids)
    assert safe_segment("Image") != safe_segment("image") == "image"


def test_deterministic():
    assert safe_segment("a/b") == safe_segment("a/b")


@pytest.mark.parametrize("row_id", ["", None, 7])
def test_empty_or_non_string_id_is_an_error(row_id):
    with pytest.raises(ValueError, match="non-empty id"):
        safe_segment(row_id)


def test_image_key():
    assert image_key("s3://bucket/out/", "row-1", 0, "png") == "s3://bucket/out/images/row-1/0.png"
    key = image_key("/tmp/out", "../../etc/passwd", 3, "jpg")
    assert key.startswith("/tmp/out/images/") and key.endswith("/3.jpg")
    assert key.count("/") == "/tmp/out/images/x/3.jpg".count("/")


@pytest.mark.parametrize(
    ("variant", "ext"), [(-1, "png"), (True, "png"), (1.0, "png"), (0, ".png"), (0, ""), (0, "p/g")]
)
def test_image_key_rejects_bad_variant_or_extension(variant, ext):
    with pytest.raises(ValueError, match="'row'"):
        image_key("out", "row", variant, ext)
