"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler with predict_x0: each step first corrects
the current sample with the new model output (UniC), then predicts the next one (UniP), both of the B(h) kind
"bh1"/"bh2", with the order ramping up over the run and down at the end (lower_order_final)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sd_core.diffusers_config import unsupported
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

# diffusers' __init__ maps these DPM-Solver solver types onto bh2.
_BH2_ALIASES = ("midpoint", "heun", "logrho")


@dataclass(frozen=True)
class UniPCConfig(SchedulerConfig):
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None

    DIFFUSERS_CLASS: ClassVar[str] = "UniPCMultistepScheduler"
    UNSUPPORTED: ClassVar[Mapping[str, Any]] = {
        "predict_x0": True,
        "thresholding": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "shift_terminal": None,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver_type in _BH2_ALIASES:
            object.__setattr__(self, "solver_type", "bh2")
        check_choice(self, "solver_type", ("bh1", "bh2"))
        check_choice(self, "final_sigmas_type", FINAL_SIGMAS_TYPES)
        if self.solver_type == "bh1" and self.final_sigmas_type == "zero":
            # diffusers' bh1 step to sigma 0 multiplies an infinite B(h) by zero and returns NaN.
            why = "'bh2' when final_sigmas_type='zero' (diffusers returns NaN there)"
            raise unsupported(self.DIFFUSERS_CLASS, "solver_type", "bh1", why)
        if self.solver_order >= 3 and not self.lower_order_final and self.final_sigmas_type == "zero":
            # The last step's log-SNR gap is infinite, which makes diffusers' order >= 3 system singular.
            why = "True when solver_order >= 3 and final_sigmas_type='zero' (diffusers fails there)"
            raise unsupported(self.DIFFUSERS_CLASS, "lower_order_final", False, why)
        if self.solver_order < 1:
            raise unsupported(self.DIFFUSERS_CLASS, "solver_order", self.solver_order, "1 or more")


def unipc_schedule(config: UniPCConfig, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """(n+1 sigmas as float32 on the CPU, n int64 timesteps), as UniPCMultistepScheduler.set_timesteps."""
    alphas = sigma_alphas_cumprod(config, config.rescale_betas_zero_snr)
    train = config.num_train_timesteps
    timesteps = multistep_timesteps(config.timestep_spacing, train, n, config.steps_offset, train)
    train_sigmas = training_sigmas(alphas)
    sigma_min_final = config.final_sigmas_type == "sigma_min"
    if config.use_karras_sigmas:
        sigmas, fractional = karras_schedule(train_sigmas.numpy(), n, config.sigma_min, config.sigma_max)
        timesteps = fractional.round()
        final_sigma = sigmas[-1] if sigma_min_final else 0  # here "sigma_min" repeats the last Karras sigma
    else:
        sigmas = interpolated_sigmas(timesteps, train_sigmas)
        final_sigma = smallest_training_sigma(alphas) if sigma_min_final else 0
    return with_final_sigma(sigmas, final_sigma), timesteps.astype(np.int64)


@dataclass(frozen=True)
class _BhUpdate:
    """One UniP or UniC update from schedule step s0 to t: its scalars (0-d float32 on the CPU, computed
    as diffusers computes them) and `rhos`, the weights of the data-prediction differences (on the run's
    device)."""

    sigma_ratio: torch.Tensor  # sigma_t / sigma_s0 (VP sigmas)
    alpha_t: torch.Tensor
    h_phi_1: torch.Tensor  # expm1(-h)
    b_h: torch.Tensor  # B(h)
    rks: list[torch.Tensor]  # (lambda_si - lambda_s0) / h at the earlier steps s1, s2, ...
    rhos: torch.Tensor | None  # None for a first-order UniP

    @property
    def order(self) -> int:
        return len(self.rks) + 1


def _bh_update(
    sigmas: torch.Tensor, s0: int, t: int, order: int, corrector: bool, bh1: bool, device: torch.device
) -> _BhUpdate:
    """The UniP (corrector=False) or UniC update of the given order from schedule step s0 to t."""
    alpha_t, sigma_t = alpha_sigma(sigmas[t])
    _, sigma_s0 = alpha_sigma(sigmas[s0])
    lambda_s0 = log_snr(sigmas[s0])
    h = log_snr(sigmas[t]) - lambda_s0
    rks = [(log_snr(sigmas[s0 - k]) - lambda_s0) / h for k in range(1, order)]
    hh = -h
    h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
    b_h = hh if bh1 else torch.expm1(hh)
    # The order conditions R @ rhos = b (Zhao et al. 2023, Theorem 3.1), built exactly as diffusers does.
    all_rks = torch.stack([*rks, torch.ones(())])
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    powers, b = [], []
    for i in range(1, order + 1):
        powers.append(torch.pow(all_rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R, b = torch.stack(powers), torch.stack(b)
    half = torch.tensor([0.5])  # diffusers' fixed weight where the system would be 1x1
    if corrector:
        rhos = half if order == 1 else torch.linalg.solve(R, b)
    else:
        rhos = None if order == 1 else half if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    rhos = None if rhos is None else rhos.to(device)
    return _BhUpdate(sigma_t / sigma_s0, alpha_t, h_phi_1, b_h, rks, rhos)


def _weighted_history(rhos: torch.Tensor, rks: list[torch.Tensor], x0s: list[torch.Tensor]) -> torch.Tensor:
    """sum_k rhos[k] * (x0s[-k-2] - x0s[-1]) / rks[k]."""
    newest = x0s[-1]
    differences = torch.stack([(x0s[-(k + 2)] - newest) / rk for k, rk in enumerate(rks)], dim=1)
    return torch.einsum("k,bkc...->bc...", rhos, differences)


class UniPCRun(VPRun):
    def __init__(self, config: UniPCConfig, settings: RunSettings):
        sigmas, timesteps = unipc_schedule(config, settings.num_inference_steps)
        super().__init__(sigmas, timesteps, settings)
        self.config = config
        self._predictors: list[_BhUpdate] = []
        self._correctors: list[_BhUpdate | None] = []  # step i corrects the sample step i-1 predicted
        bh1, device = config.solver_type == "bh1", settings.device
        for i in range(self.num_steps):
            index = self.schedule_index(i)
            order = config.solver_order
            if config.lower_order_final:
                order = min(order, self._schedule_length - index)
            order = min(order, i + 1)  # warm-up: no more than the data predictions made so far
            corrector = None
            if i > 0 and index - 1 not in config.disable_corrector:
                previous_order = self._predictors[-1].order
                corrector = _bh_update(sigmas, index - 1, index, previous_order, True, bh1, device)
            self._correctors.append(corrector)
            self._predictors.append(_bh_update(sigmas, index, index + 1, order, False, bh1, device))
        self._x0s: list[torch.Tensor] = []  # data predictions, newest last, at most solver_order
        self._last_sample: torch.Tensor | None = None  # the sample the previous step predicted from

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        sigma = self._sigmas[self.schedule_index(i)]
        x0 = x0_from_prediction(self.config.prediction_type, model_out, x, sigma)
        corrector = self._correctors[i]
        if corrector is not None:
            x = self._corrected(corrector, x0)
        self._x0s = [*self._x0s, x0][-self.config.solver_order :]
        self._last_sample = x
        return self._predicted(self._predictors[i], x)

    def _predicted(self, update: _BhUpdate, x: torch.Tensor) -> torch.Tensor:
        """UniP: extrapolate the data predictions from x to the next step."""
        x_t = update.sigma_ratio * x - update.alpha_t * update.h_phi_1 * self._x0s[-1]
        if update.rhos is not None:
            residual = _weighted_history(update.rhos.to(x.dtype), update.rks, self._x0s)
            x_t = x_t - update.alpha_t * update.b_h * residual
        return x_t.to(x.dtype)

    def _corrected(self, update: _BhUpdate, x0: torch.Tensor) -> torch.Tensor:
        """UniC: redo the previous step's prediction with this step's data prediction `x0` included."""
        x = self._last_sample
        x_t = update.sigma_ratio * x - update.alpha_t * update.h_phi_1 * self._x0s[-1]
        rhos = update.rhos.to(x.dtype)
        residual = rhos[-1] * (x0 - self._x0s[-1])
        if update.rks:
            residual = _weighted_history(rhos[:-1], update.rks, self._x0s) + residual
        return (x_t - update.alpha_t * update.b_h * residual).to(x.dtype)
