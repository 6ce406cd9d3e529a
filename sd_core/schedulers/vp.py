"""What DPM-Solver++ and UniPC share: samples kept at x = alpha_t * x0 + sigma_t * eps (variance preserving),
steps in log-SNR lambda = log(alpha_t / sigma_t), and model outputs converted to data (x0) predictions."""

from __future__ import annotations

import numpy as np
import torch

from sd_core.schedulers.noise_schedule import karras_sigmas, sigmas_to_timesteps
from sd_core.schedulers.run import RunSettings, SchedulerRun


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process with noise-to-signal ratio `sigma`."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t) - log(sigma_t): +inf at sigma = 0."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def x0_from_prediction(
    prediction_type: str, model_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The data prediction from a model output at x = alpha_t * x0 + sigma_t * eps."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_t * model_out) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * model_out
    return model_out


def karras_schedule(
    train_sigmas: np.ndarray, n: int, sigma_min: float | None, sigma_max: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(n Karras sigmas spanning the whole training range, their fractional timesteps)."""
    sigmas = karras_sigmas(np.flip(train_sigmas).copy(), n, sigma_min, sigma_max)
    return sigmas, sigmas_to_timesteps(sigmas, np.log(train_sigmas))


class VPRun(SchedulerRun):
    """A run over `sigmas` (one per schedule position plus the final one), float32 on the CPU like diffusers:
    per-step scalars are computed from them exactly as diffusers does and reach device kernels by value."""

    def __init__(self, sigmas: torch.Tensor, timesteps: np.ndarray, settings: RunSettings):
        super().__init__(timesteps, settings)
        self._sigmas = sigmas
        self._schedule_length = len(timesteps)

    def schedule_index(self, i: int) -> int:
        """Position of executed step `i` in the full schedule."""
        return self.begin_index + i

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = alpha_sigma(self._sigmas[self.begin_index].to(z0.dtype))
        return alpha_t * z0 + sigma_t * noise
