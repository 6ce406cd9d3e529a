"""Chaos scenario (b): a worker node removed mid-run on a multi-node local cluster loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from connectors.storage import Storage
from tests.jobs.job_runs import assert_output_sound
from tests.jobs.test_img2img import write_dataset

pytestmark = pytest.mark.slow


def test_worker_node_removed_mid_run_loses_nothing(model_dirs, tmp_path):
    rows = 24
    storage = Storage()
    manifest = write_dataset(storage, str(tmp_path / "data"), [(128, 128)] * rows)  # ~2 s per row
    output = str(tmp_path / "out")
    command = [
        sys.executable, "-m", "tests.jobs.node_loss_run",
        "--model", str(model_dirs["v1"]), "--manifest", manifest, "--output", output,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_AUTH_MODE": "disabled"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    logs = process.stdout + process.stderr
    results = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and results, logs[-6000:]
    result = json.loads(results[-1].removeprefix("RESULT "))
    assert "node_id" in result["removed"], result  # a node that ran the model really went away mid-run
    assert result["removed"]["parts_before"] < rows // 2
    assert result["exit_code"] == 0, logs[-6000:]
    counts = assert_output_sound(storage, output, manifest, complete=True)
    assert counts["images"] == rows and counts["errors"] == 0, counts
