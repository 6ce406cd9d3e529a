"""Reading diffusers config.json dicts into our config dataclasses, refusing what we don't build."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def as_tuples(value: Any) -> Any:
    """JSON lists (nested too) as tuples, so configs compare and hash the same however they were written."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def as_lists(value: Any) -> Any:
    """Tuples (nested too) as lists, as config.json writes them."""
    return [as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def unsupported(model: str, key: str, value: Any, supported: str) -> ValueError:
    """The error for a config value we don't build: names the model, the key, its value and what works."""
    return ValueError(f"{model} config: {key}={value!r} is not supported; supported: {supported}")


def read_config(
    config: Mapping[str, Any],
    model: str,
    supported: Collection[str],
    fixed: Mapping[str, tuple[Any, ...]],
    ignored: Collection[str] = (),
) -> dict[str, Any]:
    """The `supported` entries of a diffusers config.json dict, lists turned into tuples.

    Keys starting with "_" and `ignored` keys are skipped. A `fixed` key changes the architecture in a way we
    don't build unless it holds one of its allowed values (the diffusers default); any other value, and any
    unknown key, raises ValueError naming the key, its value and what is supported.
    """
    picked = {}
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in supported:
            picked[key] = as_tuples(value)
        elif key in fixed:
            if as_tuples(value) not in fixed[key]:
                raise unsupported(model, key, value, " or ".join(repr(v) for v in fixed[key]))
        else:
            known = sorted({*supported, *fixed, *ignored})
            raise unsupported(model, key, value, f"only the keys {', '.join(known)}")
    return picked
