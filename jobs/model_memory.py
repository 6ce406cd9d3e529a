"""How much device memory an actor's model weights take, from the parameter counts the preflight read
in safetensors headers, in the dtypes the actors will load them in (`--dry-run` reports it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs.config import RunConfig
from jobs.model_setup import dtype_name

LABEL = "memory    "  # plan.describe()'s column
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_GIB = 2**30


def run_dtypes(config: RunConfig) -> tuple[str, str]:
    """(model dtype, VAE dtype) as jobs.model_setup resolves them, on a GPU where the actors ask for one
    (or may: a pool not yet sized for the cluster counts as GPU actors)."""
    compute = config.compute
    on_gpu = compute.device == "cuda" or (compute.device == "auto" and compute.gpus_per_actor != 0)
    device = "cuda" if on_gpu else "cpu"
    dtype = dtype_name(config.model.dtype, device)
    return dtype, dtype_name(config.model.vae_dtype, device) if config.model.vae_dtype else dtype


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"


def weight_memory_lines(config: RunConfig, layouts: Mapping[str, Any]) -> list[str]:
    """One line: the weights of the model (and refiner) an actor holds, per component, in GiB."""
    dtype, vae_dtype = run_dtypes(config)
    parts, total, unknown = [], 0.0, []
    for section, layout in layouts.items():
        if layout.parameters is None:
            unknown.append(section)
            continue
        upcast = layout.family is not None and layout.family.vae_force_upcast and dtype == "float16"
        upcast = upcast and config.model.vae_dtype is None
        upcast = upcast and (layout.configs or {}).get("vae", {}).get("force_upcast", True)
        section_vae = "float32" if upcast else vae_dtype
        size = sum(
            count * _BYTES[section_vae if component == "vae" else dtype]
            for component, count in layout.parameters.items()
        )
        total += size
        count = _count(sum(layout.parameters.values()))
        parts.append(f"{section} {size / _GIB:.2f} GiB ({count} parameters)")
    if not parts:
        return [f"{LABEL}weights not counted: the model is a pickle, whose header cannot be read"]
    line = f"{LABEL}an actor holds {total / _GIB:.2f} GiB of weights in {dtype}: " + "; ".join(parts)
    if vae_dtype != dtype:
        line += f" (VAE in {vae_dtype})"
    if unknown:
        line += f"; {', '.join(unknown)} not counted (a pickle)"
    return [line + "; activations come on top (they grow with batch size x image area)"]
