"""The job's stages over work tables: decode (CPU), denoise (GPU actor), encode + write (CPU).

Each stage handles every row in its own error scope: a failure marks that row's `error_*` columns and
the row flows on untouched, so it ends in the errors table instead of being dropped. Rows already
marked pass through every later stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata as package_metadata
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc

from connectors.image_decode import DecodeOptions, decode_image
from connectors.image_encode import a1111_parameters, encode_image
from connectors.image_resize import resize_for_model, target_size
from connectors.manifest import SDXL_COLUMNS
from connectors.output import ErrorRecord, OutputSink, errors_table
from connectors.storage import Storage, StorageError, is_transient
from jobs.faults import inject_worker_death
from jobs.rows import WORK_COLUMNS

PIXEL_COLUMNS = ("pixels", "pixel_width", "pixel_height", "input_sha256")


def sdbatch_version() -> str:
    try:
        return package_metadata.version("sdbatch")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def is_ok(table: pa.Table) -> list[bool]:
    return pc.is_null(table["error_type"]).to_pylist()


def mark_error(row: dict, stage: str, error: BaseException, attempts: int = 1) -> None:
    """Record `error` on a row dict: the row then flows to the errors table."""
    message = str(error) or type(error).__name__
    row.update(
        error_stage=stage,
        error_type=type(error).__name__,
        error_message=message[:2000],
        attempts=max(int(row.get("attempts") or 0), attempts),
        retryable=isinstance(error, StorageError) or is_transient(error),
    )


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _table(rows: list[dict], like: pa.Table, added: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    """Rows back to a table with the input's schema plus the `added` columns (missing values null)."""
    fields = [f for f in like.schema if f.name not in {name for name, _ in added}]
    schema = pa.schema(fields + [pa.field(name, kind) for name, kind in added])
    return pa.Table.from_pylist(rows, schema=schema)


# ---- decode --------------------------------------------------------------------------------------


def decode_stage(table: pa.Table, storage: Storage, options: DecodeOptions) -> pa.Table:
    """Read each row's image (URI or inline bytes), decode to RGB and resize to its model size."""
    started = time.perf_counter()
    rows = _rows(table)
    for row in rows:
        if row["error_type"] is None:
            _decode_row(row, storage, options)
        row["image_bytes"] = None  # bytes end here; only pixels travel on
    out = _table(
        rows,
        table,
        [
            ("pixels", pa.binary()),
            ("pixel_width", pa.int64()),
            ("pixel_height", pa.int64()),
            ("input_sha256", pa.string()),
            ("decode_ms", pa.float64()),
        ],
    )
    return _spread_time(out, "decode_ms", started)


def _decode_row(row: dict, storage: Storage, options: DecodeOptions) -> None:
    source = row["image"] or f"inline image of row {row['id']!r}"
    try:
        data = row["image_bytes"] if row["image"] is None else storage.read_bytes(row["image"])
    except Exception as error:  # noqa: BLE001 - every failure becomes this row's error
        mark_error(row, "read", _explain_read(error, source, storage))
        return
    try:
        image = decode_image(data, source, options)
        width, height = target_size(image.size, row["width"], row["height"])
        resized = resize_for_model(image, width, height, row["resize_mode"])
    except Exception as error:  # noqa: BLE001
        mark_error(row, "decode", error)
        return
    row.update(
        pixels=resized.tobytes(),
        pixel_width=width,
        pixel_height=height,
        input_sha256=hashlib.sha256(data).hexdigest(),
    )


def _explain_read(error: BaseException, source: str, storage: Storage) -> BaseException:
    if isinstance(error, FileNotFoundError) and _is_folder(storage, source):
        # An object store has no directories: a key that names a "folder" is simply not found.
        return IsADirectoryError(f"input image {source} is a directory, not an image file; name one file")
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"input image {source} does not exist; fix the manifest's image value")
    if isinstance(error, IsADirectoryError):
        return IsADirectoryError(f"input image {source} is a directory, not an image file; name one file")
    return error


