"""Validation of one pipeline call's arguments, broadcast to one value per row.

Arguments every family takes are checked here; a family's own arguments (SDXL's second prompts and
micro-conditioning) are accepted only for a family that has them, and any other family refuses them by
name rather than ignoring them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sd_core.families import TIME_ID_WIDTHS, ModelFamily
from sd_core.images import OUTPUT_TYPES
from sd_core.micro_conditioning import per_row_values
from sd_core.text_encoder import PROMPT_SYNTAXES

SEED_MIN, SEED_MAX = 0, 2**64 - 1
SECOND_PROMPTS = ("prompts_2", "negative_prompts_2")
FAMILY_OPTIONS = SECOND_PROMPTS + tuple(TIME_ID_WIDTHS)  # the call's family-specific keyword arguments


@dataclass(frozen=True)
class CallArgs:
    prompts: list[str]
    negative_prompts: list[str | None]  # None: no negative prompt (zeros where the model says so)
    guidance_scales: list[float]
    seeds: list[int]
    strength: float
    num_inference_steps: int
    eta: float
    clip_skip: int | None
    output_type: str
    prompts_2: list[str | None] | None = None  # None entries: the row's prompt
    negative_prompts_2: list[str | None] | None = None
    guidance_rescales: list[float] = field(default_factory=list)
    denoising_start: float | None = None
    denoising_end: float | None = None
    prompt_syntax: str = "plain"
    micro_conditioning: dict[str, list[Any]] = field(default_factory=dict)  # name -> per-row value or None

    @property
    def uses_cfg(self) -> bool:
        return any(g > 1 for g in self.guidance_scales)


def _per_row(value, batch: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(
                f"{name} has {len(value)} entries but there are {batch} prompts; give one per row"
            )
        return list(value)
    return [value] * batch


def _check_number(value, name: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    if not (low <= value <= high):  # also rejects NaN
        raise ValueError(f"{name} must lie in [{low}, {high}]; got {value}")
    return float(value)


def _texts(value, batch: int, name: str, optional: bool) -> list[str | None]:
    rows = _per_row(value, batch, name)
    for i, text in enumerate(rows):
        if not isinstance(text, str) and not (optional and text is None):
            kind = "a string or None" if optional else "a string"
            raise TypeError(f"{name}[{i}] must be {kind}; got {type(text).__name__}")
    return rows


def _second_texts(value, batch: int, name: str) -> list[str | None] | None:
    """A second tower's texts; a single "" means "not given", as diffusers' `prompt_2 or prompt` reads it."""
    if value is None or value == "":
        return None
    return _texts(value, batch, name, optional=True)


def _fraction(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, float) or not 0.0 < value < 1.0:
        raise ValueError(
            f"{name} must be None or a float strictly between 0 and 1 (the fraction of the schedule); "
            f"got {value!r}"
        )
    return value


def check_family_options(family: ModelFamily, options: Mapping[str, Any]) -> None:
    """ValueError naming the family for any given (non-None) option the family does not take."""
    given = (name for name, value in options.items() if value is not None)
    foreign = sorted(name for name in given if name not in family.call_options)
    if foreign:
        takes = ", ".join(family.call_options) or "none of the SDXL arguments"
        raise ValueError(
            f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to this {family.label} "
            f"model ({family.name}); it takes {takes}"
        )


def resolve_call_args(
    family: ModelFamily,
    max_clip_skip: int,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str | None] | None,
    strength: float,
    guidance_scale: float | Sequence[float],
    num_inference_steps: int,
    seeds: int | Sequence[int] | None,
    eta: float,
    clip_skip: int | None,
    output_type: str,
    *,
    guidance_rescale: float | Sequence[float] = 0.0,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    prompt_syntax: str = "plain",
    family_options: Mapping[str, Any] | None = None,
) -> CallArgs:
    """Check every argument once, with messages that say which one is wrong and how to fix it."""
    family_options = dict(family_options or {})
    check_family_options(family, family_options)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts is empty; give one prompt per image")
    batch = len(prompt_list)
    prompt_list = _texts(prompt_list, batch, "prompts", optional=False)
    negatives = _texts(negative_prompts, batch, "negative_prompts", optional=True)
    guidance = [
        _check_number(g, f"guidance_scale[{i}]", 0.0, 1e4)
        for i, g in enumerate(_per_row(guidance_scale, batch, "guidance_scale"))
    ]
    rescales = [
        _check_number(r, f"guidance_rescale[{i}]", 0.0, 1.0)
        for i, r in enumerate(_per_row(guidance_rescale, batch, "guidance_rescale"))
    ]
    if seeds is None:
        seeds = [secrets.randbits(63) for _ in range(batch)]
    seed_list = _per_row(seeds, batch, "seeds")
    for i, s in enumerate(seed_list):
        if isinstance(s, bool) or not isinstance(s, int) or not SEED_MIN <= s <= SEED_MAX:
            raise ValueError(f"seeds[{i}] must be an integer in [0, 2**64 - 1]; got {s!r}")
    strength = _check_number(strength, "strength", 0.0, 1.0)
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
    start, end = _fraction(denoising_start, "denoising_start"), _fraction(denoising_end, "denoising_end")
    if start is None and int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength {strength} x num_inference_steps {num_inference_steps} < 1 would run no "
            "denoising step "
            "(diffusers silently returns the input); raise strength or num_inference_steps"
        )
    eta = _check_number(eta, "eta", 0.0, 1.0)
    if clip_skip is not None and (
        isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= max_clip_skip
    ):
        raise ValueError(
            f"clip_skip must be None or an integer in [0, {max_clip_skip}] for this model's text "
            f"encoder(s); got {clip_skip!r}"
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}; got {prompt_syntax!r}")
    micro = {
        name: per_row_values(name, value, batch)
        for name, value in family_options.items()
        if name not in SECOND_PROMPTS and value is not None
    }
    return CallArgs(
        prompts=prompt_list,
        negative_prompts=negatives,
        guidance_scales=guidance,
        seeds=seed_list,
        strength=strength,
        num_inference_steps=num_inference_steps,
        eta=eta,
        clip_skip=clip_skip,
        output_type=output_type,
        prompts_2=_second_texts(family_options.get(SECOND_PROMPTS[0]), batch, SECOND_PROMPTS[0]),
        negative_prompts_2=_second_texts(family_options.get(SECOND_PROMPTS[1]), batch, SECOND_PROMPTS[1]),
        guidance_rescales=rescales,
        denoising_start=start,
        denoising_end=end,
        prompt_syntax=prompt_syntax,
        micro_conditioning=micro,
    )
