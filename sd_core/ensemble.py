"""SDXL's ensemble of experts in one process: a base model denoises the schedule down to a switch point,
a refiner the rest, the latents handed over in memory (diffusers' `denoising_end` / `denoising_start`
recipe, with both models on the same sampler and step count).

Where the row's strength starts below the switch point the base has nothing to do and the refiner runs
the whole img2img; where no step falls below it, the base runs alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sd_core.call_args import FAMILY_OPTIONS
from sd_core.pipeline import CallReport, Img2ImgPipeline


class ExpertEnsemble:
    """Callable like an Img2ImgPipeline; `switch_at` is the fraction of the schedule the base covers."""

    def __init__(self, base: Img2ImgPipeline, refiner: Img2ImgPipeline, switch_at: float):
        if isinstance(switch_at, bool) or not isinstance(switch_at, float) or not 0.0 < switch_at < 1.0:
            raise ValueError(f"switch_at must be a float strictly between 0 and 1; got {switch_at!r}")
        base_vae, refiner_vae = base.vae.config, refiner.vae.config
        if (base_vae.latent_channels, base_vae.scaling_factor) != (
            refiner_vae.latent_channels,
            refiner_vae.scaling_factor,
        ):
            raise ValueError(
                f"the refiner ({refiner.family.label}) reads latents other than the base's "
                f"({base.family.label}): latent channels / VAE scaling factor "
                f"{refiner_vae.latent_channels} / {refiner_vae.scaling_factor} vs "
                f"{base_vae.latent_channels} / {base_vae.scaling_factor}; "
                "use a refiner of the base's family"
            )
        self.base, self.refiner, self.switch_at = base, refiner, switch_at
        self.set_scheduler(base.scheduler.name)
        self.last_call = CallReport()

    @property
    def family(self):
        return self.base.family

    @property
    def scheduler(self):
        return self.base.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return self.base.vae_scale_factor

    def set_scheduler(self, name: str) -> None:
        """Both models on one sampler: their halves of the schedule must be the same schedule's."""
        self.base.set_scheduler(name)
        self.refiner.set_scheduler(name)

    def split_steps(self, num_inference_steps: int, strength: float) -> tuple[int, int]:
        """(steps the base runs, steps the refiner runs) for one call."""
        run = self.base.scheduler.start(num_inference_steps, strength)
        cutoff = run.settings.timestep_cutoff(self.switch_at)
        base_steps = int((run.timesteps >= cutoff).sum())
        return base_steps, run.num_steps - base_steps

    def __call__(self, images, prompts, **call: Any):
        """Img2ImgPipeline's call (its other arguments by keyword), the schedule split at switch_at."""
        for name in ("denoising_start", "denoising_end"):
            if call.get(name) is not None:
                raise ValueError(f"{name} is the ensemble's own (switch_at={self.switch_at}); do not pass it")
        output_type = call.pop("output_type", "pil")
        base_call, refiner_call = self._split_options(call)
        steps, strength = call.get("num_inference_steps", 50), call.get("strength", 0.8)
        base_steps, refiner_steps = self.split_steps(steps, strength)
        if base_steps == 0:  # the row's strength starts below the switch: all of it is the refiner's
            images = self.refiner(images, prompts, output_type=output_type, **refiner_call)
            self.last_call = self.refiner.last_call
            return images
        if refiner_steps == 0:
            images = self.base(images, prompts, output_type=output_type, **base_call)
            self.last_call = self.base.last_call
            return images
        latents = self.base(images, prompts, output_type="latent", denoising_end=self.switch_at, **base_call)
        first = self.base.last_call
        result = self.refiner(
            latents, prompts, output_type=output_type, denoising_start=self.switch_at, **refiner_call
        )
        second = self.refiner.last_call
        self.last_call = replace(
            first,
            steps_run=first.steps_run + second.steps_run,
            truncated_prompts=[
                a or b for a, b in zip(first.truncated_prompts, second.truncated_prompts, strict=True)
            ],
            micro_conditioning={**first.micro_conditioning, **second.micro_conditioning},
        )
        return result

    def _split_options(self, call: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The call's arguments for each model: family options go to the model(s) that take them; one that
        neither takes is an error naming both, as a single pipeline's would be."""
        base_takes, refiner_takes = self.base.family.call_options, self.refiner.family.call_options
        common = {k: v for k, v in call.items() if k not in FAMILY_OPTIONS}
        base_call, refiner_call = dict(common), dict(common)
        for name in FAMILY_OPTIONS:
            value = call.get(name)
            if value is None:
                continue
            if name not in base_takes and name not in refiner_takes:
                raise ValueError(
                    f"{name} applies to neither model: the base ({self.base.family.label}) takes "
                    f"{', '.join(base_takes) or 'none'}, the refiner ({self.refiner.family.label}) "
                    f"{', '.join(refiner_takes) or 'none'}"
                )
            if name in base_takes:
                base_call[name] = value
            if name in refiner_takes:
                refiner_call[name] = value
        return base_call, refiner_call
