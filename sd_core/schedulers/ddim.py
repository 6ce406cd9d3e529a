"""DDIM (Song et al. 2020), as diffusers' DDIMScheduler: deterministic at eta=0, DDPM-like noise for eta>0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sd_core.schedulers.config import SchedulerConfig
from sd_core.schedulers.noise_schedule import alphas_cumprod, noised_at_alpha, spaced_timesteps
from sd_core.schedulers.run import RunSettings, SchedulerRun, randn_rows


@dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    DIFFUSERS_CLASS: ClassVar[str] = "DDIMScheduler"
    UNSUPPORTED: ClassVar[Mapping[str, Any]] = {"thresholding": False}


def integer_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """The descending integer timesteps DDIM (and, ascending, PNDM) spaces."""
    spaced = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, n, config.steps_offset)
    return spaced.round().astype(np.int64)


def x0_and_eps(
    prediction_type: str, model_out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample and noise implied by a prediction at alpha-bar `alpha` (diffusers' DDIM forms)."""
    beta = 1 - alpha
    if prediction_type == "epsilon":
        return (x - beta ** (0.5) * model_out) / alpha ** (0.5), model_out
    if prediction_type == "sample":
        return model_out, (x - alpha ** (0.5) * model_out) / beta ** (0.5)
    return (alpha**0.5) * x - (beta**0.5) * model_out, (alpha**0.5) * model_out + (beta**0.5) * x


class DDIMRun(SchedulerRun):
    def __init__(self, config: DDIMConfig, settings: RunSettings):
        if settings.num_inference_steps > config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={settings.num_inference_steps} cannot exceed the model's "
                f"num_train_timesteps={config.num_train_timesteps}"
            )
        super().__init__(integer_timesteps(config, settings.num_inference_steps), settings)
        self.config = config
        alphas = alphas_cumprod(config, config.rescale_betas_zero_snr)
        final_alpha = torch.tensor(1.0) if config.set_alpha_to_one else alphas[0]
        # Where diffusers has them once add_noise ran: the table on the device, the final alpha on the CPU.
        alphas = alphas.to(settings.device)
        # Quirk kept from diffusers: the previous timestep is t - T // N even with "trailing"/"linspace".
        stride = config.num_train_timesteps // settings.num_inference_steps
        self._alphas = [alphas[t] for t in self._host_timesteps]
        self._prev_alphas = [
            alphas[t - stride] if t - stride >= 0 else final_alpha for t in self._host_timesteps
        ]

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noised_at_alpha(self._alphas[0], z0, noise)

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        alpha, alpha_prev = self._alphas[i], self._prev_alphas[i]
        x0, eps = x0_and_eps(self.config.prediction_type, model_out, x, alpha)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        eta = self.settings.eta
        variance = ((1 - alpha_prev) / (1 - alpha)) * (1 - alpha / alpha_prev)
        std = eta * variance ** (0.5)
        x_prev = alpha_prev ** (0.5) * x0 + (1 - alpha_prev - std**2) ** (0.5) * eps
        if eta > 0:
            x_prev = x_prev + std * randn_rows(model_out, generators)
        return x_prev
