"""PNDM (Liu et al. 2022), as diffusers' PNDMScheduler: 12 Runge-Kutta (PRK) warm-up steps, then the
4th-order linear multistep PLMS; with skip_prk_steps, PLMS alone warmed up by a pseudo-Heun second step.

The step-counter logic follows diffusers exactly, including where img2img's entry point makes it use timesteps
from the start of the full schedule (PRK) or split the duplicated second timestep (PLMS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sd_core.schedulers.config import SchedulerConfig
from sd_core.schedulers.ddim import integer_timesteps
from sd_core.schedulers.noise_schedule import alphas_cumprod, noised_at_alpha
from sd_core.schedulers.run import RunSettings, SchedulerRun

PNDM_ORDER = 4


@dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"

    DIFFUSERS_CLASS: ClassVar[str] = "PNDMScheduler"
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")


def pndm_timesteps(config: PNDMConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(PRK timesteps, then PLMS timesteps), each descending, as diffusers' set_timesteps lays them out."""
    ascending = integer_timesteps(config, n)[::-1]
    if config.skip_prk_steps:
        # The second-highest timestep runs twice: once as a plain step, once to redo it pseudo-Heun style.
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        return np.array([], dtype=np.int64), plms.astype(np.int64)
    if n < PNDM_ORDER:
        raise ValueError(
            f"PNDM's Runge-Kutta warm-up (skip_prk_steps=False) needs num_inference_steps >= {PNDM_ORDER}, "
            f"got {n}"
        )
    half_stride = config.num_train_timesteps // n // 2
    prk = ascending[-PNDM_ORDER:].repeat(2) + np.tile(np.array([0, half_stride]), PNDM_ORDER)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return prk.astype(np.int64), ascending[:-3][::-1].astype(np.int64)


def plms_combination(ets: list[torch.Tensor]) -> torch.Tensor:
    """The Adams-Bashforth combination of the last (up to 4) model outputs."""
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


class PNDMRun(SchedulerRun):
    def __init__(self, config: PNDMConfig, settings: RunSettings):
        prk, plms = pndm_timesteps(config, settings.num_inference_steps)
        super().__init__(np.concatenate([prk, plms]), settings)
        self.config = config
        self._prk_timesteps = prk.tolist()
        self._stride = config.num_train_timesteps // settings.num_inference_steps
        alphas = alphas_cumprod(config)
        self._final_alpha = torch.tensor(1.0) if config.set_alpha_to_one else alphas[0]
        # Where diffusers has them once add_noise ran: the table on the device, the final alpha on the CPU.
        self._alphas = alphas.to(settings.device)
        self._ets: list[torch.Tensor] = []  # past raw model outputs
        self._rk_sum: torch.Tensor | None = None  # PRK: weighted sum of this step's stage outputs
        self._first_sample: torch.Tensor | None = None  # the sample a multi-stage step started from

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noised_at_alpha(self._alphas[self._host_timesteps[0]], z0, noise)

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        if i < len(self._prk_timesteps):
            return self._prk_step(model_out, i, x)
        return self._plms_step(model_out, i, x)

    def _prk_step(self, model_out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        stage = i % 4
        prev_t = self._host_timesteps[i] - (0 if i % 2 else self._stride // 2)
        t = self._prk_timesteps[i // 4 * 4]
        if stage == 0:
            self._rk_sum = 1 / 6 * model_out
            self._ets.append(model_out)
            self._first_sample = x
        elif stage in (1, 2):
            self._rk_sum = self._rk_sum + 1 / 3 * model_out
        else:
            model_out = self._rk_sum + 1 / 6 * model_out
            self._rk_sum = None
        return self._transfer(self._first_sample, t, prev_t, model_out)

    def _plms_step(self, model_out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        t = self._host_timesteps[i]
        prev_t = t - self._stride
        if i == 1:  # the pseudo-Heun redo of step 0, from step 0's sample
            prev_t, t = t, t + self._stride
            model_out = (model_out + self._ets[-1]) / 2
            x = self._first_sample
        else:
            self._ets = [*self._ets[-3:], model_out]
            if i == 0:
                self._first_sample = x
            else:
                model_out = plms_combination(self._ets)
        return self._transfer(x, t, prev_t, model_out)

    def _transfer(self, x: torch.Tensor, t: int, prev_t: int, model_out: torch.Tensor) -> torch.Tensor:
        """PNDM's transfer x_t -> x_prev_t along the DDIM ODE for a noise prediction (formula 9)."""
        alpha = self._alphas[t]
        alpha_prev = self._alphas[prev_t] if prev_t >= 0 else self._final_alpha
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        if self.config.prediction_type == "v_prediction":
            model_out = (alpha**0.5) * model_out + (beta**0.5) * x
        sample_coeff = (alpha_prev / alpha) ** (0.5)
        denom = alpha * beta_prev ** (0.5) + (alpha * beta * alpha_prev) ** (0.5)
        return sample_coeff * x - (alpha_prev - alpha) * model_out / denom
