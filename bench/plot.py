"""Summarise every bench/results/*.json in one figure, bench/results/summary.png.

One bar-chart panel per `"plot"` panel a benchmark marked as primary (convention in bench/common.py);
results without one get a panel of their top-level numbers if they have any, else are listed as skipped.
Missing benchmarks are simply absent.

    python -m bench.plot [--results DIR] [--output PNG]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS


def panels_of(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels one results file asks for (its `plot` entry), or a fallback of its top-level numbers."""
    name = payload.get("benchmark", "?")
    results = payload.get("results") or {}
    plot = results.get("plot") if isinstance(results, dict) else None
    if isinstance(plot, dict):
        plot = [plot]
    panels = []
    for panel in plot or []:
        if not isinstance(panel, dict):
            continue
        labels, values = panel.get("labels") or [], panel.get("values") or []
        pairs = [(str(lab), float(v)) for lab, v in zip(labels, values, strict=False) if _is_number(v)]
        if not pairs:
            continue
        notes = panel.get("annotations") or [""] * len(pairs)
        panels.append(
            {
                "title": str(panel.get("title") or name),
                "labels": [p[0] for p in pairs],
                "values": [p[1] for p in pairs],
                "unit": str(panel.get("unit") or ""),
                "annotations": [str(a) for a in notes][: len(pairs)],
                "source": _source(payload),
            }
        )
    if panels or plot:
        return panels
    if isinstance(results, dict):
        numbers = {k: float(v) for k, v in results.items() if _is_number(v)}
        if numbers:
            return [
                {
                    "title": f"{name} (no 'plot' entry: top-level numbers)",
                    "labels": list(numbers),
                    "values": list(numbers.values()),
                    "unit": "",
                    "annotations": [""] * len(numbers),
                    "source": _source(payload),
                }
            ]
    return []


def _source(payload: dict[str, Any]) -> str:
    machine = payload.get("machine") or {}
    where = machine.get("gpu") or machine.get("cpu") or ""
    return " · ".join(str(x) for x in (payload.get("benchmark"), payload.get("when"), where) if x)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(panels, skipped file notes) over every JSON in `results_dir`, in file-name order."""
    panels, skipped = [], []
    for path in sorted(results_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            skipped.append(f"{path.name}: unreadable ({error})")
            continue
        found = panels_of(payload) if isinstance(payload, dict) else []
        if found:
            panels += found
        else:
            skipped.append(f"{path.name}: nothing numeric to plot")
    return panels, skipped


def draw(panels: list[dict[str, Any]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        positions = range(len(panel["values"]))
        colours = [_colour(label) for label in panel["labels"]]
        bars = ax.bar(positions, panel["values"], color=colours)
        ax.set_xticks(list(positions), panel["labels"], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(panel["unit"])
        ax.set_title(_wrap(panel["title"]), fontsize=9)
        top = max(panel["values"] + [0.0])
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
        for bar, value, note in zip(bars, panel["values"], panel["annotations"], strict=False):
            text = f"{value:.3g}" + (f"\n{note}" if note else "")
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        if panel["source"]:
            ax.text(1.0, -0.32, panel["source"], transform=ax.transAxes, ha="right", fontsize=6, color="grey")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def _colour(label: str) -> str:
    lowered = label.lower()
    if lowered.startswith("ours"):
        return "tab:blue"
    if lowered.startswith("diffusers"):
        return "tab:orange"
    return "tab:grey"


def _wrap(title: str, width: int = 70) -> str:
    words, lines, line = title.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results JSON")
    parser.add_argument("--output", type=Path, help="PNG to write (default: <results>/summary.png)")
    args = parser.parse_args(argv)
    output = args.output or args.results / "summary.png"
    panels, skipped = collect(args.results)
    for note in skipped:
        print(f"skipped {note}")
    if not panels:
        print(f"no results to plot in {args.results}")
        return 0
    try:
        draw(panels, output)
    except ImportError:
        print("matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    print(f"wrote {output} ({len(panels)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
