"""Driver memory: peak RSS of the job's driver process at 1k, 10k and 100k-row manifests.

    python -m bench.driver_memory [--quick] [--full-rows 1000,10000]

The driver runs as a subprocess, `python -m jobs.img2img ...` (tiny SD1 model, 64x64 inputs, 2 steps at
strength 0.5 = 1 step run,
no guidance), and this process samples its memory every 20 ms: RSS through psutil and the kernel's
own peak, `VmHWM` in /proc/<pid>/status (exact, whatever the sampling misses). Only the driver is
measured: Ray's own processes (GCS, raylet, workers, actors) are separate processes.

* `--dry-run` for every size: the whole plan (config, model and adapter checks, manifest validation,
  expected keys, output scan, input sample) and no Ray.
* the full run (local Ray started by the driver, local disk) for `--full-rows` sizes (default 1k;
  10k takes several minutes on 2 cores; 100k is out of reach there).
* a baseline: `python -m jobs.img2img --help` (the interpreter and the driver's imports, no work).

Rows cycle over 16 distinct input images, so the manifest's size is what grows, not the inputs.
Acceptance (issue #7): peak at 100k <= 1.25x peak at 1k.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import REPO, print_table, save  # noqa: E402
from bench.models import png_bytes, tiny_model  # noqa: E402

IMAGES = 16
SIZE = 64
ACCEPTANCE = 1.25


# The plan's steps one by one in a fresh process (as jobs.plan.make_plan runs them), with RSS, the peak so
# far and Arrow's live allocation after each: where the driver's memory goes as the manifest grows.
STAGES_CHILD = """
import json, sys
import psutil
import pyarrow as pa
spec = json.loads(sys.argv[1])
process = psutil.Process()
stages = []
def mark(name):
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) / 1024  # not ru_maxrss: that survives exec, so it holds the parent's peak
    stages.append({"stage": name, "rss_mib": process.memory_info().rss / 2**20, "peak_mib": peak,
                   "arrow_mib": pa.total_allocated_bytes() / 2**20})
mark("interpreter + pyarrow")
from connectors.manifest import open_manifest, validate_manifest
from connectors.output import OutputSink
from connectors.storage import Storage
from jobs import plan
from jobs.config import load_config
from jobs.preflight import check_model_and_adapters
mark("imports")
planning = plan.planning_memory()  # make_plan runs these steps inside it (kept: leaving it restores the pool)
planning.__enter__()
config = load_config(None, flags=spec["flags"])
storage = Storage(config.storage.to_options(config.retry))
check_model_and_adapters(config, storage)
mark("config + model preflight")
fs, _ = storage.filesystem(config.manifest)
summary = validate_manifest(config.manifest, fs, rows_as_errors=True)
mark("validate_manifest")
manifest = open_manifest(config.manifest, fs)
expected = plan.expected_keys(manifest, config.defaults.num_images)
mark("expected_keys")
done = plan.settled_keys(OutputSink(storage, config.output), "all")
plan._sample_missing_images(manifest, storage, config.inputs.allowed_roots)
mark("settled_keys + image sample")
print(json.dumps({"stages": stages, "expected_keys_mib": expected.nbytes / 2**20,
                  "arrow_peak_mib": pa.default_memory_pool().max_memory() / 2**20,
                  "arrow_backend": pa.default_memory_pool().backend_name}))
