"""Parquet manifests: open (file, directory, glob or hive prefix), stream, validate, resolve image URIs."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
_GLOB = re.compile(r"[*?\[]")
_ABSOLUTE = r"^([A-Za-z][A-Za-z0-9+.-]*://|/)"
PROMPT_MAX_LENGTH = 10_000  # characters; CLIP reads 77 tokens, this only keeps huge values off the workers


class ManifestError(ValueError):
    """A manifest that cannot be read or breaks the schema; the message lists every problem found."""


@dataclass(frozen=True)
class ColumnRule:
    """What one manifest column may hold; nulls in optional columns mean "use the run default"."""

    name: str
    kind: str  # "string", "image" (string URI or binary bytes), "float" or "int"
    required: bool = False
    low: float | None = None  # every int rule has low >= 0 (see _out_of_range)
    high: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()
    expected: str = ""
    max_length: int | None = None  # prompt columns (text for CLIP): most characters a value may have

    def length_problem(self, length: int | None = None) -> str:
        """What is wrong with a value longer than max_length (`length`, when known, is shown)."""
        got = f" (got {length})" if length is not None else ""
        clip = "CLIP reads only the first 77 tokens, so shorten it"
        return f"longer than {self.max_length} characters{got}; {clip}"


_SCORE = "a finite number in [0, 10] (the LAION aesthetic scale)"
COLUMN_RULES = (
    ColumnRule("id", "string", required=True),
    ColumnRule("image", "image", required=True),
    ColumnRule("prompt", "string", required=True, max_length=PROMPT_MAX_LENGTH),
    ColumnRule("negative_prompt", "string", max_length=PROMPT_MAX_LENGTH),
    ColumnRule("strength", "float", low=0.0, high=1.0, expected="a finite number in [0, 1]"),
    ColumnRule("guidance_scale", "float", low=0.0, expected="a finite number >= 0"),
    ColumnRule("num_inference_steps", "int", low=1, high=1000, expected="an integer in 1..1000"),
    ColumnRule("seed", "int", low=0, high=2**63 - 1, expected="an integer in 0..2**63-1"),
    ColumnRule("num_images", "int", low=1, high=64, expected="an integer in 1..64"),
    ColumnRule("width", "int", low=64, high=4096, multiple_of=8, expected="a multiple of 8 in 64..4096"),
    ColumnRule("height", "int", low=64, high=4096, multiple_of=8, expected="a multiple of 8 in 64..4096"),
    ColumnRule("resize_mode", "string", choices=RESIZE_MODES, expected=f"one of {', '.join(RESIZE_MODES)}"),
    ColumnRule("guidance_rescale", "float", low=0.0, high=1.0, expected="a finite number in [0, 1]"),
    # SDXL: the second text encoder's prompts, and the micro-conditioning (sizes in pixels)
    ColumnRule("prompt_2", "string", max_length=PROMPT_MAX_LENGTH),
    ColumnRule("negative_prompt_2", "string", max_length=PROMPT_MAX_LENGTH),
    ColumnRule("aesthetic_score", "float", low=0.0, high=10.0, expected=_SCORE),
    ColumnRule("negative_aesthetic_score", "float", low=0.0, high=10.0, expected=_SCORE),
    ColumnRule("original_width", "int", low=1, high=65536, expected="an integer in 1..65536"),
    ColumnRule("original_height", "int", low=1, high=65536, expected="an integer in 1..65536"),
    ColumnRule("crop_top", "int", low=0, high=65536, expected="an integer in 0..65536"),
    ColumnRule("crop_left", "int", low=0, high=65536, expected="an integer in 0..65536"),
)
# Columns only SDXL models read; a run of another family refuses a manifest that sets them.
SDXL_COLUMNS = (
    "prompt_2",
    "negative_prompt_2",
    "aesthetic_score",
    "negative_aesthetic_score",
    "original_width",
    "original_height",
    "crop_top",
    "crop_left",
)
KNOWN_COLUMNS = tuple(rule.name for rule in COLUMN_RULES)

_STRING = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_BINARY = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
_KINDS = {
    "string": (_STRING, "a string"),
    "image": (_STRING + _BINARY, "a string URI or binary image bytes"),
    "float": ((pa.types.is_floating, pa.types.is_integer), "a number (e.g. float64)"),
    "int": ((pa.types.is_integer,), "an integer (e.g. int64; in pandas use the nullable 'Int64' dtype)"),
}


@dataclass(frozen=True)
class Manifest:
    """An opened manifest: its pyarrow dataset and the directory relative image URIs resolve against."""

    uri: str
    base_uri: str  # ends with '/'
    dataset: ds.Dataset


@dataclass(frozen=True)
class ManifestSummary:
    """What validation found in a good manifest."""

    uri: str
    base_uri: str
    num_rows: int
    columns: tuple[str, ...]
    extra_columns: tuple[str, ...]  # carried through untouched
    binary_images: int
    uri_images: int
    bad_rows: tuple[str, ...] = ()  # with rows_as_errors: the row-level problems, as report lines


def open_manifest(uri: str, filesystem: fsspec.AbstractFileSystem | None = None) -> Manifest:
    """Open one Parquet file, a directory, a glob or a hive-partitioned prefix (partitions become columns)."""
    fs, path = (
        fsspec.core.url_to_fs(uri) if filesystem is None else (filesystem, filesystem._strip_protocol(uri))
    )
    if _GLOB.search(path):
        source = [p for p in sorted(fs.glob(path)) if fs.isfile(p)]
        if not source:
            raise ManifestError(f"{uri}: no files match this glob; check the pattern")
        options = {"partitioning": "hive", "partition_base_dir": _directory(path).rstrip("/")}
        base_uri = _directory(uri)
    elif fs.isdir(path):
        source, options, base_uri = path, {"partitioning": "hive"}, uri.rstrip("/") + "/"
    elif fs.isfile(path):
        source, options, base_uri = path, {}, _directory(uri)
    else:
        raise ManifestError(
            f"{uri}: manifest not found; give a Parquet file, a directory, a glob or a hive prefix"
        )
    try:
        dataset = ds.dataset(source, filesystem=fs, format="parquet", **options)
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(
            f"{uri}: not a Parquet file or dataset; write the manifest as Parquet ({error})"
        ) from error
    if not dataset.files:
        raise ManifestError(f"{uri}: the directory holds no Parquet files")
    return Manifest(uri, base_uri, dataset)


def iter_manifest_batches(
    uri: str,
    filesystem: fsspec.AbstractFileSystem | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 1024,
) -> Iterator[pa.RecordBatch]:
    """Stream the manifest's rows (only `columns`, default all) in batches of at most `batch_size`."""
    manifest = open_manifest(uri, filesystem)
    missing = [name for name in columns or () if name not in manifest.dataset.schema.names]
    if missing:
        raise ManifestError(
            f"{uri}: no column(s) {missing}; the manifest has {manifest.dataset.schema.names}"
        )
    yield from _scan(manifest, columns, batch_size)


