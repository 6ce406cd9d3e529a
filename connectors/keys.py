"""Row ids → output keys: every id becomes one safe, collision-free path segment."""

from __future__ import annotations

import hashlib
import re
import unicodedata

PLAIN_ID = re.compile(r"[a-z0-9_-][a-z0-9._-]{0,99}")
_SLUG_UNSAFE = re.compile(r"[^a-z0-9_-]+")
_EXTENSION = re.compile(r"[a-z0-9]{1,16}")
_SLUG_CHARS = 60
_DIGEST_HEX = 32
# Windows refuses these as file names, with or without an extension, in any case.
_RESERVED_STEMS = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{port}{n}" for port in ("com", "lpt") for n in range(10)}
)


def safe_segment(row_id: str) -> str:
    """One path segment for `row_id`, safe on S3, POSIX, Windows and case-insensitive file systems.

    Plain ids are kept as they are: 1-100 characters of `[a-z0-9._-]`, not starting or ending with '.',
    and not a Windows device name (`con`, `nul.txt`, `com1`, ...). Every other id (upper case, '/',
    '\\', '..', control characters, unicode, too long, reserved) becomes `{slug}~{hash}`: a readable
    slug (ASCII-folded, lower-cased, runs of other characters as '_', at most 60 characters) and the
    first 32 hex digits (128 bits) of the id's UTF-8 SHA-256.

    Why this cannot collide: '~' never appears in a plain segment, so a plain and an escaped segment
    always differ; two plain segments differ because they are the ids themselves; two escaped ones
    differ unless SHA-256 collides on 128 bits. Every segment is lower-case ASCII (≤ 93 bytes), so
    segments that differ only by case, or by unicode normalisation, do not exist at all.
    """
    if not isinstance(row_id, str) or not row_id:
        raise ValueError(
            f"row id {row_id!r} is empty or not a string; every manifest row needs a non-empty id"
        )
    if _is_plain(row_id):
        return row_id
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]
    return f"{_slug(row_id)}~{digest}"


def image_key(output_prefix: str, row_id: str, variant: int, ext: str) -> str:
    """The key of one output image: `{output_prefix}/images/{safe_segment(row_id)}/{variant}.{ext}`."""
    if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
        raise ValueError(f"variant {variant!r} for row id {row_id!r} must be an integer >= 0")
    if not _EXTENSION.fullmatch(ext):
        raise ValueError(
            f"extension {ext!r} for row id {row_id!r} must be 1-16 lower-case letters or digits, "
            "without a dot, e.g. 'png'"
        )
    return f"{output_prefix.rstrip('/')}/images/{safe_segment(row_id)}/{variant}.{ext}"


def _is_plain(row_id: str) -> bool:
    return (
        PLAIN_ID.fullmatch(row_id) is not None
        and not row_id.endswith(".")
        and row_id.split(".", 1)[0] not in _RESERVED_STEMS
    )


def _slug(row_id: str) -> str:
    """A readable hint of the id; no dots, so never hidden, `..` or a device name with an extension."""
    ascii_text = unicodedata.normalize("NFKD", row_id).encode("ascii", "ignore").decode("ascii")
    return _SLUG_UNSAFE.sub("_", ascii_text.lower())[:_SLUG_CHARS] or "id"
