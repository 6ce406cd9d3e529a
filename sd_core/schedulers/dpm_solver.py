"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++" and solver_order=2, optionally on Karras sigmas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sd_core.schedulers.config import FINAL_SIGMAS_TYPES, SchedulerConfig, check_choice
from sd_core.schedulers.noise_schedule import (
    interpolated_sigmas,
    multistep_timesteps,
    sigma_alphas_cumprod,
    smallest_training_sigma,
    training_sigmas,
    with_final_sigma,
)
from sd_core.schedulers.run import RunSettings
from sd_core.schedulers.vp import VPRun, alpha_sigma, karras_schedule, log_snr, x0_from_prediction

# diffusers' __init__ maps these UniPC / DEIS solver types onto midpoint.
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")


@dataclass(frozen=True)
class DPMSolverConfig(SchedulerConfig):
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    rescale_betas_zero_snr: bool = False
    # Not DPMSolverMultistepScheduler arguments, but from_config keeps unknown keys in its config and its
    # Karras conversion reads them from there (so a UniPC or Euler config's bounds apply).
    sigma_min: float | None = None
    sigma_max: float | None = None

    DIFFUSERS_CLASS: ClassVar[str] = "DPMSolverMultistepScheduler"
    # "algorithm_type" and "solver_order" are fixed by the sampler name (from_config overrides).
    UNSUPPORTED: ClassVar[Mapping[str, Any]] = {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "thresholding": False,
        "variance_type": None,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_type in _MIDPOINT_ALIASES:
            object.__setattr__(self, "solver_type", "midpoint")
        check_choice(self, "solver_type", ("midpoint", "heun"))
        check_choice(self, "final_sigmas_type", FINAL_SIGMAS_TYPES)


def dpm_solver_schedule(config: DPMSolverConfig, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """(n+1 sigmas as float32 on the CPU, n int64 timesteps), as DPMSolverMultistepScheduler.set_timesteps."""
    alphas = sigma_alphas_cumprod(config, config.rescale_betas_zero_snr)
    lambdas = torch.log(torch.sqrt(alphas)) - torch.log(torch.sqrt(1 - alphas))
    clipped = torch.searchsorted(torch.flip(lambdas, [0]), config.lambda_min_clipped)
    last_timestep = (config.num_train_timesteps - clipped).item()
    timesteps = multistep_timesteps(
        config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset, last_timestep
    )
    train_sigmas = training_sigmas(alphas)
    if config.use_karras_sigmas:
        sigmas, fractional = karras_schedule(train_sigmas.numpy(), n, config.sigma_min, config.sigma_max)
        timesteps = fractional if config.beta_schedule == "squaredcos_cap_v2" else fractional.round()
    else:
        sigmas = interpolated_sigmas(timesteps, train_sigmas)
    final_sigma = smallest_training_sigma(alphas) if config.final_sigmas_type == "sigma_min" else 0
    return with_final_sigma(sigmas, final_sigma), timesteps.astype(np.int64)


class DPMSolverRun(VPRun):
    def __init__(self, config: DPMSolverConfig, settings: RunSettings):
        sigmas, timesteps = dpm_solver_schedule(config, settings.num_inference_steps)
        super().__init__(sigmas, timesteps, settings)
        self.config = config
        self._previous_x0: torch.Tensor | None = None

    def _first_order_at(self, index: int) -> bool:
        """Whether the schedule's step `index` falls back to first order (diffusers' lower_order_final)."""
        if index != self._schedule_length - 1:
            return False
        config = self.config
        short = self._schedule_length < 15
        return (
            config.euler_at_final
            or (config.lower_order_final and short)
            or config.final_sigmas_type == "zero"
        )

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        index = self.schedule_index(i)
        x0 = x0_from_prediction(self.config.prediction_type, model_out, x, self._sigmas[index])
        x = x.to(torch.float32)
        if self._previous_x0 is None or self._first_order_at(index):
            x_prev = self._first_order(x, x0, index)
        else:
            x_prev = self._second_order(x, x0, self._previous_x0, index)
        self._previous_x0 = x0
        return x_prev.to(model_out.dtype)

    def _first_order(self, x: torch.Tensor, x0: torch.Tensor, index: int) -> torch.Tensor:
        """DPM-Solver++(1), i.e. DDIM in log-SNR, from schedule step `index` to the next."""
        sigma_s, sigma_t = self._sigmas[index], self._sigmas[index + 1]
        alpha_t, sigma_t_vp = alpha_sigma(sigma_t)
        _, sigma_s_vp = alpha_sigma(sigma_s)
        h = log_snr(sigma_t) - log_snr(sigma_s)
        return (sigma_t_vp / sigma_s_vp) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0

    def _second_order(
        self, x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, index: int
    ) -> torch.Tensor:
        """The multistep second-order update using the previous step's data prediction."""
        sigma_s1, sigma_s0, sigma_t = self._sigmas[index - 1], self._sigmas[index], self._sigmas[index + 1]
        alpha_t, sigma_t_vp = alpha_sigma(sigma_t)
        _, sigma_s0_vp = alpha_sigma(sigma_s0)
        lambda_t, lambda_s0, lambda_s1 = log_snr(sigma_t), log_snr(sigma_s0), log_snr(sigma_s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d1 = (1.0 / r0) * (x0 - x0_prev)
        decay = alpha_t * (torch.exp(-h) - 1.0)
        x_prev = (sigma_t_vp / sigma_s0_vp) * x - decay * x0
        if self.config.solver_type == "midpoint":
            return x_prev - 0.5 * decay * d1
        return x_prev + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
