"""DAGs for the end-to-end tests: the real operator (deferrable, its default), imported as any DAG would.
`sdbatch_e2e` runs the real `python -m jobs.augment --config <Variable> --partition ds=<ds>` with
`--dry-run` added (a real run takes minutes on CPU); `sdbatch_e2e_fail` a command that fails;
`sdbatch_e2e_retry` one that fails its first time (it leaves the flag file named by the Variable
`sdbatch_e2e_flag`) and succeeds on the task's retry. The address, the config and the output root come
from Airflow Variables."""

from __future__ import annotations

import shlex
from datetime import datetime, timedelta, timezone

from airflow.sdk import DAG
from sdbatch_operator import SdbatchRayJobOperator

with DAG(
    dag_id="sdbatch_e2e",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
):
    SdbatchRayJobOperator(task_id="augment", extra_args=["--dry-run"], poll_interval=0.5)

with DAG(
    dag_id="sdbatch_e2e_fail",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    default_args={"retries": 0},
):
    SdbatchRayJobOperator(
        task_id="augment",
        entrypoint=shlex.join(["python", "-c", "import sys; print('e2e-boom-marker'); sys.exit(5)"]),
        poll_interval=0.5,
        log_lines=10,
    )

FAIL_ONCE = (
    "import pathlib, sys\n"
    "flag = pathlib.Path(sys.argv[1])\n"
    "first = not flag.exists()\n"
    "flag.touch()\n"
    "print('e2e-retry-marker', 'first' if first else 'again')\n"
    "sys.exit(6 if first else 0)\n"
)

with DAG(
    dag_id="sdbatch_e2e_retry",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    default_args={"retries": 1, "retry_delay": timedelta(0)},
):
    SdbatchRayJobOperator(
        task_id="augment",
        entrypoint=shlex.join(["python", "-c", FAIL_ONCE]) + " {{ var.value.sdbatch_e2e_flag }}",
        poll_interval=0.5,
        log_lines=10,
    )