def validate_manifest(
    uri: str,
    filesystem: fsspec.AbstractFileSystem | None = None,
    sample_ids: int = 5,
    batch_size: int = 16384,
    rows_as_errors: bool = False,
    not_required: Sequence[str] = (),
) -> ManifestSummary:
    """Check every row against COLUMN_RULES; raise one ManifestError listing every problem found.

    With `rows_as_errors`, bad values in single rows (out of range, null prompt, empty image, ...) do not
    raise: they are returned in `bad_rows` and a job records those rows as errors. Problems that make
    the run impossible (missing columns, wrong types, bad or duplicate ids, no rows) always raise.
    `not_required` names required columns the caller supplies otherwise (augmentation writes prompts).

    Rows are streamed in batches, reading only the known columns, so the driver's memory does not grow
    with the manifest: duplicate ids are found from a 64-bit hash of each id (8 bytes per row, see
    `_IdHashes`), and only ids whose hash repeats are read back, in a second pass over `id`, to be
    counted exactly.
    """
    manifest = open_manifest(uri, filesystem)
    schema = manifest.dataset.schema
    findings = _Findings(uri, sample_ids)
    for rule in COLUMN_RULES:
        if rule.required and rule.name not in schema.names and rule.name not in not_required:
            findings.add(rule.name, "missing required column; add it to every manifest file")
    rules = [rule for rule in COLUMN_RULES if rule.name in schema.names and _type_ok(rule, schema, findings)]
    has_ids = any(rule.name == "id" for rule in rules)
    num_rows = binary_images = uri_images = 0
    hashes = _IdHashes()
    for batch in _scan(manifest, [rule.name for rule in rules], batch_size):
        ids = batch.column("id") if has_ids else None
        if ids is not None:
            hashes.add(ids)
        for rule in rules:
            for problem, mask in _bad_rows(rule, batch.column(rule.name)):
                findings.add_rows(rule.name, problem, mask, ids, num_rows)
        if "image" in batch.schema.names:
            valid_images = batch.num_rows - batch.column("image").null_count
            if any(is_type(batch.schema.field("image").type) for is_type in _BINARY):
                binary_images += valid_images
            else:
                uri_images += valid_images
        num_rows += batch.num_rows
    if num_rows == 0:
        findings.add("", "the manifest has 0 rows; it needs at least one")
    elif has_ids:
        _find_duplicate_ids(manifest, hashes.repeated(), findings, batch_size)
    findings.raise_if_any(except_row_level=rows_as_errors)
    return ManifestSummary(
        uri=uri,
        base_uri=manifest.base_uri,
        num_rows=num_rows,
        columns=tuple(schema.names),
        extra_columns=tuple(name for name in schema.names if name not in KNOWN_COLUMNS),
        binary_images=binary_images,
        uri_images=uri_images,
        bad_rows=tuple(findings.lines(findings.row_level.__contains__)) if rows_as_errors else (),
    )


