"""Manifest rows → work items: one per (id, variant), every parameter resolved, bad rows marked as errors.

Pure pyarrow functions, run in Ray tasks. A work item carries everything the later stages need, so any
stage can turn it into an output or an error row on its own. Status columns (`error_*`) travel with
the rows: a row that failed at one stage passes through the others untouched and ends in the errors
table instead of being dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from connectors.manifest import KNOWN_COLUMNS, resolve_image_uri, row_problems
from connectors.output import key_strings
from connectors.uri_policy import check_allowed
from jobs.augment_config import AugmentConfig
from jobs.augment_policy import TemplateError, realise
from jobs.config import SDXL_NUMBERS, RowDefaults
from jobs.config_checks import RULES

SEED_SPACE = 2**32  # derived seeds stay 32-bit so A1111/ComfyUI users can paste them
_SDXL_NUMBERS = tuple((name, int if RULES[name].kind == "int" else float) for name in SDXL_NUMBERS)
# SDXL keyword argument of the core -> the work columns that hold its per-row value (two: a pair)
SDXL_ARGUMENTS = {
    "prompts_2": ("prompt_2",),
    "negative_prompts_2": ("negative_prompt_2",),
    "aesthetic_score": ("aesthetic_score",),
    "negative_aesthetic_score": ("negative_aesthetic_score",),
    "original_size": ("original_height", "original_width"),
    "crops_coords_top_left": ("crop_top", "crop_left"),
}
_SEED_MAX = 2**63 - 1

STATUS_COLUMNS = ("error_stage", "error_type", "error_message", "attempts", "retryable")
WORK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("variant", pa.int32()),
        ("image", pa.string()),  # resolved URI, or null when the bytes are inline
        ("image_bytes", pa.binary()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("strength", pa.float64()),
        ("guidance_scale", pa.float64()),
        ("num_inference_steps", pa.int64()),
        ("seed", pa.int64()),
        ("width", pa.int64()),  # requested size, null = the input's size rounded to a multiple of 8
        ("height", pa.int64()),
        ("resize_mode", pa.string()),
        ("guidance_rescale", pa.float64()),
        ("prompt_2", pa.string()),  # SDXL (null: not given)
        ("negative_prompt_2", pa.string()),
        ("aesthetic_score", pa.float64()),
        ("negative_aesthetic_score", pa.float64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("crop_top", pa.int64()),
        ("crop_left", pa.int64()),
        ("error_stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("attempts", pa.int32()),
        ("retryable", pa.bool_()),
    ]
)
WORK_COLUMNS = tuple(WORK_SCHEMA.names)
EXTRA_PREFIX = "manifest_"  # extra columns whose names clash with ours are carried under this prefix


def derived_seed(run_seed: int, row_id: str, variant: int) -> int:
    """A stable 32-bit seed from (run seed, id, variant): reruns reproduce every image."""
    text = f"{run_seed}\x00{row_id}\x00{variant}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % SEED_SPACE


def expand_rows(
    batch: pa.Table,
    defaults: RowDefaults,
    run_seed: int,
    manifest_base: str,
    skip_keys: pa.Array | None = None,
    only_keys: pa.Array | None = None,
    allowed_roots: Sequence[str] = (),
    augment: AugmentConfig | None = None,
) -> pa.Table:
    """Expand manifest rows into work items, resolving defaults, seeds and image URIs.

    `skip_keys` (already done) and `only_keys` (a retry round's rows) are `key_strings` arrays. Rows
    with bad values become error items (stage "validate") naming the column and the value; so do rows
    whose resolved image URI lies outside `allowed_roots` (type "InputNotAllowed"; empty = anywhere).
    With an enabled `augment` policy every row makes `augment.variants` items, each with the policy's
    values for it (the manifest's own prompt column is then not needed if the policy has prompts).
    """
    augment = augment if augment is not None and augment.enabled else None
    batch = _fill_prompt(batch, defaults, augment)
    problems = row_problems(batch).to_pylist()
    columns = batch.to_pydict()
    extras = [name for name in batch.column_names if name not in KNOWN_COLUMNS]
    items: list[dict] = []
    sources: list[int] = []  # the manifest row of each item, to carry its extra columns
    for position, row_id in enumerate(columns["id"]):
        row = {name: values[position] for name, values in columns.items()}
        problem = problems[position]
        for variant in range(row_variants(row.get("num_images"), defaults.num_images, augment)):
            item = _work_item(row, row_id, variant, defaults, run_seed, manifest_base, problem)
            if augment is not None and item["error_type"] is None:
                _apply_policy(item, augment, row, run_seed)
            items.append(_confine_input(item, allowed_roots))
            sources.append(position)
    table = _to_table(items, sources, batch, extras)
    return _filter_keys(table, skip_keys, only_keys)


def _fill_prompt(batch: pa.Table, defaults: RowDefaults, augment: AugmentConfig | None) -> pa.Table:
    if augment is not None and augment.prompts:  # the policy writes every prompt: any value passes
        prompts = pa.array([""] * batch.num_rows, pa.string())
        if "prompt" in batch.column_names:
            return batch.set_column(batch.column_names.index("prompt"), "prompt", prompts)
        return batch.append_column("prompt", prompts)
    if defaults.prompt is None:
        return batch
    if "prompt" not in batch.column_names:
        return batch.append_column("prompt", pa.array([defaults.prompt] * batch.num_rows, pa.string()))
    filled = pc.fill_null(batch["prompt"], defaults.prompt)
    return batch.set_column(batch.column_names.index("prompt"), "prompt", filled)


def row_variants(num_images: object, default: int, augment: AugmentConfig | None) -> int:
    """A row's variants: the augmentation policy's count when one is on, else `variant_count`."""
    return augment.variants if augment is not None and augment.enabled else variant_count(num_images, default)


def _apply_policy(item: dict, augment: AugmentConfig, row: dict, run_seed: int) -> None:
    """Overwrite the item's prompt, negative prompt, strength and guidance with the policy's draws."""
    try:
        item.update(realise(augment, row, item["id"], item["variant"], run_seed))
    except TemplateError as error:
        _mark_invalid(item, "BadManifestRow", str(error))


def variant_count(num_images: object, default: int) -> int:
    """A row's number of variants: its num_images, else the default; 1 when the value is bad (the row is
    then one error item). The plan counts the work with the same rule."""
    count = default if num_images is None else num_images
    return int(count) if isinstance(count, int) and 1 <= count <= 64 else 1


def _value(row: dict, name: str, default: object) -> object:
    value = row.get(name)
    return default if value is None else value


def _work_item(
    row: dict,
    row_id: str,
    variant: int,
    defaults: RowDefaults,
    run_seed: int,
    manifest_base: str,
    problem: str | None,
) -> dict:
    image = row.get("image")
    item = {
        "id": row_id,
        "variant": variant,
        "image": None,
        "image_bytes": image if isinstance(image, bytes) else None,
        "prompt": row.get("prompt"),
        "negative_prompt": _value(row, "negative_prompt", defaults.negative_prompt),
        "strength": _number(_value(row, "strength", defaults.strength), float),
        "guidance_scale": _number(_value(row, "guidance_scale", defaults.guidance_scale), float),
        "num_inference_steps": _number(_value(row, "num_inference_steps", defaults.num_inference_steps), int),
        "seed": None,
        "width": _number(_value(row, "width", defaults.width), int),
        "height": _number(_value(row, "height", defaults.height), int),
        "resize_mode": _value(row, "resize_mode", defaults.resize_mode),
        "guidance_rescale": _number(_value(row, "guidance_rescale", defaults.guidance_rescale), float),
        "prompt_2": _value(row, "prompt_2", defaults.prompt_2),
        "negative_prompt_2": _value(row, "negative_prompt_2", defaults.negative_prompt_2),
        **{name: _number(_value(row, name, getattr(defaults, name)), kind) for name, kind in _SDXL_NUMBERS},
        "error_stage": None,
        "error_type": None,
        "error_message": problem,
        "attempts": 0,
        "retryable": False,
    }
    if problem is None and (item["original_width"] is None) != (item["original_height"] is None):
        given = "original_width" if item["original_height"] is None else "original_height"
        problem = f"column {given!r} is set but its partner is not: give original_width and original_height"
    if problem is None:
        try:
            if isinstance(image, str):
                item["image"] = resolve_image_uri(manifest_base, image)
            item["seed"] = _seed(row.get("seed"), row_id, variant, run_seed)
        except ValueError as error:
            problem = str(error)
    if problem is not None:
        _mark_invalid(item, "BadManifestRow", problem)
    return item


def _confine_input(item: dict, allowed_roots: Sequence[str]) -> dict:
    """Turn a valid item whose image URI lies outside `allowed_roots` into an error item; it is never read."""
    if item["error_type"] is None and item["image"] is not None:
        refusal = check_allowed(item["image"], allowed_roots)
        if refusal is not None:
            _mark_invalid(item, "InputNotAllowed", refusal)
            item["image"] = None
    return item


def _mark_invalid(item: dict, error_type: str, message: str) -> None:
    item.update(error_stage="validate", error_type=error_type, error_message=message, attempts=1)


def _seed(seed: int | None, row_id: str, variant: int, run_seed: int) -> int:
    """The row's seed column (+ variant, as A1111 numbers a batch), else one derived from the id."""
    if seed is None:
        return derived_seed(run_seed, row_id, variant)
    return (int(seed) + variant) % (_SEED_MAX + 1)


def _number(value: object, kind: type) -> object:
    """Cast when the value fits the type; leave anything else for row validation to report."""
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if kind is int and not -(2**63) <= number <= _SEED_MAX:
        return None
    return number


def _to_table(items: list[dict], sources: list[int], batch: pa.Table, extras: Sequence[str]) -> pa.Table:
    table = pa.Table.from_pylist(items, schema=WORK_SCHEMA)
    positions = pa.array(sources, pa.int64())
    for name in extras:
        carried = name if name not in WORK_COLUMNS else EXTRA_PREFIX + name
        table = table.append_column(carried, batch[name].take(positions))
    return table


def _filter_keys(table: pa.Table, skip_keys: pa.Array | None, only_keys: pa.Array | None) -> pa.Table:
    if (skip_keys is None or len(skip_keys) == 0) and only_keys is None:
        return table
    keys = key_strings(table["id"], table["variant"])
    keep = pa.array([True] * table.num_rows)
    if skip_keys is not None and len(skip_keys):
        keep = pc.invert(pc.is_in(keys, value_set=skip_keys))
    if only_keys is not None:
        keep = pc.and_(keep, pc.is_in(keys, value_set=only_keys))
    return table.filter(keep)
