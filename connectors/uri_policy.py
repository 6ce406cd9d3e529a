"""Which input URIs a run may read: manifest rows are user data, `inputs.allowed_roots` is the operator's.

Pure string functions (no I/O). Decisions, in order of the tricks they defeat:

- The scheme is compared in lower case; `file://` and a plain absolute path are the same place.
- Roots match whole path segments: `s3://b/data` allows `s3://b/data/x.png`, not `s3://b/database/x.png`.
- `.`, `..` and `//` are collapsed lexically before matching (`/mnt/data/../../etc/passwd` is
  `/etc/passwd`). A local `..` stops at `/`, as the OS does; a `..` that climbs above an object store's
  bucket (or a URL's host) is refused, since a path-normalising HTTP stack would read another bucket.
- Object stores read keys literally (s3fs sends `s3://b//data/x` as the key `/data/x`), so there the
  URI as written must also start with the root's segments: both readings have to be inside.
- Percent-escapes are not decoded: `%2e%2e` is a name, as s3fs (which escapes `%` itself) and local
  paths treat it. A plain-HTTP server might decode it; do not rely on roots for `http(s)://` inputs.
- The check is lexical: a symlink inside a local root is followed by the OS, so roots must hold no
  symlinks to places outside them (nor to their own ancestors, which a later `..` could climb past).
- Relative URIs (a manifest given by a relative path) cannot be placed, so they are refused; inline
  image bytes carry no URI and are always allowed (callers do not ask).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

LOCAL = "file"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_SHOWN_CHARS = 120  # URIs in messages are cut to this: a row's value can be arbitrarily long


@dataclass(frozen=True)
class _Location:
    """A URI split into its scheme and path segments (the bucket or host first, for non-local schemes)."""

    scheme: str
    segments: tuple[str, ...]  # `.`, `..` and empty segments collapsed
    written: tuple[str, ...] | None  # object stores: the segments as written, which is how keys are read


def normalise_uri(uri: str) -> str:
    """`uri` with its scheme in lower case, `file://` turned into a plain path and `.`, `..` and `//`
    collapsed. Raises ValueError for a relative path, a URI without a bucket, or a `..` above the bucket."""
    try:
        return _format(_locate(uri))
    except ValueError as error:
        raise ValueError(f"{_shown(uri)} {error}") from None


def root_problem(root: str) -> str | None:
    """Why `root` cannot be an allowed input root (relative, with `..`, without a bucket), or None."""
    if not root.strip():
        return "must not be empty; give a URI prefix such as s3://bucket/data/ or /mnt/data/"
    if ".." in _path_of(root).split("/"):
        return f"{_shown(root)} contains '..'; write the root without it"
    try:
        _locate_root(root)
    except ValueError as error:
        return (
            f"{_shown(root)} {error}; give an absolute path (/mnt/data/) or a URI prefix (s3://bucket/data/)"
        )
    return None


def check_allowed(uri: str, roots: Sequence[str]) -> str | None:
    """None when `uri` lies under one of `roots` (or `roots` is empty: no restriction), else why not.

    `roots` must be valid (see `root_problem`; the config checks them): a bad one raises ValueError."""
    if not roots:
        return None
    try:
        location = _locate(uri)
    except ValueError as error:
        return (
            f"image URI {_shown(uri)} {error}, so inputs.allowed_roots cannot allow it; give the manifest "
            "and its images as absolute paths or URIs under an allowed root"
        )
    if any(_contains(_locate_root(root), location) for root in roots):
        return None
    return (
        f"image URI {_shown(uri)} is outside the allowed input roots ({', '.join(roots)}); move the file "
        "under an allowed root or add its root to inputs.allowed_roots"
    )


def _contains(root: _Location, location: _Location) -> bool:
    if root.scheme != location.scheme:
        return False
    depth = len(root.segments)
    inside = location.segments[:depth] == root.segments
    return inside and (location.written is None or location.written[:depth] == root.segments)


@functools.lru_cache(maxsize=256)
def _locate_root(root: str) -> _Location:
    """A root's location; a bare scheme (`s3://`) has no segments and so holds the whole scheme."""
    match = _SCHEME.fullmatch(root)
    if match and not match.group(2).strip("/"):
        return _Location(match.group(1).lower(), (), None)
    return _locate(root)


def _locate(uri: str) -> _Location:
    match = _SCHEME.fullmatch(uri)
    scheme, path = (match.group(1).lower(), match.group(2)) if match else (LOCAL, uri)
    if scheme == LOCAL:
        if not path.startswith("/"):
            raise ValueError("is a relative path")
        return _Location(LOCAL, _collapse(path.split("/"), can_climb_out=True), None)
    bucket, _, key = path.partition("/")
    if bucket in ("", ".", ".."):
        raise ValueError("names no bucket or host")
    key_segments = _collapse(key.split("/"), can_climb_out=False)
    return _Location(scheme, (bucket, *key_segments), tuple(path.split("/")))


def _collapse(segments: Sequence[str], can_climb_out: bool) -> tuple[str, ...]:
    """Drop empty and `.` segments and let `..` remove the one before; above the top, a local `..`
    stays at `/` (as the OS reads it) and an object store's is refused."""
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if not kept and not can_climb_out:
                raise ValueError("climbs above its bucket with '..'")
            kept = kept[:-1]
        elif segment not in ("", "."):
            kept.append(segment)
    return tuple(kept)


def _format(location: _Location) -> str:
    path = "/".join(location.segments)
    return f"/{path}" if location.scheme == LOCAL else f"{location.scheme}://{path}"


def _path_of(uri: str) -> str:
    match = _SCHEME.fullmatch(uri)
    return match.group(2) if match else uri


def _shown(uri: str) -> str:
    """repr() of at most the first _SHOWN_CHARS characters, without building the repr of a huge value."""
    return repr(uri[:_SHOWN_CHARS]) + ("..." if len(uri) > _SHOWN_CHARS else "")