def row_problems(batch: pa.Table | pa.RecordBatch) -> pa.Array:
    """Per row, what is wrong with its values (the first problem found), or null for a good row.

    Checks the known columns present with a usable type against COLUMN_RULES, exactly as
    `validate_manifest` does; a job uses it to turn bad rows into error rows instead of refusing the run.
    """
    messages: list[str | None] = [None] * batch.num_rows
    for rule in COLUMN_RULES:
        if rule.name not in batch.schema.names:
            continue
        if not any(check(batch.schema.field(rule.name).type) for check in _KINDS[rule.kind][0]):
            continue
        values = batch.column(rule.name)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        for problem, mask in _bad_rows(rule, values):
            for position in pc.indices_nonzero(mask).to_pylist():
                if messages[position] is None:
                    shown = _shown_value(rule, values[position].as_py())
                    messages[position] = f"column {rule.name!r}: {problem}{shown}"
    return pa.array(messages, pa.string())


def _shown_value(rule: ColumnRule, value: object) -> str:
    """` (got ...)` for a row problem: the value cut to 80 characters, or only the length of a long one."""
    if value is None:
        return ""
    if rule.max_length is not None and isinstance(value, str) and len(value) > rule.max_length:
        return f" (got {len(value)} characters)"
    return f" (got {_short_repr(value)})"


def _short_repr(value: object) -> str:
    text = repr(value[:80] if isinstance(value, (str, bytes)) else value)  # no repr of a huge value
    return text if len(text) <= 80 else text[:77] + "..."


def resolve_image_uri(manifest_uri: str, image_value: str) -> str:
    """The URI of one row's image, from the `image` string of a manifest at `manifest_uri`.

    Absolute values (with a scheme such as `s3://` or `file://`, or starting with '/') are returned
    unchanged, '..' included: naming another place is then explicit. Relative values are joined to the
    manifest's directory, everything up to the last '/' of `manifest_uri` (before any glob character;
    pass `Manifest.base_uri` for a directory manifest), keeping its scheme and bucket. A relative value
    whose '..' climbs out of that directory is refused.
    """
    if not image_value:
        raise ValueError(f"empty image value in manifest {manifest_uri}; give a URI or the image bytes")
    if re.match(_ABSOLUTE, image_value):
        return image_value
    if _climbs_out(image_value):
        raise ValueError(
            f"image {image_value!r} climbs out of the directory of manifest {manifest_uri} with '..'; "
            "write it as an absolute URI"
        )
    return _directory(manifest_uri) + posixpath.normpath(image_value)


