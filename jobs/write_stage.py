"""The job's last stage: encode and write each row's image, then its batch's metadata and errors parts,
and the summary rows the driver's progress and report read."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from importlib import metadata as package_metadata
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa

from connectors.image_encode import encode_image
from connectors.manifest import SDXL_COLUMNS
from connectors.output import ErrorRecord, OutputSink, errors_table
from jobs.denoise_stage import DENOISE_COLUMNS, MODEL_COLUMNS
from jobs.infotext import image_infotext
from jobs.rows import WORK_COLUMNS
from jobs.stages import PIXEL_COLUMNS, mark_error, table_rows


def sdbatch_version() -> str:
    try:
        return package_metadata.version("sdbatch")
    except package_metadata.PackageNotFoundError:
        return "unknown"


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
    table: pa.Table,
    sink: OutputSink,
    output_format: str,
    quality: int,
    prompt_syntax: str = "plain",
    clip_skip: int = 1,
    eta: float = 0.0,
) -> pa.Table:
    """Encode and write each ok row's image, then publish the batch's metadata and errors parts.

    Images go first and the metadata part last, so a committed row's image always exists. Each image
    carries A1111's infotext (jobs/infotext.py), which takes the run's prompt syntax, clip skip (A1111
    counting) and DDIM eta. Returns one small summary row per input row for the driver's progress and
    report.
    """
    started = time.perf_counter()
    rows = table_rows(table)
    extras = [name for name in table.column_names if name not in _NOT_EXTRA]
    metadata_rows, summaries = [], []
    version = sdbatch_version()
    for row in rows:
        if row["error_type"] is None:
            try:
                parameters, settings = image_infotext(row, clip_skip, eta, prompt_syntax, version)
                uri = _write_image(row, sink, output_format, quality, parameters, settings)
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
    frozenset(WORK_COLUMNS) | set(PIXEL_COLUMNS) | {name for name, _ in DENOISE_COLUMNS} | {"decode_ms"}
)


def _write_image(
    row: dict, sink: OutputSink, output_format: str, quality: int, parameters: str, settings: str
) -> str:
    width, height = row["pixel_width"], row["pixel_height"]
    image = PIL.Image.frombytes("RGB", (width, height), row["pixels"])
    data = encode_image(image, output_format, quality, parameters, png_texts={"sdbatch": settings})
    ext = "jpg" if output_format == "jpeg" else output_format
    return sink.write_image(row["id"], row["variant"], data, ext)


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
        **{name: row[name] for name, _ in MODEL_COLUMNS},
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
