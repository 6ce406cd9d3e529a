"""Submit-or-attach for one logical run of an sdbatch job on a Ray cluster, through the Ray Jobs API.

No scheduler imports here: the Airflow operator (`sdbatch_augment_dag.py`) is a thin shell around
`run_job` and `stop`, and anything else that schedules runs (cron, Argo, a script) can use them too.

One logical run (one DAG and one logical date) has a deterministic *base* submission id, e.g.
`sdbatch-sdbatch_augment-20260101`. Ray refuses to reuse a submission id, so the attempts of that run
are `<base>`, `<base>-retry-1`, `<base>-retry-2`, ... and `submit_or_attach` decides from the jobs the
cluster already has:

* an attempt SUCCEEDED  -> nothing is submitted; that attempt is the result;
* an attempt is PENDING or RUNNING -> attach to it (a scheduler retry, or a second scheduler, does not
  start a second copy of the job);
* otherwise (no attempt, or the last one FAILED or was STOPPED) -> submit the next attempt id. The job
  resumes from what its output already holds, so re-running after a failure is safe.

`wait_for_terminal` polls to SUCCEEDED / FAILED / STOPPED; `run_job` raises `JobFailed`, whose message
ends with the last lines of the attempt's log, when the result is not SUCCEEDED. `stop` is what a
scheduler's kill hook calls.

The client is anything with the methods of `ray.job_submission.JobSubmissionClient` (ray 2.60) used
here: `submit_job`, `list_jobs`, `get_job_info`, `get_job_logs`, `stop_job`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

log = logging.getLogger(__name__)

PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
ACTIVE = frozenset({PENDING, RUNNING})
TERMINAL = frozenset({STOPPED, SUCCEEDED, FAILED})

# What `submit_or_attach` did: the three outcomes of one logical run's submission.
ALREADY_SUCCEEDED, ATTACHED, SUBMITTED = "already-succeeded", "attached", "submitted"

RETRY_SEPARATOR = "-retry-"


class JobClient(Protocol):
    """The part of `ray.job_submission.JobSubmissionClient` this module uses."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, **kwargs: Any) -> str: ...

    def list_jobs(self) -> list[Any]: ...

    def get_job_info(self, job_id: str) -> Any: ...

    def get_job_logs(self, job_id: str) -> str: ...

    def stop_job(self, job_id: str) -> bool: ...


class JobFailed(RuntimeError):
    """The run's attempt ended FAILED or STOPPED; the message ends with the attempt's log tail."""

    def __init__(self, submission_id: str, status: str, message: str | None, log_tail: str):
        self.submission_id, self.status, self.job_message, self.log_tail = (
            submission_id,
            status,
            message,
            log_tail,
        )
        super().__init__(
            f"Ray job {submission_id} ended {status}"
            + (f": {message}" if message else "")
            + f"\n--- last lines of the job's log ---\n{log_tail}"
        )


class JobTimeout(TimeoutError):
    """The attempt did not reach a terminal state within the timeout."""

    def __init__(self, submission_id: str, status: str, timeout: float):
        self.submission_id, self.status, self.timeout = submission_id, status, timeout
        super().__init__(f"Ray job {submission_id} still {status} after {timeout:g} s")


class TooManyAttempts(RuntimeError):
    """Every allowed attempt of this run has failed; nothing more is submitted."""


@dataclass(frozen=True)
class Attempt:
    """One existing Ray job that belongs to a logical run."""

    submission_id: str
    number: int  # 0 for the base id, n for `<base>-retry-n`
    status: str
    message: str | None = None
    entrypoint: str | None = None


@dataclass(frozen=True)
class JobRun:
    """The attempt a logical run is bound to, what was done to get it, and its last known status."""

    submission_id: str
    attempt: int
    action: str  # ALREADY_SUCCEEDED, ATTACHED or SUBMITTED
    status: str


def status_name(status: Any) -> str:
    """`JobStatus.RUNNING` (a str Enum), or a plain string, as "RUNNING"."""
    return str(getattr(status, "value", status))


def attempt_id(base_id: str, number: int) -> str:
    """The submission id of attempt `number` (0 = the base id itself)."""
    if number < 0:
        raise ValueError(f"attempt numbers start at 0, got {number}")
    return base_id if number == 0 else f"{base_id}{RETRY_SEPARATOR}{number}"