class _Findings:
    """Problems found so far, grouped by (column, problem), each with a count and the first few row ids."""

    def __init__(self, uri: str, sample_ids: int):
        self.uri = uri
        self.sample_ids = sample_ids
        self.problems: dict[tuple[str, str], tuple[int, list[str], str]] = {}
        self.row_level: set[tuple[str, str]] = set()  # bad values in single rows (ids excepted)

    def add(self, column: str, problem: str, count: int = 0, samples: Sequence[str] = (), noun: str = "rows"):
        total, kept, _ = self.problems.get((column, problem), (0, [], noun))
        kept = kept + list(samples[: self.sample_ids - len(kept)])
        self.problems[(column, problem)] = (total + count, kept, noun)

    def add_rows(self, column: str, problem: str, mask: pa.Array, ids: pa.Array | None, offset: int) -> None:
        """Record the rows of one batch where `mask` is true, naming them by id (or position when no id)."""
        count = pc.sum(mask).as_py() or 0
        if count:
            positions = pc.indices_nonzero(mask).slice(0, self.sample_ids).to_pylist()
            values = ids.take(positions).to_pylist() if ids is not None else [None] * len(positions)
            labels = [_label(v, offset + p) for v, p in zip(values, positions, strict=True)]
            self.add(column, problem, count, labels)
            if column != "id":
                self.row_level.add((column, problem))

    def raise_if_any(self, except_row_level: bool = False) -> None:
        lines = self.lines(lambda key: not (except_row_level and key in self.row_level))
        if lines:
            raise ManifestError(f"{self.uri}: {len(lines)} problem(s) in the manifest:\n" + "\n".join(lines))

    def lines(self, include: Callable[[tuple[str, str]], bool]) -> list[str]:
        lines = []
        for (column, problem), (count, samples, noun) in self.problems.items():
            if not include((column, problem)):
                continue
            where = f"column {column!r}: " if column else ""
            more = ", ..." if count > len(samples) else ""
            which = (
                f" [{count} {noun if count > 1 else noun[:-1]}: {', '.join(samples)}{more}]" if count else ""
            )
            lines.append(f"  - {where}{problem}{which}")
        return lines


def _scan(manifest: Manifest, columns: Sequence[str] | None, batch_size: int) -> Iterator[pa.RecordBatch]:
    try:
        for batch in manifest.dataset.to_batches(columns=columns, batch_size=batch_size):
            if batch.num_rows:
                yield batch
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(
            f"{manifest.uri}: cannot read the manifest ({error}); every file must be Parquet with the same "
            "column types"
        ) from error


def _type_ok(rule: ColumnRule, schema: pa.Schema, findings: _Findings) -> bool:
    checks, expected = _KINDS[rule.kind]
    actual = schema.field(rule.name).type
    if any(check(actual) for check in checks):
        return True
    findings.add(rule.name, f"wrong type {actual}; expected {expected}, so convert the column before writing")
    return False


def _bad_rows(rule: ColumnRule, values: pa.Array) -> list[tuple[str, pa.Array]]:
    """(problem, mask) for each way the rows of one batch can break `rule`."""
    checks = []
    if rule.required:
        checks.append(("null values; this column is required in every row", pc.is_null(values)))
    if rule.name == "id":
        checks.append(("empty ids; every row needs a non-empty, unique id", _is_empty(values)))
    if rule.name == "image":
        checks.append(("empty values; give an image URI or the image bytes", _is_empty(values)))
        if not any(is_type(values.type) for is_type in _BINARY):
            checks.append(
                (
                    "relative paths that climb out of the manifest's directory with '..'; "
                    "write them as absolute URIs",
                    _climbing_paths(values),
                )
            )
    if rule.max_length is not None:
        checks.append((rule.length_problem(), _too_long(values, rule.max_length)))
    if rule.expected:
        checks.append(
            (
                f"out of range; expected {rule.expected} (null means the run default)",
                _out_of_range(rule, values),
            )
        )
    return checks


def _is_empty(values: pa.Array) -> pa.Array:
    return pc.fill_null(pc.equal(pc.binary_length(values), 0), False)


def _too_long(values: pa.Array, max_length: int) -> pa.Array:
    if pa.types.is_string_view(values.type):  # utf8_length has no string_view kernel
        values = values.cast(pa.large_string())
    return pc.fill_null(pc.greater(pc.utf8_length(values), max_length), False)


def _climbing_paths(values: pa.Array) -> pa.Array:
    suspects = pc.fill_null(pc.match_substring(values, ".."), False)
    if not pc.any(suspects).as_py():
        return suspects
    return pa.array([v is not None and _climbs_out(v) for v in values.to_pylist()], pa.bool_())


