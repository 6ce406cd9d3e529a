"""What every configuration section shares: the error that lists every problem (with the key path and
where its value came from), and the checks sections run on their values when they are built."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from connectors.manifest import COLUMN_RULES, ColumnRule

Problem = tuple[str, str]  # (dotted key path, what is wrong and how to fix it)
RULES = {rule.name: rule for rule in COLUMN_RULES}  # per-row limits, shared with manifests


class ConfigError(ValueError):
    """A configuration that cannot be used; `problems` holds (key path, message) for each thing wrong."""

    def __init__(
        self,
        problems: str | Sequence[Problem],
        source: str | None = None,
        origins: Mapping[str, str] | None = None,
    ):
        listed = (("", problems),) if isinstance(problems, str) else problems
        self.problems: tuple[Problem, ...] = tuple(listed)
        self.source = source
        super().__init__(_format_problems(self.problems, source, origins or {}))


def _format_problems(problems: Sequence[Problem], source: str | None, origins: Mapping[str, str]) -> str:
    lines = [f"invalid configuration{f' in {source}' if source else ''}:"]
    for key, message in problems:
        origin = _origin_of(key, origins)
        label = f"{key} (from {origin})" if key and origin else key
        lines.append(f"  - {label}: {message}" if label else f"  - {message}")
    return "\n".join(lines)


def _origin_of(key: str, origins: Mapping[str, str]) -> str | None:
    """The override or flag that set `key` or the section holding it; None when the value is the file's."""
    while key:
        if key in origins:
            return origins[key]
        key = key[: max(key.rfind("."), key.rfind("["), 0)]
    return None


# -- validation helpers ------------------------------------------------------------------------------


def bounds(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    multiple_of: int | None = None,
    expected: str = "",
) -> Iterator[Problem]:
    """A problem when `value` is not finite, outside [low, high] or not a multiple of `multiple_of`."""
    broken = (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
        or (multiple_of is not None and value % multiple_of != 0)
    )
    if broken:
        yield name, f"must be {expected or _expected(value, low, high, multiple_of)}, got {value!r}"


def _expected(value: float, low: float | None, high: float | None, multiple_of: int | None) -> str:
    if low is not None and high is not None:
        text = f"in {low}..{high}" if isinstance(value, int) else f"in [{low}, {high}]"
    elif low is not None:
        text = f">= {low}"
    elif high is not None:
        text = f"<= {high}"
    else:
        text = "a finite number"
    return f"a multiple of {multiple_of} {text}" if multiple_of else text


def choice(name: str, value: str, choices: Sequence[str]) -> Iterator[Problem]:
    if value not in choices:
        suggestion = did_you_mean(value, choices)
        yield name, f"unknown value {value!r}{suggestion}; choose one of {', '.join(choices)}"


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def column_rule(name: str, value: Any) -> Iterator[Problem]:
    """Check a per-row default against the manifest column rule of the same name."""
    rule: ColumnRule = RULES[name]
    if rule.choices:
        yield from choice(name, value, rule.choices)
    else:
        yield from bounds(name, value, rule.low, rule.high, rule.multiple_of, rule.expected)


def text_length(name: str, value: str | None) -> Iterator[Problem]:
    """Check a per-row default text against the manifest column's max_length."""
    rule: ColumnRule = RULES[name]
    if value is not None and rule.max_length is not None and len(value) > rule.max_length:
        yield name, rule.length_problem(len(value))


def not_empty(name: str, value: str) -> Iterator[Problem]:
    if not value.strip():
        yield name, "must not be empty"


class Checked:
    """Validates on construction: an instance that exists is a valid one."""

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError(problems)

    def _problems(self) -> Iterator[Problem]:
        return iter(())


def described(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a section (mapping)"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
