"""The img2img job: `python -m jobs.img2img --config job.yaml` (also `sdbatch run`).

The driver checks everything first (jobs/plan.py), then runs a main pass and retry rounds over Ray
Data (jobs/flow.py), records rows that never produced a result, writes the contact sheet, commits the
output (`_run.json`, then `_SUCCESS`) and prints a summary. Exit codes: 0 every row accounted for
and the error rate within `max_error_rate`; 1 too many errors or incomplete; 2 refused before any
work (bad config, manifest or output); 143 stopped by SIGTERM (`ray job stop`) after recording what
was done.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from connectors.output import CommitError, ErrorRecord, OutputSink, errors_table, key_strings, table_keys
from jobs.config import ConfigError, RunConfig
from jobs.contact import write_contact_sheet
from jobs.faults import pause_point
from jobs.flow import PassSettings, build_pass, make_actor_registry, release_actors
from jobs.plan import PlanError, RunPlan, make_plan, unsettled_keys
from jobs.report import ProgressReporter, summary_lines
from jobs.resources import ResourceError, ResourceWait, local_machine_view, ray_cluster_view, size_actor_pool
from jobs.run_flags import add_run_arguments, config_from_args

log = logging.getLogger("sdbatch")

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_STOPPED = 0, 1, 2, 143
STREAM_BLOCK_BYTES = 64 * 1024


class JobStopped(Exception):
    """SIGTERM arrived (`ray job stop`, a pod being evicted): record what is done, then exit."""


@dataclass
class RunStats:
    """What the passes did, for the report and `_run.json`."""

    started: float = field(default_factory=time.monotonic)
    processed: int = 0
    errors: int = 0
    core_rows: int = 0
    core_calls: float = 0.0
    encoded_images: int = 0  # images the VAE encoder ran on: fewer than rows when variants share one
    stage_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    actor_start_s: dict[str, float] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)

    def add(self, summary: pa.Table, counted_errors: pa.Array | None = None) -> None:
        """Count a batch of results once per row: a row in `counted_errors` (keys of rows an earlier pass
        already counted as a retryable error) that now succeeds turns that error into an image."""
        ok = summary["ok"]
        if counted_errors is None or len(counted_errors) == 0:
            again = pa.array([False] * summary.num_rows)
        else:
            again = pc.is_in(key_strings(summary["id"], summary["variant"]), value_set=counted_errors)
        new = pc.invert(again)
        self.processed += pc.sum(new).as_py() or 0
        self.errors += pc.sum(pc.and_(new, pc.invert(ok))).as_py() or 0
        self.errors -= pc.sum(pc.and_(again, ok)).as_py() or 0
        sizes = [s for s in summary["core_batch_rows"].to_pylist() if s]
        self.core_rows += len(sizes)
        self.core_calls += sum(1 / s for s in sizes)
        self.encoded_images += pc.sum(summary["core_encoded_images"]).as_py() or 0
        for stage in ("decode", "denoise", "write"):
            self.stage_ms[stage] += pc.sum(summary[f"{stage}_ms"]).as_py() or 0.0
        for actor, start in zip(
            summary["actor_id"].to_pylist(), summary["actor_start_s"].to_pylist(), strict=True
        ):
            if actor and start is not None:
                self.actor_start_s[actor] = start

    def batch_fill(self, batch_size: int) -> float | None:
        """Mean rows per core call over the batch size (1.0 = every call full)."""
        return self.core_rows / (self.core_calls * batch_size) if self.core_calls else None


def run(plan: RunPlan) -> dict[str, Any]:
    """Run the job for a checked plan; returns the summary dict (with `exit_code`)."""
    import ray

    sink = OutputSink(plan.storage, plan.config.output)
    if plan.todo_rows == 0 and sink.is_committed():
        return _already_complete(plan, sink)
    if plan.pool is None:  # called without run_command (the demo, tests): size it here, and say so
        plan = _sized_on_cluster(ray, plan)
        log.info("%s", plan.pool.describe())
    _init_ray(ray)
    config = plan.config
    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = -1  # a failed block's rows are found missing and redone below
    # A map task buffers its output until a block reaches this size; at Ray's default (128 MiB) a task's
    # rows were published only when it ended, so images reached storage (and a crash's resume point) at
    # the end of the pass. Small blocks stream every model call's rows on to the writers at once.
    context.target_max_block_size = STREAM_BLOCK_BYTES
    sink.begin()
    sink.write_job_record({"fingerprint": config.fingerprint(), "config": config.to_dict()})
    stats = RunStats()
    progress = ProgressReporter(plan.todo_rows, every_s=config.log_every_s)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        _run_passes(ray, plan, sink, stats, progress)
        _record_lost_rows(plan, sink)
        progress.finish()
        return _finish(plan, sink, stats)
    except JobStopped:
        log.warning("stopped by SIGTERM: recording what is done; rerun the same command to finish")
        sink.record_incomplete(_run_info(plan, stats, status="stopped"))
        return {**_summary(plan, stats, committed=False), "exit_code": EXIT_STOPPED}
    finally:
        signal.signal(signal.SIGTERM, previous)


def _already_complete(plan: RunPlan, sink: OutputSink) -> dict[str, Any]:
    """A rerun of a committed output with nothing new to do touches nothing."""
    counts = sink.read_run_manifest().get("counts", {})
    images, errors = counts.get("images", 0), counts.get("errors", 0)
    error_rate = errors / max(1, plan.expected_rows)
    log.info(
        "output %s is already complete (%d images, %d errors); nothing to do",
        sink.layout.root,
        images,
        errors,
    )
    return {
        "rows": plan.expected_rows,
        "images": images,
        "errors": errors,
        "error_rate": error_rate,
        "output": plan.config.output,
        "committed": True,
        "exit_code": EXIT_OK if error_rate <= plan.config.max_error_rate else EXIT_FAILED,
    }


def _init_ray(ray: Any) -> None:
    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def _raise_stopped(signum: int, frame: Any) -> None:
    raise JobStopped()


def _run_passes(
    ray: Any, plan: RunPlan, sink: OutputSink, stats: RunStats, progress: ProgressReporter
) -> None:
    config = plan.config
    batch = config.compute.batch_size
    rounds = config.retry.retry_rounds
    if plan.todo_rows:
        settings = PassSettings(batch, config.compute.call_rows, False, skip_keys=ray.put(plan.done_keys))
        _run_pass(ray, plan, settings, stats, progress, "main pass")
    for round_number in range(1, rounds + 1):
        todo = unsettled_keys(plan.expected_keys, sink, errors="final")  # retryable errors are redone
        if len(todo) == 0:
            return
        last = round_number == rounds
        size = 1 if last else max(1, batch >> round_number)
        log.info("retry round %d/%d: %d rows, batch size %d", round_number, rounds, len(todo), size)
        settings = PassSettings(size, size, last, only_keys=ray.put(todo), expected_rows=len(todo))
        # the rows of `todo` that hold a (retryable) error were counted already; the missing ones were not
        counted = todo.filter(pc.is_in(todo, value_set=table_keys(sink.read_errors())))
        _run_pass(ray, plan, settings, stats, progress, f"retry round {round_number}", counted)


def _run_pass(
    ray: Any,
    plan: RunPlan,
    settings: PassSettings,
    stats: RunStats,
    progress: ProgressReporter,
    name: str,
    counted_errors: pa.Array | None = None,
) -> None:
    started = time.monotonic()
    before = stats.processed
    registry = make_actor_registry(ray)
    settings = dataclasses.replace(settings, registry=registry)
    started_actors = lambda: len(ray.get(registry.members.remote(), timeout=30)) > 0  # noqa: E731
    wait = ResourceWait(started_actors, ray.available_resources, plan.pool, plan.config.log_every_s)
    try:
        dataset = build_pass(ray.data, plan.config, plan.storage, plan.manifest, settings)
        with wait:
            for summary in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                stats.add(summary, counted_errors)
                progress.update(stats.processed, stats.errors)
    finally:
        try:
            release_actors(ray, registry)  # their GPUs are free for the next round at once
        except Exception as error:  # noqa: BLE001 - never hide the pass's own outcome
            log.warning("could not release the pass's actors: %s", error)
    stats.passes.append(
        {"name": name, "rows": stats.processed - before, "seconds": round(time.monotonic() - started, 3)}
    )


def _record_lost_rows(plan: RunPlan, sink: OutputSink) -> None:
    """Rows still without a result after every round (their worker kept dying) become error rows."""
    lost = unsettled_keys(plan.expected_keys, sink, errors="all")
    if len(lost) == 0:
        return
    attempts = plan.config.retry.retry_rounds + 1
    records = []
    for key in lost.to_pylist():
        row_id, _, variant = key.rpartition("\x00")
        records.append(
            ErrorRecord(
                row_id,
                int(variant),
                "denoise",
                "WorkerDied",
                f"no result after {attempts} passes: the worker processing this row died each time (a crash, "
                "out of memory or os._exit inside the model call); other rows of its batches were redone",
                attempts,
                True,
            )
        )
    log.warning("%d rows never produced a result; recorded as errors", len(records))
    sink.write_errors(errors_table(records))


def _finish(plan: RunPlan, sink: OutputSink, stats: RunStats) -> dict[str, Any]:
    config = plan.config
    sheet = write_contact_sheet(sink, plan, config.contact_sheet_rows)
    pause_point("commit")
    try:
        counts = sink.commit(
            _run_info(plan, stats, status="complete", contact_sheet=sheet),
            plan.expected_rows,
            before_marker=lambda: pause_point("commit:run-manifest-written"),
        )
        committed = True
    except CommitError as error:
        log.error("%s", error)
        counts, committed = None, False
    summary = _summary(plan, stats, committed=committed, contact_sheet=sheet)
    if counts is not None:
        summary.update(images=counts.images, errors=counts.errors)
        summary["error_rate"] = counts.errors / max(1, plan.expected_rows)
    ok = committed and summary.get("error_rate", 1.0) <= config.max_error_rate
    summary["exit_code"] = EXIT_OK if ok else EXIT_FAILED
    return summary


def _run_info(
    plan: RunPlan, stats: RunStats, status: str, contact_sheet: str | None = None
) -> dict[str, Any]:
    config = plan.config
    info = {
        "status": status,
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "versions": _versions(),
        "storage": plan.storage.describe(),
        "rows": plan.expected_rows,
        "skipped_already_done": len(plan.done_keys),
        "elapsed_s": round(time.monotonic() - stats.started, 3),
        "images_per_s": round(
            (stats.processed - stats.errors) / max(1e-9, time.monotonic() - stats.started), 4
        ),
        "passes": stats.passes,
        "batch_fill": stats.batch_fill(config.compute.batch_size),
        "encoded_images": stats.encoded_images,
        "stage_seconds": {k: round(v / 1000, 3) for k, v in stats.stage_ms.items()},
        "actor_start_s": max(stats.actor_start_s.values(), default=None),
        "contact_sheet": contact_sheet,
    }
    info.update(_model_hashes(plan))
    return info


_MODEL_RECORD = ("family", "model_sha256", "adapters", "refiner_sha256", "refiner_adapters")


def _model_hashes(plan: RunPlan) -> dict[str, Any]:
    """The model family and the model, refiner and adapter hashes the actors recorded (from the first
    committed metadata part; parts written before the refiner existed lack those columns)."""
    sink = OutputSink(plan.storage, plan.config.output)
    parts = sink.metadata_parts()
    if not parts:
        return {}
    row = sink.read_part_tables(parts[:1], None)[0].slice(0, 1).to_pylist()
    return {name: row[0][name] for name in _MODEL_RECORD if name in row[0]} if row else {}


def _summary(
    plan: RunPlan, stats: RunStats, committed: bool, contact_sheet: str | None = None
) -> dict[str, Any]:
    elapsed = time.monotonic() - stats.started
    images = stats.processed - stats.errors
    return {
        "rows": plan.expected_rows,
        "images": images,
        "errors": stats.errors,
        "error_rate": stats.errors / max(1, plan.expected_rows),
        "elapsed_s": elapsed,
        "images_per_s": images / elapsed if elapsed > 0 else None,
        "batch_fill": stats.batch_fill(plan.config.compute.batch_size),
        "stage_seconds": {k: v / 1000 for k, v in stats.stage_ms.items()},
        "actor_start_s": max(stats.actor_start_s.values(), default=None),
        "output": plan.config.output,
        "contact_sheet": contact_sheet,
        "committed": committed,
    }


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("sdbatch", "torch", "ray", "transformers", "pyarrow", "s3fs"):
        try:
            versions[package] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["python"] = sys.version.split()[0]
    return versions


def main(argv: list[str] | None = None, prog: str = "python -m jobs.img2img") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Stable Diffusion img2img over a Parquet manifest"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: config_from_args(args), args.dry_run)


def run_command(make_config: Callable[[], RunConfig], dry_run: bool) -> int:
    """What a job command does once its flags are parsed: build the config, plan, print the plan, then
    run (or stop there for a dry run); the exit code. Shared by `sdbatch run` and `sdbatch augment`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = _sized_for_cluster(make_plan(make_config()), dry_run)
    except (ConfigError, PlanError, ResourceError) as error:
        print(f"sdbatch: refused before any work:\n{error}", file=sys.stderr)
        return EXIT_REFUSED
    for line in plan.describe():
        print(line)
    if dry_run:
        print("dry run: configuration, manifest and output checked; nothing was run")
        return EXIT_REFUSED if plan.missing_images else EXIT_OK
    summary = run(plan)
    for line in summary_lines(summary):
        print(line)
    return summary["exit_code"]


def _sized_for_cluster(plan: RunPlan, dry_run: bool) -> RunPlan:
    """The plan with its actor pool sized: for a run, on the cluster it connects to; for a dry run, which
    touches no cluster, on this machine as a local Ray instance would see it (or left to the run when
    RAY_ADDRESS names a cluster)."""
    if plan.todo_rows == 0:
        return plan  # nothing to run: no pool to size
    if dry_run:
        if os.environ.get("RAY_ADDRESS"):
            return plan
        return plan.with_pool(size_actor_pool(plan.config.compute, local_machine_view()))
    import ray

    return _sized_on_cluster(ray, plan)


def _sized_on_cluster(ray: Any, plan: RunPlan) -> RunPlan:
    """The plan with its pool sized on the cluster this driver connects to (started here if need be)."""
    _init_ray(ray)
    return plan.with_pool(size_actor_pool(plan.config.compute, ray_cluster_view(ray)))


if __name__ == "__main__":
    sys.exit(main())
