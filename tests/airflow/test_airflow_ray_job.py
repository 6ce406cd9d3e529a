"""The DAG's operator and trigger against a real local Ray cluster (`ray start --head`) through the Ray
Jobs API.

Each test builds the operator as the DAG file does, renders its templates for a logical date and calls
`execute` as an Airflow try would (no database needed); a second try is a fresh operator, as a fresh
Airflow try parses the DAG anew. Blocking tries (`deferrable=False`) wait in `execute`; deferrable ones
raise `TaskDeferred`, whose trigger the test runs as a triggerer would, then resume a fresh operator with
`execute_complete`. The `dag.test()` tests at the end run the same through Airflow's own task runner.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
import time
from datetime import datetime, timezone

import pytest
import sdbatch_ray
from airflow._shared.module_loading import import_string
from airflow.sdk import DAG
from airflow.sdk.exceptions import TaskDeferred
from ray.job_submission import JobSubmissionClient
from ray_head import ray_bin_dir
from sdbatch_operator import SdbatchRayJobOperator
from sdbatch_trigger import SdbatchRayJobTrigger

OUTPUT_TEMPLATE = "s3://bucket/augmented/ds={{ ds }}"


def make_operator(
    dag_id: str, address: str, entrypoint: str, *, deferrable: bool, **kwargs
) -> SdbatchRayJobOperator:
    with DAG(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc)):
        return SdbatchRayJobOperator(
            task_id="augment",
            ray_address=address,
            entrypoint=entrypoint,
            output_uri=OUTPUT_TEMPLATE,
            poll_interval=0.3,
            deferrable=deferrable,
            **kwargs,
        )


def context_for(ds: str) -> dict:
    logical_date = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc)
    return {"ds": ds, "ds_nodash": ds.replace("-", ""), "logical_date": logical_date}


def run_try(operator: SdbatchRayJobOperator, ds: str) -> str:
    context = context_for(ds)
    operator.render_template_fields(context)
    return operator.execute(context)


def defer_try(operator: SdbatchRayJobOperator, ds: str) -> SdbatchRayJobTrigger:
    """A deferrable try's `execute`: it must defer, to `execute_complete`; returns its trigger."""
    with pytest.raises(TaskDeferred) as deferred:
        run_try(operator, ds)
    assert deferred.value.method_name == "execute_complete"
    return deferred.value.trigger


def resume_try(operator: SdbatchRayJobOperator, ds: str, event: dict) -> str:
    context = context_for(ds)
    operator.render_template_fields(context)
    return operator.execute_complete(context, event=event)


def as_triggerer_runs_it(trigger: SdbatchRayJobTrigger) -> dict:
    """Rebuild the trigger from its serialized form (as any triggerer, restarted or not, does) and return
    the payload of its first event."""
    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**kwargs)

    async def first():
        return await anext(rebuilt.run())

    return asyncio.run(first()).payload


def wait_until_running(client: JobSubmissionClient, submission_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get_job_status(submission_id) != "RUNNING":
        assert time.monotonic() < deadline, f"{submission_id} did not start"
        time.sleep(0.2)


def attempts(client: JobSubmissionClient, base_id: str) -> dict[str, str]:
    """{submission id: status} of every job of the logical run `base_id`."""
    return {a.submission_id: a.status for a in sdbatch_ray.find_attempts(client, base_id)}


def python_command(code: str) -> str:
    return shlex.join(["python", "-c", code])


@pytest.fixture(scope="module")
def client(ray_head) -> JobSubmissionClient:
    return JobSubmissionClient(ray_head.dashboard_url)


def test_submits_once_and_a_second_try_does_not_resubmit(ray_head, client):
    entrypoint = python_command("import sys; print('done-marker', sys.executable)")
    first = make_operator("sdbatch_once", ray_head.dashboard_url, entrypoint, deferrable=False)
    output = run_try(first, "2026-03-01")
    base_id = "sdbatch-sdbatch_once-20260301"
    assert output == "s3://bucket/augmented/ds=2026-03-01"
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}
    logs = client.get_job_logs(base_id)
    assert "done-marker" in logs
    assert str(ray_bin_dir() / "python") in logs  # the python first on the cluster's PATH ran it

    jobs_before = len(client.list_jobs())
    second = make_operator("sdbatch_once", ray_head.dashboard_url, entrypoint, deferrable=False)
    assert run_try(second, "2026-03-01") == output
    assert len(client.list_jobs()) == jobs_before
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}


