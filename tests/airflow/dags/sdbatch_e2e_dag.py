"""DAGs for the end-to-end tests: the real operator, imported as any DAG would. `sdbatch_e2e` runs the
real `python -m jobs.augment --config <Variable> --partition ds=<ds>` with `--dry-run` added (a real
run takes minutes on CPU); `sdbatch_e2e_fail` a command that fails. The address, the config and the
output root come from Airflow Variables."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone

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
