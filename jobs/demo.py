"""`make demo` / `sdbatch demo`: the img2img job end to end on this machine.

With no model given it writes a tiny SD1-style model with random weights (nothing to download), so its
outputs are noise by design: what it shows is the job, and the summary and the contact sheet's title say
so. `--model PATH_OR_URI` (a diffusers folder or single-file checkpoint, local or on object storage) runs
the same pictures, drawn at the model's native size, through that model instead, on a GPU when there is
one (`compute.device: auto`).

Each model gets a folder of its own under `--output`: `run/` and `input/` for the tiny model,
`model-<name>-<hash>/run/` and `.../input/` for a given one, so their resumes never meet. Inside, the
pictures and a Parquet manifest with prompts go into `input/`, and the real job (a local Ray instance unless
RAY_ADDRESS names a cluster) writes `run/`; it prints the run summary and where the contact sheet is.
Running it again resumes into the same output and finds nothing left to do.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq

from connectors.storage import Storage, scheme_of
from jobs.config import RunConfig, load_config
from jobs.config_checks import ConfigError
from jobs.config_sources import parse_override
from jobs.contact import SHEET_NAME
from jobs.img2img import EXIT_REFUSED, run
from jobs.plan import PlanError, make_plan
from jobs.preflight import read_model_layout
from jobs.report import summary_lines
from jobs.resources import ResourceError
from sd_core.tiny import make_tiny_model

SHAPES = ("circle", "square", "stripe", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "yellow": (240, 220, 30), "blue": (40, 80, 230)}
STYLES = ("oil painting", "watercolour")
TINY_SIZES = ((64, 64), (96, 64))  # the tiny model's pictures: small, so the demo takes seconds on a CPU
TINY_NOTE = "tiny model with random weights: its outputs are noise by design; what this shows is the job"
REAL_MODEL_HINT = "for real pictures, run it on a checkpoint of yours: make demo MODEL=path/or/s3/uri"
FALLBACK_SIDE = 512  # a pickled checkpoint without a config folder says nothing of its size before loading


@dataclass(frozen=True)
class DemoRun:
    """One demo run: its configuration, the sizes its pictures are drawn at, and what to tell the user."""

    config: RunConfig
    sizes: tuple[tuple[int, int], tuple[int, int]]  # (square, landscape), alternating over the rows
    notes: list[str]


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
        draw.rectangle((0, height // 2 - height // 10, width, height // 2 + height // 10), fill=colour)
    else:
        draw.polygon(
            [(width // 2, height // 4), (width // 4, 3 * height // 4), (3 * width // 4, 3 * height // 4)],
            fill=colour,
        )
    return image


def write_dataset(folder: Path, sizes: Sequence[tuple[int, int]] = TINY_SIZES) -> Path:
    """16 pictures (`sizes` in turn) and a manifest with prompts, a label column and per-row strengths."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"id": [], "image": [], "prompt": [], "strength": [], "label": []}
    for index, (shape, (name, colour)) in enumerate(
        (shape, colour) for shape in SHAPES for colour in COLOURS.items()
    ):
        buffer = io.BytesIO()
        picture(shape, colour, sizes[index % len(sizes)]).save(buffer, format="PNG")
        (folder / "images" / f"{index:02d}.png").write_bytes(buffer.getvalue())
        rows["id"].append(f"{name}-{shape}")
        rows["image"].append(f"images/{index:02d}.png")
        rows["prompt"].append(f"a {name} {shape}, {STYLES[index % 2]}")
        rows["strength"].append(0.6 if index % 4 < 2 else 0.8)
        rows["label"].append(shape)
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table(rows), manifest)
    return manifest