def test_failed_job_fails_the_try_with_the_log_tail_and_the_next_try_resubmits(ray_head, client, tmp_path):
    flag = tmp_path / "first-attempt-ran"
    # 200 lines of noise, then the marker; fails the first time, succeeds once the flag exists (as a
    # resumed run finishes what the failed one left).
    code = (
        "import pathlib, sys\n"
        f"flag = pathlib.Path({str(flag)!r})\n"
        "first = not flag.exists()\n"
        "flag.touch()\n"
        "[print('noise line', i) for i in range(200)]\n"
        "print('boom-marker' if first else 'recovered-marker', flush=True)\n"
        "sys.exit(3 if first else 0)\n"
    )
    base_id = "sdbatch-sdbatch_retry-20260302"
    operator = make_operator(
        "sdbatch_retry", ray_head.dashboard_url, python_command(code), deferrable=False, log_lines=20
    )
    with pytest.raises(sdbatch_ray.JobFailed) as failure:
        run_try(operator, "2026-03-02")
    message = str(failure.value)
    assert failure.value.status == "FAILED" and failure.value.submission_id == base_id
    assert "boom-marker" in message
    assert "noise line 199" in message and "noise line 100" not in message  # the tail, not the whole log
    assert attempts(client, base_id) == {base_id: "FAILED"}

    retry = make_operator(
        "sdbatch_retry", ray_head.dashboard_url, python_command(code), deferrable=False, log_lines=20
    )
    assert run_try(retry, "2026-03-02") == "s3://bucket/augmented/ds=2026-03-02"
    assert attempts(client, base_id) == {base_id: "FAILED", f"{base_id}-retry-1": "SUCCEEDED"}
    assert "recovered-marker" in client.get_job_logs(f"{base_id}-retry-1")

    again = make_operator("sdbatch_retry", ray_head.dashboard_url, python_command(code), deferrable=False)
    run_try(again, "2026-03-02")
    assert len(attempts(client, base_id)) == 2


def test_a_running_job_is_attached_to(ray_head, client):
    base_id = "sdbatch-sdbatch_attach-20260303"
    entrypoint = python_command("import time; time.sleep(4); print('slow-marker')")
    client.submit_job(entrypoint=entrypoint, submission_id=base_id)  # e.g. by a try whose worker died
    operator = make_operator("sdbatch_attach", ray_head.dashboard_url, entrypoint, deferrable=False)
    assert run_try(operator, "2026-03-03") == "s3://bucket/augmented/ds=2026-03-03"
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}


def test_on_kill_stops_the_running_job(ray_head, client):
    base_id = "sdbatch-sdbatch_kill-20260304"
    operator = make_operator("sdbatch_kill", ray_head.dashboard_url, "sleep 60", deferrable=False)
    outcome: dict = {}

    def execute() -> None:
        try:
            outcome["value"] = run_try(operator, "2026-03-04")
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (operator._job_id and client.get_job_status(base_id) == "RUNNING"):
        assert time.monotonic() < deadline, "the job did not start"
        assert thread.is_alive(), outcome
        time.sleep(0.2)
    started = time.monotonic()
    operator.on_kill()
    assert client.get_job_status(base_id) == "STOPPED"
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 30
    assert isinstance(outcome.get("error"), sdbatch_ray.JobFailed), outcome
    assert outcome["error"].status == "STOPPED"
    assert attempts(client, base_id) == {base_id: "STOPPED"}


def test_a_deferrable_try_submits_defers_while_the_job_runs_and_resumes_with_the_output_uri(ray_head, client):
    base_id = "sdbatch-sdbatch_defer-20260306"
    entrypoint = python_command("import time; time.sleep(2); print('deferred-marker')")
    operator = make_operator("sdbatch_defer", ray_head.dashboard_url, entrypoint, deferrable=True)
    trigger = defer_try(operator, "2026-03-06")
    # execute() returned (deferred) as soon as the job was submitted: no worker slot waits for it.
    assert client.get_job_status(base_id) in ("PENDING", "RUNNING")
    assert (trigger.submission_id, trigger.address, trigger.deadline) == (
        base_id,
        ray_head.dashboard_url,
        None,
    )

    event = as_triggerer_runs_it(trigger)
    assert (event["submission_id"], event["status"], event["timed_out"]) == (base_id, "SUCCEEDED", False)
    resumed = make_operator("sdbatch_defer", ray_head.dashboard_url, entrypoint, deferrable=True)
    assert resume_try(resumed, "2026-03-06", event) == "s3://bucket/augmented/ds=2026-03-06"
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}
    assert "deferred-marker" in client.get_job_logs(base_id)


