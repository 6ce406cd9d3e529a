"""LMS: 4th-order linear multistep in sigma (k-diffusion's sample_lms), as diffusers' LMSDiscreteScheduler.

diffusers integrates each Lagrange basis polynomial with scipy.integrate.quad, evaluating it on float32
tensors. On a polynomial quad stops after its first rule, QUADPACK's 21-point Gauss-Kronrod (exact up to
degree 31); we apply that rule to the same float32 integrand without scipy, which reproduces diffusers'
coefficients bit for bit (an exact float64 integral differs from them by up to 2 float32 ulps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sd_core.schedulers.config import SchedulerConfig
from sd_core.schedulers.run import RunSettings
from sd_core.schedulers.sigma_space import SigmaSpaceRun, sigma_schedule, x0_from_prediction

LMS_ORDER = 4
# QUADPACK qk21 abscissae on [0, 1] (the last is the centre) and their Gauss-Kronrod weights.
_KRONROD_HALF_NODES = np.array([
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
    0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
    0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
    0.294392862701460198131126603103866, 0.148874338981631210884826001129720,
    0.0,
])  # fmt: skip
_KRONROD_HALF_WEIGHTS = np.array([
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
    0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
    0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077208846736073, 0.134709217311473325928054001771707,
    0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
])  # fmt: skip
_KRONROD_NODES = np.concatenate([-_KRONROD_HALF_NODES[:-1], _KRONROD_HALF_NODES[::-1]])
_KRONROD_WEIGHTS = np.concatenate([_KRONROD_HALF_WEIGHTS[:-1], _KRONROD_HALF_WEIGHTS[::-1]])


@dataclass(frozen=True)
class LMSConfig(SchedulerConfig):
    use_karras_sigmas: bool = False

    DIFFUSERS_CLASS: ClassVar[str] = "LMSDiscreteScheduler"
    UNSUPPORTED: ClassVar[Mapping[str, Any]] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}


def lms_coefficient(sigmas: np.ndarray, order: int, t: int, current_order: int) -> float:
    """The integral from sigmas[t] to sigmas[t+1] of the Lagrange basis polynomial through
    sigmas[t], ..., sigmas[t-order+1] that is 1 at sigmas[t-current_order] (`sigmas`: float32)."""
    a, b = float(sigmas[t]), float(sigmas[t + 1])
    centre, half_length = 0.5 * (a + b), 0.5 * (b - a)
    taus = (centre + half_length * _KRONROD_NODES).astype(np.float32)
    basis = np.ones_like(taus)
    for k in range(order):
        if k != current_order:
            basis *= (taus - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
    return float(half_length * np.dot(_KRONROD_WEIGHTS, basis.astype(np.float64)))


class LMSRun(SigmaSpaceRun):
    def __init__(self, config: LMSConfig, settings: RunSettings):
        n = settings.num_inference_steps
        sigmas, timesteps = sigma_schedule(config, n, karras=config.use_karras_sigmas)
        super().__init__(sigmas, timesteps, settings)
        self.config = config
        self._coefficients = [self._step_coefficients(sigmas.numpy(), i) for i in range(self.num_steps)]
        self._derivatives: list[torch.Tensor] = []  # newest last, at most LMS_ORDER

    def _step_coefficients(self, sigmas: np.ndarray, i: int) -> list[float]:
        """The weights of the newest..oldest derivatives at executed step `i`.

        Quirk kept from diffusers: the polynomial's order counts schedule positions (min(index + 1, 4)), not
        the steps this run has taken, so an img2img run's first steps use the leading coefficients of a
        higher-order rule.
        """
        index = self.begin_index + i
        order = min(index + 1, LMS_ORDER)
        available = min(i + 1, LMS_ORDER)
        return [lms_coefficient(sigmas, order, index, j) for j in range(min(order, available))]

    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        sigma = self.sigma(i)
        x0 = x0_from_prediction(self.config.prediction_type, model_out, x, sigma)
        self._derivatives = [*self._derivatives[-(LMS_ORDER - 1) :], (x - x0) / sigma]
        update = sum(c * d for c, d in zip(self._coefficients[i], reversed(self._derivatives), strict=True))
        return x + update
