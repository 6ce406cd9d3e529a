"""Actor cold start: building the ready pipeline vs reading the same bytes raw.

    python -m bench.cold_start [--quick] [--repeats N]

Each measurement runs in a fresh Python process (as an actor is one), alternating the sides:

* **factory**: `jobs.model_setup.PipelineFactory(config)()` exactly as the actor calls it: load the
  model folder, fuse the LoRAs, add the embedding, warm up (one 64x64 call), hash the model (a local
  folder is hashed on every start: `cached_sha256` keeps a digest only for node-cache copies). Timed
  after the imports, which are reported separately (`imports s`: torch, transformers' CLIP, sd_core,
  jobs). Its parts (load, adapters, warm-up, model hash) are timed by wrapping those calls in the child;
  `process s` is the child's whole life (interpreter start, imports, factory) seen from here.
* **raw read**: read every file of the model folder and of the adapters into memory, nothing else.

With 0 adapters and with 2 LoRAs (kohya LoCon with text-encoder modules, PEFT with metadata alphas; the
test suite's writers) + 1 textual inversion (safetensors, 2 vectors). The files were just written or
read, so both sides read from the page cache: this is the CPU cost of a start, not the disk's.
Model: the mid-sized one of the job benchmark (bench.models.MID_V1); the tiny one in --quick.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import REPO, print_table, save, summary  # noqa: E402
from bench.models import MID_V1, cache_dir, folder_bytes, mid_model, tiny_model  # noqa: E402

FACTORY_CHILD = """
import json, sys, time
spec = json.loads(sys.argv[1])
started = time.perf_counter()
import torch
import transformers.models.clip.modeling_clip
import sd_core
from jobs.config import load_config
import jobs.model_setup as setup
from jobs.model_cache import cached_sha256
imports_s = time.perf_counter() - started
parts = {}
def timed(owner, name, key):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            parts[key] = parts.get(key, 0.0) + time.perf_counter() - begun
    setattr(owner, name, wrapper)
timed(sd_core.Img2ImgPipeline, "from_pretrained", "load_s")
timed(sd_core.Img2ImgPipeline, "load_loras", "loras_s")
timed(sd_core.Img2ImgPipeline, "load_textual_inversion", "embeddings_s")
timed(setup, "_warm_up", "warm_up_s")
timed(setup, "cached_sha256", "hash_s")
config = load_config(None, flags=spec["flags"])
started = time.perf_counter()
pipe, info = setup.PipelineFactory(config)()
factory_s = time.perf_counter() - started
print(json.dumps({"imports_s": imports_s, "factory_s": factory_s, "adapters": len(pipe.adapters), **parts}))
"""

RAW_CHILD = """
import json, os, sys, time
spec = json.loads(sys.argv[1])
started = time.perf_counter()
total = 0
for root in spec["paths"]:
    files = [root] if os.path.isfile(root) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    for path in files:
        with open(path, "rb") as handle:
            total += len(handle.read())