def attempt_number(base_id: str, submission_id: str | None) -> int | None:
    """Which attempt of `base_id` this submission id is, or None if it belongs to another run."""
    if not submission_id:
        return None
    match = re.fullmatch(
        re.escape(base_id) + r"(?:" + re.escape(RETRY_SEPARATOR) + r"([1-9][0-9]*))?", submission_id
    )
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) else 0


def find_attempts(client: JobClient, base_id: str) -> list[Attempt]:
    """Every job on the cluster that is an attempt of `base_id`, oldest attempt first."""
    attempts = []
    for job in client.list_jobs():
        number = attempt_number(base_id, getattr(job, "submission_id", None))
        if number is not None:
            attempts.append(
                Attempt(
                    submission_id=job.submission_id,
                    number=number,
                    status=status_name(job.status),
                    message=getattr(job, "message", None),
                    entrypoint=getattr(job, "entrypoint", None),
                )
            )
    return sorted(attempts, key=lambda attempt: attempt.number)


def submit_or_attach(
    client: JobClient,
    base_id: str,
    entrypoint: str,
    *,
    runtime_env: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    submit_options: Mapping[str, Any] | None = None,
    max_attempts: int | None = None,
) -> JobRun:
    """Bind the logical run `base_id` to one Ray job: an existing succeeded or live attempt, else a new one.

    `submit_options` are passed to `submit_job` as they are (`entrypoint_num_cpus`, `entrypoint_resources`,
    ...). `max_attempts` (None = unlimited) caps how many attempts are ever submitted for this run.
    """
    attempts = find_attempts(client, base_id)
    succeeded = [attempt for attempt in attempts if attempt.status == SUCCEEDED]
    if succeeded:
        done = succeeded[-1]
        _warn_if_entrypoint_changed(done, entrypoint)
        log.info("Ray job %s already SUCCEEDED: not submitting again", done.submission_id)
        return JobRun(done.submission_id, done.number, ALREADY_SUCCEEDED, SUCCEEDED)
    live = [attempt for attempt in attempts if attempt.status in ACTIVE]
    if live:
        current = live[-1]
        _warn_if_entrypoint_changed(current, entrypoint)
        log.info("Ray job %s is %s: attaching to it", current.submission_id, current.status)
        return JobRun(current.submission_id, current.number, ATTACHED, current.status)

    number = attempts[-1].number + 1 if attempts else 0
    if max_attempts is not None and number >= max_attempts:
        last = attempts[-1]
        raise TooManyAttempts(
            f"{len(attempts)} attempt(s) of {base_id} already ran (the last, {last.submission_id}, ended "
            f"{last.status}); max_attempts={max_attempts}: not submitting another"
        )
    submission_id = attempt_id(base_id, number)
    job_metadata = {"sdbatch_run": base_id, "sdbatch_attempt": str(number), **(metadata or {})}
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=dict(runtime_env) if runtime_env else None,
            metadata=job_metadata,
            **dict(submit_options or {}),
        )
    except Exception as error:
        # Another submitter may have taken this id between our listing and our submission (Ray refuses a
        # reused id), or the request may have reached the server and only the answer was lost: if the job
        # exists now, it is this run's attempt, so attach to it.
        try:
            info = client.get_job_info(submission_id)
        except Exception:
            raise error from None
        status = status_name(info.status)
        log.warning(
            "submitting %s failed (%s) but the job exists (%s): attaching", submission_id, error, status
        )
        return JobRun(submission_id, number, ATTACHED, status)
    log.info(
        "submitted Ray job %s (attempt %d)%s",
        submission_id,
        number,
        f" after {attempts[-1].submission_id} ended {attempts[-1].status}" if attempts else "",
    )
    return JobRun(submission_id, number, SUBMITTED, PENDING)


def _warn_if_entrypoint_changed(attempt: Attempt, entrypoint: str) -> None:
    if attempt.entrypoint is not None and attempt.entrypoint != entrypoint:
        log.warning(
            "Ray job %s was submitted with a different entrypoint (%r, now %r); using it as this run's job",
            attempt.submission_id,
            attempt.entrypoint,
            entrypoint,
        )