def test_a_failed_jobs_event_fails_the_resumed_try_with_the_log_tail(ray_head, client):
    base_id = "sdbatch-trigger-failed"
    code = (
        "import sys; [print('noise line', i) for i in range(200)]; print('trigger-boom-marker'); sys.exit(3)"
    )
    client.submit_job(entrypoint=python_command(code), submission_id=base_id)
    trigger = SdbatchRayJobTrigger(
        address=ray_head.dashboard_url, submission_id=base_id, poll_interval=0.3, log_lines=5
    )
    event = as_triggerer_runs_it(trigger)
    assert (event["status"], event["timed_out"]) == ("FAILED", False)
    assert event["log_tail"].splitlines() == [
        *(f"noise line {i}" for i in range(196, 200)),
        "trigger-boom-marker",
    ]

    operator = make_operator("sdbatch_trigger_failed", ray_head.dashboard_url, "unused", deferrable=True)
    with pytest.raises(sdbatch_ray.JobFailed) as failure:
        resume_try(operator, "2026-03-07", event)
    assert failure.value.status == "FAILED" and failure.value.submission_id == base_id
    assert f"Ray job {base_id} ended FAILED" in str(failure.value)
    assert "trigger-boom-marker" in str(failure.value)


def test_a_deferred_try_stops_the_job_at_its_deadline(ray_head, client):
    base_id = "sdbatch-sdbatch_deadline-20260308"
    operator = make_operator(
        "sdbatch_deadline", ray_head.dashboard_url, "sleep 60", deferrable=True, job_timeout=2
    )
    before = time.time()
    trigger = defer_try(operator, "2026-03-08")
    assert before + 2 <= trigger.deadline <= time.time() + 2
    event = as_triggerer_runs_it(trigger)
    assert event["timed_out"] is True and event["status"] in ("PENDING", "RUNNING")
    assert client.get_job_status(base_id) == "STOPPED"  # stopped by the trigger
    with pytest.raises(sdbatch_ray.JobTimeout, match=f"Ray job {base_id} still"):
        resume_try(operator, "2026-03-08", event)


def test_killing_a_deferred_task_stops_the_job_through_the_trigger(ray_head, client):
    base_id = "sdbatch-trigger-kill"
    client.submit_job(entrypoint="sleep 60", submission_id=base_id)
    wait_until_running(client, base_id)
    trigger = SdbatchRayJobTrigger(address=ray_head.dashboard_url, submission_id=base_id)
    started = time.monotonic()
    asyncio.run(trigger.on_kill())  # what the triggerer calls when a user marks or clears the task
    assert client.get_job_status(base_id) == "STOPPED"
    assert time.monotonic() - started < 30  # within the triggerer's on_kill_timeout


def test_default_entrypoint_and_submission_id_from_variables(monkeypatch):
    """The DAG's task reads the address and config from Airflow Variables (here from AIRFLOW_VAR_*, the
    environment variables backend every Airflow reads first) and builds `python -m jobs.augment`."""
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_RAY_ADDRESS", "http://ray-head:8265")
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_CONFIG", "s3://configs/augment.yaml")
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_OUTPUT_ROOT", "s3://data/augmented/")
    import sdbatch_augment_dag

    operator = sdbatch_augment_dag.dag.get_task("augment")
    context = context_for("2026-03-05")
    operator.render_template_fields(context)
    assert operator.resolve_address() == "http://ray-head:8265"
    assert shlex.split(operator.resolve_entrypoint()) == [
        "python",
        "-m",
        "jobs.augment",
        "--config",
        "s3://configs/augment.yaml",
        "--partition",
        "ds=2026-03-05",
    ]
    assert operator.resolve_output_uri() == "s3://data/augmented/ds=2026-03-05"
    assert operator.base_submission_id(context) == "sdbatch-sdbatch_augment-20260305"


def test_address_from_a_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_HEAD", "http://ray-head.internal:8265")
    from sdbatch_operator import address_from_connection

    assert address_from_connection("ray_head") == "http://ray-head.internal:8265"


def deferred_until_the_job_ended(logged: str, submission_id: str, status: str) -> bool:
    """In one try's `dag.test()` log: the task paused as DEFERRED, then the trigger (run inline, as
    `dag.test()` runs triggers) saw the job reach `status`, then the task started again to resume."""
    lines = logged.splitlines()
    paused = [i for i, line in enumerate(lines) if "Pausing task as DEFERRED" in line]
    ended = [
        i
        for i, line in enumerate(lines)
        if f"Ray job {submission_id} is {status}" in line and "sdbatch_trigger" in line
    ]
    started = [i for i, line in enumerate(lines) if "Task started" in line]
    return (
        len(paused) == 1
        and len(ended) == 1
        and len(started) == 2
        and started[0] < paused[0] < ended[0] < started[1]
    )


