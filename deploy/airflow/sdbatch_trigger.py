"""`SdbatchRayJobTrigger`: waits, in Airflow's triggerer, for one Ray job to end, so no worker slot is held.

`SdbatchRayJobOperator` submits (or attaches to) a Ray job and defers to this trigger with the job's
submission id. The trigger polls the Ray Jobs API (the sync `JobSubmissionClient`, each call in a thread
via `asyncio.to_thread`, so the triggerer's event loop never blocks) and fires one event when the job is
SUCCEEDED, FAILED or STOPPED, or when the run's deadline passes (it then stops the job, as `run_job` does
on a timeout). The event is a dict:

    {"submission_id": str, "status": str, "timed_out": bool, "message": str | None, "log_tail": str}

`status` is the terminal status, or on a timeout the last status seen before the deadline; `log_tail`
holds the last `log_lines` lines of the job's log unless the job SUCCEEDED.

The triggerer imports this class by its classpath, `sdbatch_trigger.SdbatchRayJobTrigger`, and does not
read DAG bundles: this module and `sdbatch_ray` must be on the triggerer's `sys.path` (README.md). Everything
the trigger needs is in its kwargs (the deadline is absolute, wall-clock seconds), so a triggerer restart
rebuilds it and it goes on polling the same job.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

try:
    import sdbatch_ray
except ImportError:  # this folder is not on sys.path (a DagBag over another folder, a test)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sdbatch_ray

# The triggerer gives `on_kill` 30 s by default ([triggerer] on_kill_timeout); stay inside it.
ON_KILL_STOP_WAIT = 20.0


class SdbatchRayJobTrigger(BaseTrigger):
    """Poll the Ray job `submission_id` at `address` every `poll_interval` seconds until it ends or
    `deadline` (seconds since the epoch; None = no limit) passes. Up to `max_consecutive_errors` failed
    polls in a row (the dashboard restarting) are logged and retried; one more raises (the task fails)."""

    def __init__(
        self,
        *,
        address: str,
        submission_id: str,
        poll_interval: float = 30.0,
        deadline: float | None = None,
        log_lines: int = 100,
        max_consecutive_errors: int = 5,
    ):
        super().__init__()
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.address = address
        self.submission_id = submission_id
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.log_lines = log_lines
        self.max_consecutive_errors = max_consecutive_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "address": self.address,
                "submission_id": self.submission_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "log_lines": self.log_lines,
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        client: sdbatch_ray.JobClient | None = None
        errors, last = 0, None
        while True:
            try:
                if client is None:  # the constructor itself calls the dashboard
                    client = await asyncio.to_thread(sdbatch_ray.make_client, self.address)
                info = await asyncio.to_thread(client.get_job_info, self.submission_id)
            except Exception as error:
                errors += 1
                if errors > self.max_consecutive_errors:
                    raise
                self.log.warning(
                    "polling Ray job %s failed (%d in a row): %s", self.submission_id, errors, error
                )
            else:
                errors = 0
                status = sdbatch_ray.status_name(info.status)
                if status != last:
                    self.log.info("Ray job %s is %s", self.submission_id, status)
                    last = status
                if status in sdbatch_ray.TERMINAL:
                    yield TriggerEvent(await self._event(client, status, getattr(info, "message", None)))
                    return
            remaining = None if self.deadline is None else self.deadline - time.time()
            if remaining is not None and remaining <= 0:
                yield TriggerEvent(await self._timed_out(client, last or sdbatch_ray.PENDING))
                return
            await asyncio.sleep(
                min(self.poll_interval, remaining) if remaining is not None else self.poll_interval
            )

    async def _event(
        self, client: sdbatch_ray.JobClient, status: str, message: str | None, *, timed_out: bool = False
    ) -> dict[str, Any]:
        tail = ""
        if status != sdbatch_ray.SUCCEEDED:
            tail = await asyncio.to_thread(sdbatch_ray.log_tail, client, self.submission_id, self.log_lines)
        return {
            "submission_id": self.submission_id,
            "status": status,
            "timed_out": timed_out,
            "message": message,
            "log_tail": tail,
        }

    async def _timed_out(self, client: sdbatch_ray.JobClient | None, status: str) -> dict[str, Any]:
        self.log.warning("Ray job %s still %s at its deadline: stopping it", self.submission_id, status)
        if client is None:
            client = await asyncio.to_thread(sdbatch_ray.make_client, self.address)
        stopped = await asyncio.to_thread(sdbatch_ray.stop, client, self.submission_id)
        self.log.info("Ray job %s is %s", self.submission_id, stopped)
        return await self._event(client, status, None, timed_out=True)

    async def on_kill(self) -> None:
        """A user marked the deferred task failed or succeeded, or cleared it (Airflow 3.3, the pinned
        version, calls this then, not on a triggerer shutdown or restart; older versions never call it;
        README.md, "Kill", has the one other case): stop the Ray job, as the operator's `on_kill` does
        for a running task."""
        client = await asyncio.to_thread(sdbatch_ray.make_client, self.address)
        status = await asyncio.to_thread(sdbatch_ray.stop, client, self.submission_id, wait=ON_KILL_STOP_WAIT)
        self.log.info("on_kill: Ray job %s is %s", self.submission_id, status)
