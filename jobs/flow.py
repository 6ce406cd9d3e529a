"""One pass of the job as a Ray Data pipeline: read → expand → decode → denoise (actors) → write.

The driver runs a main pass and then retry rounds; each is this same flow with other settings.
"""

from __future__ import annotations

import functools
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from connectors.image_decode import DecodeOptions
from connectors.manifest import Manifest
from connectors.output import OutputSink
from connectors.storage import Storage
from jobs.config import RunConfig
from jobs.denoise_stage import Denoiser
from jobs.model_setup import PipelineFactory, core_clip_skip
from jobs.rows import expand_rows
from jobs.stages import decode_stage
from jobs.write_stage import write_stage


@dataclass(frozen=True)
class PassSettings:
    """What differs between the main pass and the retry rounds."""

    batch_size: int  # rows per core call
    rows_per_call: int  # rows per actor call, grouped by shape inside it
    one_row_blocks: bool  # the last round: a row that kills its worker takes no other row with it
    registry: Any = None  # ActorRegistry handle: the pass's actors register, the driver releases them
    skip_keys: Any = None  # ObjectRef of key strings already done
    only_keys: Any = None  # ObjectRef of key strings to redo (retry rounds)
    expected_rows: int | None = None  # for one_row_blocks


def build_pass(
    ray_data: Any, config: RunConfig, storage: Storage, manifest: Manifest, settings: PassSettings
) -> Any:
    """The Dataset of summary rows (one per processed (id, variant)) for one pass."""
    fs, _ = storage.filesystem(manifest.uri)
    files = list(manifest.dataset.files)
    data = ray_data.read_parquet(files, filesystem=fs, partitioning=_partitioning(ray_data, manifest))
    data = data.map_batches(
        _expand,
        batch_format="pyarrow",
        fn_kwargs={
            "config": config,
            "manifest_base": manifest.base_uri,
            "skip": [settings.skip_keys],
            "only": [settings.only_keys],
        },
    )
    if settings.one_row_blocks:
        data = data.repartition(max(1, settings.expected_rows or 1))
    data = data.map_batches(
        decode_stage,
        batch_format="pyarrow",
        batch_size=settings.rows_per_call,
        fn_kwargs={"storage": storage, "options": DecodeOptions()},
    )
    with warnings.catch_warnings():
        # Bounded actor-task retries are only reachable through `ray_remote_args` in Ray 2.60, which warns
        # that it will move to named parameters in 2.64; Ray is pinned, so the warning is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        data = _denoise(data, ray_data, config, settings)
    sink = OutputSink(storage, config.output)
    return data.map_batches(
        write_stage,
        batch_format="pyarrow",
        batch_size=1 if settings.one_row_blocks else config.compute.rows_per_part,
        fn_kwargs={
            "sink": sink,
            "output_format": config.defaults.output_format,
            "quality": config.defaults.quality,
            "prompt_syntax": config.defaults.prompt_syntax,
            "clip_skip": config.model.clip_skip,
            "eta": config.defaults.eta,
        },
    )


def _denoise(data: Any, ray_data: Any, config: RunConfig, settings: PassSettings) -> Any:
    """The GPU actor pool stage."""
    compute = config.compute
    return data.map_batches(
        Denoiser,
        batch_format="pyarrow",
        batch_size=settings.rows_per_call,
        fn_constructor_args=(
            PipelineFactory(config),
            settings.batch_size,
            config.defaults.eta,
            core_clip_skip(config.model.clip_skip),
            settings.registry,
            config.defaults.prompt_syntax,
        ),
        compute=ray_data.ActorPoolStrategy(
            min_size=compute.actors_min,
            max_size=compute.actors_max,
            # In the isolation round an actor holds one task at a time: when a row kills it, no queued
            # batch-mate task dies with it (and burns its retries).
            max_tasks_in_flight_per_actor=1 if settings.one_row_blocks else None,
        ),
        num_gpus=compute.gpus_per_actor,
        num_cpus=compute.cpus_per_actor,
        # A dead actor is replaced, but the task that was running on it is retried only this often:
        # a row that kills its worker cannot loop forever (the retry rounds isolate it).
        max_restarts=-1,
        max_task_retries=config.retry.max_task_retries,
    )


def _partitioning(ray_data: Any, manifest: Manifest) -> Any:
    """Hive partition columns (k=v folders) become columns, as when the manifest is validated."""
    partitioning = getattr(manifest.dataset, "partitioning", None)
    if partitioning is None or len(partitioning.schema) == 0:
        return None
    base = manifest.base_uri.split("://", 1)[-1].rstrip("/")
    return ray_data.datasource.Partitioning("hive", base_dir=base)


def _expand(batch: pa.Table, config: RunConfig, manifest_base: str, skip: list, only: list) -> pa.Table:
    return expand_rows(
        batch,
        config.defaults,
        config.seed,
        manifest_base,
        skip_keys=_fetch(skip[0]),
        only_keys=_fetch(only[0]),
        allowed_roots=config.inputs.allowed_roots,
        augment=config.augment,
    )


def _fetch(ref: Any) -> pa.Array | None:
    if ref is None:
        return None
    return _fetch_cached(ref)


@functools.lru_cache(maxsize=4)
def _fetch_cached(ref: Any) -> pa.Array:
    import ray

    return ray.get(ref)


REGISTRY_NAMESPACE = "sdbatch"
REGISTRY_PREFIX = "sdbatch-pass-"


def make_actor_registry(ray: Any) -> Any:
    """A tiny actor the pass's GPU actors register with, so the driver can release them when the pass
    ends. Ray Data frees pool actors only once nothing references them; one lingering reference (a kept
    traceback, a logging handler holding records) would keep a GPU busy into the next retry round.

    It is named `sdbatch-pass-<hex>` in the `sdbatch` namespace, so an operator (or a chaos test) can
    find the pass's actors: `ray.get_actor(name, namespace="sdbatch").members.remote()`."""

    @ray.remote(num_cpus=0)
    class ActorRegistry:
        def __init__(self) -> None:
            self.handles: list[Any] = []

        def add(self, handle: Any) -> None:
            self.handles.append(handle)

        def members(self) -> list[Any]:
            return list(self.handles)

        def drain(self) -> list[Any]:
            handles, self.handles = self.handles, []
            return handles

    name = REGISTRY_PREFIX + uuid.uuid4().hex[:12]
    return ActorRegistry.options(name=name, namespace=REGISTRY_NAMESPACE).remote()


def release_actors(ray: Any, registry: Any) -> int:
    """Kill the actors registered in `registry`, then the registry itself; returns how many."""
    handles = ray.get(registry.drain.remote())
    for handle in handles:
        ray.kill(handle)
    ray.kill(registry)
    return len({handle._actor_id for handle in handles})
