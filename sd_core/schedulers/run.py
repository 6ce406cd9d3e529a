"""One img2img denoising pass of a scheduler: which timesteps run, and the per-step state of the sampler."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RunSettings:
    """`Scheduler.start`'s arguments: the full schedule's length, img2img strength, device, DDIM's eta."""

    num_inference_steps: int
    strength: float
    device: torch.device
    eta: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if int(self.num_inference_steps * self.strength) == 0:
            raise ValueError(
                f"strength*num_inference_steps < 1 runs zero denoising steps (strength={self.strength}, "
                f"num_inference_steps={self.num_inference_steps}); raise strength or steps"
            )

    @property
    def begin_index(self) -> int:
        """Where img2img enters the schedule (diffusers' get_timesteps; every scheduler here has order 1)."""
        init_timestep = min(int(self.num_inference_steps * self.strength), self.num_inference_steps)
        return max(self.num_inference_steps - init_timestep, 0)


class SchedulerRun(ABC):
    """The executed part of a schedule and the sampler's state; steps must run in order 0..num_steps-1.

    `timesteps` are the values the UNet gets (diffusers' img2img `timesteps`, same dtype) on the run's device.
    """

    def __init__(self, schedule_timesteps: np.ndarray, settings: RunSettings):
        self.settings = settings
        self.begin_index = settings.begin_index
        executed = schedule_timesteps[self.begin_index :]
        self._host_timesteps = executed.tolist()  # Python numbers, to index tables without device syncs
        self.timesteps = torch.from_numpy(executed.copy()).to(settings.device)
        self._next_step = 0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @abstractmethod
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Clean latents noised to the first executed timestep."""

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet input for step `i`; identity unless the sampler keeps sigma-scaled samples."""
        return x

    def step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """The sample after step `i`, given the UNet prediction at `x`. `generators` (one per batch row) feed
        the stochastic samplers' noise."""
        if i != self._next_step:
            raise ValueError(f"scheduler steps must run in order: expected step {self._next_step}, got {i}")
        self._next_step += 1
        return self._step(model_out, i, x, generators)

    @abstractmethod
    def _step(
        self, model_out: torch.Tensor, i: int, x: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> torch.Tensor: ...


def randn_rows(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Noise shaped like `like`, drawn as diffusers' randn_tensor does for a generator list: one draw per row
    on its generator's device (CPU generators draw on the CPU), so a row depends only on its own generator."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"need one generator per batch row, got {len(generators)} for {like.shape[0]} rows")
    shape = (1, *like.shape[1:])
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=like.dtype) for g in generators]
    return torch.cat(rows).to(like.device)
