"""The job's stages over work tables, and what they share: decode (CPU) here; the denoise actor (GPU) in
jobs/denoise_stage.py, encode + write (CPU) in jobs/write_stage.py.

Each stage handles every row in its own error scope: a failure marks that row's `error_*` columns and
the row flows on untouched, so it ends in the errors table instead of being dropped. Rows already
marked pass through every later stage.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from connectors.image_decode import DecodeOptions, decode_image
from connectors.image_resize import resize_for_model, target_size
from connectors.storage import Storage, StorageError, is_transient

PIXEL_COLUMNS = ("pixels", "pixel_width", "pixel_height", "input_sha256")



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


def table_rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def rows_table(rows: list[dict], like: pa.Table, added: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    """Rows back to a table with the input's schema plus the `added` columns (missing values null)."""
    fields = [f for f in like.schema if f.name not in {name for name, _ in added}]
    schema = pa.schema(fields + [pa.field(name, kind) for name, kind in added])
    return pa.Table.from_pylist(rows, schema=schema)


# ---- decode --------------------------------------------------------------------------------------


def decode_stage(table: pa.Table, storage: Storage, options: DecodeOptions) -> pa.Table:
    """Read each row's image (URI or inline bytes), decode to RGB and resize to its model size."""
    started = time.perf_counter()
    rows = table_rows(table)
    for row in rows:
        if row["error_type"] is None:
            _decode_row(row, storage, options)
        row["image_bytes"] = None  # bytes end here; only pixels travel on
    out = rows_table(
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
