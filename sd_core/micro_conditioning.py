"""SDXL's micro-conditioning (`add_time_ids`): sizes, crop and aesthetic score per row, as the UNet's
added embedding reads them, with diffusers 0.42's defaults (`StableDiffusionXLImg2ImgPipeline`).

Which values a family takes, and in what order, is its `TimeIds`; here they are checked and defaulted:
the sizes default to the processed image's (height, width), the negative ones to the positive ones,
crops to (0, 0), aesthetic scores to 6.0 and 2.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sd_core.families import TIME_ID_WIDTHS, TimeIds

FIXED_DEFAULTS: dict[str, Any] = {
    "crops_coords_top_left": (0, 0),
    "negative_crops_coords_top_left": (0, 0),
    "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
}
# value -> the value it defaults to when not given (after the image size and FIXED_DEFAULTS)
DEFAULTS_FROM = {"negative_original_size": "original_size", "negative_target_size": "target_size"}
IMAGE_SIZED = ("original_size", "target_size")


def per_row_values(name: str, value: Any, batch: int) -> list[Any]:
    """One checked value per row: a pair (sizes, crops) or a number (scores); a list gives one per row.
    None entries mean "the default"."""
    pair = TIME_ID_WIDTHS[name] == 2
    rows = value if _is_row_list(value, pair) else [value] * batch
    if len(rows) != batch:
        raise ValueError(f"{name} has {len(rows)} entries but there are {batch} prompts; give one per row")
    listed = rows is value
    return [None if v is None else _checked(name, v, pair, i if listed else None) for i, v in enumerate(rows)]


def _is_row_list(value: Any, pair: bool) -> bool:
    if not isinstance(value, (list, tuple)):
        return False
    return not pair or all(v is None or isinstance(v, (list, tuple)) for v in value)


def _checked(name: str, value: Any, pair: bool, row: int | None) -> Any:
    where = name if row is None else f"{name}[{row}]"
    if pair:
        low = 0 if "crops" in name else 1
        what = "(top, left)" if "crops" in name else "(height, width)"
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
        ):
            raise ValueError(f"{where} must be a pair of integers >= {low} {what}; got {value!r}")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number; got {value!r}")
    return float(value)


def time_ids(
    spec: TimeIds, resolved: Mapping[str, Sequence[Any]], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) time ids [B, k] from `resolved_values`' per-row values."""
    batch = len(resolved[spec.positive[0]])
    tensors = []
    for names in (spec.positive, spec.negative):
        rows = [[number for name in names for number in _flat(resolved[name][row])] for row in range(batch)]
        tensors.append(torch.tensor(rows, dtype=dtype, device=device))
    return tensors[0], tensors[1]


def resolved_values(
    spec: TimeIds, values: Mapping[str, Sequence[Any]], image_size: tuple[int, int], batch: int
) -> dict[str, list[Any]]:
    """Every value the ids read, per row, with the defaults filled in (what the metadata records)."""
    resolved: dict[str, list[Any]] = {}
    for name in sorted(spec.options, key=lambda n: n in DEFAULTS_FROM):  # defaults-from after their source
        given = values.get(name) or [None] * batch
        if name in IMAGE_SIZED:
            fallback = [tuple(image_size)] * batch
        elif name in DEFAULTS_FROM:
            fallback = resolved[DEFAULTS_FROM[name]]
        else:
            fallback = [FIXED_DEFAULTS[name]] * batch
        resolved[name] = [fallback[i] if v is None else v for i, v in enumerate(given)]
    return resolved


def _flat(value: Any) -> tuple[float, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,)
