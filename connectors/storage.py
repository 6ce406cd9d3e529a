"""Object storage through fsspec: one place for filesystems, retries and atomic writes.

URIs are `s3://bucket/key` (s3fs; any S3-compatible store through `endpoint_url`), `gs://bucket/key`
(gcsfs, the optional `gcs` extra), `memory://path` (tests) and local paths (plain or `file://`).
Credentials are never part of the configuration: they come from the provider's usual chain (for S3
the `AWS_*` variables, `~/.aws` profiles, instance roles), so they cannot end up in a log line, a
metadata row or `_run.json`.
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")

_CREDENTIAL_KEYS = frozenset(
    {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "password", "access_key", "secret_key", "credentials"}
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
     errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, getattr(errno, "EREMOTEIO", errno.EIO)}
)
# Exception class names (anywhere in the MRO) of network failures raised by botocore/aiohttp/gcsfs,
# matched by name so this module needs none of those packages to import.
_TRANSIENT_CLASS_NAMES = frozenset(
    {"HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
     "ConnectTimeoutError", "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
     "ClientOSError", "IncompleteRead", "ResponseParserError", "FSTimeoutError", "TransportError"}
)
_TRANSIENT_MESSAGES = (
    "SlowDown", "reduce your request rate", "ServiceUnavailable", "Service Unavailable",
    "InternalError", "RequestTimeout", "Connection reset", "TooManyRequests", "Throttl",
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one storage operation is retried on transient errors (timeouts, 5xx, SlowDown, resets).

    Applied at two levels: the S3 client's own retries (botocore "standard" mode, `attempts` per
    request) and around each whole operation here (`attempts` tries, exponential backoff with full
    jitter, never more than `budget_s` seconds in all). Non-transient errors (missing key, access
    denied) fail at once.
    """

    attempts: int = 6
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    budget_s: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"storage retry attempts must be >= 1, got {self.attempts}")
        if min(self.initial_backoff_s, self.max_backoff_s, self.budget_s) < 0:
            raise ValueError("storage retry backoff and budget must be >= 0 seconds")

    def backoff_s(self, failures: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff after `failures` failed tries (AWS's recommendation)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (failures - 1))
        return rng.uniform(0, ceiling)


@dataclass(frozen=True)
class StorageOptions:
    """Everything that shapes how storage is reached; safe to log (it holds no credentials)."""

    endpoint_url: str | None = None  # S3-compatible stores: SeaweedFS, MinIO, R2, ...
    anonymous: bool = False  # public buckets, no credentials at all
    profile: str | None = None  # a named AWS profile instead of the default chain
    max_pool_connections: int = 64
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    extra: Mapping[str, Any] = field(default_factory=dict)  # passed to the fsspec filesystem

    def __post_init__(self) -> None:
        leaked = sorted(_credential_keys(self.extra))
        if leaked:
            raise ValueError(
                f"storage options must not carry credentials ({', '.join(leaked)}); provide them "
                "through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an "
                "instance role, GOOGLE_APPLICATION_CREDENTIALS) so they never reach logs or metadata"
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-ready copy for logs and `_run.json`."""
        described = asdict(self)
        described["extra"] = {str(k): repr(v) for k, v in self.extra.items()}
        return described


def _credential_keys(options: Mapping[Any, Any], where: str = "") -> set[str]:
    """Dotted names of credential keys in `options`, nested mappings (`client_kwargs`, ...) included."""
    found = set()
    for key, value in options.items():
        name = f"{where}{key}"
        if str(key).lower() in _CREDENTIAL_KEYS:
            found.add(name)
        elif isinstance(value, Mapping):
            found |= _credential_keys(value, f"{name}.")
    return found


# `scheme://` and the authority: up to the first '/', '?' or '#' (RFC 3986).
_AUTHORITY = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*)://(?P<authority>[^/?#]*)")
_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs"})  # bucket names hold no '@', no ':' (but ARNs)


def redact_uri(uri: str) -> str:
    """`uri` with any credentials written into it (`s3://KEY:SECRET@bucket/key`) masked as `***`.

    For bucket schemes a ':' in the bucket is taken as credentials too, as an AWS secret may hold a '/'
    that ends the bucket early (`s3://KEY:abc/def@bucket/key`); everything up to the last '@' is masked.
    """
    match = _AUTHORITY.match(uri)
    if match is None:
        return uri
    scheme, authority = match["scheme"], match["authority"]
    rest = uri[match.end("scheme") + 3 :]
    colon = ":" in authority and not authority.startswith("arn:")  # S3 access point ARNs hold ':'
    if scheme.lower() in _BUCKET_SCHEMES and ("@" in authority or colon):
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else f"{scheme}://***"
    if "@" in authority:
        return f"{scheme}://***@{rest[authority.rindex('@') + 1 :]}"
    return uri


def _refuse_credentials_in_uri(uri: str) -> None:
    redacted = redact_uri(uri)
    if redacted != uri:
        raise ValueError(
            f"{redacted} holds credentials in the URI (masked here); give them through the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role, "
            "GOOGLE_APPLICATION_CREDENTIALS) and write the URI without them"
        )


class StorageError(OSError):
    """A storage operation that kept failing with transient errors until the retry budget ran out."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts
        self.retryable = True


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: timeouts, dropped connections, throttling and 5xx answers."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(error).__mro__):
        return True
    text = str(error)
    return any(marker in text for marker in _TRANSIENT_MESSAGES)


def scheme_of(uri: str) -> str:
    """`s3`, `gs`, `memory`, ... or `file` for local paths."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else "file"


def join_uri(base: str, *parts: str) -> str:
    """`base/part/part`, with exactly one '/' between segments, for any scheme or a local path."""
    joined = base.rstrip("/")
    for part in parts:
        joined = f"{joined}/{part.strip('/')}"
    return joined


class Storage:
    """Reads and writes whole objects by URI, with retries, for every supported scheme.

    Picklable (Ray ships it to workers): filesystems are created lazily in each process.
    """

    def __init__(self, options: StorageOptions | None = None):
        self.options = options or StorageOptions()
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._rng = random.Random()

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for `uri` and the path within it; refuses URIs that hold credentials."""
        _refuse_credentials_in_uri(uri)
        scheme = scheme_of(uri)
        fs = self._filesystems.get(scheme)
        if fs is None:
            fs = self._filesystems[scheme] = _make_filesystem(scheme, self.options)
        return fs, fs._strip_protocol(uri)

    def is_local(self, uri: str) -> bool:
        return isinstance(self.filesystem(uri)[0], LocalFileSystem)

    def retrying(self, description: str, operation: Callable[[], T]) -> T:
        """Run `operation`, retrying transient failures within the policy's attempts and time budget."""
        policy = self.options.retry
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                return operation()
            except Exception as error:
                if not is_transient(error):
                    raise
                elapsed = time.monotonic() - started
                delay = policy.backoff_s(attempt, self._rng)
                if attempt == policy.attempts or elapsed + delay > policy.budget_s:
                    raise StorageError(
                        f"{description} failed after {attempt} attempts in {elapsed:.1f} s with transient "
                        f"errors; last: {type(error).__name__}: {error}. The store may be overloaded or "
                        "unreachable; raise the storage retry budget or try again later",
                        attempts=attempt,
                    ) from error
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        return self.retrying(f"reading {uri}", lambda: fs.cat_file(path))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write one whole object atomically: readers see the old state or all of `data`, never a part.

        Object stores publish an object only when its upload completes; on local disk the bytes go to
        a hidden temporary file in the same directory, which is then renamed over the target.
        """
        fs, path = self.filesystem(uri)
        if isinstance(fs, LocalFileSystem):
            _write_local_atomically(path, data)
        else:
            self.retrying(f"writing {uri}", lambda: fs.pipe_file(path, data))

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return self.retrying(f"checking {uri}", lambda: fs.exists(path))

    def is_dir(self, uri: str) -> bool:
        """A directory, or on an object store a prefix with objects under it."""
        fs, path = self.filesystem(uri)
        return bool(self.retrying(f"checking {uri}", lambda: fs.isdir(path)))

    def delete(self, uri: str) -> None:
        """Remove one object; a missing one is fine (deletes are retried, so may repeat)."""
        fs, path = self.filesystem(uri)

        def remove() -> None:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

        self.retrying(f"deleting {uri}", remove)

    def list_files(self, prefix_uri: str, pattern: str = "*") -> list[str]:
        """URIs of the files directly under `prefix_uri` whose names match `pattern`, sorted."""
        fs, path = self.filesystem(prefix_uri)
        found = self.retrying(f"listing {prefix_uri}", lambda: fs.glob(f"{path.rstrip('/')}/{pattern}"))
        base = path.rstrip("/")
        return sorted(join_uri(prefix_uri, p[len(base):]) for p in found)

    def describe(self) -> dict[str, Any]:
        return self.options.describe()


def _make_filesystem(scheme: str, options: StorageOptions) -> fsspec.AbstractFileSystem:
    if scheme in ("s3", "s3a"):
        return _s3_filesystem(options)
    kwargs = dict(options.extra)
    if scheme in ("gs", "gcs"):
        if options.anonymous:
            kwargs.setdefault("token", "anon")
        if options.endpoint_url:
            kwargs.setdefault("endpoint_url", options.endpoint_url)
        kwargs.setdefault("retries", options.retry.attempts)
    elif scheme == "file":
        kwargs = {}
    try:
        return fsspec.filesystem(scheme, **kwargs)
    except ImportError as error:
        hint = " (pip install 'sdbatch[gcs]')" if scheme in ("gs", "gcs") else ""
        raise ValueError(f"storage scheme '{scheme}://' needs a package that is not installed{hint}: "
                         f"{error}") from error
    except ValueError as error:
        raise ValueError(f"unsupported storage scheme '{scheme}://': {error}") from error


def _s3_filesystem(options: StorageOptions) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if options.endpoint_url:
        client_kwargs["endpoint_url"] = options.endpoint_url
    fs = s3fs.S3FileSystem(
        anon=options.anonymous,
        profile=options.profile,
        client_kwargs=client_kwargs,
        config_kwargs={
            "retries": {"max_attempts": options.retry.attempts, "mode": "standard"},
            "connect_timeout": options.connect_timeout_s,
            "read_timeout": options.read_timeout_s,
            "max_pool_connections": options.max_pool_connections,
        },
        # Listings are how resume and commit see other processes' writes: never serve them stale.
        use_listings_cache=False,
        **options.extra,
    )
    fs.retries = options.retry.attempts  # s3fs's own retry loop (SlowDown, dropped payloads); a class default
    return fs


def _write_local_atomically(path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
