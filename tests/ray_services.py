"""A real local Ray cluster (`ray start --head`) on free ports, for job tests and `ray job submit`.

Its workers inherit the environment given at start (the S3 test server's credentials, and the
fault-injection hook the chaos tests use), exactly as a real cluster's workers get theirs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

_LOOPBACK = "127.0.0.1"
POISON_PROMPT = "__sdbatch_test_poison__"  # a row with this prompt kills its worker (see jobs/faults.py)


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((_LOOPBACK, 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def ray_binary() -> str:
    return str(Path(sys.executable).parent / "ray")


class RayCluster:
    """`ray start --head` with the dashboard (for the Jobs API), stopped and cleaned up by `stop()`."""

    def __init__(self, env: Mapping[str, str], num_cpus: int = 4, bin_dir: Path | None = None):
        """`bin_dir` holds the `ray` to start and the `python` first on the cluster's PATH, which job
        entrypoints run with (default: this interpreter's)."""
        bin_dir = bin_dir or Path(sys.executable).parent
        self.temp_dir = tempfile.mkdtemp(prefix="sdr-", dir="/tmp")  # short: Ray's socket paths are limited
        (
            gcs,
            dashboard,
            client,
            node_manager,
            object_manager,
            agent_listen,
            agent_grpc,
            metrics,
            runtime_env,
        ) = _free_ports(9)
        # Below the kernel's ephemeral range (32768+), where _free_ports' ports come from, and above Ray's
        # default worker ports (10002-19999) that a ray.cluster_utils.Cluster in another test uses.
        worker_low = 20000 + (os.getpid() % 120) * 100
        # The venv first on PATH, as on a real cluster image: a job's `python` is then this interpreter.
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {
            **os.environ,
            **env,
            "PATH": path,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.address = f"{_LOOPBACK}:{gcs}"
        self.dashboard_url = f"http://{_LOOPBACK}:{dashboard}"
        command = [
            str(bin_dir / "ray"),
            "start",
            "--head",
            f"--node-ip-address={_LOOPBACK}",
            f"--port={gcs}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={_LOOPBACK}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={worker_low}",
            f"--max-worker-port={worker_low + 99}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--block",
        ]
        # --block keeps `ray start` as the parent of this cluster's processes: stopping it stops exactly
        # this cluster (`ray stop` would stop every Ray cluster on the machine).
        self._log = open(Path(self.temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_for_dashboard()
        except BaseException:
            self.stop()
            raise

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or `ray job submit` process that should use this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def _wait_for_dashboard(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the Ray dashboard at {self.dashboard_url} did not answer:\n{self.log_tail()}")

    def log_tail(self, characters: int = 4000) -> str:
        return (Path(self.temp_dir) / "ray-start.log").read_bytes()[-characters:].decode(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to `ray start --block` (it stops its processes); after `timeout`, SIGKILL the cluster's
        whole process group (its own session, so nothing else is touched)."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait()
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
