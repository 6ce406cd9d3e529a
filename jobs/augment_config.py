"""The `augment:` section (`sdbatch augment`): how many variants each manifest row becomes, and what each
variant's prompt, negative prompt, strength and guidance are drawn from (jobs/augment_policy.py draws)."""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass, field

from jobs.config_checks import Checked, Problem, bounds, column_rule, text_length


@dataclass(frozen=True)
class SampledValue(Checked):
    """A value drawn per variant: one of `values` (a single value = fixed), or uniform in [low, high]."""

    values: tuple[float, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def given(self) -> bool:
        return bool(self.values) or self.low is not None

    def _problems(self) -> Iterator[Problem]:
        ranged = (self.low is not None, self.high is not None)
        if self.values and any(ranged):
            yield "", "give either values (to choose from) or low and high (a uniform range), not both"
        elif ranged[0] != ranged[1]:
            yield "", "a uniform range needs both low and high"
        elif self.low is not None and self.high is not None and self.low > self.high:
            yield "", f"low ({self.low}) must be <= high ({self.high})"

    def limits(self) -> tuple[float, ...]:
        """The values any draw lies between or among (for checking them against the column rule)."""
        return self.values if self.values else tuple(v for v in (self.low, self.high) if v is not None)


@dataclass(frozen=True)
class Substitution:
    """Where manifest column `column` holds `value`, its placeholder becomes `text` (e.g. a TI token)."""

    column: str
    value: str
    text: str


@dataclass(frozen=True)
class AugmentConfig(Checked):
    """Dataset augmentation (`sdbatch augment`): each manifest row becomes `variants` images whose prompt,
    negative prompt, strength and guidance are drawn per variant, stably from (run seed, id, variant)."""

    variants: int = 0  # images per manifest row; 0 = augmentation off
    prompts: tuple[str, ...] = ()  # templates, `{column}` filled from the row; one drawn per variant
    negative_prompts: tuple[str, ...] = ()  # templates too; () = the row's or defaults' negative prompt
    strength: SampledValue = field(default_factory=SampledValue)  # not given: the row's or defaults'
    guidance_scale: SampledValue = field(default_factory=SampledValue)
    substitutions: tuple[Substitution, ...] = ()  # column values replaced before filling templates

    @property
    def enabled(self) -> bool:
        return self.variants > 0

    def template_columns(self) -> list[str]:
        """Manifest columns the templates read, in order of first use."""
        names = [name for text in self.prompts + self.negative_prompts for name in template_fields(text)]
        return list(dict.fromkeys(names))

    def _problems(self) -> Iterator[Problem]:
        yield from bounds("variants", self.variants, low=0, high=64)
        for key, templates in (("prompts", self.prompts), ("negative_prompts", self.negative_prompts)):
            for index, text in enumerate(templates):
                yield from ((f"{key}[{index}]", problem) for problem in _template_problems(text))
        for name in ("strength", "guidance_scale"):
            for value in getattr(self, name).limits():
                yield from ((f"{name}", message) for _, message in column_rule(name, value))
        if self.variants and not self.prompts and self.substitutions:
            yield "substitutions", "substitutions fill prompt templates: add prompts, or remove them"


def template_fields(template: str) -> list[str]:
    """The `{column}` names a prompt template uses, in order (with repeats)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _template_problems(template: str) -> Iterator[str]:
    """A template may hold `{column}` placeholders (plain names) and `{{`/`}}` for literal braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        yield f"{error} in {template!r}; write {{{{ and }}}} for literal braces"
        return
    for _, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            yield f"placeholder {shown} in {template!r}: use a plain manifest column name, e.g. {{label}}"
    yield from text_length("prompt", template)