def test_end_to_end_submit_defer_resume_in_airflow_task_runner(
    ray_head, client, airflow_db, augment_config, monkeypatch, capfd
):
    """`dag.test()`: Airflow's own task runner parses the DAG from its dags folder, renders the
    templates, resolves the Variables through its execution API, submits the real `jobs.augment`
    command (as a dry run), defers while it runs, resumes when the trigger fires and pushes the output
    URI to XCom."""
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_RAY_ADDRESS", ray_head.dashboard_url)
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_CONFIG", augment_config["config"])
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_OUTPUT_ROOT", augment_config["output"])
    bag = BundleDagBag(dag_folder=airflow_db, bundle_path=airflow_db, bundle_name="dags-folder")
    assert bag.import_errors == {}
    dag = bag.dags["sdbatch_e2e"]
    logical_date = datetime(2026, 3, 10, tzinfo=timezone.utc)
    base_id = "sdbatch-sdbatch_e2e-20260310"
    output = f"{augment_config['output']}/ds=2026-03-10"

    def pushed(run_id: str) -> list:
        with create_session() as session:
            rows = session.query(XComModel).filter_by(dag_id="sdbatch_e2e", run_id=run_id, key="return_value")
            return [(row.task_id, row.value) for row in rows]

    capfd.readouterr()
    first = dag.test(logical_date=logical_date)
    assert first.state == "success"
    assert deferred_until_the_job_ended(capfd.readouterr().out, base_id, "SUCCEEDED")
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}
    job = client.get_job_info(base_id)
    assert shlex.split(job.entrypoint) == [
        "python",
        "-m",
        "jobs.augment",
        "--config",
        augment_config["config"],
        "--partition",
        "ds=2026-03-10",
        "--dry-run",
    ]
    logs = client.get_job_logs(base_id)
    assert "dry run: configuration, manifest and output checked" in logs
    assert f"output    {output}" in logs  # the job's own output for the partition is the XCom value
    assert pushed(first.run_id) == [("augment", output)]

    # dag.test() replaces the date's run: a new try of the same logical date, as a cleared task is. The
    # job already succeeded: the try returns at once, without deferring.
    second = dag.test(logical_date=logical_date)
    assert second.state == "success"
    assert "Pausing task as DEFERRED" not in capfd.readouterr().out
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}  # not submitted again
    assert pushed(second.run_id) == [("augment", output)]


def test_end_to_end_failure_fails_the_task_with_the_log_tail(
    ray_head, client, airflow_db, monkeypatch, capfd
):
    from airflow.dag_processing.dagbag import BundleDagBag

    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_RAY_ADDRESS", ray_head.dashboard_url)
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_OUTPUT_ROOT", "s3://bucket/e2e/")
    dag = BundleDagBag(dag_folder=airflow_db, bundle_path=airflow_db, bundle_name="dags-folder").dags[
        "sdbatch_e2e_fail"
    ]
    capfd.readouterr()
    run = dag.test(logical_date=datetime(2026, 3, 11, tzinfo=timezone.utc))
    assert run.state == "failed"
    assert [ti.state for ti in run.get_task_instances()] == ["failed"]
    base_id = "sdbatch-sdbatch_e2e_fail-20260311"
    assert attempts(client, base_id) == {base_id: "FAILED"}
    out, err = capfd.readouterr()
    logged = out + err
    assert deferred_until_the_job_ended(logged, base_id, "FAILED")
    assert f"Ray job {base_id} ended FAILED" in logged and "e2e-boom-marker" in logged


def test_end_to_end_a_retry_after_a_failed_deferred_try_submits_the_next_attempt(
    ray_head, client, airflow_db, monkeypatch, tmp_path, capfd
):
    from airflow.dag_processing.dagbag import BundleDagBag

    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_RAY_ADDRESS", ray_head.dashboard_url)
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_OUTPUT_ROOT", "s3://bucket/e2e/")
    monkeypatch.setenv("AIRFLOW_VAR_SDBATCH_E2E_FLAG", str(tmp_path / "first-try-ran"))
    dag = BundleDagBag(dag_folder=airflow_db, bundle_path=airflow_db, bundle_name="dags-folder").dags[
        "sdbatch_e2e_retry"
    ]
    capfd.readouterr()
    run = dag.test(logical_date=datetime(2026, 3, 12, tzinfo=timezone.utc))
    assert run.state == "success"
    [ti] = run.get_task_instances()
    assert (ti.state, ti.try_number) == ("success", 2)
    base_id = "sdbatch-sdbatch_e2e_retry-20260312"
    assert attempts(client, base_id) == {base_id: "FAILED", f"{base_id}-retry-1": "SUCCEEDED"}
    assert "e2e-retry-marker again" in client.get_job_logs(f"{base_id}-retry-1")
    assert capfd.readouterr().out.count("Pausing task as DEFERRED") == 2  # both tries deferred