def _out_of_range(rule: ColumnRule, values: pa.Array) -> pa.Array:
    if rule.choices:
        valid = pc.is_in(values, value_set=pa.array(rule.choices))
    elif rule.kind == "float":
        x = pc.cast(values, pa.float64())
        valid = pc.is_finite(x)  # NaN and ±inf are never in range
        if rule.low is not None:
            valid = pc.and_(valid, pc.greater_equal(x, rule.low))
        if rule.high is not None:
            valid = pc.and_(valid, pc.less_equal(x, rule.high))
    else:
        # uint64 values above 2**63-1 wrap to negatives here, which every int rule (low >= 0) rejects.
        x = values.cast(pa.int64(), safe=False)
        valid = pc.and_(pc.greater_equal(x, int(rule.low)), pc.less_equal(x, int(rule.high)))
        if rule.multiple_of:
            remainder = pc.subtract(x, pc.multiply(pc.divide(x, rule.multiple_of), rule.multiple_of))
            valid = pc.and_(valid, pc.equal(remainder, 0))
    return pc.fill_null(pc.and_(pc.invert(valid), pc.is_valid(values)), False)


class _IdHashes:
    """64-bit hashes of the non-empty ids seen so far: 8 bytes per row however long the ids are.

    Python's `hash` of a str (SipHash, seeded per process) is enough: a repeated hash only makes its ids
    candidates, which `_find_duplicate_ids` then compares exactly.
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []

    def add(self, ids: pa.Array) -> None:
        self._chunks.append(_id_hashes(_non_empty(ids)))

    def repeated(self) -> np.ndarray:
        """The hashes seen more than once, sorted."""
        hashes = np.sort(np.concatenate(self._chunks)) if self._chunks else np.empty(0, np.int64)
        return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])


def _non_empty(ids: pa.Array) -> pa.Array:
    """The ids that are neither null nor empty (those are reported as such, never as duplicates)."""
    return ids.filter(pc.fill_null(pc.greater(pc.binary_length(ids), 0), False))


def _id_hashes(ids: pa.Array, slice_rows: int = 4096) -> np.ndarray:
    """hash() of every id, made into Python strs a slice at a time (not a whole batch at once)."""
    hashes = np.empty(len(ids), np.int64)
    for start in range(0, len(ids), slice_rows):
        values = ids.slice(start, slice_rows).to_pylist()
        hashes[start : start + len(values)] = np.fromiter(map(hash, values), np.int64, count=len(values))
    return hashes


def _find_duplicate_ids(
    manifest: Manifest, suspects: np.ndarray, findings: _Findings, batch_size: int
) -> None:
    """Count exactly, in a second pass over `id`, the ids whose hash is in `suspects`; report those that
    more than one row has, in the order of their first row."""
    if not len(suspects):
        return
    counts: dict[str, int] = {}
    for batch in _scan(manifest, ["id"], batch_size):
        ids = _non_empty(batch.column("id"))
        for row_id in ids.filter(pa.array(np.isin(_id_hashes(ids), suspects))).to_pylist():
            counts[row_id] = counts.get(row_id, 0) + 1
    repeated = [(row_id, count) for row_id, count in counts.items() if count > 1]
    if repeated:
        rows = sum(count for _, count in repeated)
        samples = [_label(row_id, None) for row_id, _ in repeated[: findings.sample_ids]]
        findings.add(
            "id",
            f"duplicate ids ({rows} rows share them); ids must be unique",
            len(repeated),
            samples,
            noun="ids",
        )


def _label(row_id: str | None, position: int | None) -> str:
    if row_id is None:
        return f"row #{position}"
    text = repr(row_id)
    return text if len(text) <= 60 else text[:57] + "..."


def _climbs_out(value: str) -> bool:
    relative = posixpath.normpath(value)
    return not re.match(_ABSOLUTE, value) and (relative == ".." or relative.startswith("../"))


def _directory(uri: str) -> str:
    """Everything up to the last '/' before any glob character ('' for a bare file name)."""
    magic = _GLOB.search(uri)
    head = uri[: magic.start()] if magic else uri
    return head[: head.rfind("/") + 1]
