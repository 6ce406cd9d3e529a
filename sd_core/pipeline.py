"""Img2ImgPipeline: SDEdit for every family (SD 1.x/2.x, SDXL base and refiner) with per-row seeds and
guidance; the same math as diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline
(encode, noise to the strength's timestep, denoise, decode). The family is data the flow is given
(sd_core.families): its text towers, its micro-conditioning, its VAE rules."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from sd_core.adapters import AdapterInfo
from sd_core.adapters.lora import FuseReport, LoadedLora, fuse_loras, load_lora_file
from sd_core.adapters.lora_export import save_lora_peft
from sd_core.adapters.lora_targets import UNET, targets_of
from sd_core.adapters.textual_inversion import add_embedding_to_towers, load_embedding_file
from sd_core.call_args import CallArgs, resolve_call_args
from sd_core.denoiser import Denoiser, guide
from sd_core.images import images_to_tensor, tensor_to_output
from sd_core.loading import ModelParts, load_model_parts
from sd_core.micro_conditioning import resolved_values, time_ids
from sd_core.prompt_encoder import PromptEncoder
from sd_core.schedulers import default_scheduler_name, make_scheduler
from sd_core.schedulers.run import randn_rows
from sd_core.speed import compile_forward, distinct_rows, set_memory_format
from sd_core.text_encoder import TowerEncoder, build_text_encoder
from sd_core.unet import UNet, UNetConfig
from sd_core.vae import AutoencoderKL, VAEConfig
from sd_core.weights import load_checked


class NonFiniteOutputError(RuntimeError):
    """The denoiser or the VAE produced NaN/Inf (or an all-black image from them)."""


def _build(module_cls, config, weights: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    with torch.device("meta"):
        module = module_cls(config)
    return load_checked(module, weights, name)


@dataclass
class CallReport:
    """What the last call did, for records: rows the VAE encoder ran on (repeats count once), steps run,
    the first timestep, prompts cut at 77 tokens, and the micro-conditioning values used (SDXL)."""

    encoded_images: int = 0
    steps_run: int = 0
    start_timestep: float | None = None
    truncated_prompts: list[bool] = field(default_factory=list)
    micro_conditioning: dict[str, list[Any]] = field(default_factory=dict)


class Img2ImgPipeline:
    """Stable Diffusion image-to-image for SD 1.x, SD 2.x and SDXL (base and refiner).

    Every output row has its own seed and CPU generator, consumed in diffusers' order (posterior
    sample, initial noise, per-step noise), so a row's image does not depend on its batch.
    """

    def __init__(
        self,
        parts: ModelParts,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: str | None = None,
        vae_dtype: torch.dtype | None = None,
        prediction_type: str | None = None,
        channels_last: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.family = parts.family
        self.source = parts.source
        self.configs = {name: dict(config) for name, config in parts.configs.items()}
        self.pipeline_flags = dict(parts.flags)  # model_index.json's (force_zeros_for_empty_prompt, ...)
        self.scheduler_config = self.configs["scheduler"]
        self.prediction_type = prediction_type
        self.unet = _build(UNet, UNetConfig.from_dict(parts.configs["unet"]), parts.weights["unet"], "UNet")
        self.unet.to(self.device, dtype)
        vae_config = VAEConfig.from_dict(parts.configs["vae"])
        self.vae_dtype = vae_dtype or self._default_vae_dtype(vae_config)
        self.vae = _build(AutoencoderKL, vae_config, parts.weights["vae"], "VAE")
        self.vae.to(self.device, self.vae_dtype)
        towers = []
        for tower in self.family.towers:
            name = tower.component
            model = build_text_encoder(parts.configs[name], parts.weights[name], tower.projection)
            tokenizer = parts.tokenizers[tower.tokenizer]
            towers.append(TowerEncoder(tower, tokenizer, model.to(self.device, dtype)))
        self.prompt_encoder = PromptEncoder(self.family, towers, parts.zero_negatives)
        self.set_scheduler(scheduler or default_scheduler_name(self.scheduler_config))
        self.vae_batch_size: int | None = None
        self._float32_vae: AutoencoderKL | None = None  # made on the first float16 overflow
        self.last_call = CallReport()
        self.set_channels_last(channels_last)
        self.adapters: list[AdapterInfo] = []
        self._loras: list[tuple[LoadedLora, float, float | None]] = []  # kept for save_lora

    def _default_vae_dtype(self, vae_config: VAEConfig) -> torch.dtype:
        """The pipeline's dtype, except float32 for a float16 run of a family whose pipelines honour the
        VAE's force_upcast (SDXL: its original VAE overflows in float16), as diffusers does."""
        if self.dtype == torch.float16 and self.family.vae_force_upcast and vae_config.force_upcast:
            return torch.float32
        return self.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: str | None = None,
        *,
        vae_dtype: torch.dtype | None = None,
        prediction_type: str | None = None,
        allow_pickle: bool = False,
        config: str | Path | None = None,
        channels_last: bool = False,
    ) -> Img2ImgPipeline:
        """Load a diffusers folder or a single CompVis/SGM checkpoint (safetensors; pickles only with
        allow_pickle), of any family; `pipe.family` says which. `config` names a diffusers folder whose
        configs a single file should use. `channels_last` stores the convolution weights NHWC."""
        parts = load_model_parts(path, allow_pickle=allow_pickle, config=config)
        return cls(
            parts,
            device,
            dtype,
            scheduler,
            vae_dtype=vae_dtype,
            prediction_type=prediction_type,
            channels_last=channels_last,
        )

    # -- configuration -------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.scale_factor_spatial

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text towers' models by component ("text_encoder", "text_encoder_2")."""
        return {t.tower.component: t.model for t in self.prompt_encoder.towers}

    @property
    def tokenizers(self) -> dict[str, Any]:
        """The text towers' tokenizers by component name ("tokenizer", "tokenizer_2")."""
        return {t.tower.tokenizer: t.tokenizer for t in self.prompt_encoder.towers}

    @property
    def tokenizer(self):
        """The first text tower's tokenizer."""
        return self.prompt_encoder.towers[0].tokenizer

    @property
    def text_encoder(self):
        """The first text tower's model (SDXL's refiner has only text_encoder_2)."""
        return self.prompt_encoder.towers[0].model

    def set_scheduler(self, name: str) -> None:
        """Switch sampler by name: ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lms, unipc."""
        scheduler = make_scheduler(name, self.scheduler_config)
        if self.prediction_type:
            scheduler = scheduler.with_prediction_type(self.prediction_type)
        self.scheduler = scheduler

    def enable_attention_slicing(self, slice_size: int | None = 1) -> None:
        """Compute attention a slice of heads at a time: less memory, a little slower. None turns it off."""
        self.unet.set_attention_slice(slice_size)
        self.vae.set_attention_slice(slice_size)

    def set_channels_last(self, enabled: bool = True) -> None:
        """Store UNet and VAE convolution weights channels-last (NHWC); the results are the same up to float
        rounding. Off by default: bench/ measured no gain, eager, on CPU fp32 or an H200 in bf16."""
        set_memory_format([self.unet, self.vae], enabled)
        self.channels_last = enabled

    def compile_unet(self, mode: str | None = None) -> None:
        """torch.compile the UNet's forward (opt-in: each new batch shape and image size compiles once, tens
        of seconds; warm it up at the shapes to come). `mode` as torch.compile's, e.g. "max-autotune"."""
        compile_forward(self.unet, mode)

    def enable_vae_slicing(self, batch_size: int | None = 1) -> None:
        """Decode `batch_size` latents at a time (None: the whole batch): bounds the VAE decoder's memory,
        which grows with batch x image area, at little cost in speed."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.vae_batch_size = batch_size

    def enable_vae_tiling(self, enabled: bool = True) -> None:
        """Encode and decode large images in overlapping tiles (diffusers' algorithm)."""
        if enabled:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    # -- adapters ------------------------------------------------------------------------------

    def load_lora(
        self,
        path: str | Path,
        scale: float = 1.0,
        text_encoder_scale: float | None = None,
        *,
        strict: bool = True,
        allow_pickle: bool = False,
    ) -> FuseReport:
        """Fuse a LoRA / LoCon / LoHa / LoKr file (kohya, PEFT or LyCORIS keys) into the weights now.
        `scale` is the UNet's, `text_encoder_scale` (default: `scale`) every text tower's. Unmatched keys
        are an error unless strict=False."""
        return self.load_loras([(path, scale, text_encoder_scale)], strict=strict, allow_pickle=allow_pickle)[
            0
        ]

    def load_loras(
        self,
        specs: Sequence[tuple[str | Path, float, float | None]],
        *,
        strict: bool = True,
        allow_pickle: bool = False,
    ) -> tuple[FuseReport, ...]:
        """Fuse several LoRAs, given as (path, scale, text_encoder_scale or None), in one pass: each weight
        gets the fp32 sum of its deltas and one cast back to the model dtype. Keys are read in this
        model's names (its family's kohya prefixes, CompVis/sgm or diffusers block names, PEFT components)."""
        models = {UNET: self.unet, **self.text_encoders}
        targets = targets_of(models, self.family)
        loras = [(load_lora_file(Path(p), allow_pickle, targets), s, ts) for p, s, ts in specs]
        reports = fuse_loras(models, loras, strict=strict)
        self.prompt_encoder.clear_cache()  # cached negatives predate the text-encoder deltas
        self._loras += loras
        for (lora, _, _), report in zip(loras, reports, strict=True):
            self.adapters.append(AdapterInfo("lora", lora.name, lora.sha256, scales=dict(report.scales)))
        return reports

    def save_lora(self, path: str | Path) -> None:
        """Write the sum of every loaded LoRA, at its scales, as one PEFT/diffusers-format .safetensors."""
        if not self._loras:
            raise ValueError("no LoRA is loaded: load_lora() first")
        save_lora_peft(self._loras, Path(path), models={UNET: self.unet, **self.text_encoders})

    def load_textual_inversion(
        self,
        path: str | Path,
        token: str | None = None,
        *,
        allow_override: bool = False,
        allow_pickle: bool = False,
    ) -> AdapterInfo:
        """Add a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds, bare
        tensor with `token`; on SDXL a clip_l + clip_g file, each tower getting its tensor). A k-vector
        token `tok` is written `tok tok_1 ... tok_{k-1}` in prompts."""
        embedding = load_embedding_file(Path(path), token=token, allow_pickle=allow_pickle)
        towers = self.prompt_encoder.towers
        tokens = add_embedding_to_towers(towers, self.family, embedding, allow_override=allow_override)
        self.prompt_encoder.clear_cache()  # cached negatives were encoded before the new tokens existed
        info = AdapterInfo("textual_inversion", embedding.token, embedding.sha256, tokens=tuple(tokens))
        self.adapters.append(info)
        return info

    # -- the call ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[PIL.Image.Image] | torch.Tensor,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str | None] | None = None,
        strength: float = 0.8,
        guidance_scale: float | Sequence[float] = 7.5,
        num_inference_steps: int = 50,
        seeds: int | Sequence[int] | None = None,
        eta: float = 0.0,
        clip_skip: int | None = None,
        output_type: str = "pil",
        *,
        prompts_2: str | Sequence[str | None] | None = None,
        negative_prompts_2: str | Sequence[str | None] | None = None,
        original_size: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        target_size: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        crops_coords_top_left: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        negative_original_size: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        negative_target_size: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
        aesthetic_score: float | Sequence[float | None] | None = None,
        negative_aesthetic_score: float | Sequence[float | None] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_rescale: float | Sequence[float] = 0.0,
        prompt_syntax: str = "plain",
    ):
        """Edit `images` towards `prompts`; one output per row.

        images: PIL images (sides floored to multiples of the VAE factor, as diffusers does), a float
        tensor [B, 3, H, W] in [0, 1], or latents [B, 4, h, w] (an `output_type="latent"` result: the
        base -> refiner hand-off). guidance_scale, guidance_rescale, seeds, negative prompts and the SDXL
        micro-conditioning may be per-row lists. SDXL takes `prompts_2` / `negative_prompts_2` (the
        second text encoder's; default: the first's), `original_size`, `crops_coords_top_left` and
        `target_size` (base) or `aesthetic_score` (refiner), and their negative_* counterparts; another
        family refuses them. `denoising_start` / `denoising_end` run only that part of the schedule
        (ensemble of experts; with denoising_start the input is taken as partly denoised latents and no
        noise is added, strength is unused). `prompt_syntax="a1111"` reads A1111's `(word:1.2)` weights
        and encodes long prompts in 75-token chunks; "plain" (default) is diffusers' (cut at 77 tokens).
        Returns PIL images, an np array [B, H, W, 3] in [0, 1], a tensor [B, 3, H, W] ('pt'), or
        latents ('latent'). `last_call` reports what the call did.
        """
        family_options = {
            "prompts_2": prompts_2,
            "negative_prompts_2": negative_prompts_2,
            "original_size": original_size,
            "target_size": target_size,
            "crops_coords_top_left": crops_coords_top_left,
            "negative_original_size": negative_original_size,
            "negative_target_size": negative_target_size,
            "negative_crops_coords_top_left": negative_crops_coords_top_left,
            "aesthetic_score": aesthetic_score,
            "negative_aesthetic_score": negative_aesthetic_score,
        }
        args = resolve_call_args(
            self.family,
            self.prompt_encoder.max_clip_skip,
            prompts,
            negative_prompts,
            strength,
            guidance_scale,
            num_inference_steps,
            seeds,
            eta,
            clip_skip,
            output_type,
            guidance_rescale=guidance_rescale,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            prompt_syntax=prompt_syntax,
            family_options=family_options,
        )
        given_latents = self._is_latent_input(images)
        start = images.float() if given_latents else images_to_tensor(images, self.vae_scale_factor)
        if start.shape[0] != len(args.prompts):
            raise ValueError(
                f"got {start.shape[0]} images but {len(args.prompts)} prompts; give one prompt per image"
            )
        latents = self.denoise(start, args, given_latents)
        if args.output_type == "latent":
            return latents
        decoded = self.decode_safely(latents)
        self._check_finite(decoded, "the VAE decoder", None if given_latents else start)
        return tensor_to_output(decoded, args.output_type)

    def _is_latent_input(self, images) -> bool:
        """A float tensor with the latent channel count is latents (diffusers' rule: images have 3)."""
        channels = self.vae.config.latent_channels
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == channels):
            return False
        if not images.is_floating_point():
            raise ValueError(f"latents must be a float tensor [B, {channels}, h, w], not {images.dtype}")
        return True

    def denoise(self, start: torch.Tensor, args: CallArgs, given_latents: bool = False) -> torch.Tensor:
        """The SDEdit loop: pixels [B,3,H,W] in [-1,1] (or latents [B,4,h,w]) -> denoised latents."""
        run = self.scheduler.start(
            args.num_inference_steps,
            args.strength,
            device=self.device,
            eta=args.eta,
            denoising_start=args.denoising_start,
            denoising_end=args.denoising_end,
        )
        generators = [torch.Generator("cpu").manual_seed(s) for s in args.seeds]
        text = self.prompt_encoder.encode(args.prompts, args.prompts_2, args.clip_skip, args.prompt_syntax)
        report = CallReport(steps_run=run.num_steps, start_timestep=float(run.timesteps[0]))
        report.truncated_prompts = text.truncated
        if given_latents:
            clean = start.to(self.device, self.dtype)
        else:
            clean, report.encoded_images = self.encode(start, generators)
        image_size = (clean.shape[-2] * self.vae_scale_factor, clean.shape[-1] * self.vae_scale_factor)
        positive_ids, negative_ids = self._time_ids(args, image_size, report)
        ids = positive_ids
        if args.uses_cfg:
            uncond = self.prompt_encoder.encode_negative(
                args.negative_prompts, args.negative_prompts_2, text, args.prompt_syntax
            )
            text = uncond.cat(text)
            ids = None if ids is None else torch.cat([negative_ids, positive_ids])
        denoiser = Denoiser(self.unet, text.to(self.dtype), ids)
        scales = torch.tensor(args.guidance_scales, dtype=self.dtype, device=self.device).view(-1, 1, 1, 1)
        rescales = None
        if any(r > 0 for r in args.guidance_rescales):
            rescales = torch.tensor(args.guidance_rescales, dtype=self.dtype, device=self.device)
            rescales = rescales.view(-1, 1, 1, 1)
        latents = clean
        if args.denoising_start is None:  # else the input is partly denoised already (no noise: diffusers)
            latents = run.add_noise(clean, randn_rows(clean, generators))
        for i, t in enumerate(run.timesteps):
            model_in = run.scale_model_input(torch.cat([latents, latents]) if args.uses_cfg else latents, i)
            prediction = denoiser(model_in, t)
            if args.uses_cfg:
                prediction = guide(prediction, scales, rescales)
            latents = run.step(prediction, i, latents, generators)
        self._check_finite(latents, "the UNet", None)
        self.last_call = report
        return latents

    def _time_ids(
        self, args: CallArgs, image_size: tuple[int, int], report: CallReport
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """SDXL's (positive, negative) micro-conditioning ids [B, k]; (None, None) for other families."""
        spec = self.family.time_ids
        if spec is None:
            return None, None
        resolved = resolved_values(spec, args.micro_conditioning, image_size, len(args.prompts))
        report.micro_conditioning = resolved
        return time_ids(spec, resolved, self.dtype, self.device)

    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, int]:
        """Pixels in [-1, 1] -> (scaled latents, images the encoder ran on), the posterior sampled row by row
        with each row's generator. Repeated images (variants of one input) are encoded once; each row
        still draws its own sample."""
        distinct, index = distinct_rows(pixels.to(self.device, self.vae_dtype))
        posterior = self.vae.encode(distinct)
        if index is not None:
            posterior = posterior.take(index)
        latents = (self.vae.config.scaling_factor * posterior.sample_rows(generators)).to(self.dtype)
        return latents, distinct.shape[0]

    def decode(self, latents: torch.Tensor, vae: AutoencoderKL | None = None) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] (before clamping), `vae_batch_size` rows at a time if set; by `vae`
        (in its own dtype) instead of the pipeline's if given."""
        vae = vae or self.vae
        z = (latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)
        if self.vae_batch_size is None or z.shape[0] <= self.vae_batch_size:
            return vae.decode(z)
        return torch.cat([vae.decode(part) for part in z.split(self.vae_batch_size)])

    def decode_safely(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode`, then rows a float16 VAE overflowed on (NaN/Inf, which SD's VAE decoder is known for)
        decoded again by a float32 copy of the VAE: fp16 speed for the rows that fit, no black images."""
        decoded = self.decode(latents)
        if self.vae_dtype != torch.float16:
            return decoded
        overflowed = ~torch.isfinite(decoded.flatten(1)).all(dim=1)
        if not overflowed.any():  # one device sync per call
            return decoded
        if self._float32_vae is None:
            self._float32_vae = copy.deepcopy(self.vae).float()
        fallback = self._float32_vae
        fallback.tile_sample_size, fallback.tile_overlap = self.vae.tile_sample_size, self.vae.tile_overlap
        decoded = decoded.float()
        decoded[overflowed] = self.decode(latents[overflowed], fallback)
        return decoded

    def _check_finite(self, tensor: torch.Tensor, stage: str, inputs: torch.Tensor | None) -> None:
        flat = tensor.flatten(1)
        bad = (~torch.isfinite(flat).all(dim=1)).nonzero().flatten().tolist()
        if inputs is not None:  # an all-black decode of a non-black input is the other symptom of overflow
            black = (flat.amax(dim=1) <= -1.0) & (inputs.flatten(1).amax(dim=1).to(flat.device) > -1.0)
            bad = sorted(set(bad) | set(black.nonzero().flatten().tolist()))
        if not bad:
            return
        hint = (
            "the VAE overflows in float16 for some images: load with vae_dtype=torch.float32"
            if stage == "the VAE decoder" and self.vae_dtype == torch.float16
            else "half precision overflowed: use dtype=torch.bfloat16 or torch.float32"
            if self.dtype == torch.float16
            else "the weights may be corrupt or the wrong model family for this config"
        )
        raise NonFiniteOutputError(
            f"{stage} produced NaN/Inf or black output for rows {bad}; likely cause: {hint}"
        )

    # -- export --------------------------------------------------------------------------------

    def save_single_file(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the pipeline as one CompVis-layout .safetensors file (loads in A1111, ComfyUI, diffusers)."""
        from sd_core.export import save_single_file

        save_single_file(self, Path(path), dtype)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the pipeline as a diffusers folder (model_index.json, unet/, vae/, ...)."""
        from sd_core.export import save_diffusers_folder

        save_diffusers_folder(self, Path(folder), dtype)
