"""LoRA-family adapters fused into the weights at load time, so sampling pays nothing per step.

Each adapter's delta is computed in closed form in float32 on the weight's device, summed over the
adapters that touch a module, added to the weight in float32 and cast back to the module's dtype.
Everything is checked (unknown keys, shapes) before the first weight changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from sd_core.adapters.lora_formats import (
    Factors,
    LohaFactors,
    LoraFactors,
    LoraRecord,
    normalise,
    read_lora_file,
)
from sd_core.adapters.lora_targets import UNET, LoraTargets, standard_targets, weighted_modules

log = logging.getLogger(__name__)

_EXAMPLES = 5


@dataclass(frozen=True)
class LoadedLora:
    """An adapter file read into per-module factor records (in our module naming), not yet applied."""

    name: str  # the file's stem
    sha256: str  # of the file's bytes
    format: str  # "kohya", "peft", "loha", "lokr", or several joined by "+"
    records: tuple[LoraRecord, ...]
    unmatched_keys: tuple[str, ...]  # keys of no supported format or naming no known module


@dataclass(frozen=True)
class FuseReport:
    """What fusing one adapter did."""

    lora: str
    applied_modules: int
    skipped_keys: int
    skipped_examples: tuple[str, ...]
    scales: dict[str, float]  # component -> the scale its modules were fused at (the components it patches)


def load_lora_file(
    path: str | Path, allow_pickle: bool = False, targets: LoraTargets | None = None
) -> LoadedLora:
    """Read a LoRA/LoCon/LoHa/LoKr file (kohya, PEFT/diffusers or LyCORIS keys). Names resolve against
    `targets` (default: the standard SD1/SD2 module names; pass `targets_of(models, family)` for SDXL or
    other UNet layouts). Pickles (.pt/.bin/.ckpt) only with `allow_pickle`."""
    path = Path(path)
    raw = read_lora_file(path, allow_pickle)
    records, unmatched = normalise(raw.tensors, raw.metadata, targets or standard_targets())
    labels = sorted({record.label for record in records})
    return LoadedLora(path.stem, raw.sha256, "+".join(labels) or "empty", tuple(records), tuple(unmatched))


# ---- closed-form deltas ----------------------------------------------------------------------------


def lora_pair(factors: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float32 with delta = B @ A: A [r, in, *kernel] (Tucker `mid` folded in), B [out, r]
    carrying alpha/rank."""
    down = factors.down.float()
    if factors.mid is not None:  # down is 1x1: fold it into the mid kernel
        down = torch.einsum("abhw,bi->aihw", factors.mid.float(), down.flatten(1))
    return down, factors.up.float().flatten(1) * _alpha_scale(factors.alpha, factors.rank)


