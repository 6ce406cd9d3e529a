"""The S3 test services work: SeaweedFS serves s3fs and pyarrow, and FaultProxy forwards faithfully and
injects the faults it promises, which botocore's retries then absorb."""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.s3_services import SLOW_DOWN_BODY, FaultProxy, SeaweedServer

RETRYING = {"retries": {"max_attempts": 10, "mode": "standard"}}


@pytest.fixture(scope="module")
def server() -> Iterator[SeaweedServer]:
    with pytest.MonkeyPatch.context() as monkeypatch, SeaweedServer() as weed:
        for name, value in weed.env().items():
            monkeypatch.setenv(name, value)
        yield weed


def make_fs(server: SeaweedServer, endpoint_url: str | None = None, **kwargs) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(
        **server.storage_options(endpoint_url),
        use_listings_cache=False,
        skip_instance_cache=True,
        **kwargs,
    )


def test_s3fs_round_trip_small_and_multipart(server: SeaweedServer) -> None:
    fs = make_fs(server)
    base = f"{server.bucket}/direct"
    small, big = os.urandom(1234), os.urandom(12 * 2**20)
    fs.pipe(f"{base}/small.bin", small)
    with fs.open(f"{base}/big.bin", "wb", block_size=5 * 2**20) as f:  # 3 parts: 5 + 5 + 2 MiB
        for start in range(0, len(big), 2**20):  # one big write() would go up as a single part
            f.write(big[start : start + 2**20])

    assert fs.cat(f"{base}/small.bin") == small
    assert fs.cat(f"{base}/big.bin") == big
    assert fs.info(f"{base}/big.bin")["ETag"].strip('"').endswith("-3")  # really a multipart upload
    assert sorted(fs.ls(base)) == [f"{base}/big.bin", f"{base}/small.bin"]
    fs.rm(base, recursive=True)
    assert not fs.exists(f"{base}/small.bin")


def test_s3fs_through_faulty_proxy_with_retries(server: SeaweedServer) -> None:
    with FaultProxy(server.endpoint_url, error_rate=0.1, reset_rate=0.05, seed=1234) as proxy:
        fs = make_fs(server, proxy.endpoint_url, config_kwargs=RETRYING)
        base = f"{server.bucket}/faulty"
        objects = {f"{base}/{i:03d}.bin": os.urandom(100 + i) for i in range(100)}
        fs.pipe(objects)  # concurrent PUTs over several keep-alive connections
        assert fs.cat(list(objects)) == objects
        assert sorted(fs.ls(base)) == sorted(objects)

        assert proxy.requests > 200
        assert proxy.errors_injected > 0
        assert proxy.resets_injected > 0
        assert proxy.resets_after_upstream > 0
        proxy.enabled = False
        fs.rm(base, recursive=True)


def test_parquet_through_faulty_proxy(server: SeaweedServer) -> None:
    table = pa.table({"id": list(range(1000)), "text": [f"row {i}" for i in range(1000)]})
    with FaultProxy(server.endpoint_url, error_rate=0.1, reset_rate=0.05, seed=7) as proxy:
        fs = make_fs(server, proxy.endpoint_url, config_kwargs=RETRYING)
        path = f"{server.bucket}/parquet/table.parquet"
        pq.write_table(table, path, filesystem=fs)
        assert pq.read_table(path, filesystem=fs).equals(table)
        assert proxy.requests > 0


# -- FaultProxy against a recording upstream: exact forwarding and each fault mode ---------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers with a JSON echo of what arrived, in chunked framing for GET, to test both directions."""

    protocol_version = "HTTP/1.1"
    received: list[dict] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        record = {
            "method": self.command,
            "path": self.path,
            "headers": list(self.headers.items()),
            "body": self.rfile.read(length).decode(),
        }
        self.received.append(record)
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.command == "GET":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(payload), 10):
                piece = payload[start : start + 10]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = _echo


@pytest.fixture()
def echo_upstream() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    handler = type("Echo", (_EchoHandler,), {"received": received})
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    upstream.daemon_threads = True
    thread = threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{upstream.server_address[1]}", received
    upstream.shutdown()
    upstream.server_close()


def _connect(proxy: FaultProxy) -> http.client.HTTPConnection:
    host, port = proxy.endpoint_url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def test_proxy_forwards_verbatim_and_dechunks(echo_upstream: tuple[str, list[dict]]) -> None:
    url, received = echo_upstream
    with FaultProxy(url) as proxy:
        conn = _connect(proxy)
        headers = {"Host": "bucket.example.test:9000", "X-Amz-Date": "20250101T000000Z", "x-Mixed-Case": "v"}
        conn.request("PUT", "/b/k?x=1", body=iter([b"hello ", b"chunked ", b"world"]), headers=headers)
        put = conn.getresponse()
        assert put.status == 200 and json.loads(put.read())["body"] == "hello chunked world"
        forwarded = dict(received[-1]["headers"])
        assert forwarded["Host"] == "bucket.example.test:9000"  # SigV4 signs it: never rewritten
        assert forwarded["X-Amz-Date"] == "20250101T000000Z" and forwarded["x-Mixed-Case"] == "v"
        assert "Transfer-Encoding" not in forwarded and forwarded["Content-Length"] == "19"

        conn.request("HEAD", "/b/k")  # same keep-alive connection: framing stayed in sync
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b"" and int(head.getheader("Content-Length")) > 0

        conn.request("GET", "/b/k")
        get = conn.getresponse()
        assert get.getheader("Transfer-Encoding") == "chunked"
        assert json.loads(get.read())["method"] == "GET"
        assert proxy.requests == 3 and len(received) == 3


def test_proxy_injects_slow_down(echo_upstream: tuple[str, list[dict]]) -> None:
    url, received = echo_upstream
    with FaultProxy(url, error_rate=1.0) as proxy:
        conn = _connect(proxy)
        for _ in range(2):  # the body was consumed, so the keep-alive connection still works
            conn.request("PUT", "/b/k", body=b"payload")
            response = conn.getresponse()
            assert response.status == 503 and response.read() == SLOW_DOWN_BODY
        assert received == [] and proxy.errors_injected == 2

        proxy.enabled = False
        conn.request("PUT", "/b/k", body=b"payload")
        assert conn.getresponse().status == 200 and len(received) == 1


def test_proxy_resets_before_and_after_upstream(echo_upstream: tuple[str, list[dict]]) -> None:
    url, received = echo_upstream
    with FaultProxy(url, reset_rate=1.0) as proxy:
        for upstream_saw_it in (False, True):  # resets alternate: before forwarding, then after
            conn = _connect(proxy)
            conn.request("PUT", "/b/k", body=b"payload")
            with pytest.raises(ConnectionResetError):
                conn.getresponse()
            conn.close()
            assert len(received) == int(upstream_saw_it)
        assert proxy.resets_injected == 2 and proxy.resets_after_upstream == 1
