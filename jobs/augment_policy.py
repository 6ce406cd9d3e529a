"""Augmentation: the values one variant of a manifest row gets, drawn from the policy in the config.

Every draw comes from a generator seeded by sha256(run seed, id, variant), so a rerun, a resumed run or a
retry round realises exactly the same prompt, strength and guidance for each (id, variant).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

from connectors.manifest import PROMPT_MAX_LENGTH
from jobs.augment_config import AugmentConfig, SampledValue, template_fields


class TemplateError(ValueError):
    """A row lacks a value that a prompt template needs: that row becomes an error row."""


def variant_random(run_seed: int, row_id: str, variant: int) -> random.Random:
    """The generator of one (id, variant): independent of batch, order and rerun."""
    text = f"augment\x00{run_seed}\x00{row_id}\x00{variant}".encode("utf-8", "surrogatepass")
    return random.Random(int.from_bytes(hashlib.sha256(text).digest()[:8], "big"))


def realise(
    policy: AugmentConfig, row: Mapping[str, Any], row_id: str, variant: int, run_seed: int
) -> dict[str, Any]:
    """The policy's values for one variant: prompt, negative_prompt, strength, guidance_scale (only the
    keys the policy sets). Draws happen in a fixed order, each whether or not its value is used."""
    rng = variant_random(run_seed, row_id, variant)
    prompt = rng.choice(policy.prompts) if policy.prompts else None
    negative = rng.choice(policy.negative_prompts) if policy.negative_prompts else None
    strength, guidance = _draw(policy.strength, rng), _draw(policy.guidance_scale, rng)
    values: dict[str, Any] = {}
    if prompt is not None:
        values["prompt"] = fill(prompt, row, policy)
    if negative is not None:
        values["negative_prompt"] = fill(negative, row, policy)
    if strength is not None:
        values["strength"] = strength
    if guidance is not None:
        values["guidance_scale"] = guidance
    return values


def _draw(sampled: SampledValue, rng: random.Random) -> float | None:
    pick = rng.random()  # always drawn, so adding a range to one value leaves the others' draws alone
    if sampled.values:
        return sampled.values[min(int(pick * len(sampled.values)), len(sampled.values) - 1)]
    if sampled.low is not None and sampled.high is not None:
        return round(sampled.low + pick * (sampled.high - sampled.low), 6)
    return None


def fill(template: str, row: Mapping[str, Any], policy: AugmentConfig) -> str:
    """`template` with each `{column}` replaced by the row's value (after the policy's substitutions)."""
    values = {}
    for name in template_fields(template):
        if name not in row:
            raise TemplateError(f"the template {template!r} needs column {name!r}, which the manifest lacks")
        if row[name] is None:
            raise TemplateError(f"column {name!r} is null in this row; the template {template!r} needs it")
        values[name] = _substitute(policy, name, str(row[name]))
    text = template.format_map(values)
    if len(text) > PROMPT_MAX_LENGTH:
        raise TemplateError(
            f"the template {template!r} filled from this row is {len(text)} characters, over the "
            f"{PROMPT_MAX_LENGTH} a prompt may have; shorten the template or the column values"
        )
    return text


def _substitute(policy: AugmentConfig, column: str, value: str) -> str:
    for rule in policy.substitutions:
        if rule.column == column and rule.value == value:
            return rule.text
    return value
