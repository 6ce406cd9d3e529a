"""Noise-schedule math shared by the samplers: betas, alphas_cumprod, sigmas and timestep spacing.

Everything here runs once per `start()` on the host and follows diffusers' arithmetic op for op (float32 torch
where diffusers uses torch, float64 numpy where it uses numpy) so the schedules match bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sd_core.schedulers.config import SchedulerConfig

KARRAS_RHO = 7.0


def betas(config: SchedulerConfig, rescale_zero_snr: bool = False) -> torch.Tensor:
    """The training betas (float32), optionally rescaled to zero terminal SNR."""
    steps = config.num_train_timesteps
    if config.trained_betas is not None:
        result = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        result = torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        result = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float32) ** 2
    else:
        result = _cosine_betas(steps)
    return _rescale_zero_terminal_snr(result) if rescale_zero_snr else result


def _cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """ "squaredcos_cap_v2": betas of the cosine alpha-bar schedule (Nichol & Dhariwal)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    values = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(values, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv 2305.08891)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(config: SchedulerConfig, rescale_zero_snr: bool = False) -> torch.Tensor:
    """alpha-bar per training timestep (float32)."""
    return torch.cumprod(1.0 - betas(config, rescale_zero_snr), dim=0)


def sigma_alphas_cumprod(config: SchedulerConfig, rescale_zero_snr: bool = False) -> torch.Tensor:
    """`alphas_cumprod` as diffusers' sigma-based schedulers keep it: a zero terminal value is floored at
    2**-24 so the last sigma stays finite."""
    result = alphas_cumprod(config, rescale_zero_snr)
    if rescale_zero_snr:
        result[-1] = 2**-24
    return result


def training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha-bar) / alpha-bar) per training timestep, ascending (float32)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int) -> np.ndarray:
    """`n` descending training timesteps as diffusers' set_timesteps spaces them (float64, "linspace" ones
    unrounded)."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, n)[::-1].copy()
    if spacing == "leading":
        leading = (np.arange(0, n) * (num_train_timesteps // n)).round()[::-1] + steps_offset
        return leading.astype(np.float64)
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)) - 1


def multistep_timesteps(
    spacing: str, num_train_timesteps: int, n: int, steps_offset: int, last_timestep: int
) -> np.ndarray:
    """DPM-Solver / UniPC spacing (int64): "linspace" and "leading" space n+1 points below `last_timestep` and
    drop the lowest; "trailing" steps down from `last_timestep` by num_train_timesteps / n."""
    if spacing == "trailing":
        steps = np.arange(last_timestep, 0, -num_train_timesteps / n).round() - 1
    else:
        steps = spaced_timesteps(spacing, last_timestep, n + 1, steps_offset)[:-1].round()
    return steps.astype(np.int64)


def interpolated_sigmas(timesteps: np.ndarray, sigmas: torch.Tensor) -> np.ndarray:
    """The training sigmas linearly interpolated at (possibly fractional) timesteps (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas.numpy())


def karras_sigmas(
    in_sigmas: np.ndarray, n: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> np.ndarray:
    """Karras et al. (2022) rho=7 spacing of n sigmas between `in_sigmas`' ends (or the given bounds)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigmas_to_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the given sigmas, interpolating log-sigma (float64)."""
    return np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])


def _sigma_to_t(sigma: np.floating, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def smallest_training_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The sigma of training timestep 0: the last sigma when final_sigmas_type="sigma_min"."""
    return ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5


def with_final_sigma(sigmas: np.ndarray, final_sigma: float | torch.Tensor) -> torch.Tensor:
    """The step sigmas with the sigma after the last step appended, as float32 on the CPU."""
    return torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32))


def noised_at_alpha(alpha_cumprod: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) at alpha-bar `alpha_cumprod` (computed in the samples' dtype)."""
    alpha = alpha_cumprod.to(z0.dtype)
    return alpha**0.5 * z0 + (1 - alpha) ** 0.5 * noise
