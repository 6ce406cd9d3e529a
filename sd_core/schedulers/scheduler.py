"""The eight img2img samplers by name, each built from any diffusers scheduler_config.json like its
diffusers class's `from_config` would build it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sd_core.schedulers.config import SchedulerConfig, resolve_config
from sd_core.schedulers.ddim import DDIMConfig, DDIMRun
from sd_core.schedulers.dpm_solver import DPMSolverConfig, DPMSolverRun
from sd_core.schedulers.euler import EulerAncestralConfig, EulerAncestralRun, EulerConfig, EulerRun
from sd_core.schedulers.lms import LMSConfig, LMSRun
from sd_core.schedulers.pndm import PNDMConfig, PNDMRun
from sd_core.schedulers.run import RunSettings, SchedulerRun
from sd_core.schedulers.unipc import UniPCConfig, UniPCRun


@dataclass(frozen=True)
class _Sampler:
    config_type: type[SchedulerConfig]
    run_type: type[SchedulerRun]
    overrides: Mapping[str, Any] = field(default_factory=dict)  # from_config keyword arguments of the name


_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SAMPLERS: dict[str, _Sampler] = {
    "ddim": _Sampler(DDIMConfig, DDIMRun),
    "pndm": _Sampler(PNDMConfig, PNDMRun),
    "euler": _Sampler(EulerConfig, EulerRun),
    "euler_a": _Sampler(EulerAncestralConfig, EulerAncestralRun),
    "dpmpp_2m": _Sampler(DPMSolverConfig, DPMSolverRun, {**_DPM_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": _Sampler(DPMSolverConfig, DPMSolverRun, {**_DPM_2M, "use_karras_sigmas": True}),
    "lms": _Sampler(LMSConfig, LMSRun),
    "unipc": _Sampler(UniPCConfig, UniPCRun),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


@dataclass(frozen=True)
class Scheduler:
    """A sampler and its resolved config; `start` begins one img2img pass with fresh state."""

    name: str
    config: SchedulerConfig

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    def with_prediction_type(self, prediction_type: str) -> Scheduler:
        """This scheduler for a model predicting `prediction_type` whatever its config says."""
        config = dataclasses.replace(self.config, prediction_type=prediction_type)
        return dataclasses.replace(self, config=config)

    def start(
        self,
        num_inference_steps: int,
        strength: float,
        device: str | torch.device = "cpu",
        eta: float = 0.0,
        *,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> SchedulerRun:
        """A run of the last `int(num_inference_steps * strength)` steps of a `num_inference_steps` schedule,
        or, with `denoising_start` / `denoising_end` (fractions in (0, 1)), of the steps between those points
        of the schedule (base and refiner each run their part of one schedule).

        `eta` is DDIM's noise weight (0: deterministic); as in diffusers' pipeline, other samplers ignore it.
        Raises ValueError unless 0 <= strength <= 1 and at least one step runs.
        """
        settings = RunSettings(
            num_inference_steps,
            strength,
            torch.device(device),
            eta,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            num_train_timesteps=self.config.num_train_timesteps,
        )
        return _SAMPLERS[self.name].run_type(self.config, settings)


def make_scheduler(name: str, config_dict: Mapping[str, Any]) -> Scheduler:
    """The sampler `name` built from a diffusers scheduler_config.json dict (of any scheduler class)."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    sampler = _SAMPLERS[name]
    return Scheduler(name, resolve_config(sampler.config_type, config_dict, sampler.overrides))


_SCHEDULER_BY_CLASS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LMSDiscreteScheduler": "lms",
    "UniPCMultistepScheduler": "unipc",
}


def default_scheduler_name(config: dict) -> str:
    """Our name for the scheduler a model ships with."""
    cls = config.get("_class_name", "")
    if cls == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if config.get("use_karras_sigmas") else "dpmpp_2m"
    if cls not in _SCHEDULER_BY_CLASS:
        raise ValueError(
            f"the model's scheduler {cls or '(unnamed)'} has no sdbatch equivalent; "
            f"pass scheduler= one of {', '.join(SCHEDULER_NAMES)}"
        )
    return _SCHEDULER_BY_CLASS[cls]