def _is_folder(storage: Storage, uri: str) -> bool:
    try:
        return storage.is_dir(uri)
    except Exception:  # noqa: BLE001 - only sharpens the message; the row fails either way
        return False


def _spread_time(table: pa.Table, column: str, started: float) -> pa.Table:
    """Each row's share of the stage's wall time, for per-stage totals in the run report."""
    share = (time.perf_counter() - started) * 1000 / max(1, table.num_rows)
    index = table.column_names.index(column)
    return table.set_column(index, column, pa.array([share] * table.num_rows, pa.float64()))


# ---- denoise -------------------------------------------------------------------------------------


def shape_groups(rows: Sequence[dict], batch_size: int) -> Iterator[list[int]]:
    """Positions of ok rows grouped by what one core call must share, in chunks of `batch_size`."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        if row["error_type"] is None:
            key = (row["pixel_height"], row["pixel_width"], row["strength"], row["num_inference_steps"])
            groups[key].append(position)
    for positions in groups.values():
        for start in range(0, len(positions), batch_size):
            yield positions[start : start + batch_size]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] floats in [0, 1] → uint8, rounded as diffusers' numpy_to_pil does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class Denoiser:
    """The GPU actor: loads the model and adapters once, then edits batches of rows.

    `make_pipeline` builds the ready pipeline (model loaded, adapters pinned, warmed up); it is a
    parameter so the job's model loading stays in one place (jobs/model_setup.py).
    """

    def __init__(
        self,
        make_pipeline: Callable[[], Any],
        batch_size: int,
        eta: float,
        clip_skip: int,
        registry: Any = None,
        prompt_syntax: str = "plain",
    ):
        if registry is not None:  # the driver releases this actor (and its GPU) when the pass ends
            import ray

            registry.add.remote(ray.get_runtime_context().current_actor)
        started = time.perf_counter()
        self.pipe, self.model_info = make_pipeline()
        self.batch_size = batch_size
        self.eta = eta
        self.clip_skip = clip_skip
        self.prompt_syntax = prompt_syntax
        self.start_s = time.perf_counter() - started
        self.actor_id = _actor_id()
        self._timesteps: dict[tuple[int, float], int] = {}

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = _rows(table)
        for positions in shape_groups(rows, self.batch_size):
            self._run_isolating(rows, positions)
        for row in rows:
            row.update(actor_id=self.actor_id, actor_start_s=self.start_s)
            if row["error_type"] is not None:
                row["pixels"] = None
        return _table(rows, table, _DENOISE_COLUMNS)

    def _run_isolating(self, rows: list[dict], positions: list[int]) -> None:
        """Run one core call; if it fails, run its rows one by one so only the bad row fails."""
        try:
            self._run(rows, positions)
        except Exception as error:  # noqa: BLE001
            if len(positions) == 1:
                mark_error(rows[positions[0]], "denoise", error)
                return
            for position in positions:
                self._run_isolating(rows, [position])

    def _run(self, rows: list[dict], positions: list[int]) -> None:
        import torch

        chosen = [rows[p] for p in positions]
        inject_worker_death(chosen)
        first = chosen[0]
        height, width = first["pixel_height"], first["pixel_width"]
        pixels = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(height, width, 3) for r in chosen])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
        started = time.perf_counter()
        images = self.pipe(
            tensor,
            [r["prompt"] for r in chosen],
            negative_prompts=[r["negative_prompt"] or None for r in chosen],  # "": none (SDXL: zeros)
            strength=first["strength"],
            guidance_scale=[r["guidance_scale"] for r in chosen],
            num_inference_steps=first["num_inference_steps"],
            seeds=[r["seed"] for r in chosen],
            eta=self.eta,
            clip_skip=self.clip_skip,
            output_type="np",
            guidance_rescale=[r["guidance_rescale"] for r in chosen],
            prompt_syntax=self.prompt_syntax,
            **family_options(chosen),
        )
        elapsed_ms = (time.perf_counter() - started) * 1000 / len(chosen)
        report = self.pipe.last_call
        steps = first["num_inference_steps"]
        start_timestep = self._start_timestep(steps, first["strength"])
        steps_run = min(int(steps * first["strength"]), steps)  # img2img's count (base and refiner)
        realised = realised_values(report.micro_conditioning, len(chosen))
        for position, (row, image) in enumerate(zip(chosen, to_uint8(np.asarray(images)), strict=True)):
            row.update(realised[position])
            row.update(
                pixels=image.tobytes(),
                denoise_ms=elapsed_ms,
                core_batch_rows=len(chosen),
                # the call's count, on its first row
                core_encoded_images=report.encoded_images if position == 0 else 0,
                steps_run=steps_run,
                start_timestep=start_timestep,
                prompt_truncated=report.truncated_prompts[position],
                **{name: self.model_info[name] for name, _ in _MODEL_COLUMNS},
            )

    def _start_timestep(self, steps: int, strength: float) -> int:
        key = (steps, strength)
        if key not in self._timesteps:
            run = self.pipe.scheduler.start(steps, strength)
            self._timesteps[key] = int(run.timesteps[0])
        return self._timesteps[key]


# What the actor records of its models on every row (jobs.model_setup's model_info keys).
_MODEL_COLUMNS = (
    ("family", pa.string()),
    ("scheduler", pa.string()),
    ("model_sha256", pa.string()),
    ("adapters", pa.string()),
    ("refiner_sha256", pa.string()),
    ("refiner_adapters", pa.string()),
    ("refiner_switch_at", pa.float64()),
)
_DENOISE_COLUMNS = (
    ("pixels", pa.binary()),
    ("denoise_ms", pa.float64()),
    ("core_batch_rows", pa.int64()),
    ("core_encoded_images", pa.int64()),
    ("steps_run", pa.int64()),
    ("start_timestep", pa.int64()),
    ("prompt_truncated", pa.bool_()),
    *_MODEL_COLUMNS,
    ("actor_id", pa.string()),
    ("actor_start_s", pa.float64()),
)
# SDXL keyword argument of the core -> the work columns holding its per-row value
_PAIRS = {
    "original_size": ("original_height", "original_width"),
    "crops_coords_top_left": ("crop_top", "crop_left"),
}
_TEXTS = {"prompts_2": "prompt_2", "negative_prompts_2": "negative_prompt_2"}
_SCORES = ("aesthetic_score", "negative_aesthetic_score")


def family_options(rows: Sequence[dict]) -> dict[str, list]:
    """The SDXL arguments of one core call, a value per row (None: the core's default), for the ones
    any row sets; a row's empty second prompt means none (the first prompt is used)."""
    options: dict[str, list] = {}
    for argument, column in _TEXTS.items():
        options[argument] = [row[column] or None for row in rows]
    for argument in _SCORES:
        options[argument] = [row[argument] for row in rows]
    for argument, (first, second) in _PAIRS.items():
        options[argument] = [
            None if row[first] is None and row[second] is None else (row[first] or 0, row[second] or 0)
            for row in rows
        ]
    return {name: values for name, values in options.items() if any(v is not None for v in values)}


def realised_values(micro_conditioning: dict[str, list], rows: int) -> list[dict[str, Any]]:
    """Per row, the micro-conditioning values the core used (defaults filled in) as work columns."""
    realised: list[dict[str, Any]] = [{} for _ in range(rows)]
    for argument, values in micro_conditioning.items():
        if argument in _PAIRS:
            for row, pair in zip(realised, values, strict=True):
                row.update(zip(_PAIRS[argument], pair, strict=True))
        elif argument in _SCORES:
            for row, value in zip(realised, values, strict=True):
                row[argument] = value
    return realised


def _actor_id() -> str:
    try:
        import ray

        context = ray.get_runtime_context()
        return f"{context.get_node_id()[:12]}/{context.get_actor_id() or os.getpid()}"
    except Exception:  # noqa: BLE001 - outside Ray (tests, the bare core loop)
        return f"local/{os.getpid()}"


# ---- encode + write ------------------------------------------------------------------------------

METADATA_FIXED = (
    "id",
    "variant",
    "output",
    "input",
    "input_sha256",
    "prompt",
    "negative_prompt",
    "seed",
    "strength",
    "num_inference_steps",
    "steps_run",
    "start_timestep",
    "guidance_scale",
    "scheduler",
    "model_sha256",
    "adapters",
    "width",
    "height",
    "elapsed_ms",
    "actor_id",
    "sdbatch_version",
    "family",
    "guidance_rescale",
    "prompt_syntax",
    "prompt_truncated",
    *SDXL_COLUMNS,
    "refiner_sha256",
    "refiner_adapters",
    "refiner_switch_at",
)
SUMMARY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("variant", pa.int32()),
        ("ok", pa.bool_()),
        ("retryable", pa.bool_()),
        ("core_batch_rows", pa.int64()),
        ("core_encoded_images", pa.int64()),
        ("decode_ms", pa.float64()),
        ("denoise_ms", pa.float64()),
        ("write_ms", pa.float64()),
        ("actor_id", pa.string()),
        ("actor_start_s", pa.float64()),
    ]
)


