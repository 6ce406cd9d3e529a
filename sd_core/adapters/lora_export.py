"""Saving the sum of several adapters as one PEFT/diffusers-format LoRA file.

Plain LoRAs are exported exactly by concatenating ranks (scale·alpha/rank folded into lora_B, a Tucker
`lora_mid` folded into lora_A); LoHa/LoKr deltas are full rank in general and go through an SVD truncated
at their numerical rank. Keys are `unet.<module>.lora_A.weight` / `.lora_B.weight`, and for each text
tower `<component>.text_model.<module>...` (`text_encoder.`, SDXL's `text_encoder_2.`; the projection
stays `text_encoder_2.text_projection`): the names diffusers' `load_lora_weights` reads, with transformers
4's nested CLIP models and (diffusers >= 0.42 strips the `text_model.` prefix for a model without that
level) transformers 5's flat CLIPTextModel. No alpha is stored: loaders then take alpha = rank, a scale
of 1.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd_core.adapters.lora import LoadedLora, component_scales, delta_of, fit_delta, lora_pair
from sd_core.adapters.lora_formats import LoraFactors, LoraRecord
from sd_core.adapters.lora_targets import NESTED_TEXT, UNET, weighted_modules

log = logging.getLogger(__name__)

_TEXT_PROJECTION = "text_projection"  # beside `text_model.` in CLIPTextModelWithProjection


def export_key(component: str, module: str) -> str:
    """The PEFT key (before `.lora_A.weight`) diffusers reads for one of our modules."""
    if component == UNET or module.startswith(NESTED_TEXT) or module == _TEXT_PROJECTION:
        return f"{component}.{module}"
    return f"{component}.{NESTED_TEXT}{module}"


def save_lora_peft(
    adapters: Sequence[tuple[LoadedLora, float, float | None]],
    path: str | Path,
    models: Mapping[str, nn.Module] | None = None,
) -> None:
    """Write (lora, unet scale, text-tower scale or None = unet scale) adapters as one .safetensors LoRA.

    Give the {component: model} LyCORIS files were made for when they hold conv LoHa/LoKr: those store a
    conv kernel flattened, and only the model's weight says how to unflatten it.
    """
    shapes = {
        (component, name): module.weight.shape
        for component, model in (models or {}).items()
        for name, module in weighted_modules(model).items()
    }
    pairs: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for lora, scale, text_encoder_scale in adapters:
        if lora.unmatched_keys:
            log.warning("LoRA %r: %d unmatched keys are not exported", lora.name, len(lora.unmatched_keys))
        scales = component_scales(sorted({r.component for r in lora.records}), scale, text_encoder_scale)
        for record in lora.records:
            a, b = _low_rank(record, shapes.get((record.component, record.module)))
            if a.shape[0]:
                pairs[record.component, record.module].append((a, b * scales[record.component]))
    tensors = {}
    for (component, module), parts in pairs.items():
        key = export_key(component, module)
        shapes_of_a = {tuple(a.shape[1:]) for a, _ in parts}
        if len(shapes_of_a) > 1:
            raise ValueError(
                f"{component} module {module}: the adapters' factors have different shapes "
                f"{sorted(shapes_of_a)}; pass models= to shape them like the model's weights"
            )
        a = torch.cat([a for a, _ in parts])
        b = torch.cat([b for _, b in parts], dim=1)
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.reshape(*b.shape, *(1,) * (a.ndim - 2)).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _low_rank(record: LoraRecord, shape: torch.Size | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, *weight kernel], B [out, r]) with B @ A = the record's delta (at scale 1)."""
    if isinstance(record.factors, LoraFactors):
        a, b = lora_pair(record.factors)
    else:
        a, b = svd_pair(delta_of(record.factors))
    if shape is not None:  # checks the shapes fit, and unflattens LyCORIS' flattened conv kernels
        where = f"{record.component} module {record.module}"
        fit_delta(torch.empty(b.shape[0], *a.shape[1:], device="meta"), shape, where)
        a = a.reshape(a.shape[0], *shape[1:])
    return a, b


def svd_pair(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = delta up to float32 rounding, of the delta's numerical rank (the SVD runs in
    float64; singular values below float32's resolution of the largest one are dropped)."""
    matrix = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = s[:1] * max(matrix.shape) * torch.finfo(torch.float32).eps
    rank = int((s > tolerance).sum())
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).float().reshape(rank, *delta.shape[1:])
    return a, (u[:, :rank] * root).float()