def native_side(configs: Mapping[str, Mapping[str, Any]] | None) -> int:
    """The side in pixels a model was trained at: its UNet's latent sample size times the VAE's scale
    (SD 1.x 512, SD 2.x 768 or 512, SDXL 1024); FALLBACK_SIDE when its configs are unknown."""
    if configs is None or "sample_size" not in configs.get("unet", {}):
        return FALLBACK_SIDE
    sample = configs["unet"]["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def picture_sizes(side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """A square and a 3:2 landscape picture at a model's native side (multiples of 8, as the core wants)."""
    return (side, side), (side * 3 // 2 // 8 * 8, side)


def model_folder_name(model: str) -> str:
    """`model-<name>-<hash>`: the folder under --output for a given model; the name is the file's or folder's
    (readable), the hash is of the whole path or URI (so two `model.safetensors` do not share a folder)."""
    name = PurePosixPath(model.rstrip("/")).name.removesuffix(".safetensors") or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "model"
    return f"model-{name}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def demo_config(
    model: str,
    folder: Path,
    settings: Mapping[str, Any],
    overrides: Sequence[str],
    title: str,
) -> RunConfig:
    """The job's configuration: the demo's `settings`, under the user's `--set` overrides (which win)."""
    given = {parse_override(text)[0] for text in overrides}
    flags = {
        "model.path": model,
        "manifest": str(folder / "input" / "manifest.parquet"),
        "output": str(folder / "run"),
        "defaults.negative_prompt": "blurry",
        "compute.batch_size": 4,
        "contact_sheet_title": title,
        **settings,
    }
    return load_config(None, overrides, {key: value for key, value in flags.items() if key not in given})


def tiny_run(root: Path, args: argparse.Namespace) -> DemoRun:
    """The demo's own tiny random model, on CPU actors, with pictures small enough to take seconds."""
    model = root / "tiny-model"
    if not (model / "model_index.json").exists():
        make_tiny_model(model, family="v1")
    settings = {
        "model.scheduler": "euler_a",
        "defaults.num_inference_steps": args.steps or 20,
        "compute.gpus_per_actor": 0,  # a few million parameters: a GPU would only add start-up time
    }
    config = demo_config(str(model), root, settings, args.overrides, f"sdbatch demo · {TINY_NOTE}")
    return DemoRun(config, TINY_SIZES, [TINY_NOTE, REAL_MODEL_HINT])


def model_run(root: Path, args: argparse.Namespace) -> DemoRun:
    """The user's model: pictures at its native size (read from its configs or header, not its weights),
    the compute left to the job (a GPU per actor when the cluster has GPUs)."""
    model = args.model if scheme_of(args.model) != "file" else str(Path(args.model).expanduser().resolve())
    settings = {
        "model.scheduler": "dpmpp_2m_karras",
        "defaults.num_inference_steps": args.steps or 30,
        "storage.endpoint_url": args.storage_endpoint,
    }
    folder = root / model_folder_name(model)
    config = demo_config(model, folder, settings, args.overrides, f"sdbatch demo · {model}")
    storage = Storage(config.storage.to_options(config.retry))
    layout = read_model_layout(model, config.model.allow_pickle, config.model.config, storage)
    sizes = picture_sizes(native_side(layout.configs))
    family = layout.family.label if layout.family is not None else "family unknown"
    drawn = " and ".join(f"{width}x{height}" for width, height in sizes)
    return DemoRun(config, sizes, [f"model {model} ({family}): the demo pictures drawn at {drawn}"])


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--output", type=Path, default=Path("demo-output"), metavar="FOLDER",
        help="folder to write into (default: demo-output); each model gets a folder of its own there")
    add("--model", metavar="PATH_OR_URI",
        help="run the demo pictures through this model instead of a tiny random one: a diffusers folder or "
        "single .safetensors checkpoint, local or a URI (s3://, gs://); credentials come from the "
        "environment")
    add("--steps", type=int, metavar="N",
        help="defaults.num_inference_steps (default: 20 for the tiny model, 30 for a given one)")
    add("--storage-endpoint", metavar="URL", help="storage.endpoint_url: an S3-compatible store's endpoint")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any run setting, as `sdbatch run --set` (e.g. storage.profile=dev); repeatable")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m jobs.demo") -> int:
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.output.resolve()
    try:
        demo = model_run(root, args) if args.model is not None else tiny_run(root, args)
        for note in demo.notes:
            print(note)
        write_dataset(Path(demo.config.manifest).parent, demo.sizes)
        plan = make_plan(demo.config)
    except (ConfigError, PlanError) as error:
        print(f"{prog}: refused before any work:\n{error}", file=sys.stderr)
        return EXIT_REFUSED
    for line in plan.describe():
        print(line)
    try:
        summary = run(plan)
    except ResourceError as error:
        print(f"{prog}: refused before any work:\n{error}", file=sys.stderr)
        return EXIT_REFUSED
    print()
    for line in summary_lines(summary):
        print(line)
    print()
    for note in demo.notes:
        print(note)
    sheet = Path(demo.config.output) / SHEET_NAME
    if sheet.exists():
        print(f"open {sheet} to see every input next to its output")
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
