"""Airflow 3 DAG: the daily sdbatch augmentation run, one Ray job per logical date.

The task submits `python -m jobs.augment --config <config> --partition ds=<ds>` to the Ray cluster
through the Ray Jobs API with the submission id `sdbatch-<dag_id>-<ds_nodash>` (retries after a failure
get `-retry-1`, `-retry-2`, ...), so re-running a logical date never starts a second copy: a succeeded
job is not resubmitted, a running one is attached to, a failed one is resubmitted (the job resumes). The
task then defers: Airflow's triggerer waits for the job (no worker slot is held), at most the 12 h
`execution_timeout`, after which the job is stopped. See README.md beside this file for the Variables and
Connection to set and for the triggerer's setup.

Ray is imported only when the task runs, so parsing this file needs only Airflow.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import DAG

try:
    from sdbatch_operator import SdbatchRayJobOperator
except ImportError:  # the DAG folder is not on sys.path (a DagBag over another folder, a test)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sdbatch_operator import SdbatchRayJobOperator

with DAG(
    dag_id="sdbatch_augment",
    description="Daily sdbatch augmentation of the day's partition on Ray",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "sdbatch",
        "retries": 2,
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=12),
    },
    tags=["sdbatch", "ray"],
) as dag:
    SdbatchRayJobOperator(task_id="augment")