def wait_for_terminal(
    client: JobClient,
    submission_id: str,
    *,
    poll_interval: float = 10.0,
    timeout: float | None = None,
    max_consecutive_errors: int = 5,
    on_status: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED and return that status.

    Up to `max_consecutive_errors` failed polls in a row (the dashboard restarting, a network blip) are
    logged and retried; one more raises. Raises `JobTimeout` after `timeout` seconds (None = no limit).
    `on_status` is called with each status that differs from the previous one.
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
    deadline = None if timeout is None else clock() + timeout
    errors, last = 0, None
    while True:
        try:
            status = status_name(client.get_job_info(submission_id).status)
            errors = 0
        except Exception as error:
            errors += 1
            if errors > max_consecutive_errors:
                raise
            log.warning("polling Ray job %s failed (%d in a row): %s", submission_id, errors, error)
            status = last or PENDING
        else:
            if status != last:
                log.info("Ray job %s is %s", submission_id, status)
                if on_status is not None:
                    on_status(status)
            last = status
            if status in TERMINAL:
                return status
        if deadline is not None and clock() >= deadline:
            raise JobTimeout(submission_id, status, timeout or 0.0)
        sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - clock())))


def log_tail(client: JobClient, submission_id: str, lines: int = 100, max_chars: int = 20_000) -> str:
    """The last `lines` lines (at most `max_chars` characters) of the job's log; never raises."""
    try:
        text = client.get_job_logs(submission_id) or ""
    except Exception as error:
        return f"(the job's log could not be read: {error})"
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""
    return tail[-max_chars:] if len(tail) > max_chars else tail


def run_job(
    client: JobClient,
    base_id: str,
    entrypoint: str,
    *,
    runtime_env: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    submit_options: Mapping[str, Any] | None = None,
    max_attempts: int | None = None,
    poll_interval: float = 10.0,
    timeout: float | None = None,
    stop_on_timeout: bool = True,
    log_lines: int = 100,
    on_attempt: Callable[[JobRun], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> JobRun:
    """Submit or attach (see `submit_or_attach`), wait for the end, and return the SUCCEEDED `JobRun`.

    `on_attempt` is called as soon as the run is bound to a job (before waiting), so a kill hook knows
    what to stop. Raises `JobFailed` (with the log tail) if the job ends FAILED or STOPPED, and
    `JobTimeout` after `timeout` seconds of waiting, having stopped the job if `stop_on_timeout`.
    """
    run = submit_or_attach(
        client,
        base_id,
        entrypoint,
        runtime_env=runtime_env,
        metadata=metadata,
        submit_options=submit_options,
        max_attempts=max_attempts,
    )
    if on_attempt is not None:
        on_attempt(run)
    if run.status != SUCCEEDED:
        try:
            status = wait_for_terminal(
                client, run.submission_id, poll_interval=poll_interval, timeout=timeout, sleep=sleep
            )
        except JobTimeout:
            if stop_on_timeout:
                stop(client, run.submission_id)
            raise
        run = replace(run, status=status)
    if run.status != SUCCEEDED:
        message = None
        try:
            message = getattr(client.get_job_info(run.submission_id), "message", None)
        except Exception:  # the log tail below is what matters
            pass
        raise JobFailed(
            run.submission_id, run.status, message, log_tail(client, run.submission_id, log_lines)
        )
    return run


def stop(
    client: JobClient,
    submission_id: str,
    *,
    wait: float = 30.0,
    poll_interval: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """Ask Ray to stop the job (SIGTERM to its entrypoint, then SIGKILL after Ray's grace period) and wait
    up to `wait` seconds for a terminal state. Returns the last status seen, or None if it could not be
    read. Never raises: this is called from kill hooks, which must not fail."""
    try:
        stopped = client.stop_job(submission_id)
        log.info(
            "asked Ray to stop job %s (%s)", submission_id, "it was running" if stopped else "not running"
        )
    except Exception as error:
        log.warning("stopping Ray job %s failed: %s", submission_id, error)
    deadline = clock() + wait
    status = None
    while True:
        try:
            status = status_name(client.get_job_info(submission_id).status)
        except Exception as error:
            log.warning("reading Ray job %s's status failed: %s", submission_id, error)
        if status in TERMINAL or clock() >= deadline:
            return status
        sleep(poll_interval)


def make_client(address: str, **kwargs: Any) -> JobClient:
    """A `JobSubmissionClient` for the Ray dashboard at `address` (http://head:8265); imports Ray here,
    so modules importing this one do not need Ray."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, **kwargs)
