"""Build the ready pipeline inside an actor: fetch the model and adapters, load, pin, warm up."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from connectors.storage import Storage
from jobs.config import AdaptersConfig, RunConfig
from jobs.infotext import run_identity
from jobs.model_cache import cached_sha256, local_copy

log = logging.getLogger("sdbatch")

WARMUP_SIZE = 64  # one tiny call compiles kernels and allocates workspaces before real rows arrive


def resolve_device(config: RunConfig) -> str:
    import torch

    wanted = config.compute.device
    if wanted != "auto":
        return wanted
    if config.compute.gpus_per_actor == 0:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if config.compute.gpus_per_actor:  # None: a pool never sized for a cluster (the core used directly)
        log.warning(
            "this actor holds a GPU but torch %s sees no CUDA device (a CPU build of torch, or no driver): "
            "it runs on the CPU; install a CUDA build of torch on the workers, or set "
            "compute.gpus_per_actor: 0",
            torch.__version__,
        )
    return "cpu"


def dtype_name(name: str, device: str) -> str:
    """A configured dtype on `device`: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


def resolve_dtype(name: str | None, device: str):
    import torch

    return None if name is None else getattr(torch, dtype_name(name, device))


@dataclass
class PipelineFactory:
    """Picklable recipe the actor calls once: returns (pipeline, model_info). With a `refiner` section
    the pipeline is an ExpertEnsemble of the base and the refiner, both pinned and warmed up."""

    config: RunConfig

    def __call__(self) -> tuple[Any, dict[str, Any]]:
        import torch

        config = self.config
        storage = Storage(config.storage.to_options(config.retry))
        device = resolve_device(config)
        if device == "cpu" and config.compute.cpus_per_actor >= 1:
            torch.set_num_threads(max(1, int(config.compute.cpus_per_actor)))
        model = config.model
        model_path = local_copy(model.path, storage)
        base, base_loras = self._load(model_path, model.config, config.adapters, storage, device)
        info: dict[str, Any] = {
            "family": base.family.name,
            "model_sha256": cached_sha256(model_path),
            "adapters": adapters_json(base.adapters),
            "refiner_sha256": None,
            "refiner_adapters": None,
            "refiner_switch_at": None,
            "device": device,
        }
        pipe, stages, refiner_file = base, [base], None
        if config.refiner is not None:
            from sd_core.ensemble import ExpertEnsemble

            section = config.refiner
            refiner_path = local_copy(section.path, storage)
            refiner, _ = self._load(refiner_path, section.config, section.adapters, storage, device)
            pipe, stages = ExpertEnsemble(base, refiner, config.refiner.switch_at), [base, refiner]
            info.update(
                refiner_sha256=cached_sha256(refiner_path),
                refiner_adapters=adapters_json(refiner.adapters),
                refiner_switch_at=config.refiner.switch_at,
            )
            refiner_file = (refiner_path, info["refiner_sha256"])
        for stage in stages:
            if model.compile:
                stage.compile_unet()
            _warm_up(stage, config)
        info["scheduler"] = pipe.scheduler.name
        # A1111's names and short hashes for the images' infotext; not metadata (no fingerprint, no resume)
        info["a1111_identity"] = run_identity(
            pipe.scheduler, (model_path, info["model_sha256"]), refiner_file, base.adapters, base_loras
        )
        return pipe, info

    def _load(
        self, path: str, config_uri: str | None, adapters: AdaptersConfig, storage: Storage, device: str
    ) -> tuple[Any, list[tuple[str, float, float | None]]]:
        """One model loaded with its adapters fused and its embeddings added, and its LoRAs as loaded:
        (local path, scale, text-encoder scale or None)."""
        from sd_core import Img2ImgPipeline

        model = self.config.model
        pipe = Img2ImgPipeline.from_pretrained(
            path,
            device=device,
            dtype=resolve_dtype(model.dtype, device),
            scheduler=model.scheduler,
            vae_dtype=resolve_dtype(model.vae_dtype, device),
            prediction_type=model.prediction_type,
            allow_pickle=model.allow_pickle,
            config=local_copy(config_uri, storage) if config_uri else None,
        )
        loras = [(local_copy(a.path, storage), a.scale, a.text_encoder_scale) for a in adapters.loras]
        if loras:
            pipe.load_loras(loras, allow_pickle=model.allow_pickle)
        for embedding in adapters.embeddings:
            pipe.load_textual_inversion(
                local_copy(embedding.path, storage), token=embedding.token, allow_pickle=model.allow_pickle
            )
        return pipe, loras


def core_clip_skip(clip_skip: int) -> int | None:
    """The config counts like A1111 (1 = last layer, 2 = the one before); the core counts layers skipped."""
    return None if clip_skip <= 1 else clip_skip - 1


def warm_up_shape(config: RunConfig, vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """(rows, height, width) of the warm-up call: tiny, or with a compiled UNet the batch the job will run
    most (a full batch at the configured output size), so its graph is compiled before rows arrive."""
    defaults = config.defaults
    if not (config.model.compile and defaults.width and defaults.height):
        return 1, WARMUP_SIZE, WARMUP_SIZE
    floor = vae_scale_factor
    return config.compute.batch_size, defaults.height // floor * floor, defaults.width // floor * floor


def _warm_up(pipe: Any, config: RunConfig) -> None:
    import torch

    rows, height, width = warm_up_shape(config, pipe.vae_scale_factor)
    pipe(
        torch.full((rows, 3, height, width), 0.5),
        ["warm-up"] * rows,
        strength=1.0,
        num_inference_steps=1,
        seeds=list(range(rows)),
        guidance_scale=config.defaults.guidance_scale if config.model.compile else 2.0,
        clip_skip=core_clip_skip(config.model.clip_skip),
    )


def adapters_json(adapters: Sequence[Any]) -> str:
    """The pinned adapters as a compact JSON list for metadata (kind, name, sha256, scales, tokens)."""
    return json.dumps(
        [
            {
                "kind": a.kind,
                "name": a.name,
                "sha256": a.sha256,
                "scales": dict(a.scales),  # component -> scale applied
                "tokens": list(a.tokens) if a.tokens else [],
            }
            for a in adapters
        ],
        sort_keys=True,
    )
