"""A driver SIGKILLed mid-run, then rerun: every row once, same images, and a further rerun does nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from connectors.output import OutputSink
from connectors.storage import Storage, StorageOptions, join_uri
from jobs.img2img import EXIT_OK, run
from jobs.plan import make_plan
from tests.jobs.job_runs import assert_output_sound
from tests.jobs.test_img2img import make_config, write_dataset

pytestmark = pytest.mark.slow
ROWS = 40
STEPS = 24  # slow enough per row that a signal lands while most rows are still to do


def job_command(model: str, manifest: str, output: str, endpoint: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.img2img", "--model", model, "--manifest", manifest, "--output", output,
        "--steps", str(STEPS), "--batch-size", "1", "--storage-endpoint", endpoint,
        "--set", "compute.gpus_per_actor=0", "--set", "compute.actors_max=1",
        "--set", "compute.rows_per_call=1",
        "--set", "compute.rows_per_part=1",
    ]  # fmt: skip


def object_listing(storage: Storage, root: str) -> dict[str, str]:
    fs, path = storage.filesystem(root)
    return {name: info.get("ETag", info.get("size")) for name, info in fs.find(path, detail=True).items()}


def start_and_signal(cluster, s3_server, model: str, rows: int, sig: int) -> tuple[Storage, str, str, int]:
    """Start a job driver process, send it `sig` once some (not all) rows are committed."""
    storage = Storage(StorageOptions(endpoint_url=s3_server.endpoint_url))
    root = f"s3://{s3_server.bucket}/resume-{os.getpid()}-{time.monotonic_ns()}"
    manifest = write_dataset(storage, root, [(64, 64)] * rows)
    output = join_uri(root, "out")
    sink = OutputSink(storage, output)
    command = job_command(model, manifest, output, s3_server.endpoint_url)
    env = {**cluster.client_env(), "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(sink.metadata_parts()) < 2:
            assert driver.poll() is None, "the driver finished before it could be signalled"
            assert time.monotonic() < deadline, "no progress before the deadline"
            time.sleep(0.2)
        driver.send_signal(sig)
        code = driver.wait(120)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(3)  # the job's workers are torn down by Ray
    return storage, manifest, output, code


def test_sigterm_records_progress_and_exits_non_zero(ray_driver, s3_server, model_dirs):
    storage, _, output, code = start_and_signal(
        ray_driver, s3_server, str(model_dirs["v1"]), ROWS, signal.SIGTERM
    )
    assert code == 143
    sink = OutputSink(storage, output)
    assert not sink.is_committed()
    record = sink.read_run_manifest()
    assert record["complete"] is False and record["status"] == "stopped"
    assert 0 < len(sink.read_metadata()) < ROWS


def test_driver_killed_mid_run_then_rerun(ray_driver, s3_server, model_dirs):
    storage, manifest, output, _ = start_and_signal(
        ray_driver, s3_server, str(model_dirs["v1"]), ROWS, signal.SIGKILL
    )
    sink = OutputSink(storage, output)
    assert_output_sound(storage, output, manifest, complete=False)
    committed_before = {
        (r["id"], r["variant"]): storage.read_bytes(r["output"]) for r in sink.read_metadata().to_pylist()
    }
    assert 0 < len(committed_before) < ROWS

    config = make_config(
        str(model_dirs["v1"]), manifest, output, s3_server.endpoint_url,
        **{"defaults.num_inference_steps": STEPS, "compute.batch_size": 4, "compute.rows_per_part": 8},
    )  # fmt: skip
    plan = make_plan(config)
    assert plan.todo_rows == ROWS - len(committed_before)
    summary = run(plan)
    assert summary["exit_code"] == EXIT_OK and summary["committed"], summary
    metadata = sink.read_metadata()
    keys = list(zip(metadata["id"].to_pylist(), metadata["variant"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == ROWS
    assert sink.read_errors().num_rows == 0
    parts_rows = sum(table.num_rows for table in sink.read_part_tables(sink.metadata_parts(), ["id"]))
    assert parts_rows == ROWS, "a row is in two metadata parts"
    for row in metadata.to_pylist():  # a row committed before the kill kept its image
        key = (row["id"], row["variant"])
        if key in committed_before:
            assert storage.read_bytes(row["output"]) == committed_before[key]

    assert_output_sound(storage, output, manifest, complete=True)
    # A second rerun has nothing to do and touches nothing.
    before = object_listing(storage, output)
    again = make_plan(config)
    assert again.todo_rows == 0
    assert run(again)["exit_code"] == EXIT_OK
    after = object_listing(storage, output)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {k.rsplit("/", 1)[1] for k in changed} <= {
        "_run.json",
        "_SUCCESS",
        "_job.json",
        "contact_sheet.png",
    }
