"""The output of a run and its commit protocol.

Layout under an output prefix:

    images/{safe(id)}/{variant}.{ext}   one object per generated image, deterministic key
    metadata/part-{digest}.parquet     one row per committed image (id, variant, image, ...)
    errors/part-{digest}.parquet       one row per failed (id, variant): stage, type, message, ...
    _run.json                          config, versions, counts and parts of the committed run
    _SUCCESS                           written last; present only while the output is complete

Every object is written whole (see `Storage.write_bytes`), so a reader never sees half a part. Images
are written before the metadata part that names them, so every metadata row's image exists; a crash
can leave images no metadata names (orphans), which a resumed run simply overwrites. A part's name is
a digest of the (id, variant) keys it holds, so a retried task rewrites the same part instead of
adding a second copy. What is done is what the metadata parts say: resume reads them, never the
(possibly millions of) image keys.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.keys import image_key
from connectors.storage import Storage, join_uri

KEY_COLUMNS = ("id", "variant")
PART_PATTERN = "part-*.parquet"
ERRORS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("variant", pa.int32()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int32()),
        ("retryable", pa.bool_()),
    ]
)
_READ_THREADS = 8


class CommitError(RuntimeError):
    """The run cannot be committed: its output does not account for every expected row."""


@dataclass(frozen=True)
class ErrorRecord:
    """One failed (id, variant): where it failed, how, and whether trying again may help."""

    id: str
    variant: int
    stage: str  # "read", "decode", "denoise", "encode", "write", ...
    error_type: str
    message: str
    attempts: int = 1
    retryable: bool = False


@dataclass(frozen=True)
class PartInfo:
    uri: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class CommitSummary:
    images: int
    errors: int
    metadata_parts: int
    error_parts: int
    duplicates_removed: int
    superseded_errors_removed: int


@dataclass(frozen=True)
class OutputLayout:
    """Where each kind of object lives under one output prefix."""

    root: str

    @property
    def metadata_dir(self) -> str:
        return join_uri(self.root, "metadata")

    @property
    def errors_dir(self) -> str:
        return join_uri(self.root, "errors")

    @property
    def run_manifest(self) -> str:
        return join_uri(self.root, "_run.json")

    @property
    def job_record(self) -> str:
        """What configuration writes here (its fingerprint): a rerun with another one is refused."""
        return join_uri(self.root, "_job.json")

    @property
    def success_marker(self) -> str:
        return join_uri(self.root, "_SUCCESS")

    def image_uri(self, row_id: str, variant: int, ext: str) -> str:
        return image_key(self.root, row_id, variant, ext)


def errors_table(records: Iterable[ErrorRecord]) -> pa.Table:
    rows = [asdict(record) for record in records]
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def part_name(keys: pa.Table) -> str:
    """`part-{digest}.parquet`, the digest taken over the sorted (id, variant) keys of the rows."""
    ordered = keys.select(list(KEY_COLUMNS)).sort_by([(c, "ascending") for c in KEY_COLUMNS])
    digest = hashlib.sha256()
    for row_id, variant in zip(ordered["id"].to_pylist(), ordered["variant"].to_pylist(), strict=True):
        digest.update(f"{len(row_id)}:{row_id}:{variant};".encode("utf-8", "surrogatepass"))
    return f"part-{digest.hexdigest()[:32]}.parquet"


class OutputSink:
    """Writes images and metadata/error parts under one prefix, and commits the run."""

    def __init__(self, storage: Storage, root: str):
        self.storage = storage
        self.layout = OutputLayout(root)

    # ---- writing -------------------------------------------------------------------------------

    def write_image(self, row_id: str, variant: int, data: bytes, ext: str) -> str:
        uri = self.layout.image_uri(row_id, variant, ext)
        self.storage.write_bytes(uri, data)
        return uri

    def write_metadata(self, table: pa.Table) -> PartInfo | None:
        """Publish committed rows; their images must already be written."""
        return self._write_part(self.layout.metadata_dir, table)

    def write_errors(self, table: pa.Table) -> PartInfo | None:
        return self._write_part(self.layout.errors_dir, table)

    def _write_part(self, directory: str, table: pa.Table) -> PartInfo | None:
        if table.num_rows == 0:
            return None
        _check_keys(table)
        data = _parquet_bytes(table)
        uri = join_uri(directory, part_name(table))
        self.storage.write_bytes(uri, data)
        return PartInfo(uri=uri, rows=table.num_rows, bytes=len(data))

    # ---- reading -------------------------------------------------------------------------------

    def metadata_parts(self) -> list[str]:
        return self.storage.list_files(self.layout.metadata_dir, PART_PATTERN)

    def error_parts(self) -> list[str]:
        return self.storage.list_files(self.layout.errors_dir, PART_PATTERN)

    def read_metadata(self, columns: Sequence[str] | None = None, unique: bool = True) -> pa.Table:
        """All committed metadata rows, each (id, variant) once (`unique=False`: as stored, for audits)."""
        table = self._read_parts(self.metadata_parts(), columns)
        return _unique_keys(table) if unique else table

    def read_errors(self) -> pa.Table:
        return self._read_parts(self.error_parts(), None, ERRORS_SCHEMA)

    def committed_keys(self) -> pa.Table:
        """The (id, variant) pairs already done, for resume: read from metadata parts only."""
        return self.read_metadata(KEY_COLUMNS)

    def is_committed(self) -> bool:
        return self.storage.exists(self.layout.success_marker)

    def read_run_manifest(self) -> dict[str, Any]:
        return json.loads(self.storage.read_bytes(self.layout.run_manifest))

    def read_job_record(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(self.layout.job_record))
        except FileNotFoundError:
            return None

    def write_job_record(self, record: dict[str, Any]) -> None:
        self.storage.write_bytes(self.layout.job_record, _json_bytes(record))

    def _read_parts(
        self, uris: Sequence[str], columns: Sequence[str] | None, schema: pa.Schema | None = None
    ) -> pa.Table:
        tables = self.read_part_tables(uris, columns)
        if not tables:
            if schema is not None:
                return schema.empty_table()
            names = list(columns or KEY_COLUMNS)
            return pa.table({n: pa.array([], pa.int32() if n == "variant" else pa.string()) for n in names})
        return pa.concat_tables(tables, promote_options="permissive")

    def read_part_tables(self, uris: Sequence[str], columns: Sequence[str] | None) -> list[pa.Table]:
        """The given parts as tables, as stored (read in parallel)."""
        def read(uri: str) -> pa.Table:
            data = self.storage.read_bytes(uri)
            return pq.read_table(pa.BufferReader(data), columns=None if columns is None else list(columns))

        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            return list(pool.map(read, uris))

    # ---- commit --------------------------------------------------------------------------------

    def begin(self) -> None:
        """Mark the output incomplete before a run writes into it (it may hold an earlier commit)."""
        self.storage.delete(self.layout.success_marker)

    def commit(
        self,
        run_info: dict[str, Any],
        expected_rows: int | None = None,
        before_marker: Callable[[], None] | None = None,
    ) -> CommitSummary:
        """Settle the parts, then write `_run.json` and, last, `_SUCCESS`.

        Settling makes every (id, variant) appear once: duplicate metadata rows (a part rewritten
        under other batch boundaries) keep one copy; error rows whose key later succeeded, or that
        failed again in a later pass, are dropped or keep only the latest. Replacement parts are
        written before the parts they replace are deleted, so a crash in between loses nothing.
        With `expected_rows`, the commit refuses (no `_SUCCESS`) unless images + errors match it.
        `before_marker` runs between the two writes (the chaos tests stop the driver there).
        """
        duplicates = self._settle_metadata()
        metadata_parts = self.metadata_parts()
        keys = _unique_keys(self._read_parts(metadata_parts, KEY_COLUMNS))
        superseded = self._settle_errors(keys)
        error_parts = self.error_parts()
        error_count = sum(t.num_rows for t in self.read_part_tables(error_parts, KEY_COLUMNS))
        summary = CommitSummary(
            images=keys.num_rows,
            errors=error_count,
            metadata_parts=len(metadata_parts),
            error_parts=len(error_parts),
            duplicates_removed=duplicates,
            superseded_errors_removed=superseded,
        )
        if expected_rows is not None and summary.images + summary.errors != expected_rows:
            raise CommitError(
                f"output {self.layout.root} accounts for {summary.images} images + {summary.errors} "
                f"errors = {summary.images + summary.errors} rows, but the run expected {expected_rows}; "
                "not writing _SUCCESS. Rerun the job on the same output to finish the missing rows"
            )
        manifest = {
            **run_info,
            "complete": True,
            "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "counts": {"images": summary.images, "errors": summary.errors},
            "parts": {
                "metadata": [_name(uri) for uri in metadata_parts],
                "errors": [_name(uri) for uri in error_parts],
            },
        }
        manifest_bytes = _json_bytes(manifest)
        self.storage.write_bytes(self.layout.run_manifest, manifest_bytes)
        if before_marker is not None:
            before_marker()
        marker = {
            "images": summary.images,
            "errors": summary.errors,
            "run_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        }
        self.storage.write_bytes(self.layout.success_marker, json.dumps(marker, sort_keys=True).encode())
        return summary

    def record_incomplete(self, run_info: dict[str, Any]) -> None:
        """Write `_run.json` for a run that stopped early (no `_SUCCESS`); a rerun finishes it."""
        self.storage.write_bytes(self.layout.run_manifest, _json_bytes({**run_info, "complete": False}))

    def _settle_metadata(self) -> int:
        """Rewrite the parts that share keys with another part so each key is in one part."""
        parts = self.metadata_parts()
        tables = self.read_part_tables(parts, KEY_COLUMNS)
        if not tables:
            return 0
        indexed = pa.concat_tables(
            [t.append_column("part", pa.array([i] * t.num_rows, pa.int32())) for i, t in enumerate(tables)]
        )
        counts = indexed.group_by(list(KEY_COLUMNS)).aggregate([("part", "count")])
        repeated = counts.filter(pc.greater(counts["part_count"], 1))
        if repeated.num_rows == 0:
            return 0
        affected_rows = indexed.join(repeated.select(list(KEY_COLUMNS)), list(KEY_COLUMNS), join_type="inner")
        affected = sorted(set(affected_rows["part"].to_pylist()))
        merged = pa.concat_tables(
            self.read_part_tables([parts[i] for i in affected], None), promote_options="permissive"
        )
        unique = _unique_keys(merged)
        self._replace_parts(self.layout.metadata_dir, [parts[i] for i in affected], unique)
        return merged.num_rows - unique.num_rows

    def _settle_errors(self, committed: pa.Table) -> int:
        """Drop error rows whose key has an image now, and keep one (the latest) row per failed key."""
        parts = self.error_parts()
        if not parts:
            return 0
        errors = self._read_parts(parts, None, ERRORS_SCHEMA)
        done = pc.is_in(table_keys(errors), value_set=table_keys(committed))
        pending = errors.filter(pc.invert(done))
        latest = _unique_keys(pending.sort_by([("attempts", "descending")]))
        removed = errors.num_rows - latest.num_rows
        if removed:
            self._replace_parts(self.layout.errors_dir, parts, latest)
        return removed

    def _replace_parts(self, directory: str, old_parts: Sequence[str], table: pa.Table) -> None:
        new = self._write_part(directory, table)
        for uri in old_parts:
            if new is None or uri != new.uri:
                self.storage.delete(uri)


def _json_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def _check_keys(table: pa.Table) -> None:
    missing = [c for c in KEY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"output parts need the key columns {KEY_COLUMNS}; missing {missing}")
    for column in KEY_COLUMNS:
        if table[column].null_count:
            raise ValueError(f"output part has null values in key column '{column}'")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def key_strings(ids: pa.Array | pa.ChunkedArray, variants: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string per (id, variant), for set membership tests in pyarrow."""
    return pc.binary_join_element_wise(pc.cast(ids, pa.string()), pc.cast(variants, pa.string()), "\x00")


def table_keys(table: pa.Table) -> pa.Array:
    """`key_strings` of a table's id and variant columns."""
    return key_strings(table["id"], table["variant"])


def _unique_keys(table: pa.Table) -> pa.Table:
    """The first row of each (id, variant), in table order."""
    if table.num_rows == 0:
        return table
    positions = pa.array(range(table.num_rows), pa.int64())
    indexed = table.select(list(KEY_COLUMNS)).append_column("_position", positions)
    firsts = indexed.group_by(list(KEY_COLUMNS), use_threads=False).aggregate([("_position", "min")])
    if firsts.num_rows == table.num_rows:
        return table
    keep = firsts["_position_min"]
    return table.take(pc.take(keep, pc.sort_indices(keep)))


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
