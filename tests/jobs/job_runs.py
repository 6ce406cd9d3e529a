"""Helpers for tests that run the job as users do and check what it left behind.

`JobDriver` starts `python -m jobs.img2img` as its own process (a test can then kill it at a chosen
moment); `assert_output_sound` checks the guarantees every failure scenario must keep.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.image_decode import decode_image
from connectors.output import OutputSink, table_keys
from connectors.storage import Storage
from jobs.verify import verify_output


class JobDriver:
    """The job's driver as a child process on the test cluster; its output goes to `log_path`."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], log_path: str, module: str = "jobs.img2img"
    ):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        command = [sys.executable, "-m", module, *args]
        self.process = subprocess.Popen(
            command, env={**env, "PYTHONPATH": os.getcwd()}, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Poll `condition` until it holds; fail if the driver exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the driver exited before {what}:\n{self.log()[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.log()[-4000:]}"
            time.sleep(0.1)

    def kill(self, signal_number: int, settle_s: float = 3.0) -> int:
        """Send `signal_number`, wait for the exit, give Ray a moment to tear the job's workers down."""
        self.process.send_signal(signal_number)
        code = self.wait(120)
        time.sleep(settle_s)
        return code

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


def driver_args(
    model: str, manifest: str, output: str, endpoint: str | None, **settings: object
) -> list[str]:
    """Command-line flags of a CPU job; `settings` become `--set key=value` (dots as '__' in names)."""
    args = ["--model", model, "--manifest", manifest, "--output", output]
    if endpoint:
        args += ["--storage-endpoint", endpoint]
    merged = {
        "compute.gpus_per_actor": 0,
        "compute.actors_max": 1,
        "contact_sheet_rows": 4,
        **{k.replace("__", "."): v for k, v in settings.items()},
    }
    for key, value in merged.items():
        args += ["--set", f"{key}={value}"]
    return args


def assert_output_sound(storage: Storage, output: str, manifest: str, complete: bool) -> dict[str, int]:
    """The guarantees of every failure scenario (issue #6, acceptance 2), whatever happened before:

    - rows in = rows in metadata + rows in errors (only when `complete`; before that, no more), each
      (id, variant) once, never in both tables (`sdbatch verify`, which also decodes every image);
    - no partial file visible to readers: every object under the output is whole (images decode,
      Parquet parts and JSON parse, no temporary names);
    - `_SUCCESS` exactly when complete.
    Returns the counts.
    """
    sink = OutputSink(storage, output)
    report = verify_output(storage, output, manifest, check_all_images=True)
    if complete:
        assert report.ok, "\n".join(report.lines())
    else:
        # Incomplete: the only problems allowed are rows not done yet and the missing _SUCCESS.
        allowed = ("in the manifest but in neither metadata nor errors", "no _SUCCESS")
        unexpected = [p for p in report.problems if not any(a in p for a in allowed)]
        assert not unexpected, "\n".join(report.lines())
    assert sink.is_committed() == complete
    metadata_keys = table_keys(sink.read_metadata(unique=False)).to_pylist()
    error_keys = table_keys(sink.read_errors()).to_pylist()
    assert len(metadata_keys) == len(set(metadata_keys)), "a row is in the metadata twice"
    assert len(error_keys) == len(set(error_keys)), "a row is in the errors twice"
    assert not set(metadata_keys) & set(error_keys), "a row is both an image and an error"
    assert_every_object_whole(storage, output)
    return {"images": len(metadata_keys), "errors": len(error_keys), **report.counts}


def assert_every_object_whole(storage: Storage, output: str) -> int:
    """Read every object under `output` as its kind; returns how many were checked."""
    fs, root = storage.filesystem(output)
    paths = fs.find(root)
    for path in paths:
        name = posixpath.basename(path)
        assert not name.startswith(".") and not name.endswith(".tmp"), f"temporary object visible: {path}"
        data = fs.cat_file(path)
        if name.endswith(".parquet"):
            pq.read_table(pa.BufferReader(data))
        elif name.endswith(".json") or name == "_SUCCESS":
            json.loads(data)
        elif name.endswith((".png", ".jpg", ".jpeg", ".webp")):
            decode_image(data, path)
        else:
            raise AssertionError(f"unexpected object in the output: {path}")
    return len(paths)