print(json.dumps({"read_s": time.perf_counter() - started, "bytes": total}))
"""


def make_adapters(model: Path, text_width: int, folder: Path) -> tuple[list[dict], list[dict]]:
    """Two LoRAs and one textual inversion for `model`, in the real file formats."""
    from sd_core import Img2ImgPipeline

    # The adapter writers live in the test suite (they are the formats' reference fixtures).
    from tests.sd_core.test_lora import (
        KOHYA_UNET_MODULES,
        PEFT_CONFIGS,
        pick,
        weight_shapes,
        write_kohya,
        write_peft,
    )
    from tests.sd_core.test_textual_inversion import vectors, write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    kohya, peft, embedding = (
        folder / "kohya.safetensors",
        folder / "peft.safetensors",
        folder / "toy.safetensors",
    )
    if not (kohya.exists() and peft.exists() and embedding.exists()):
        shapes = weight_shapes(Img2ImgPipeline.from_pretrained(model))
        write_kohya(
            kohya,
            shapes,
            pick(shapes, KOHYA_UNET_MODULES),
            alpha_of=lambda m: 4.0,
            rank_of=lambda m: 8,
            seed=1,
        )
        write_peft(
            peft, shapes, pick(shapes, ("mid_block.attentions.", "up_blocks.1.")), PEFT_CONFIGS, seed=2
        )
        write_safetensors(embedding, {"<toy>": vectors(2, text_width, 3)})
    loras = [{"path": str(kohya), "scale": 0.8}, {"path": str(peft), "scale": 0.5}]
    return loras, [{"path": str(embedding), "token": "<toy>"}]


def child(code: str, spec: dict) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], cwd=REPO, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - started
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.quick:
        from sd_core.tiny_configs import TINY_V1

        model, text_width, model_name = tiny_model(), TINY_V1["text_encoder"]["hidden_size"], "tiny-v1"
    else:
        model, text_width, model_name = mid_model(), MID_V1["text_encoder"]["hidden_size"], "mid-v1"
    loras, embeddings = make_adapters(model, text_width, cache_dir() / f"adapters-{model_name}")
    cpus = max(1, (os.cpu_count() or 1) - 1)
    base_flags = {
        "model.path": str(model),
        "manifest": "unused.parquet",
        "output": "unused",
        "compute.gpus_per_actor": 0,
        "compute.actors_max": 1,
        "compute.cpus_per_actor": cpus,
    }
    cases = {
        "no adapters": ({**base_flags}, [str(model)]),
        "2 LoRAs + 1 TI": (
            {**base_flags, "adapters.loras": loras, "adapters.embeddings": embeddings},
            [str(model)] + [a["path"] for a in loras + embeddings],
        ),
    }
    results: dict[str, Any] = {
        "model_mb": round(folder_bytes(model) / 1e6, 2),
        "adapters_mb": round(sum(folder_bytes(Path(a["path"])) for a in loras + embeddings) / 1e6, 3),
    }
    rows, labels, values = [], [], []
    for case, (flags, paths) in cases.items():
        child(RAW_CHILD, {"paths": paths})  # untimed: page cache and interpreter warm for both sides
        samples: dict[str, list[dict]] = {"factory": [], "raw": []}
        for _ in range(repeats):
            samples["raw"].append(child(RAW_CHILD, {"paths": paths}))
            samples["factory"].append(child(FACTORY_CHILD, {"flags": flags}))
        factory = summary([s["factory_s"] for s in samples["factory"]])
        raw = summary([s["read_s"] for s in samples["raw"]])
        figures = {
            "factory": factory,
            "raw_read": raw,
            "imports": summary([s["imports_s"] for s in samples["factory"]]),
            **{
                part: summary([s.get(f"{part}_s", 0.0) for s in samples["factory"]])
                for part in ("load", "loras", "embeddings", "warm_up", "hash")
            },
            "factory_process": summary([s["process_s"] for s in samples["factory"]]),
            "bytes": samples["raw"][0]["bytes"],
            "ratio": factory["median_s"] / raw["median_s"],
            "samples": samples,
        }
        results[case] = figures
        rows.append(
            [
                case,
                figures["bytes"] / 1e6,
                factory["median_s"],
                raw["median_s"],
                figures["ratio"],
                figures["load"]["median_s"],
                figures["loras"]["median_s"] + figures["embeddings"]["median_s"],
                figures["warm_up"]["median_s"],
                figures["hash"]["median_s"],
                figures["imports"]["median_s"],
                figures["factory_process"]["median_s"],
            ]
        )
        labels += [f"{case}: factory", f"{case}: raw read"]
        values += [factory["median_s"], raw["median_s"]]
    print_table(
        f"Actor cold start, {model_name} ({results['model_mb']} MB), median of {repeats} fresh processes",
        [
            "case",
            "MB",
            "factory s",
            "raw read s",
            "ratio",
            "load",
            "adapters",
            "warm-up",
            "hash",
            "imports s",
            "process s",
        ],
        rows,
    )
    results["plot"] = {
        "title": f"Actor cold start ({model_name})",
        "labels": labels,
        "values": values,
        "unit": "s",
    }
    name = "cold_start_quick" if args.quick else "cold_start"
    config = {
        "model": model_name,
        "repeats": repeats,
        "torch_threads": cpus,
        "loras": loras,
        "embeddings": embeddings,
        "quick": args.quick,
        "page_cache": "warm",
    }
    path = save(name, config, results)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