def write_stage(
    table: pa.Table, sink: OutputSink, output_format: str, quality: int, prompt_syntax: str = "plain"
) -> pa.Table:
    """Encode and write each ok row's image, then publish the batch's metadata and errors parts.

    Images go first and the metadata part last, so a committed row's image always exists. Returns one
    small summary row per input row for the driver's progress and report.
    """
    started = time.perf_counter()
    rows = _rows(table)
    extras = [name for name in table.column_names if name not in _NOT_EXTRA]
    metadata_rows, summaries = [], []
    version = sdbatch_version()
    for row in rows:
        if row["error_type"] is None:
            try:
                uri = _write_image(row, sink, output_format, quality)
                metadata_rows.append(_metadata_row(row, uri, extras, version, prompt_syntax))
            except Exception as error:  # noqa: BLE001
                mark_error(row, "write", error)
        summaries.append(_summary(row))
    metadata = pa.Table.from_pylist(metadata_rows) if metadata_rows else None
    if metadata is not None:
        metadata = metadata.cast(_metadata_schema(metadata.schema, table.schema))
        sink.write_metadata(metadata)
    failed = [_error_record(row) for row in rows if row["error_type"] is not None]
    sink.write_errors(errors_table(failed))
    summary = pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)
    share = (time.perf_counter() - started) * 1000 / max(1, len(rows))
    return summary.set_column(
        SUMMARY_SCHEMA.names.index("write_ms"), "write_ms", pa.array([share] * len(rows), pa.float64())
    )


