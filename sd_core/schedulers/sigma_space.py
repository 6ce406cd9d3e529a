"""What Euler, Euler ancestral and LMS share: samples kept at x = x0 + sigma * eps (k-diffusion's view), a
sigma per step interpolated from the training schedule, and UNet inputs scaled back by 1/sqrt(sigma^2 + 1)."""

from __future__ import annotations

import numpy as np
import torch

from sd_core.schedulers.config import SchedulerConfig
from sd_core.schedulers.noise_schedule import (
    interpolated_sigmas,
    karras_sigmas,
    sigma_alphas_cumprod,
    sigmas_to_timesteps,
    smallest_training_sigma,
    spaced_timesteps,
    training_sigmas,
    with_final_sigma,
)
from sd_core.schedulers.run import RunSettings, SchedulerRun


def sigma_schedule(
    config: SchedulerConfig,
    n: int,
    *,
    rescale_zero_snr: bool = False,
    karras: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma_min: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """(n+1 sigmas as float32 on the CPU, n float32 timesteps), as Euler/EulerA/LMS set_timesteps make."""
    alphas = sigma_alphas_cumprod(config, rescale_zero_snr)
    train_sigmas = training_sigmas(alphas)
    spaced = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    timesteps = spaced.astype(np.float32)
    sigmas = interpolated_sigmas(timesteps, train_sigmas)
    if karras:
        # Between this schedule's own first and last sigma; the timesteps become fractional.
        sigmas = karras_sigmas(sigmas, n, sigma_min, sigma_max)
        timesteps = sigmas_to_timesteps(sigmas, np.log(train_sigmas.numpy())).astype(np.float32)
    final_sigma = smallest_training_sigma(alphas) if final_sigma_min else 0.0
    return with_final_sigma(sigmas, final_sigma), timesteps


def x0_from_prediction(
    prediction_type: str, model_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The denoised sample from a prediction at x = x0 + sigma * eps (the UNet saw x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return x - sigma * model_out
    if prediction_type == "v_prediction":
        return model_out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return model_out


class SigmaSpaceRun(SchedulerRun):
    """A run over `sigmas` (one per schedule position plus the final one, float32 on the CPU like diffusers:
    scalars from it reach device kernels by value, without copies or syncs)."""

    def __init__(self, sigmas: torch.Tensor, timesteps: np.ndarray, settings: RunSettings):
        super().__init__(timesteps, settings)
        self._sigmas = sigmas

    def sigma(self, i: int) -> torch.Tensor:
        """The sigma of executed step `i` (i = num_steps gives the final one)."""
        return self._sigmas[self.begin_index + i]

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return z0 + noise * self.sigma(0).to(z0.dtype)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / ((self.sigma(i) ** 2 + 1) ** 0.5)
