"""The DAG file parses in real Airflow with no import errors; the submit-or-attach decisions of
sdbatch_ray and the polling of sdbatch_trigger on a scripted client (the cases a live cluster cannot
easily produce on demand)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import sdbatch_ray
from sdbatch_trigger import SdbatchRayJobTrigger

DAG_FOLDER = Path(__file__).resolve().parents[2] / "deploy" / "airflow"


def test_dag_folder_imports_without_errors():
    from airflow.dag_processing.dagbag import BundleDagBag

    # As the DAG processor parses a DAG bundle (a local folder bundle holding this folder).
    bag = BundleDagBag(dag_folder=DAG_FOLDER, bundle_path=DAG_FOLDER, bundle_name="sdbatch")
    assert bag.import_errors == {}
    # .airflowignore keeps the helper module out of parsing: only the DAG file was read.
    assert sorted(Path(path).name for path in bag.file_last_changed) == ["sdbatch_augment_dag.py"]
    assert sorted(bag.dag_ids) == ["sdbatch_augment"]
    dag = bag.dags["sdbatch_augment"]
    task = dag.get_task("augment")
    assert type(task).__name__ == "SdbatchRayJobOperator"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert task.retries == 2
    assert task.retry_delay == timedelta(minutes=10)
    assert {"partition", "output_uri", "entrypoint", "submission_id", "config", "ray_address"} <= set(
        task.template_fields
    )
    assert task.partition == "ds={{ ds }}"
    assert task.deferrable is True


def test_parsing_the_dag_does_not_import_ray():
    import subprocess
    import sys

    code = (
        f"import sys; sys.path.insert(0, {str(DAG_FOLDER)!r}); import sdbatch_augment_dag; "
        "print('ray' in sys.modules, 'ray.job_submission' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


class ScriptedClient:
    """A JobSubmissionClient stand-in: jobs is {submission id: [statuses to report, in order]}."""

    def __init__(self, jobs: dict[str, list[str]] | None = None, logs: str = ""):
        self.jobs = {job_id: list(statuses) for job_id, statuses in (jobs or {}).items()}
        self.logs = logs
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.refuse_submit = False

    def _status(self, job_id: str) -> str:
        statuses = self.jobs[job_id]
        return statuses.pop(0) if len(statuses) > 1 else statuses[0]

    def list_jobs(self):
        listed = [
            SimpleNamespace(submission_id=job_id, status=s[0], message=None)
            for job_id, s in self.jobs.items()
        ]
        return [*listed, SimpleNamespace(submission_id=None, status="SUCCEEDED")]  # a driver job: no id

    def get_job_info(self, job_id: str):
        if job_id not in self.jobs:
            raise RuntimeError(f"Job {job_id} does not exist")
        return SimpleNamespace(submission_id=job_id, status=self._status(job_id), message="msg")

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs) -> str:
        if self.refuse_submit:
            self.jobs[submission_id] = ["RUNNING", "SUCCEEDED"]  # someone else got there first
            raise RuntimeError(f"Job with submission_id {submission_id} already exists")
        self.submitted.append(submission_id)
        self.jobs[submission_id] = ["PENDING", "RUNNING", "SUCCEEDED"]
        return submission_id

    def get_job_logs(self, job_id: str) -> str:
        return self.logs

    def stop_job(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        self.jobs[job_id] = ["STOPPED"]
        return True


BASE = "sdbatch-d-20260101"


def test_attempt_ids():
    assert sdbatch_ray.attempt_id(BASE, 0) == BASE
    assert sdbatch_ray.attempt_id(BASE, 2) == f"{BASE}-retry-2"
    assert sdbatch_ray.attempt_number(BASE, f"{BASE}-retry-12") == 12
    assert sdbatch_ray.attempt_number(BASE, BASE) == 0
    for other in (f"{BASE}-retry-0", f"{BASE}-retry-x", f"{BASE}1", "sdbatch-d-2026010", None, ""):
        assert sdbatch_ray.attempt_number(BASE, other) is None


@pytest.mark.parametrize(
    ("jobs", "action", "bound_to", "submitted"),
    [
        ({}, "submitted", BASE, [BASE]),
        ({BASE: ["SUCCEEDED"]}, "already-succeeded", BASE, []),
        ({BASE: ["FAILED"], f"{BASE}-retry-1": ["SUCCEEDED"]}, "already-succeeded", f"{BASE}-retry-1", []),
        ({BASE: ["RUNNING", "SUCCEEDED"]}, "attached", BASE, []),
        ({BASE: ["FAILED"], f"{BASE}-retry-1": ["PENDING", "SUCCEEDED"]}, "attached", f"{BASE}-retry-1", []),
        ({BASE: ["FAILED"]}, "submitted", f"{BASE}-retry-1", [f"{BASE}-retry-1"]),
        (
            {BASE: ["FAILED"], f"{BASE}-retry-1": ["STOPPED"]},
            "submitted",
            f"{BASE}-retry-2",
            [f"{BASE}-retry-2"],
        ),
        ({"sdbatch-d-20260102": ["RUNNING"]}, "submitted", BASE, [BASE]),  # another date's job
    ],
)
def test_submit_or_attach_decisions(jobs, action, bound_to, submitted):
    client = ScriptedClient(jobs)
    run = sdbatch_ray.run_job(
        client, BASE, "python -m jobs.augment", poll_interval=0.01, sleep=lambda s: None
    )
    assert (run.action, run.submission_id, run.status) == (action, bound_to, "SUCCEEDED")
    assert client.submitted == submitted


def test_a_lost_submission_race_attaches_to_the_winner():
    client = ScriptedClient()
    client.refuse_submit = True
    run = sdbatch_ray.submit_or_attach(client, BASE, "python -m jobs.augment")
    assert (run.action, run.submission_id) == ("attached", BASE)


def test_a_refused_submission_of_a_job_that_does_not_exist_raises():
    class Refusing(ScriptedClient):
        def submit_job(self, **kwargs):
            raise RuntimeError("bad runtime_env")

    with pytest.raises(RuntimeError, match="bad runtime_env"):
        sdbatch_ray.submit_or_attach(Refusing(), BASE, "x")


def test_max_attempts_stops_resubmitting():
    client = ScriptedClient({BASE: ["FAILED"], f"{BASE}-retry-1": ["FAILED"]})
    with pytest.raises(sdbatch_ray.TooManyAttempts, match="retry-1"):
        sdbatch_ray.submit_or_attach(client, BASE, "x", max_attempts=2)
    assert client.submitted == []


def test_failure_carries_the_last_lines_of_the_log():
    logs = "\n".join(f"line {i}" for i in range(500)) + "\nTraceback: boom\n"
    client = ScriptedClient({BASE: ["RUNNING", "FAILED"]}, logs=logs)
    with pytest.raises(sdbatch_ray.JobFailed) as failure:
        sdbatch_ray.run_job(client, BASE, "x", poll_interval=0.01, log_lines=5, sleep=lambda s: None)
    assert failure.value.log_tail.splitlines() == [
        "line 496",
        "line 497",
        "line 498",
        "line 499",
        "Traceback: boom",
    ]
    assert "ended FAILED" in str(failure.value) and "Traceback: boom" in str(failure.value)


def flaky(client, failing_polls: tuple[int, ...]):
    """`client` whose get_job_info raises ConnectionError on the listed calls (1-based): a dashboard
    restarting."""
    real, calls = client.get_job_info, {"n": 0}

    def get_job_info(job_id):
        calls["n"] += 1
        if calls["n"] in failing_polls:
            raise ConnectionError("dashboard restarting")
        return real(job_id)

    client.get_job_info = get_job_info
    return client


def test_transient_poll_errors_are_retried_and_persistent_ones_raise():
    client = flaky(ScriptedClient({BASE: ["RUNNING", "RUNNING", "SUCCEEDED"]}), failing_polls=(2, 3))
    assert (
        sdbatch_ray.wait_for_terminal(client, BASE, poll_interval=0.01, sleep=lambda s: None) == "SUCCEEDED"
    )

    def down(job_id):
        raise ConnectionError("down")

    client.get_job_info = down
    with pytest.raises(ConnectionError):
        sdbatch_ray.wait_for_terminal(
            client, BASE, poll_interval=0.01, max_consecutive_errors=3, sleep=lambda s: None
        )


def test_timeout_stops_the_job():
    client = ScriptedClient({BASE: ["RUNNING"]})
    now = {"t": 0.0}

    def sleep(seconds):
        now["t"] += seconds

    with pytest.raises(sdbatch_ray.JobTimeout):
        sdbatch_ray.wait_for_terminal(
            client, BASE, poll_interval=1, timeout=5, sleep=sleep, clock=lambda: now["t"]
        )
    client2 = ScriptedClient({BASE: ["RUNNING"]})
    with pytest.raises(sdbatch_ray.JobTimeout):
        sdbatch_ray.run_job(client2, BASE, "x", poll_interval=0.01, timeout=0.05)
    assert client2.stopped == [BASE]


def test_stop_never_raises():
    class Broken(ScriptedClient):
        def stop_job(self, job_id):
            raise RuntimeError("no such job")

        def get_job_info(self, job_id):
            raise RuntimeError("no such job")

    assert sdbatch_ray.stop(Broken(), BASE, wait=0.0) is None


def test_the_wait_is_bounded_by_job_timeout_else_execution_timeout_when_deferred():
    from airflow.sdk import DAG
    from sdbatch_operator import SdbatchRayJobOperator

    def limit(**kwargs) -> float | None:
        with DAG(dag_id="limits", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc)):
            return SdbatchRayJobOperator(task_id="t", **kwargs).job_time_limit()

    # Airflow does not count time deferred against execution_timeout: the trigger enforces it instead.
    assert limit(execution_timeout=timedelta(hours=12)) == 12 * 3600
    assert limit(execution_timeout=timedelta(hours=12), job_timeout=60.0) == 60.0
    assert limit() is None
    # Blocking, execution_timeout kills the task itself (and on_kill stops the job).
    assert limit(execution_timeout=timedelta(hours=12), deferrable=False) is None


def test_the_trigger_is_rebuilt_from_its_serialized_form():
    from airflow._shared.module_loading import import_string
    from airflow.sdk.serde import deserialize, serialize

    trigger = SdbatchRayJobTrigger(
        address="http://ray-head:8265",
        submission_id=f"{BASE}-retry-1",
        poll_interval=5.0,
        deadline=1_900_000_000.5,
        log_lines=7,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "sdbatch_trigger.SdbatchRayJobTrigger"
    # As the task runner stores the kwargs (serde, JSON) and a triggerer, maybe restarted, rebuilds them.
    stored = json.dumps(serialize(kwargs))
    rebuilt = import_string(classpath)(**deserialize(json.loads(stored)))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["deadline"] == 1_900_000_000.5  # absolute: a restart does not restart the clock


def first_event(trigger: SdbatchRayJobTrigger) -> dict:
    async def first():
        return await anext(trigger.run())

    return asyncio.run(first()).payload


def test_the_trigger_polls_without_blocking_the_event_loop(monkeypatch):
    class SlowClient(ScriptedClient):
        def get_job_info(self, job_id: str):
            time.sleep(0.2)  # a slow dashboard: a blocking call in the loop would stall every trigger
            return super().get_job_info(job_id)

    client = SlowClient({BASE: ["RUNNING", "RUNNING", "SUCCEEDED"]})
    monkeypatch.setattr(sdbatch_ray, "make_client", lambda address: client)
    trigger = SdbatchRayJobTrigger(address="http://ray-head:8265", submission_id=BASE, poll_interval=0.01)

    async def run_beside_a_ticker() -> tuple[dict, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        event = await anext(trigger.run())
        ticker.cancel()
        return event.payload, ticks

    event, ticks = asyncio.run(run_beside_a_ticker())
    assert event == {
        "submission_id": BASE,
        "status": "SUCCEEDED",
        "timed_out": False,
        "message": "msg",
        "log_tail": "",
    }
    assert ticks >= 15  # the loop ran on during 0.6 s of polling (blocked, it would tick ~3 times)


def test_the_trigger_retries_transient_poll_errors_and_raises_on_persistent_ones(monkeypatch):
    scripted = ScriptedClient({BASE: ["RUNNING", "FAILED"]}, logs="Traceback: boom\n")
    client = flaky(scripted, failing_polls=(2, 3))
    monkeypatch.setattr(sdbatch_ray, "make_client", lambda address: client)
    trigger = SdbatchRayJobTrigger(address="http://x", submission_id=BASE, poll_interval=0.01)
    event = first_event(trigger)
    assert (event["status"], event["log_tail"]) == ("FAILED", "Traceback: boom")

    def down(job_id):
        raise ConnectionError("down")

    client.get_job_info = down
    trigger = SdbatchRayJobTrigger(
        address="http://x", submission_id=BASE, poll_interval=0.01, max_consecutive_errors=2
    )
    with pytest.raises(ConnectionError):
        first_event(trigger)