_NOT_EXTRA = (
    frozenset(WORK_COLUMNS) | set(PIXEL_COLUMNS) | {name for name, _ in _DENOISE_COLUMNS} | {"decode_ms"}
)


def _write_image(row: dict, sink: OutputSink, output_format: str, quality: int) -> str:
    width, height = row["pixel_width"], row["pixel_height"]
    image = PIL.Image.frombytes("RGB", (width, height), row["pixels"])
    parameters = a1111_parameters(
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        steps=row["num_inference_steps"],
        sampler=row["scheduler"],
        cfg_scale=row["guidance_scale"],
        seed=row["seed"],
        width=width,
        height=height,
        denoising_strength=row["strength"],
        model_hash=(row["model_sha256"] or "")[:10] or None,
        extra=_refiner_infotext(row),
    )
    data = encode_image(image, output_format, quality, parameters)
    ext = "jpg" if output_format == "jpeg" else output_format
    return sink.write_image(row["id"], row["variant"], data, ext)


def _refiner_infotext(row: dict) -> dict[str, object]:
    """A1111's refiner fields (it writes the refiner checkpoint's name and hash, and the switch point)."""
    if row.get("refiner_sha256") is None:
        return {}
    return {"Refiner": row["refiner_sha256"][:10], "Refiner switch at": row["refiner_switch_at"]}


