"""A node-local cache of model and adapter files, so N actors on one node download each URI once.

`local_copy(uri, storage)` turns a model folder, a `.safetensors` file or an adapter file given as a
URI (`s3://`, `gs://`, `memory://`, ...) into a local path that diffusers-style loaders can open.
Local paths pass through untouched. A remote object lands in

    {cache}/{sha256(uri)[:24]}/{basename}

`{cache}` being `cache_dir`, else `$SDBATCH_CACHE_DIR`, else `~/.cache/sdbatch`. The entry is
committed like a Hadoop output: downloaded into `{digest}.tmp-<uuid>`, checked against the remote
listing, renamed into place, and only then named by a `{digest}.complete` marker. Readers trust only
the marker, so a crash at any point leaves something that the next call cleans and redoes. An
exclusive `flock` on `{digest}.lock` makes concurrent processes on one node wait for a single
download (flock is per node: do not share one cache folder between nodes over NFS).

Importing this module stays light (no torch, no sd_core): the Ray driver may use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import fsspec

from connectors.storage import Storage, scheme_of

__all__ = ["cache_root", "cached_sha256", "local_copy", "sha256_of"]

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_DOWNLOAD_THREADS = 8  # a diffusers folder is ~10 files; parallel GETs hide per-request latency
_MARKER_SUFFIX = ".complete"


def cache_root(cache_dir: str | None = None) -> str:
    """The cache folder: `cache_dir`, else `$SDBATCH_CACHE_DIR`, else `~/.cache/sdbatch`."""
    chosen = cache_dir or os.environ.get("SDBATCH_CACHE_DIR") or os.path.join("~", ".cache", "sdbatch")
    return os.path.abspath(os.path.expanduser(chosen))


def local_copy(uri: str, storage: Storage, cache_dir: str | None = None, refresh: bool = False) -> str:
    """A local path holding the file or folder at `uri`, downloading it at most once per node.

    Local paths (plain or `file://`) are returned as given once they are known to exist. For remote
    URIs a cached copy is trusted without asking the store again: model and adapter URIs are expected
    to be immutable (publish a new version under a new key). The remote listing (size, ETag, mtime
    of every file) is recorded in the entry's marker for inspection; pass `refresh=True` to force a
    fresh download after an object was overwritten in place. A refresh replaces the folder under any
    process still reading the old copy, so do it before starting the actors, not while they run.

    Raises FileNotFoundError naming the path or URI when it does not exist.
    """
    if scheme_of(uri) == "file":
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"model path {path} does not exist; give an existing local file or folder, or a URI "
                "such as s3://bucket/key"
            )
        return path

    root = cache_root(cache_dir)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    entry = os.path.join(root, digest)
    marker = entry + _MARKER_SUFFIX
    target = os.path.join(entry, posixpath.basename(uri.partition("://")[2].rstrip("/")))

    if not refresh and _is_complete(marker, target):
        return target  # the common case, on every actor start after the first: no storage call at all
    os.makedirs(root, exist_ok=True)
    with _exclusive_lock(entry + ".lock"):
        # Another process may have finished the download while this one waited for the lock.
        if not refresh and _is_complete(marker, target):
            return target
        _discard(root, digest)
        _download(uri, storage, entry, target)
    return target


def sha256_of(path: str) -> str:
    """sha256 of a file, or of a folder: over the sorted (relative path, file sha256) of every file.

    Hidden files and folders (a name starting with '.', like a hub download's `.cache/`) are skipped,
    so the digest names the model's content, not the bookkeeping around it.
    """
    if os.path.isfile(path):
        return _file_sha256(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cannot hash {path}: no such file or folder")
    combined = hashlib.sha256()
    for relative in sorted(_visible_files(path)):
        file_digest = _file_sha256(os.path.join(path, relative))
        combined.update(f"{relative}\0{file_digest}\n".encode())
    return combined.hexdigest()


def cached_sha256(local_path: str) -> str:
    """`sha256_of(local_path)`, computed once per node for copies made by `local_copy`.

    Inside a complete cache entry the digest is kept in a sidecar `{local_path}.sha256` (the entry is
    immutable, so the digest cannot go stale). User paths may change between runs and are hashed anew.
    """
    marker = os.path.dirname(os.path.abspath(local_path)) + _MARKER_SUFFIX
    if not _is_complete(marker, local_path):
        return sha256_of(local_path)
    sidecar = local_path + ".sha256"
    try:
        with open(sidecar) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        pass
    digest = sha256_of(local_path)
    # Racing processes compute the same value; the rename makes each write all-or-nothing.
    temporary = f"{sidecar}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w") as handle:
        handle.write(digest)
    os.replace(temporary, sidecar)
    return digest


def _is_complete(marker: str, target: str) -> bool:
    """True when `marker` commits exactly `target` and the target is still there."""
    try:
        with open(marker) as handle:
            committed = json.load(handle).get("path")
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return committed == os.path.abspath(target) and os.path.exists(target)


@contextmanager
def _exclusive_lock(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _discard(root: str, digest: str) -> None:
    """Remove whatever an earlier, crashed or refreshed download left for `digest` (lock held)."""
    marker = os.path.join(root, digest + _MARKER_SUFFIX)
    if os.path.exists(marker):
        os.remove(marker)  # first, so a crash below never leaves a marker over a half-removed entry
    leftovers = [name for name in os.listdir(root) if name == digest or name.startswith(f"{digest}.tmp-")]
    for name in leftovers:
        shutil.rmtree(os.path.join(root, name))


def _download(uri: str, storage: Storage, entry: str, target: str) -> None:
    """Fetch `uri` into a temporary folder, check it against the listing, then commit it as `entry`."""
    started = time.monotonic()
    fs, remote = storage.filesystem(uri)
    listing = _remote_listing(uri, fs, remote, storage)
    temporary = f"{entry}.tmp-{uuid.uuid4().hex}"
    staged = os.path.join(temporary, os.path.basename(target))
    log.info("downloading %s (%d files, %d bytes) to %s", uri, len(listing), _total(listing), target)

    def fetch(relative: str) -> None:
        source = posixpath.join(remote, relative) if relative else remote
        destination = os.path.join(staged, relative) if relative else staged
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        storage.retrying(f"downloading {source} of {uri}", lambda: fs.get_file(source, destination))

    try:
        with ThreadPoolExecutor(max_workers=_DOWNLOAD_THREADS) as pool:
            list(pool.map(fetch, listing))
        _verify(uri, staged, listing)
        os.replace(temporary, entry)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    record = {
        "uri": uri,
        "path": os.path.abspath(target),
        "files": len(listing),
        "bytes": _total(listing),
        "time": time.time(),
        "listing": listing,
    }
    _write_json_atomically(entry + _MARKER_SUFFIX, record)
    log.info("cached %s in %.1f s", uri, time.monotonic() - started)


def _remote_listing(
    uri: str, fs: fsspec.AbstractFileSystem, remote: str, storage: Storage
) -> dict[str, dict[str, Any]]:
    """{relative path: size, ETag, mtime} of every file at `uri`; the key is "" for a single file."""
    try:
        info = storage.retrying(f"inspecting {uri}", lambda: fs.info(remote))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"model URI {uri} does not exist; check the bucket and key and that the credentials can list it"
        ) from error
    if info["type"] != "directory":
        return {"": _describe(info)}
    found = storage.retrying(f"listing {uri}", lambda: fs.find(remote, detail=True))
    prefix = remote.rstrip("/") + "/"
    listing = {
        name[len(prefix):]: _describe(details)
        for name, details in found.items()
        if details["type"] != "directory"
    }
    if not listing:
        raise FileNotFoundError(f"model URI {uri} is a folder with no files in it")
    return listing


def _describe(info: dict[str, Any]) -> dict[str, Any]:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    return {"size": info.get("size"), "etag": etag, "mtime": None if mtime is None else str(mtime)}


def _total(listing: dict[str, dict[str, Any]]) -> int:
    return sum(item["size"] or 0 for item in listing.values())


def _verify(uri: str, staged: str, listing: dict[str, dict[str, Any]]) -> None:
    """Every listed file is on disk with the listed size: no truncated or missing download is committed."""
    if listing.keys() == {""}:
        on_disk = {"": os.path.getsize(staged)}
    else:
        on_disk = {name: os.path.getsize(os.path.join(staged, name)) for name in _all_files(staged)}
    expected = {name: item["size"] for name, item in listing.items()}
    # A listing without a size (None) accepts any size; a file not listed at all (-1) never matches.
    mismatched = sorted(
        name for name in expected.keys() | on_disk.keys()
        if expected.get(name, -1) not in (None, on_disk.get(name))
    )
    if mismatched:
        raise OSError(
            f"download of {uri} does not match its listing (files {mismatched[:5]}: sizes differ or are "
            "missing); the object may have changed during the download, try again"
        )


def _all_files(folder: str) -> Iterator[str]:
    for directory, _, files in os.walk(folder):
        for name in files:
            yield os.path.relpath(os.path.join(directory, name), folder).replace(os.sep, "/")


def _visible_files(folder: str) -> Iterator[str]:
    return (name for name in _all_files(folder) if not any(p.startswith(".") for p in name.split("/")))


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomically(path: str, record: dict[str, Any]) -> None:
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