def delta_of(factors: Factors) -> torch.Tensor:
    """The float32 weight delta of one module's factors, in the shape the factors imply (LyCORIS keeps a
    non-Tucker conv kernel flattened to [out, in·kh·kw]; `fit_delta` reshapes it)."""
    if isinstance(factors, LoraFactors):
        a, b = lora_pair(factors)
        return (b @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    if isinstance(factors, LohaFactors):
        w1 = _rebuild(factors.w1_a, factors.w1_b, factors.t1)
        w2 = _rebuild(factors.w2_a, factors.w2_b, factors.t2)
        return w1 * w2 * _alpha_scale(factors.alpha, factors.rank)
    w1 = factors.w1.float() if factors.w1 is not None else factors.w1_a.float() @ factors.w1_b.float()
    w2 = factors.w2.float() if factors.w2 is not None else _rebuild(factors.w2_a, factors.w2_b, factors.t2)
    # LyCORIS: alpha/rank of the factorised side; with both sides full the scale is 1 whatever alpha says
    scale = 1.0 if factors.rank is None else _alpha_scale(factors.alpha, factors.rank)
    return _kron(w1, w2) * scale


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """torch.kron(w1, w2) for a 2-D w1 and a 2-D or conv-shaped w2, kernel dims taken from w2 alone
    (torch.kron itself fails on the meta device for 4-D inputs)."""
    (a, c), (b, d), kernel = w1.shape, w2.shape[:2], w2.shape[2:]
    ones = (1,) * len(kernel)
    blocks = w1.reshape(a, 1, c, 1, *ones) * w2.reshape(1, b, 1, d, *kernel)
    return blocks.reshape(a * b, c * d, *kernel)


def _rebuild(a: torch.Tensor, b: torch.Tensor, tucker: torch.Tensor | None) -> torch.Tensor:
    """a @ b; with a Tucker core, LyCORIS' rebuild: a [r, out], b [r, in], core [r, r, kh, kw]."""
    if tucker is None:
        return a.float() @ b.float()
    return torch.einsum("ijhw,jr,ip->prhw", tucker.float(), b.float(), a.float())


def _alpha_scale(alpha: float | None, rank: int) -> float:
    """alpha/rank; kohya and LyCORIS treat a missing or zero alpha as alpha = rank."""
    return 1.0 if not alpha else alpha / rank


def fit_delta(delta: torch.Tensor, shape: torch.Size, where: str) -> torch.Tensor:
    """`delta` in the weight's shape: as is, or a [out, in] delta for a 1x1 conv (and back), or a
    flattened conv kernel. Anything else is a LoRA made for another model."""
    if delta.shape == shape:
        return delta
    linear_like = delta.ndim == 2 or delta.shape[2:] == (1, 1)
    if linear_like and delta.flatten(1).shape == (shape[0], shape[1:].numel()):
        return delta.reshape(shape)
    raise ValueError(
        f"{where}: the adapter's delta has shape {tuple(delta.shape)} but the model's weight has shape "
        f"{tuple(shape)}; a LoRA for a different model family (SD 1.x, SD 2.x, SDXL)?"
    )


def _float_on(factors: Factors, device: torch.device) -> Factors:
    """The factors as float32 tensors on `device` (meta: shapes only, for checking before fusing)."""
    moved = {
        f.name: v.to(device, torch.float32) if isinstance(v := getattr(factors, f.name), torch.Tensor) else v
        for f in fields(factors)
    }
    return type(factors)(**moved)


# ---- fusing ------------------------------------------------------------------------------------------


def model_modules(models: Mapping[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """{component: {module name: module}} of what LoRA-family adapters patch, for {component: model}
    ("unet", "text_encoder", "text_encoder_2"; also on the meta device)."""
    return {component: weighted_modules(model) for component, model in models.items()}


def matching_records(
    lora: LoadedLora, modules: Mapping[str, Mapping[str, nn.Module]]
) -> tuple[list[LoraRecord], list[str]]:
    """The records of `lora` that patch a module of this model, and the keys that patch none (the file's
    unmatched keys, then those of records naming a module this model lacks). ValueError (`fit_delta`)
    when a record's delta does not fit its module's weight. Reads shapes only: meta modules do."""
    skipped, matching = list(lora.unmatched_keys), []
    for record in lora.records:
        module = modules.get(record.component, {}).get(record.module)
        if module is None:
            skipped.extend(record.keys)
            continue
        where = f"{lora.name}: {record.component} module {record.module}"
        fit_delta(delta_of(_float_on(record.factors, torch.device("meta"))), module.weight.shape, where)
        matching.append(record)
    return matching, skipped


def component_scales(
    components: Sequence[str], scale: float, text_encoder_scale: float | None
) -> dict[str, float]:
    """{component: scale}: `scale` for the UNet, `text_encoder_scale` (None: `scale`) for every text tower."""
    text_scale = scale if text_encoder_scale is None else text_encoder_scale
    return {component: scale if component == UNET else text_scale for component in components}


def fuse_lora(
    models: Mapping[str, nn.Module],
    lora: LoadedLora,
    scale: float = 1.0,
    text_encoder_scale: float | None = None,
    strict: bool = True,
) -> FuseReport:
    """Add `lora`'s deltas to the weights of {component: model} in place (text_encoder_scale, for every
    text tower, None: scale)."""
    return fuse_loras(models, [(lora, scale, text_encoder_scale)], strict)[0]


def fuse_loras(
    models: Mapping[str, nn.Module],
    adapters: Sequence[tuple[LoadedLora, float, float | None]],
    strict: bool = True,
) -> tuple[FuseReport, ...]:
    """Fuse several (lora, unet scale, text-tower scale or None) into {component: model} at once: each
    module's deltas are summed in float32 and the weight is cast back once. strict: keys that match no
    module are an error; else a warning, and they are skipped."""
    modules = model_modules(models)
    plan: dict[tuple[str, str], list[tuple[Factors, float]]] = defaultdict(list)
    reports = []
    for lora, scale, text_encoder_scale in adapters:
        records, skipped = matching_records(lora, modules)
        patched = sorted({record.component for record in records}, key=list(models).index)
        scales = component_scales(patched, scale, text_encoder_scale)
        for record in records:
            plan[record.component, record.module].append((record.factors, scales[record.component]))
        applied = {(record.component, record.module) for record in records}
        reports.append(FuseReport(lora.name, len(applied), len(skipped), tuple(skipped[:_EXAMPLES]), scales))
    _report_skipped(reports, strict)
    for (component, name), contributions in plan.items():
        weight = modules[component][name].weight
        total = sum(
            s * fit_delta(delta_of(_float_on(f, weight.device)), weight.shape, name) for f, s in contributions
        )
        with torch.no_grad():
            weight.copy_((weight.float() + total).to(weight.dtype))
    return tuple(reports)


def _report_skipped(reports: Sequence[FuseReport], strict: bool) -> None:
    for report in reports:
        if not report.skipped_keys:
            continue
        what = (
            f"LoRA {report.lora!r}: {report.skipped_keys} keys match no module of this model or no supported "
            f"format, e.g. {list(report.skipped_examples)}"
        )
        if strict:
            raise ValueError(f"{what}; pass strict=False to skip them with a warning")
        log.warning("%s; skipped them and applied %d modules", what, report.applied_modules)
