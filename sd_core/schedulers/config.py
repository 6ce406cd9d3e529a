"""Scheduler configs: the noise-schedule fields every sampler shares, and diffusers' `from_config` reading.

Each sampler's config is a frozen dataclass whose fields are exactly the `__init__` keys of the diffusers
class it mirrors (with that class's defaults), so a scheduler_config.json written for *any* scheduler class
resolves the way `DiffusersClass.from_config(config_dict)` would: known keys are used, unknown keys are
ignored, absent keys take the class default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from sd_core.diffusers_config import as_tuples, unsupported

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class SchedulerConfig:
    """Fields common to all eight diffusers classes, with their shared defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    # The diffusers class this config mirrors, named in error messages.
    DIFFUSERS_CLASS: ClassVar[str] = ""
    # Prediction types the diffusers class steps with.
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    # Keys the diffusers class knows whose non-default values change the math in a way we don't implement:
    # key -> the one value we support.
    UNSUPPORTED: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.trained_betas is None:
            check_choice(self, "beta_schedule", BETA_SCHEDULES)
        check_choice(self, "timestep_spacing", TIMESTEP_SPACINGS)
        check_choice(self, "prediction_type", self.PREDICTION_TYPES)


def check_choice(config: SchedulerConfig, key: str, choices: tuple[Any, ...]) -> None:
    """ValueError naming the key, its value and the supported values unless `config.key` is in `choices`."""
    value = getattr(config, key)
    if value not in choices:
        raise unsupported(config.DIFFUSERS_CLASS, key, value, ", ".join(repr(c) for c in choices))


ConfigT = TypeVar("ConfigT", bound=SchedulerConfig)


def resolve_config(
    config_type: type[ConfigT], config_dict: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ConfigT:
    """`config_type` read from a scheduler_config.json dict, as `from_config(config_dict, **overrides)`.

    Like diffusers, keys listed in "_use_default_values" count as absent. Raises ValueError for a key whose
    value changes the math in a way we don't implement (see `UNSUPPORTED`).
    """
    use_defaults = set(config_dict.get("_use_default_values", ()))
    given = {k: v for k, v in config_dict.items() if k not in use_defaults and not k.startswith("_")}
    given.update(overrides or {})
    for key, supported_value in config_type.UNSUPPORTED.items():
        if key in given and given[key] != supported_value:
            raise unsupported(config_type.DIFFUSERS_CLASS, key, given[key], repr(supported_value))
    known = {f.name for f in dataclasses.fields(config_type)}
    return config_type(**{k: as_tuples(v) for k, v in given.items() if k in known})
