"""Euler and Euler ancestral (Karras et al. 2022 / k-diffusion), as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler. Euler never churns (img2img passes s_churn=0), so it draws no noise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sd_core.diffusers_config import unsupported
from sd_core.schedulers.config import FINAL_SIGMAS_TYPES, SchedulerConfig, check_choice
from sd_core.schedulers.run import RunSettings, randn_rows
from sd_core.schedulers.sigma_space import SigmaSpaceRun, sigma_schedule, x0_from_prediction


@dataclass(frozen=True)
class EulerConfig(SchedulerConfig):
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    DIFFUSERS_CLASS: ClassVar[str] = "EulerDiscreteScheduler"
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "original_sample")
    UNSUPPORTED: ClassVar[Mapping[str, Any]] = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "final_sigmas_type", FINAL_SIGMAS_TYPES)
        check_choice(self, "timestep_type", ("discrete", "continuous"))
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            raise unsupported(
                self.DIFFUSERS_CLASS, "timestep_type", "continuous", "'discrete' for v_prediction"
            )


@dataclass(frozen=True)
class EulerAncestralConfig(SchedulerConfig):
    rescale_betas_zero_snr: bool = False

    DIFFUSERS_CLASS: ClassVar[str] = "EulerAncestralDiscreteScheduler"
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")


def euler_to(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma, from sigma to sigma_to."""
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_to - sigma)


class EulerRun(SigmaSpaceRun):
    def __init__(self, config: EulerConfig, settings: RunSettings):
        sigmas, timesteps = sigma_schedule(
            config,
            settings.num_inference_steps,
            rescale_zero_snr=config.rescale_betas_zero_snr,
            karras=config.use_karras_sigmas,
            sigma_min=config.sigma_min,
            sigma_max=config.sigma_max,
            final_sigma_min=config.final_sigmas_type == "sigma_min",
        )
        super().__init__(sigmas, timesteps, settings)
        self.config = config

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = self.sigma(i)
        x0 = x0_from_prediction(self.config.prediction_type, model_out, x, sigma)
        return euler_to(x, x0, sigma, self.sigma(i + 1)).to(model_out.dtype)


class EulerAncestralRun(SigmaSpaceRun):
    def __init__(self, config: EulerAncestralConfig, settings: RunSettings):
        n = settings.num_inference_steps
        sigmas, timesteps = sigma_schedule(config, n, rescale_zero_snr=config.rescale_betas_zero_snr)
        super().__init__(sigmas, timesteps, settings)
        self.config = config

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x = x.to(torch.float32)
        x0 = x0_from_prediction(self.config.prediction_type, model_out, x, sigma)
        # Step deterministically down to sigma_down, then add fresh noise of size sigma_up.
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x_prev = euler_to(x, x0, sigma, sigma_down)
        return (x_prev + randn_rows(model_out, generators) * sigma_up).to(model_out.dtype)
