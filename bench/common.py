"""What every benchmark shares: the machine's description, interleaved timing, and JSON results.

Each benchmark prints a table and saves `bench/results/<name>.json` with the machine, versions, device
and configuration beside its figures, so a number is never separated from where it came from.

Plot convention (read by `python -m bench.plot`, which draws `bench/results/summary.png`): a benchmark's
`results` may hold a `"plot"` entry marking its primary figures, either one panel or a list of panels:

    "plot": {"title": str, "labels": [str, ...], "values": [float, ...], "unit": str,
             "annotations": [str, ...]}            # optional: a text above each bar ("" for none)

Each panel becomes one bar chart. Build panels with `plot_panel(...)`, which checks the shape. A results
file without a `"plot"` entry gets a fallback panel of its top-level numeric results, if it has any.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, accelerator, and the versions that shape the figures."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("diffusers", "transformers", "ray"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def interleaved(
    runs: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each run, alternating A B A B ... so drift (thermal, other load) hits every side alike.
    `warmup` untimed rounds first (allocations, kernel selection, caches)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median (the figure we report), min, max and relative spread of timing samples."""
    median = statistics.median(samples)
    return {
        "median_s": median,
        "min_s": min(samples),
        "max_s": max(samples),
        "spread": (max(samples) - min(samples)) / median if median else 0.0,
        "n": len(samples),
    }


def save(name: str, config: Mapping[str, Any], results: Mapping[str, Any]) -> Path:
    """Write bench/results/<name>.json (the latest run) with the machine and configuration."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": dict(config),
        "results": dict(results),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if index else c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_panel(
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    unit: str,
    annotations: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One `"plot"` panel (see the module docstring): bars `values` named `labels`, in `unit`."""
    if len(labels) != len(values):
        raise ValueError(f"plot panel {title!r}: {len(labels)} labels but {len(values)} values")
    if annotations is not None and len(annotations) != len(values):
        raise ValueError(f"plot panel {title!r}: {len(annotations)} annotations but {len(values)} values")
    panel: dict[str, Any] = {
        "title": title,
        "labels": [str(label) for label in labels],
        "values": [float(v) for v in values],
        "unit": unit,
    }
    if annotations is not None:
        panel["annotations"] = [str(a) for a in annotations]
    return panel
