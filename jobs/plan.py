"""Everything checked before any work starts, and what the run has to do (`--dry-run` prints this).

No model is loaded and no Ray cluster is needed here: bad configuration, a bad manifest or an output
written with another configuration is refused before a GPU is touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.manifest import (
    Manifest,
    ManifestSummary,
    open_manifest,
    resolve_image_uri,
    validate_manifest,
)
from connectors.output import OutputSink, key_strings, table_keys
from connectors.storage import Storage
from connectors.uri_policy import check_allowed
from jobs.config import AdaptersConfig, RunConfig
from jobs.model_memory import weight_memory_lines
from jobs.resources import ActorPool
from jobs.rows import SDXL_ARGUMENTS, variant_count
from sd_core.families import FAMILIES

SAMPLE_IMAGES = 16  # input images checked for existence up front
KEY_BATCH_ROWS = 16384  # manifest rows turned into keys at a time


class PlanError(ValueError):
    """The run cannot start: the message says what, where and how to fix it."""


@dataclass
class RunPlan:
    config: RunConfig
    storage: Storage
    manifest: Manifest
    summary: ManifestSummary
    expected_keys: pa.Array  # key strings of every (id, variant) the manifest asks for
    done_keys: pa.Array  # already accounted for in the output (skipped)
    missing_images: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what jobs.preflight checked of model and adapters
    layouts: Mapping[str, Any] = field(default_factory=dict)  # the model's (and refiner's) parameter counts
    pool: ActorPool | None = None  # the actor pool sized for the cluster (None: not yet)

    def with_pool(self, pool: ActorPool) -> RunPlan:
        """This plan with the compute settings the pool resolved for the cluster."""
        config = dataclasses.replace(self.config, compute=pool.compute)
        return dataclasses.replace(self, config=config, pool=pool)

    @property
    def expected_rows(self) -> int:
        return len(self.expected_keys)

    @property
    def todo_rows(self) -> int:
        return self.expected_rows - len(self.done_keys)

    def describe(self) -> list[str]:
        config = self.config
        lines = [
            f"manifest  {self.summary.uri}: {self.summary.num_rows} rows "
            f"({self.summary.uri_images} image URIs, {self.summary.binary_images} inline images)",
            f"work      {self.expected_rows} images (rows x variants); {len(self.done_keys)} already done; "
            f"{self.todo_rows} to do",
            f"model     {config.model.path} (scheduler {config.model.scheduler or 'model default'}, "
            f"dtype {config.model.dtype})",
            f"adapters  {len(config.adapters.loras)} LoRA, {len(config.adapters.embeddings)} embeddings",
            f"output    {config.output}",
            f"compute   batch {config.compute.batch_size}, {config.compute.call_rows} rows per actor call",
            self.pool.describe() if self.pool is not None else _unsized_pool_line(config),
        ]
        if config.refiner is not None:
            refiner = config.refiner
            lines.insert(
                3,
                f"refiner   {refiner.path}: takes over at switch_at {refiner.switch_at} of the schedule; "
                f"{len(refiner.adapters.loras)} LoRA, {len(refiner.adapters.embeddings)} embeddings",
            )
        if config.augment.enabled:
            lines.append(_augment_line(config))
        lines.extend(self.checks)
        if self.layouts:
            lines.extend(weight_memory_lines(config, self.layouts))
        if self.summary.extra_columns:
            lines.append(f"carried   extra columns {', '.join(self.summary.extra_columns)}")
        if self.summary.bad_rows:
            lines.append("bad rows  (these become error rows; the run goes on):")
            lines.extend(self.summary.bad_rows)
        if self.missing_images:
            lines.append(f"missing   {len(self.missing_images)} of the first {SAMPLE_IMAGES} input images:")
            lines.extend(f"  - {uri}" for uri in self.missing_images)
        return lines


def _unsized_pool_line(config: RunConfig) -> str:
    compute = config.compute
    if compute.gpus_per_actor is None:
        gpus = "1 GPU if the cluster has GPUs, else none"
    else:
        gpus = f"{compute.gpus_per_actor:g} GPU" if compute.gpus_per_actor else "no GPU"
    actors = "every GPU (or CPU) it offers" if compute.actors_max is None else str(compute.actors_max)
    return (
        f"actors    sized from the cluster when the run starts: {compute.actors_min} to {actors}, each "
        f"{gpus} + {compute.cpus_per_actor:g} CPU"
    )


@contextmanager
def planning_memory() -> Iterator[None]:
    """pyarrow calls made inside (scans, compute, new arrays) allocate from the system allocator (malloc).

    Planning streams the whole manifest through the driver once. The default pool (mimalloc) keeps the
    pages of freed scan buffers committed, per thread: the driver's RSS grew by about twice Arrow's own
    peak, so with the manifest. malloc reuses and returns them. Buffers remember their pool, so arrays
    made here (the expected keys) are freed correctly after the switch back. Arrow's C++ internals that
    take no pool argument (file read buffers) still use the process default.
    """
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _augment_line(config: RunConfig) -> str:
    augment = config.augment
    columns = augment.template_columns()
    drawn = [name for name in ("strength", "guidance_scale") if getattr(augment, name).given]
    return (
        f"augment   {augment.variants} variants per row; {len(augment.prompts)} prompt and "
        f"{len(augment.negative_prompts)} negative templates"
        + (f" (columns {', '.join(columns)})" if columns else "")
        + (f"; drawn: {', '.join(drawn)}" if drawn else "")
    )


def make_plan(config: RunConfig) -> RunPlan:
    """Check the model, adapters, manifest and output; count the work. Raises PlanError."""
    with planning_memory():
        return _make_plan(config)


def _make_plan(config: RunConfig) -> RunPlan:
    storage = Storage(config.storage.to_options(config.retry))
    _check_inputs_exist(config, storage)
    from jobs.preflight import check_model_and_adapters  # here: preflight imports PlanError from this module

    models = check_model_and_adapters(config, storage)
    fs, _ = storage.filesystem(config.manifest)
    try:
        supplied = ("prompt",) if config.augment.enabled and config.augment.prompts else ()
        summary = validate_manifest(config.manifest, fs, rows_as_errors=True, not_required=supplied)
        manifest = open_manifest(config.manifest, fs)
    except ValueError as error:
        raise PlanError(str(error)) from error
    _check_template_columns(config, manifest)
    families = [layout.family for layout in models.layouts.values() if layout.family is not None]
    if len(families) == len(models.layouts):  # a pickled file without its configs: the actors will say
        check_family_settings(config, manifest, families)
    checks = models.lines
    sink = OutputSink(storage, config.output)
    _check_same_configuration(config, sink)
    expected = expected_keys(manifest, config.defaults.num_images, config.augment.variants or None)
    done = settled_keys(sink, "none" if config.retry_errors else "all")
    done = pc.filter(done, pc.is_in(done, value_set=expected)) if len(done) else done
    missing = _sample_missing_images(manifest, storage, config.inputs.allowed_roots)
    return RunPlan(config, storage, manifest, summary, expected, done, missing, checks, models.layouts)


# SDXL settings (manifest columns and run defaults of the same names) -> the core argument they feed
SDXL_SETTINGS = {column: argument for argument, columns in SDXL_ARGUMENTS.items() for column in columns}


def check_family_settings(config: RunConfig, manifest: Manifest, families: Sequence[Any]) -> None:
    """Refuse SDXL settings that none of the run's models reads (the base's and the refiner's families
    say which): a run never ignores a value it was given. Columns are refused only where a row sets a
    value, so one manifest can serve SD 1.x and SDXL runs when the SDXL columns are empty."""
    takes = {name for family in families for name in family.call_options}
    labels = " and ".join(f"{family.label} ({family.name})" for family in families)
    names = manifest.dataset.schema.names
    problems, refused = [], []
    for setting, argument in SDXL_SETTINGS.items():
        if argument in takes:
            continue
        found = len(problems)
        if getattr(config.defaults, setting) is not None:
            problems.append(f"  - defaults.{setting} is set ({getattr(config.defaults, setting)!r})")
        if setting in names:
            rows = _rows_with_values(manifest, setting)
            if rows:
                problems.append(f"  - manifest column {setting!r} has values in {rows} rows")
        if len(problems) > found:
            readers = sorted(f.label for f in FAMILIES.values() if argument in f.call_options)
            refused.append(f"{setting} is read by {' and '.join(readers)}")
    if problems:
        hint = "; ".join(refused)
        raise PlanError(
            f"these settings do not apply to the run's model ({labels}), and a run never ignores a value:\n"
            + "\n".join(problems)
            + f"\n({hint}.) Remove them, or run a model that reads them."
        )


def _rows_with_values(manifest: Manifest, column: str) -> int:
    """How many rows hold a value (not null, not an empty string) in `column`."""
    count = 0
    for batch in manifest.dataset.to_batches(columns=[column], batch_size=KEY_BATCH_ROWS):
        values = batch.column(0)
        set_values = pc.invert(pc.is_null(values))
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            set_values = pc.and_(set_values, pc.not_equal(values, ""))
        count += pc.sum(set_values.cast(pa.int64())).as_py() or 0
    return count


def expected_keys(manifest: Manifest, default_num_images: int, variants: int | None = None) -> pa.Array:
    """Key strings of every (id, variant): each row's num_images (or the default; 1 when invalid), or
    `variants` for every row (an augmentation run)."""
    columns = ["id"] + (["num_images"] if "num_images" in manifest.dataset.schema.names else [])
    chunks = []
    for batch in manifest.dataset.to_batches(columns=columns, batch_size=KEY_BATCH_ROWS):
        if variants:
            counts = np.full(batch.num_rows, variants, np.int64)
        else:
            counts = _variant_counts(batch, default_num_images)
        rows = np.repeat(np.arange(batch.num_rows), counts)  # each row's position, once per variant
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        numbers = pa.array(np.arange(len(rows), dtype=np.int32) - starts.astype(np.int32), pa.int32())
        chunks.append(key_strings(batch.column("id").take(pa.array(rows)), numbers))
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _check_template_columns(config: RunConfig, manifest: Manifest) -> None:
    """Refuse an augmentation whose prompt templates or substitutions name columns the manifest lacks."""
    if not config.augment.enabled:
        return
    needed = config.augment.template_columns() + [s.column for s in config.augment.substitutions]
    names = manifest.dataset.schema.names
    missing = [name for name in dict.fromkeys(needed) if name not in names]
    if missing:
        raise PlanError(
            f"augment: the prompt templates or substitutions use column(s) {', '.join(map(repr, missing))}, "
            f"which the manifest {config.manifest} lacks (it has: {', '.join(names)}); add the column or "
            "change the templates"
        )


def _variant_counts(batch: pa.RecordBatch, default_num_images: int) -> np.ndarray:
    """`variant_count` of every row of `batch`, without a Python object per row where the column allows."""
    default = variant_count(None, default_num_images)
    if "num_images" not in batch.schema.names:
        return np.full(batch.num_rows, default, np.int64)
    values = batch.column("num_images")
    if not pa.types.is_integer(values.type):  # validation refuses such a column; keep the exact rule
        return np.array([variant_count(v, default_num_images) for v in values.to_pylist()], np.int64)
    # uint64 values above 2**63-1 wrap to negatives here, out of range like the values themselves.
    counts = values.cast(pa.int64(), safe=False).fill_null(default).to_numpy()
    return np.where((counts >= 1) & (counts <= 64), counts, 1)


def settled_keys(sink: OutputSink, errors: str) -> pa.Array:
    """Keys the output already accounts for: committed images plus, by `errors`, "all" error rows,
    the "final" ones (not retryable) or "none"."""
    keys = [table_keys(sink.committed_keys())]
    if errors != "none":
        failed = sink.read_errors()
        if errors == "final":
            failed = failed.filter(pc.invert(failed["retryable"]))
        keys.append(table_keys(failed))
    return pc.unique(pa.chunked_array(keys, pa.string()).combine_chunks())


def unsettled_keys(expected: pa.Array, sink: OutputSink, errors: str) -> pa.Array:
    """The `expected` keys that `settled_keys(sink, errors)` does not hold."""
    return expected.filter(pc.invert(pc.is_in(expected, value_set=settled_keys(sink, errors))))


def _check_inputs_exist(config: RunConfig, storage: Storage) -> None:
    paths = [("model.path", config.model.path)]
    if config.model.config:
        paths.append(("model.config", config.model.config))
    paths += _adapter_paths("adapters", config.adapters)
    if config.refiner is not None:
        paths.append(("refiner.path", config.refiner.path))
        if config.refiner.config:
            paths.append(("refiner.config", config.refiner.config))
        paths += _adapter_paths("refiner.adapters", config.refiner.adapters)
    missing = [f"  - {key}: {path}" for key, path in paths if not storage.exists(path)]
    if missing:
        listing = "\n".join(missing)
        raise PlanError(f"these inputs do not exist; fix the paths in the config or flags:\n{listing}")


def _adapter_paths(section: str, adapters: AdaptersConfig) -> list[tuple[str, str]]:
    paths = [(f"{section}.loras[{i}].path", lora.path) for i, lora in enumerate(adapters.loras)]
    return paths + [(f"{section}.embeddings[{i}].path", e.path) for i, e in enumerate(adapters.embeddings)]


def _check_same_configuration(config: RunConfig, sink: OutputSink) -> None:
    record = sink.read_job_record()
    if record is None or config.force:
        return
    if record.get("fingerprint") != config.fingerprint():
        raise PlanError(
            f"output {config.output} was written by a run with a different configuration (model, adapters, "
            "defaults or seed differ), so its images would not match this run's. Write to a new output, "
            "or pass --force to add to it anyway"
        )


def _sample_missing_images(manifest: Manifest, storage: Storage, allowed_roots: Sequence[str]) -> list[str]:
    """URIs among the first rows' images that do not exist. URIs outside `allowed_roots` are not probed
    (even asking would touch a place rows may not read) and URIs that cannot be asked about (credentials
    written into them, no permission) are skipped: the run records those rows as errors."""
    if "image" not in manifest.dataset.schema.names:
        return []
    batch = manifest.dataset.head(SAMPLE_IMAGES, columns=["image"])
    missing = []
    for value in batch.column("image").to_pylist():
        if isinstance(value, str) and value:
            try:
                uri = resolve_image_uri(manifest.base_uri, value)
                if check_allowed(uri, allowed_roots) is None and not storage.exists(uri):
                    missing.append(uri)
            except (ValueError, OSError):
                continue
    return missing
