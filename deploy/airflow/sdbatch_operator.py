"""`SdbatchRayJobOperator`: one logical date's sdbatch job on Ray, for Airflow 3 DAGs.

A module of its own (not a DAG file), so any DAG can import the operator without also defining the
`sdbatch_augment` DAG (Airflow attributes every DAG created while parsing a file to that file). The
submit-or-attach logic is in `sdbatch_ray` (no Airflow there), the wait in `sdbatch_trigger` (run by
Airflow's triggerer); Ray is imported only when a task or trigger runs.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

try:
    import sdbatch_ray
    from sdbatch_trigger import SdbatchRayJobTrigger
except ImportError:  # this folder is not on sys.path (a DagBag over another folder, a test)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sdbatch_ray
    from sdbatch_trigger import SdbatchRayJobTrigger

ADDRESS_VARIABLE = "sdbatch_ray_address"  # the Ray dashboard, e.g. http://ray-head:8265
CONFIG_VARIABLE = "sdbatch_config"  # the job's YAML config, as the cluster sees it (s3://..., /etc/...)
OUTPUT_ROOT_VARIABLE = "sdbatch_output_root"  # where partitions are written: <root>/ds=<ds>


class SdbatchRayJobOperator(BaseOperator):
    """Run one logical date's sdbatch job on Ray: submit or attach, wait, fail with the job's log tail.

    With `deferrable=True` (the default) the task submits or attaches, then defers to
    `SdbatchRayJobTrigger`: the wait runs in Airflow's triggerer and holds no worker slot, and
    `execute_complete` ends the task when the job does. `deferrable=False` polls in the task itself.
    The wait is bounded by `job_timeout` seconds, else (deferrable only: Airflow does not count the time
    a task is deferred against it) by the task's `execution_timeout`; past it, the job is stopped.

    The address comes from `ray_address`, else the Connection `ray_conn_id`, else the Variable
    `sdbatch_ray_address`; the config from `config`, else the Variable `sdbatch_config`; the output URI
    (the return value, pushed to XCom) from `output_uri`, else `<Variable sdbatch_output_root>/<partition>`.
    `entrypoint` replaces the default `python -m jobs.augment --config ... --partition ...`, to which
    `extra_args` are appended (e.g. `["--set", "compute.batch_size=8"]`, `["--dry-run"]`).
    """

    template_fields: Sequence[str] = (
        "ray_address",
        "config",
        "partition",
        "output_uri",
        "entrypoint",
        "submission_id",
        "runtime_env",
    )
    ui_color = "#cfe8fc"

    def __init__(
        self,
        *,
        ray_address: str | None = None,
        ray_conn_id: str | None = None,
        config: str | None = None,
        partition: str = "ds={{ ds }}",
        output_uri: str | None = None,
        entrypoint: str | None = None,
        extra_args: Sequence[str] | None = None,
        submission_id: str | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        submit_options: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        poll_interval: float = 30.0,
        job_timeout: float | None = None,
        log_lines: int = 100,
        deferrable: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.ray_address = ray_address
        self.ray_conn_id = ray_conn_id
        self.config = config
        self.partition = partition
        self.output_uri = output_uri
        self.entrypoint = entrypoint
        self.extra_args = list(extra_args or [])
        self.submission_id = submission_id
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.submit_options = dict(submit_options) if submit_options else None
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.log_lines = log_lines
        self.deferrable = deferrable
        # Set by execute() as soon as the run is bound to a Ray job, for on_kill().
        self._client: sdbatch_ray.JobClient | None = None
        self._job_id: str | None = None

    # -- inputs ----------------------------------------------------------------------------------------

    def resolve_address(self) -> str:
        if self.ray_address:
            return self.ray_address
        if self.ray_conn_id:
            return address_from_connection(self.ray_conn_id)
        return _variable(ADDRESS_VARIABLE)

    def resolve_entrypoint(self) -> str:
        if self.entrypoint:
            return self.entrypoint
        config = self.config or _variable(CONFIG_VARIABLE)
        command = ["python", "-m", "jobs.augment", "--config", config, "--partition", self.partition]
        return shlex.join([*command, *self.extra_args])

    def resolve_output_uri(self) -> str:
        if self.output_uri:
            return self.output_uri
        return f"{_variable(OUTPUT_ROOT_VARIABLE).rstrip('/')}/{self.partition}"

    def base_submission_id(self, context: Mapping[str, Any]) -> str:
        return self.submission_id or f"sdbatch-{self.dag_id}-{context['ds_nodash']}"

    def job_time_limit(self) -> float | None:
        """Seconds this try waits for the job before stopping it (None = no limit)."""
        if self.job_timeout is not None:
            return self.job_timeout
        if self.deferrable and self.execution_timeout is not None:
            return self.execution_timeout.total_seconds()
        return None

    # -- run -------------------------------------------------------------------------------------------

    def execute(self, context: Mapping[str, Any]) -> str:
        # Everything is resolved before anything is submitted: a missing Variable fails the task up front.
        address = self.resolve_address()
        entrypoint = self.resolve_entrypoint()
        output_uri = self.resolve_output_uri()
        base_id = self.base_submission_id(context)
        self.log.info("Ray %s, run %s, entrypoint: %s", address, base_id, entrypoint)

        self._client = sdbatch_ray.make_client(address)
        submission = {
            "runtime_env": self.runtime_env,
            "metadata": {"airflow_dag_id": self.dag_id, "airflow_task_id": self.task_id},
            "submit_options": self.submit_options,
            "max_attempts": self.max_attempts,
        }
        if not self.deferrable:
            run = sdbatch_ray.run_job(
                self._client,
                base_id,
                entrypoint,
                **submission,
                poll_interval=self.poll_interval,
                timeout=self.job_time_limit(),
                log_lines=self.log_lines,
                on_attempt=self._bound_to,
            )
            self.log.info("Ray job %s %s; output %s", run.submission_id, run.action, output_uri)
            return output_uri  # the return value is pushed to XCom (key "return_value")

        run = sdbatch_ray.submit_or_attach(self._client, base_id, entrypoint, **submission)
        self._bound_to(run)
        if run.status == sdbatch_ray.SUCCEEDED:
            self.log.info("Ray job %s %s; output %s", run.submission_id, run.action, output_uri)
            return output_uri
        limit = self.job_time_limit()
        self.log.info(
            "deferring: the triggerer waits for Ray job %s%s", run.submission_id, _limit_text(limit)
        )
        self.defer(
            trigger=SdbatchRayJobTrigger(
                address=address,
                submission_id=run.submission_id,
                poll_interval=self.poll_interval,
                deadline=None if limit is None else time.time() + limit,
                log_lines=self.log_lines,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Mapping[str, Any], event: Mapping[str, Any]) -> str:
        """Resumed by the trigger's event (see `sdbatch_trigger`): the output URI if the job SUCCEEDED,
        else `JobTimeout` (the trigger has stopped the job) or `JobFailed`, with the job's log tail."""
        submission_id, status = event["submission_id"], event["status"]
        if event["timed_out"]:
            self.log.error("last lines of Ray job %s's log:\n%s", submission_id, event["log_tail"])
            raise sdbatch_ray.JobTimeout(submission_id, status, self.job_time_limit() or 0.0)
        if status != sdbatch_ray.SUCCEEDED:
            raise sdbatch_ray.JobFailed(submission_id, status, event["message"], event["log_tail"])
        output_uri = self.resolve_output_uri()
        self.log.info("Ray job %s SUCCEEDED; output %s", submission_id, output_uri)
        return output_uri

    def _bound_to(self, run: sdbatch_ray.JobRun) -> None:
        self._job_id = run.submission_id
        self.log.info("run bound to Ray job %s (%s, %s)", run.submission_id, run.action, run.status)

    def on_kill(self) -> None:
        """The running task is being killed (marked failed/success in the UI, timed out, worker shutting
        down): stop the Ray job, so it does not run on unattended. A later try resubmits a new attempt.
        While the task is deferred no task process exists; the trigger's `on_kill` stops the job then."""
        if self._client is None or self._job_id is None:
            self.log.info("on_kill: no Ray job bound yet, nothing to stop")
            return
        status = sdbatch_ray.stop(self._client, self._job_id)
        self.log.info("on_kill: Ray job %s is %s", self._job_id, status)


def _limit_text(limit: float | None) -> str:
    return "" if limit is None else f" (at most {limit:g} s, then it is stopped)"


def _variable(key: str) -> str:
    from airflow.sdk import Variable

    value = Variable.get(key)
    if not value:
        raise ValueError(f"the Airflow Variable {key!r} is empty")
    return value


def address_from_connection(conn_id: str) -> str:
    """The Ray dashboard URL of a Connection: its host (a full URL is used as is), else
    `<schema or http>://<host>:<port or 8265>`."""
    from airflow.sdk import Connection

    connection = Connection.get(conn_id)
    host = (connection.host or "").strip()
    if not host:
        raise ValueError(f"the Airflow Connection {conn_id!r} has no host")
    if "://" in host:
        return host.rstrip("/")
    scheme = connection.schema or "http"
    return f"{scheme}://{host}:{connection.port or 8265}"
