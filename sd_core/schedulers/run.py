"""One img2img denoising pass of a scheduler: which timesteps run, and the per-step state of the sampler."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RunSettings:
    """`Scheduler.start`'s arguments: the full schedule's length, img2img strength, device, DDIM's eta, and
    the ensemble-of-experts cut-offs (diffusers' SDXL `denoising_start` / `denoising_end`)."""

    num_inference_steps: int
    strength: float
    device: torch.device
    eta: float = 0.0
    denoising_start: float | None = None  # run only timesteps below this fraction of training time
    denoising_end: float | None = None  # stop before timesteps below this fraction
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        for name in ("denoising_start", "denoising_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a fraction strictly between 0 and 1, got {value}")
        if self.denoising_start is not None and self.denoising_end is not None:
            if self.denoising_start >= self.denoising_end:
                raise ValueError(
                    f"denoising_start ({self.denoising_start}) must be below denoising_end "
                    f"({self.denoising_end}): together they select the part of the schedule between them"
                )
        elif self.denoising_start is None and int(self.num_inference_steps * self.strength) == 0:
            raise ValueError(
                f"strength*num_inference_steps < 1 runs zero denoising steps (strength={self.strength}, "
                f"num_inference_steps={self.num_inference_steps}); raise strength or steps"
            )

    @property
    def begin_index(self) -> int:
        """Where img2img's strength enters the schedule (diffusers' get_timesteps; every scheduler here has
        order 1). Not used when denoising_start is set."""
        init_timestep = min(int(self.num_inference_steps * self.strength), self.num_inference_steps)
        return max(self.num_inference_steps - init_timestep, 0)

    def timestep_cutoff(self, fraction: float) -> int:
        """The training timestep a denoising fraction stands for (diffusers' discrete_timestep_cutoff)."""
        return int(round(self.num_train_timesteps - fraction * self.num_train_timesteps))

    def executed_range(self, schedule_timesteps: np.ndarray) -> tuple[int, int]:
        """(begin, end) positions of the steps this run executes in the full schedule.

        With denoising_start, the run begins at the first timestep below its cutoff (strength is ignored,
        and the caller adds no noise: the input is already partly denoised); with denoising_end it stops
        before the first timestep below that cutoff, as diffusers' SDXL pipelines do.
        """
        if self.denoising_start is None:
            begin = self.begin_index
        else:
            below = int((schedule_timesteps < self.timestep_cutoff(self.denoising_start)).sum())
            begin = len(schedule_timesteps) - below
        end = len(schedule_timesteps)
        if self.denoising_end is not None:
            kept = schedule_timesteps[begin:] >= self.timestep_cutoff(self.denoising_end)
            end = begin + int(kept.sum())
        if end <= begin:
            raise ValueError(
                f"denoising_start={self.denoising_start}, denoising_end={self.denoising_end} leave none of "
                f"the {self.num_inference_steps} steps to run; widen the range or raise num_inference_steps"
            )
        return begin, end


class SchedulerRun(ABC):
    """The executed part of a schedule and the sampler's state; steps must run in order 0..num_steps-1.

    `timesteps` are the values the UNet gets (diffusers' img2img `timesteps`, same dtype) on the run's device.
    """

    def __init__(self, schedule_timesteps: np.ndarray, settings: RunSettings):
        self.settings = settings
        self.begin_index, end = settings.executed_range(schedule_timesteps)
        executed = schedule_timesteps[self.begin_index : end]
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