def _metadata_row(
    row: dict, uri: str, extras: Sequence[str], version: str, prompt_syntax: str
) -> dict[str, Any]:
    values = {
        "id": row["id"],
        "variant": row["variant"],
        "output": uri,
        "input": row["image"] or "inline",
        "input_sha256": row["input_sha256"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "seed": row["seed"],
        "strength": row["strength"],
        "num_inference_steps": row["num_inference_steps"],
        "steps_run": row["steps_run"],
        "start_timestep": row["start_timestep"],
        "guidance_scale": row["guidance_scale"],
        "scheduler": row["scheduler"],
        "model_sha256": row["model_sha256"],
        "adapters": row["adapters"],
        "width": row["pixel_width"],
        "height": row["pixel_height"],
        "elapsed_ms": (row.get("decode_ms") or 0.0) + (row.get("denoise_ms") or 0.0),
        "actor_id": row["actor_id"],
        "sdbatch_version": version,
        "guidance_rescale": row["guidance_rescale"],
        "prompt_syntax": prompt_syntax,
        "prompt_truncated": row["prompt_truncated"],
        **{name: row[name] for name, _ in _MODEL_COLUMNS},
        # SDXL's as realised: the values given, with the defaults the core filled in
        **{name: row[name] for name in SDXL_COLUMNS},
    }
    values.update({name: row[name] for name in extras})
    return values


def _metadata_schema(inferred: pa.Schema, work: pa.Schema) -> pa.Schema:
    """Fixed column types for our columns (stable across parts); extras keep their manifest types."""
    fixed = {
        "variant": pa.int32(),
        "seed": pa.int64(),
        "strength": pa.float64(),
        "guidance_scale": pa.float64(),
        "num_inference_steps": pa.int64(),
        "steps_run": pa.int64(),
        "start_timestep": pa.int64(),
        "width": pa.int64(),
        "height": pa.int64(),
        "elapsed_ms": pa.float64(),
        "guidance_rescale": pa.float64(),
        "prompt_truncated": pa.bool_(),
        "aesthetic_score": pa.float64(),
        "negative_aesthetic_score": pa.float64(),
        "original_width": pa.int64(),
        "original_height": pa.int64(),
        "crop_top": pa.int64(),
        "crop_left": pa.int64(),
        "refiner_switch_at": pa.float64(),
    }
    fields = []
    for field in inferred:
        if field.name in fixed:
            fields.append(pa.field(field.name, fixed[field.name]))
        elif field.name in METADATA_FIXED:
            fields.append(pa.field(field.name, pa.string()))
        else:
            fields.append(work.field(field.name))
    return pa.schema(fields)


def _error_record(row: dict) -> ErrorRecord:
    return ErrorRecord(
        id=row["id"],
        variant=row["variant"],
        stage=row["error_stage"],
        error_type=row["error_type"],
        message=row["error_message"],
        attempts=max(1, int(row["attempts"] or 1)),
        retryable=bool(row["retryable"]),
    )


def _summary(row: dict) -> dict[str, Any]:
    return {
        "id": row["id"],
        "variant": row["variant"],
        "ok": row["error_type"] is None,
        "retryable": bool(row["retryable"]),
        "core_batch_rows": row.get("core_batch_rows"),
        "core_encoded_images": row.get("core_encoded_images"),
        "decode_ms": row.get("decode_ms"),
        "denoise_ms": row.get("denoise_ms"),
        "write_ms": None,
        "actor_id": row.get("actor_id"),
        "actor_start_s": row.get("actor_start_s"),
    }


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an output image back to uint8 pixels (for comparing outputs, e.g. in tests)."""
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def adapters_json(adapters: Sequence[Any]) -> str:
    """The pinned adapters as a compact JSON list for metadata (kind, name, sha256, scales, tokens)."""
    return json.dumps(
        [
            {
                "kind": a.kind,
                "name": a.name,
                "sha256": a.sha256,
                "scales": dict(a.scales),  # component -> scale applied
                "tokens": list(a.tokens) if a.tokens else [],
            }
            for a in adapters
        ],
        sort_keys=True,
    )
