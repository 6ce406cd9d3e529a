"""Storage: whole-object reads and writes, listings, retries and credential hygiene, on every backend."""

from __future__ import annotations

import errno
import logging
import os
import pickle

import pytest

from connectors.storage import (
    RetryPolicy,
    Storage,
    StorageError,
    StorageOptions,
    is_transient,
    join_uri,
    scheme_of,
)

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002, budget_s=5)


def test_round_trip_overwrite_list_delete(store):
    storage, root = store.storage, store.root
    first = join_uri(root, "dir", "part-b.parquet")
    storage.write_bytes(first, b"one")
    storage.write_bytes(join_uri(root, "dir", "part-a.parquet"), b"two")
    storage.write_bytes(join_uri(root, "dir", "other.txt"), b"three")
    assert storage.read_bytes(first) == b"one"
    storage.write_bytes(first, b"replaced")
    assert storage.read_bytes(first) == b"replaced"

    listed = storage.list_files(join_uri(root, "dir"), "part-*.parquet")
    assert listed == [join_uri(root, "dir", "part-a.parquet"), first]
    assert storage.list_files(join_uri(root, "nothing-here"), "*") == []

    assert storage.exists(first)
    storage.delete(first)
    storage.delete(first)  # deletes are retried, so a second one must be harmless
    assert not storage.exists(first)


def test_large_object_round_trip(store):
    data = os.urandom(12 * 1024 * 1024 + 17)
    uri = join_uri(store.root, "big.bin")
    store.storage.write_bytes(uri, data)
    assert store.storage.read_bytes(uri) == data


def test_missing_object_fails_at_once_with_file_not_found(store):
    storage = Storage(StorageOptions(**{**store.storage.options.__dict__, "retry": FAST_RETRY}))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(join_uri(store.root, "absent.png"))


def test_local_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    storage = Storage()
    target = tmp_path / "out" / "part-1.parquet"
    storage.write_bytes(str(target), b"committed")

    def crash(*args):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b"half")
    assert target.read_bytes() == b"committed"
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-1.parquet"]


def test_retrying_retries_transient_errors_then_succeeds():
    storage = Storage(StorageOptions(retry=FAST_RETRY))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "SlowDown: Please reduce your request rate.")
        return "ok"

    assert storage.retrying("writing s3://b/k", flaky) == "ok"
    assert len(calls) == 3


def test_retrying_gives_up_after_the_budget_with_a_clear_error():
    storage = Storage(StorageOptions(retry=FAST_RETRY))
    calls = []

    def always_reset():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(StorageError) as caught:
        storage.retrying("reading s3://bucket/key.png", always_reset)
    assert len(calls) == 4 and caught.value.attempts == 4 and caught.value.retryable
    message = str(caught.value)
    assert "reading s3://bucket/key.png" in message and "4 attempts" in message
    assert "ConnectionResetError" in message and "retry budget" in message


def test_retrying_does_not_retry_permanent_errors():
    storage = Storage(StorageOptions(retry=FAST_RETRY))
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(PermissionError):
        storage.retrying("reading s3://b/k", denied)
    assert len(calls) == 1


class HTTPClientError(Exception):
    """Stands in for botocore's class of the same name: matched by name, not imported."""


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (OSError("An error occurred (ServiceUnavailable) when calling PutObject"), True),
        (OSError("InternalError: We encountered an internal error"), True),
        (HTTPClientError("connection dropped"), True),
        (FileNotFoundError("no such key"), False),
        (PermissionError("Access Denied"), False),
        (OSError(errno.EINVAL, "InvalidArgument"), False),
        (ValueError("bad parquet"), False),
    ],
)
def test_transient_error_classification(error, transient):
    assert is_transient(error) is transient


def test_options_refuse_credentials_and_describe_holds_none():
    with pytest.raises(ValueError, match="must not carry credentials.*AWS_ACCESS_KEY_ID"):
        StorageOptions(extra={"secret": "x"})
    described = StorageOptions(endpoint_url="http://127.0.0.1:1", extra={"requester_pays": True}).describe()
    assert described["endpoint_url"] == "http://127.0.0.1:1"
    assert described["retry"]["attempts"] == RetryPolicy().attempts


def test_storage_pickles_without_its_filesystems(tmp_path):
    storage = Storage(StorageOptions(endpoint_url="http://127.0.0.1:9"))
    storage.write_bytes(str(tmp_path / "a"), b"x")
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.options == storage.options
    assert copy.read_bytes(str(tmp_path / "a")) == b"x"


def test_uri_helpers():
    assert scheme_of("s3://b/k") == "s3" and scheme_of("memory://x") == "memory"
    assert scheme_of("/tmp/x") == "file" and scheme_of("relative/x") == "file"
    assert join_uri("s3://b/out/", "/images/", "a.png") == "s3://b/out/images/a.png"
    assert join_uri("/tmp/out", "x") == "/tmp/out/x"


def test_memory_backend_lists_with_its_scheme():
    storage = Storage()
    storage.write_bytes("memory://sdbatch-test/listing/part-1.parquet", b"x")
    assert storage.list_files("memory://sdbatch-test/listing", "part-*") == [
        "memory://sdbatch-test/listing/part-1.parquet"
    ]


def test_unknown_scheme_is_refused_clearly():
    with pytest.raises(ValueError, match="unsupported storage scheme 'nosuch://'"):
        Storage().read_bytes("nosuch://x/y")


def test_credentials_never_reach_log_lines(s3_server, monkeypatch, caplog):
    from tests.conftest import s3_store

    store = s3_store(s3_server, monkeypatch)
    caplog.set_level(logging.DEBUG)
    store.storage.write_bytes(join_uri(store.root, "k"), b"x")
    store.storage.read_bytes(join_uri(store.root, "k"))
    store.storage.list_files(store.root)
    assert caplog.records, "expected debug logging from the S3 client"
    assert s3_server.secret_key not in caplog.text
    assert s3_server.secret_key not in repr(store.storage.describe())