"""


def plan_stages(model: Path, manifest: Path, output: Path, env_extra: dict[str, str] | None = None) -> dict:
    flags = {"model.path": str(model), "manifest": str(manifest), "output": str(output),
             "compute.gpus_per_actor": 0}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", STAGES_CHILD, json.dumps({"flags": flags})],
        cwd=REPO, env={**os.environ, **(env_extra or {})}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_dataset(root: Path, sizes: list[int]) -> dict[int, Path]:
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    for i in range(IMAGES):
        (root / "inputs" / f"{i}.png").write_bytes(png_bytes(i, SIZE, SIZE))
    manifests = {}
    for rows in sizes:
        table = pa.table(
            {
                "id": [f"row-{i:07d}" for i in range(rows)],
                "image": [f"inputs/{i % IMAGES}.png" for i in range(rows)],
                "prompt": [f"a picture number {i}" for i in range(rows)],
            }
        )
        manifests[rows] = root / f"manifest-{rows}.parquet"
        pq.write_table(table, manifests[rows])
    return manifests


STATUS_FIELDS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")


def _status_kib(pid: int) -> dict[str, int]:
    """VmHWM (the kernel's peak RSS) and the parts of the current RSS: anonymous (heap: what the driver
    holds), file-backed (libraries) and shared memory (Ray's object store pages the driver touched)."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in STATUS_FIELDS:
                found[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return found


def measure(command: list[str], timeout: float, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `command`; its peak RSS (MiB): max(sampled RSS, last VmHWM read), seconds and exit code."""
    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watched = psutil.Process(process.pid)
    peak_rss = 0
    peaks = dict.fromkeys(STATUS_FIELDS, 0)
    output: list[bytes] = []
    import threading

    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    try:
        while process.poll() is None:
            try:
                peak_rss = max(peak_rss, watched.memory_info().rss)
            except psutil.Error:
                pass
            for name, kib in _status_kib(process.pid).items():
                peaks[name] = max(peaks[name], kib)
            if time.perf_counter() - started > timeout:
                process.kill()
                raise TimeoutError(f"{command} ran past {timeout} s")
            time.sleep(0.02)
    finally:
        reader.join(timeout=10)
    seconds = time.perf_counter() - started
    text = b"".join(output).decode(errors="replace")
    if process.returncode != 0:
        print(text[-4000:], file=sys.stderr)
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}")
    return {
        "peak_mib": max(peak_rss / 2**20, peaks["VmHWM"] / 1024),
        "sampled_rss_peak_mib": peak_rss / 2**20,
        "vm_hwm_mib": peaks["VmHWM"] / 1024,
        "rss_anon_peak_mib": peaks["RssAnon"] / 1024,
        "rss_file_peak_mib": peaks["RssFile"] / 1024,
        "rss_shmem_peak_mib": peaks["RssShmem"] / 1024,
        "seconds": seconds,
        "tail": text.strip().splitlines()[-3:],
    }


def job_command(model: Path, manifest: Path, output: Path, dry_run: bool) -> list[str]:
    command = [
        sys.executable, "-m", "jobs.img2img",
        "--model", str(model), "--manifest", str(manifest), "--output", str(output),
        "--steps", "2", "--strength", "0.5", "--guidance", "1", "--batch-size", "16",
        "--set", "compute.gpus_per_actor=0", "--set", "compute.actors_max=1",
        "--set", f"compute.cpus_per_actor={max(1, (os.cpu_count() or 1) - 1)}",
    ]  # fmt: skip
    return command + (["--dry-run"] if dry_run else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k dry runs only")
    parser.add_argument("--full-rows", default=None, help="comma-separated sizes to run fully (default 1000)")
    parser.add_argument("--also", default=None, help="comma-separated extra dry-run sizes, e.g. 1000000")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    args = parser.parse_args(argv)
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    sizes += [int(x) for x in (args.also or "").split(",") if x]
    if args.full_rows is not None:
        full = [int(x) for x in args.full_rows.split(",") if x]
    else:
        full = [] if args.quick else [1_000]
    workdir = Path(tempfile.mkdtemp(prefix="sdbatch-driver-mem-"))
    try:
        results = run_all(workdir, sizes, full, args.timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    name = "driver_memory_quick" if args.quick else "driver_memory"
    config = {
        "model": "sd_core.tiny v1, random weights",
        "image_size": SIZE,
        "distinct_images": IMAGES,
        "steps": 2,
        "strength": 0.5,  # 1 step runs (steps 1 with strength < 1 would run none: every row an error)
        "guidance": 1,
        "batch_size": 16,
        "dry_run_rows": sizes,
        "full_run_rows": full,
        "sampling_s": 0.02,
        "quick": args.quick,
    }
    path = save(name, config, results)
    print(f"\nsaved {path}")
    return 0


def run_all(workdir: Path, sizes: list[int], full: list[int], timeout: float) -> dict[str, Any]:
    """Dry runs at every size (default allocator, then Arrow's system allocator), then full runs."""
    model = tiny_model()
    manifests = write_dataset(workdir, sorted(set(sizes) | set(full)))
    results: dict[str, Any] = {
        "baseline_help": measure([sys.executable, "-m", "jobs.img2img", "--help"], 120)
    }
    dry: dict[str, Any] = {}
    for rows in sizes:
        dry[str(rows)] = measure(
            job_command(model, manifests[rows], workdir / f"out-dry-{rows}", True), timeout
        )
        print(f"dry run {rows}: {dry[str(rows)]['peak_mib']:.1f} MiB in {dry[str(rows)]['seconds']:.1f} s")
    results["dry_run"] = dry
    # Diagnostic: the same dry runs with Arrow's system allocator instead of its default (mimalloc), to
    # tell memory the plan holds from freed batch memory the allocator keeps mapped.
    system: dict[str, Any] = {}
    for rows in sizes:
        system[str(rows)] = measure(
            job_command(model, manifests[rows], workdir / f"out-dry-{rows}", True),
            timeout,
            {"ARROW_DEFAULT_MEMORY_POOL": "system"},
        )
        print(f"dry run {rows}, system allocator: {system[str(rows)]['peak_mib']:.1f} MiB")
    results["dry_run_arrow_system_allocator"] = system
    stage_sizes = sorted({min(sizes), max(s for s in sizes if s <= 100_000)})
    results["plan_stages"] = {
        f"{rows} {pool}": plan_stages(model, manifests[rows], workdir / f"out-dry-{rows}", env)
        for rows in stage_sizes
        for pool, env in (("default", None), ("system", {"ARROW_DEFAULT_MEMORY_POOL": "system"}))
    }
    for name, staged in results["plan_stages"].items():
        print_table(
            f"plan steps, {name} allocator ({staged['arrow_backend']}): expected keys "
            f"{staged['expected_keys_mib']:.2f} MiB, Arrow peak {staged['arrow_peak_mib']:.1f} MiB",
            ["after", "RSS MiB", "peak MiB", "Arrow live MiB"],
            [[st["stage"], st["rss_mib"], st["peak_mib"], st["arrow_mib"]] for st in staged["stages"]],
        )
    runs: dict[str, Any] = {}
    for rows in full:
        runs[str(rows)] = measure(
            job_command(model, manifests[rows], workdir / f"out-{rows}", False), timeout
        )
        runs[str(rows)]["images_per_s"] = rows / runs[str(rows)]["seconds"]
        print(f"full run {rows}: {runs[str(rows)]['peak_mib']:.1f} MiB in {runs[str(rows)]['seconds']:.1f} s")
    results["full_run"] = runs

    table = [
        [
            "--help (imports only)",
            "-",
            results["baseline_help"]["peak_mib"],
            "-",
            results["baseline_help"]["rss_anon_peak_mib"],
            results["baseline_help"]["rss_shmem_peak_mib"],
            results["baseline_help"]["seconds"],
        ]
    ]
    smallest = str(min(sizes))
    for kind, measured in (("dry run", dry), ("dry run, Arrow system alloc", system), ("full run", runs)):
        base = measured.get(str(min(int(k) for k in measured))) if measured else None
        for rows, figures in measured.items():
            ratio = figures["peak_mib"] / base["peak_mib"]
            figures["ratio_to_smallest"] = ratio
            table.append(
                [kind, int(rows), figures["peak_mib"], ratio, figures["rss_anon_peak_mib"],
                 figures["rss_shmem_peak_mib"], figures["seconds"]]
            )  # fmt: skip
    largest = str(max(s for s in sizes if s <= 100_000))  # the acceptance size; --also sizes are extra
    ratio = dry[largest]["peak_mib"] / dry[smallest]["peak_mib"]
    results["acceptance"] = {
        "what": f"dry-run peak at {largest} rows / at {smallest} rows <= {ACCEPTANCE}",
        "ratio": ratio,
        "passed": ratio <= ACCEPTANCE,
    }
    print_table(
        "Driver peak RSS (MiB) by manifest rows",
        ["run", "rows", "peak MiB", "x smallest", "anon MiB", "shmem MiB", "seconds"],
        table,
    )
    print(f"acceptance: {results['acceptance']}")
    labels = [f"dry {int(r) // 1000}k" for r in dry] + [f"run {int(r) // 1000}k" for r in runs]
    values = [f["peak_mib"] for f in dry.values()] + [f["peak_mib"] for f in runs.values()]
    results["plot"] = {
        "title": "Driver peak RSS by manifest size",
        "labels": labels,
        "values": values,
        "unit": "MiB",
    }
    return results


if __name__ == "__main__":
    raise SystemExit(main())
