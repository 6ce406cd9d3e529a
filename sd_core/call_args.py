"""Validation of one pipeline call's arguments, broadcast to one value per row."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sd_core.images import OUTPUT_TYPES

SEED_MIN, SEED_MAX = 0, 2**64 - 1


@dataclass(frozen=True)
class CallArgs:
    prompts: list[str]
    negative_prompts: list[str]
    guidance_scales: list[float]
    seeds: list[int]
    strength: float
    num_inference_steps: int
    eta: float
    clip_skip: int | None
    output_type: str


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


def resolve_call_args(
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None,
    strength: float,
    guidance_scale: float | Sequence[float],
    num_inference_steps: int,
    seeds: int | Sequence[int] | None,
    eta: float,
    clip_skip: int | None,
    output_type: str,
    num_text_layers: int,
) -> CallArgs:
    """Check every argument once, with messages that say which one is wrong and how to fix it."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts is empty; give one prompt per image")
    for i, p in enumerate(prompt_list):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string; got {type(p).__name__}")
    batch = len(prompt_list)
    negatives = _per_row("" if negative_prompts is None else negative_prompts, batch, "negative_prompts")
    for i, p in enumerate(negatives):
        if not isinstance(p, str):
            raise TypeError(f"negative_prompts[{i}] must be a string; got {type(p).__name__}")
    guidance = [
        _check_number(g, f"guidance_scale[{i}]", 0.0, 1e4)
        for i, g in enumerate(_per_row(guidance_scale, batch, "guidance_scale"))
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
    if int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength {strength} x num_inference_steps {num_inference_steps} < 1 would run no "
            "denoising step "
            "(diffusers silently returns the input); raise strength or num_inference_steps"
        )
    eta = _check_number(eta, "eta", 0.0, 1.0)
    if clip_skip is not None and (
        isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < num_text_layers
    ):
        raise ValueError(
            f"clip_skip must be None or an integer in [0, {num_text_layers - 1}] for this "
            f"{num_text_layers}-layer text encoder; got {clip_skip!r}"
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
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
    )
