"""`make demo`: the img2img job end to end on this machine, with nothing to download.

It writes a tiny random SD1-style model in the diffusers layout, draws 16 small test pictures with
prompts into a Parquet manifest, runs the real job (local Ray instance, local disk) into
`{output}/run`, and prints the run summary and where the contact sheet is. Running it again resumes
into the same output and finds nothing left to do.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import load_config
from jobs.img2img import run
from jobs.plan import make_plan
from jobs.report import summary_lines
from sd_core.tiny import make_tiny_model

SHAPES = ("circle", "square", "stripe", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "yellow": (240, 220, 30), "blue": (40, 80, 230)}
STYLES = ("oil painting", "watercolour")


def picture(shape: str, colour: tuple[int, int, int], size: tuple[int, int]) -> PIL.Image.Image:
    """A simple test picture: one coloured shape on a grey gradient."""
    width, height = size
    image = PIL.Image.linear_gradient("L").resize(size).convert("RGB")
    draw = PIL.ImageDraw.Draw(image)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "stripe":
        draw.rectangle((0, height // 2 - 6, width, height // 2 + 6), fill=colour)
    else:
        draw.polygon(
            [(width // 2, height // 4), (width // 4, 3 * height // 4), (3 * width // 4, 3 * height // 4)],
            fill=colour,
        )
    return image


def write_dataset(folder: Path) -> Path:
    """16 pictures (two sizes) and a manifest with prompts, a label column and per-row strengths."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"id": [], "image": [], "prompt": [], "strength": [], "label": []}
    for index, (shape, (name, colour)) in enumerate(
        (shape, colour) for shape in SHAPES for colour in COLOURS.items()
    ):
        size = (96, 64) if index % 2 else (64, 64)
        buffer = io.BytesIO()
        picture(shape, colour, size).save(buffer, format="PNG")
        (folder / "images" / f"{index:02d}.png").write_bytes(buffer.getvalue())
        rows["id"].append(f"{name}-{shape}")
        rows["image"].append(f"images/{index:02d}.png")
        rows["prompt"].append(f"a {name} {shape}, {STYLES[index % 2]}")
        rows["strength"].append(0.6 if index % 4 < 2 else 0.8)
        rows["label"].append(shape)
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table(rows), manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-output"), help="folder to write into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.output.resolve()
    model = root / "tiny-model"
    if not (model / "model_index.json").exists():
        make_tiny_model(model, family="v1")
    manifest = write_dataset(root / "input")
    config = load_config(
        None,
        flags={
            "model.path": str(model),
            "model.scheduler": "euler_a",
            "manifest": str(manifest),
            "output": str(root / "run"),
            "defaults.num_inference_steps": 20,
            "defaults.negative_prompt": "blurry",
            "compute.batch_size": 4,
            "compute.gpus_per_actor": 0,
        },
    )
    plan = make_plan(config)
    for line in plan.describe():
        print(line)
    summary = run(plan)
    print()
    for line in summary_lines(summary):
        print(line)
    if summary.get("contact_sheet"):
        print(f"\nopen {summary['contact_sheet']} to see every input next to its output")
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
