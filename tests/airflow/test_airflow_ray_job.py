"""The DAG's operator against a real local Ray cluster (`ray start --head`) through the Ray Jobs API.

Each test builds the operator as the DAG file does, renders its templates for a logical date and calls
`execute` as an Airflow try would (no database needed); a second try is a fresh operator, as a fresh
Airflow try parses the DAG anew.
"""

from __future__ import annotations

import shlex
import threading
import time
from datetime import datetime, timezone

import pytest
import sdbatch_ray
from airflow.sdk import DAG
from ray.job_submission import JobSubmissionClient
from ray_head import ray_bin_dir
from sdbatch_operator import SdbatchRayJobOperator

OUTPUT_TEMPLATE = "s3://bucket/augmented/ds={{ ds }}"


def make_operator(dag_id: str, address: str, entrypoint: str, **kwargs) -> SdbatchRayJobOperator:
    with DAG(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc)):
        return SdbatchRayJobOperator(
            task_id="augment",
            ray_address=address,
            entrypoint=entrypoint,
            output_uri=OUTPUT_TEMPLATE,
            poll_interval=0.3,
            **kwargs,
        )


def context_for(ds: str) -> dict:
    logical_date = datetime.fromisoformat(ds).replace(tzinfo=timezone.utc)
    return {"ds": ds, "ds_nodash": ds.replace("-", ""), "logical_date": logical_date}


def run_try(operator: SdbatchRayJobOperator, ds: str) -> str:
    context = context_for(ds)
    operator.render_template_fields(context)
    return operator.execute(context)


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
    first = make_operator("sdbatch_once", ray_head.dashboard_url, entrypoint)
    output = run_try(first, "2026-03-01")
    base_id = "sdbatch-sdbatch_once-20260301"
    assert output == "s3://bucket/augmented/ds=2026-03-01"
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}
    logs = client.get_job_logs(base_id)
    assert "done-marker" in logs
    assert str(ray_bin_dir() / "python") in logs  # the python first on the cluster's PATH ran it

    jobs_before = len(client.list_jobs())
    second = make_operator("sdbatch_once", ray_head.dashboard_url, entrypoint)
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
    operator = make_operator("sdbatch_retry", ray_head.dashboard_url, python_command(code), log_lines=20)
    with pytest.raises(sdbatch_ray.JobFailed) as failure:
        run_try(operator, "2026-03-02")
    message = str(failure.value)
    assert failure.value.status == "FAILED" and failure.value.submission_id == base_id
    assert "boom-marker" in message
    assert "noise line 199" in message and "noise line 100" not in message  # the tail, not the whole log
    assert attempts(client, base_id) == {base_id: "FAILED"}

    retry = make_operator("sdbatch_retry", ray_head.dashboard_url, python_command(code), log_lines=20)
    assert run_try(retry, "2026-03-02") == "s3://bucket/augmented/ds=2026-03-02"
    assert attempts(client, base_id) == {base_id: "FAILED", f"{base_id}-retry-1": "SUCCEEDED"}
    assert "recovered-marker" in client.get_job_logs(f"{base_id}-retry-1")

    again = make_operator("sdbatch_retry", ray_head.dashboard_url, python_command(code))
    run_try(again, "2026-03-02")
    assert len(attempts(client, base_id)) == 2


def test_a_running_job_is_attached_to(ray_head, client):
    base_id = "sdbatch-sdbatch_attach-20260303"
    entrypoint = python_command("import time; time.sleep(4); print('slow-marker')")
    client.submit_job(entrypoint=entrypoint, submission_id=base_id)  # e.g. by a try whose worker died
    operator = make_operator("sdbatch_attach", ray_head.dashboard_url, entrypoint)
    assert run_try(operator, "2026-03-03") == "s3://bucket/augmented/ds=2026-03-03"
    assert attempts(client, base_id) == {base_id: "SUCCEEDED"}


def test_on_kill_stops_the_running_job(ray_head, client):
    base_id = "sdbatch-sdbatch_kill-20260304"
    operator = make_operator("sdbatch_kill", ray_head.dashboard_url, "sleep 60")
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


def test_end_to_end_in_airflow_task_runner(ray_head, client, airflow_db, augment_config, monkeypatch):
    """`dag.test()`: Airflow's own task runner parses the DAG from its dags folder, renders the
    templates, resolves the Variables through its execution API, submits the real `jobs.augment`
    command (as a dry run) and pushes the output URI to XCom."""
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

    first = dag.test(logical_date=logical_date)
    assert first.state == "success"
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

    # dag.test() replaces the date's run: a new try of the same logical date, as a cleared task is.
    second = dag.test(logical_date=logical_date)
    assert second.state == "success"
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
    run = dag.test(logical_date=datetime(2026, 3, 11, tzinfo=timezone.utc))
    assert run.state == "failed"
    assert [ti.state for ti in run.get_task_instances()] == ["failed"]
    base_id = "sdbatch-sdbatch_e2e_fail-20260311"
    assert attempts(client, base_id) == {base_id: "FAILED"}
    out, err = capfd.readouterr()
    logged = out + err
    assert f"Ray job {base_id} ended FAILED" in logged and "e2e-boom-marker" in logged
