"""Chaos tests (issue #6): real runs on the real local Ray cluster and S3 server, with faults injected
from outside the job, each ending in the guarantees of `assert_output_sound` (verify included).

(a) worker actors killed mid-batch, several times; (c) the driver SIGKILLed at the start of reading and
at two points of the commit, then rerun (mid-batches: tests/jobs/test_resume.py); (d) the object store
failing ~10 % of requests and dropping connections for the whole run; (e) `ray job stop`, then the same
submission again. (b), a node removed mid-run, is in tests/jobs/test_node_loss.py.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import pytest

from connectors.output import OutputSink
from connectors.storage import Storage, StorageOptions, join_uri
from jobs.flow import REGISTRY_NAMESPACE, REGISTRY_PREFIX
from jobs.img2img import EXIT_OK, run
from jobs.plan import make_plan
from tests.jobs.job_runs import JobDriver, assert_output_sound, driver_args
from tests.jobs.test_img2img import make_config, write_dataset
from tests.jobs.test_submit import REPO
from tests.ray_services import ray_binary
from tests.s3_services import FaultProxy

pytestmark = pytest.mark.slow


def s3_dataset(s3_server, rows: int, name: str, side: int = 64) -> tuple[Storage, str, str]:
    storage = Storage(StorageOptions(endpoint_url=s3_server.endpoint_url))
    root = f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"
    manifest = write_dataset(storage, root, [(side, side)] * rows)
    return storage, manifest, join_uri(root, "out")


def part_count(storage: Storage, output: str) -> int:
    return len(OutputSink(storage, output).metadata_parts())


# ---- (a) worker actors killed mid-batch ---------------------------------------------------------------


def pass_actors(ray) -> list:
    """Handles of the Denoiser actors of the running pass, from its named registry."""
    handles = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == REGISTRY_NAMESPACE and entry["name"].startswith(REGISTRY_PREFIX):
            try:
                registry = ray.get_actor(entry["name"], namespace=REGISTRY_NAMESPACE)
                handles += ray.get(registry.members.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the pass ended meanwhile
                continue
    return list({handle._actor_id: handle for handle in handles}.values())


def next_live_actor(ray, killed: set[tuple[str, int]], timeout: float = 180):
    """A pass actor that is alive (model loaded) in a life not yet killed: the first, a restarted one
    (Ray restarts a killed actor) or a new one (Ray Data may replace it instead)."""
    from ray.util.state import get_actor

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for handle in pass_actors(ray):
            state = get_actor(handle._actor_id.hex())
            life = (handle._actor_id.hex(), state.num_restarts if state is not None else -1)
            if state is not None and state.state == "ALIVE" and life not in killed:
                return handle, life
        time.sleep(0.2)
    raise AssertionError(f"no live actor to kill within {timeout} s (killed so far: {killed})")


def test_worker_actors_killed_mid_batch_lose_nothing(ray_driver, s3_server, model_dirs, tmp_path):
    import ray

    rows = 40
    storage, manifest, output = s3_dataset(s3_server, rows, "actor-kill", side=128)  # ~2 s per row
    args = driver_args(
        str(model_dirs["v1"]), manifest, output, s3_server.endpoint_url,
        defaults__num_inference_steps=40, defaults__strength=1.0, compute__batch_size=2,
        compute__rows_per_call=2, compute__rows_per_part=2,
    )  # fmt: skip
    driver = JobDriver(args, ray_driver.client_env(), str(tmp_path / "driver.log"))
    killed: set[tuple[str, int]] = set()
    for _ in range(3):
        handle, life = next_live_actor(ray, killed)
        time.sleep(3.0)  # ready and fed: a 2-row model call takes ~4 s, so the kill lands inside one
        assert driver.process.poll() is None, "the run ended before every kill landed"
        ray.kill(handle, no_restart=False)  # a crash: Ray restarts (or Ray Data replaces) the actor
        killed.add(life)
    code = driver.wait()
    assert code == EXIT_OK, driver.log()[-6000:]
    counts = assert_output_sound(storage, output, manifest, complete=True)
    assert counts["images"] == rows and counts["errors"] == 0, counts


# ---- (c) the driver SIGKILLed at chosen points, then rerun -----------------------------------------


@pytest.mark.parametrize("point", ["read", "commit", "commit:run-manifest-written"])
def test_driver_killed_then_rerun_finishes_exactly_once(ray_driver, s3_server, model_dirs, tmp_path, point):
    rows = 10
    storage, manifest, output = s3_dataset(s3_server, rows, "driver-kill")
    sink = OutputSink(storage, output)
    settings = {"defaults.num_inference_steps": 4, "compute.batch_size": 2, "compute.rows_per_part": 3}
    args = driver_args(str(model_dirs["v1"]), manifest, output, s3_server.endpoint_url, **settings)
    env = dict(ray_driver.client_env())
    if point == "read":
        driver = JobDriver(args, env, str(tmp_path / "driver.log"))
        # `_job.json` is written just before the first pass starts reading the manifest.
        driver.wait_for(lambda: sink.read_job_record() is not None, "the job record")
    else:
        env["SDBATCH_TEST_PAUSE_AT"] = point
        driver = JobDriver(args, env, str(tmp_path / "driver.log"))
        driver.wait_for(lambda: f"paused at {point}" in driver.log(), f"the pause at {point}")
    driver.kill(signal.SIGKILL)

    assert not sink.is_committed()
    before = assert_output_sound(storage, output, manifest, complete=False)
    if point != "read":
        assert before["images"] == rows  # every row was done; only the commit was cut short
    if point == "commit:run-manifest-written":
        assert sink.read_run_manifest()["complete"] is True  # written, but without _SUCCESS it is not final

    config = make_config(str(model_dirs["v1"]), manifest, output, s3_server.endpoint_url, **settings)
    plan = make_plan(config)
    assert plan.todo_rows == rows - before["images"]
    summary = run(plan)
    assert summary["exit_code"] == EXIT_OK and summary["committed"], summary
    after = assert_output_sound(storage, output, manifest, complete=True)
    assert after["images"] == rows and after["errors"] == 0


# ---- (d) a faulty object store for the whole run -----------------------------------------------------


def test_whole_run_through_a_store_that_throttles_and_drops_connections(ray_driver, s3_server, model_dirs):
    rows = 12
    storage, manifest, output = s3_dataset(s3_server, rows, "faulty-store")
    with FaultProxy(s3_server.endpoint_url, error_rate=0.10, reset_rate=0.03, seed=11) as proxy:
        config = make_config(
            str(model_dirs["v1"]), manifest, output, proxy.endpoint_url,
            **{"compute.rows_per_part": 2, "retry.storage_attempts": 10, "defaults.num_images": 2},
        )  # fmt: skip
        summary = run(make_plan(config))
        injected = (proxy.requests, proxy.errors_injected, proxy.resets_injected)
    assert summary["exit_code"] == EXIT_OK and summary["committed"], summary
    counts = assert_output_sound(storage, output, manifest, complete=True)  # read back directly
    assert counts["images"] == 2 * rows and counts["errors"] == 0, counts
    requests, errors, resets = injected
    assert errors >= 10 and resets >= 3, injected  # the faults really hit the run
    assert (errors + resets) / requests > 0.08, injected


# ---- (e) `ray job stop`, then the same submission again ----------------------------------------------


def ray_job(cluster, command_name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**cluster.client_env(), "RAY_AUTH_MODE": "disabled"}
    command = [ray_binary(), "job", command_name, "--address", cluster.dashboard_url, *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def submit_job(cluster, submission_id: str, job_args: list[str], wait: bool) -> subprocess.CompletedProcess:
    flags = ["--submission-id", submission_id, "--working-dir", str(REPO)] + ([] if wait else ["--no-wait"])
    return ray_job(cluster, "submit", *flags, "--", "python", "-m", "jobs.img2img", *job_args)


def test_ray_job_stop_then_resubmission_finishes(ray_cluster, model_dirs, tmp_path):
    rows = 30
    storage = Storage()
    manifest = write_dataset(storage, str(tmp_path / "data"), [(128, 128)] * rows)  # ~2 s per row
    output = str(tmp_path / "out")
    job_args = driver_args(
        str(model_dirs["v1"]), manifest, output, None,
        defaults__num_inference_steps=40, defaults__strength=1.0, compute__batch_size=1,
        compute__rows_per_part=1,
    )  # fmt: skip
    first = f"sdbatch-stop-{uuid.uuid4().hex[:8]}"
    submitted = submit_job(ray_cluster, first, job_args, wait=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + 240
    while part_count(storage, output) < 1:
        assert time.monotonic() < deadline, ray_job(ray_cluster, "logs", first).stdout[-4000:]
        time.sleep(0.2)
    stopped = ray_job(ray_cluster, "stop", first)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = ray_job(ray_cluster, "status", first)
    assert "stopped" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    time.sleep(3)  # Ray tears the stopped job's workers down

    sink = OutputSink(storage, output)
    assert not sink.is_committed(), ray_job(ray_cluster, "logs", first).stdout[-5000:]
    before = assert_output_sound(storage, output, manifest, complete=False)
    assert 0 < before["images"] < rows
    if storage.exists(sink.layout.run_manifest):  # SIGTERM arrived before Ray's SIGKILL: progress recorded
        assert sink.read_run_manifest()["complete"] is False

    again = submit_job(ray_cluster, f"sdbatch-resume-{uuid.uuid4().hex[:8]}", job_args, wait=True)
    logs = again.stdout + again.stderr
    assert again.returncode == 0, logs[-6000:]
    assert f"{before['images']} already done" in logs, logs[-6000:]
    after = assert_output_sound(storage, output, manifest, complete=True)
    assert after["images"] == rows and after["errors"] == 0
