"""Reading LoRA-family files and normalising every supported format into per-module factor records.

Formats: kohya/A1111 LoRA and LoCon (`lora_down`/`lora_up`/`lora_mid`/`alpha`, `lora_unet_*` and
`lora_te_*` names), PEFT/diffusers (`unet.<module>.lora_A/lora_B`, old `lora.down/lora.up`, alphas from
`.alpha` keys or the `lora_adapter_metadata` JSON diffusers writes) and LyCORIS LoHa (`hada_*`) and
LoKr (`lokr_*`) under either naming.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from sd_core.adapters.lora_targets import LoraTargets, Target
from sd_core.loading import read_weights
from sd_core.model_files import SAFETENSORS_LENGTH_BYTES, parse_safetensors_header, safetensors_header_length

PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraFactors:
    """W += alpha/rank · up @ (mid ∘) down: kohya `lora_down/up/mid`, PEFT `lora_A/lora_B`."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]; [r, in, 1, 1] with a Tucker `mid`
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    mid: torch.Tensor | None = None  # [r, r, kh, kw]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LohaFactors:
    """LyCORIS LoHa: W += alpha/rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or Tucker-rebuilt with t1/t2."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]


@dataclass(frozen=True)
class LokrFactors:
    """LyCORIS LoKr: W += scale · kron(w1, w2), each side full or factorised (`_a @ _b`, w2 maybe Tucker)."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        """The factorised side's rank (w1's first, as LyCORIS and A1111 take it); None if both are full."""
        factorised = self.w1_b if self.w1_b is not None else self.w2_b
        return None if factorised is None else factorised.shape[0]


Factors = LoraFactors | LohaFactors | LokrFactors
_KIND_OF = {LoraFactors: "lora", LohaFactors: "loha", LokrFactors: "lokr"}


@dataclass(frozen=True)
class LoraRecord:
    """The factors one adapter file holds for one of our modules."""

    component: str  # "unet" or "text_encoder"
    module: str  # our module name
    factors: Factors
    keys: tuple[str, ...]  # the file's keys these factors came from
    naming: str  # "kohya" or "peft"

    @property
    def label(self) -> str:
        """The format this record is in: "kohya" or "peft" for plain LoRA, else "loha" / "lokr"."""
        kind = _KIND_OF[type(self.factors)]
        return self.naming if kind == "lora" else kind


@dataclass(frozen=True)
class RawLoraFile:
    """A LoRA file's tensors and safetensors metadata, before interpretation."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


# key suffix -> (factor class, field); `alpha` belongs to whichever class the other keys pick
_PARTS: dict[str, tuple[type | None, str]] = {
    "alpha": (None, "alpha"),
    "lora_down.weight": (LoraFactors, "down"),
    "lora_A.weight": (LoraFactors, "down"),
    "lora.down.weight": (LoraFactors, "down"),
    "lora_up.weight": (LoraFactors, "up"),
    "lora_B.weight": (LoraFactors, "up"),
    "lora.up.weight": (LoraFactors, "up"),
    "lora_mid.weight": (LoraFactors, "mid"),
    **{f"hada_{f}": (LohaFactors, f) for f in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{f}": (LokrFactors, f) for f in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
# per class, groups of fields of which at least one must be present
_REQUIRED: dict[type, tuple[tuple[str, ...], ...]] = {
    LoraFactors: (("down",), ("up",)),
    LohaFactors: (("w1_a",), ("w1_b",), ("w2_a",), ("w2_b",)),
    LokrFactors: (("w1", "w1_a"), ("w2", "w2_a")),
}


def read_lora_file(path: Path, allow_pickle: bool = False) -> RawLoraFile:
    """Tensors and metadata of a .safetensors file, or of a pickle when `allow_pickle` is set."""
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        tensors = read_weights(path, allow_pickle)  # refuses pickles before reading them
        return RawLoraFile(tensors, {}, hashlib.sha256(path.read_bytes()).hexdigest())
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as err:
        raise ValueError(
            f"LoRA file {path} is corrupt or truncated (not a readable safetensors file: {err})"
        ) from err
    header_end = SAFETENSORS_LENGTH_BYTES + safetensors_header_length(data)
    _, metadata = parse_safetensors_header(data[SAFETENSORS_LENGTH_BYTES:header_end])
    return RawLoraFile(tensors, metadata, sha256)


def split_key(key: str) -> tuple[str, str | None]:
    """(module key, factor suffix) of an adapter file's key; (key, None) for a key of no supported format."""
    suffix = max((s for s in _PARTS if key.endswith(f".{s}")), key=len, default=None)
    return (key, None) if suffix is None else (key.removesuffix(f".{suffix}"), suffix)


def normalise(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], targets: LoraTargets
) -> tuple[list[LoraRecord], list[str]]:
    """Per-module factor records, and the keys that fit no supported format or no known module."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # module key -> {part suffix: file key}
    unmatched = []
    for key in sorted(tensors):  # records in one order whatever the container's
        module_key, suffix = split_key(key)
        if suffix is None:
            unmatched.append(key)
        else:
            groups[module_key][suffix] = key
    peft_config = json.loads(metadata.get(PEFT_METADATA_KEY) or "{}")
    records = []
    for module_key, parts in groups.items():
        target = targets.resolve(module_key)
        factors = _factors(parts, tensors)
        if target is None or factors is None:
            unmatched.extend(parts.values())
            continue
        if factors.alpha is None and target.naming == "peft":
            factors = _with_peft_alpha(factors, peft_config, module_key, target)
        records.append(
            LoraRecord(target.component, target.module, factors, tuple(parts.values()), target.naming)
        )
    return records, unmatched


def _factors(parts: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> Factors | None:
    """The factor record a module's keys make up; None if they mix formats or lack a required factor."""
    classes = {_PARTS[suffix][0] for suffix in parts} - {None}
    if len(classes) != 1:
        return None
    cls = classes.pop()
    fields = {_PARTS[suffix][1]: tensors[key] for suffix, key in parts.items()}
    if not all(any(name in fields for name in group) for group in _REQUIRED[cls]):
        return None
    if "alpha" in fields:
        fields["alpha"] = float(fields["alpha"])
    return cls(**fields)


def _with_peft_alpha(factors: Factors, peft_config: Mapping, module_key: str, target: Target) -> Factors:
    """The alpha diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields per component) gives a module."""
    if not isinstance(factors, LoraFactors):
        return factors
    component_prefix = f"{target.component}."
    module = module_key.removeprefix(component_prefix)
    config = {
        k.removeprefix(component_prefix): v for k, v in peft_config.items() if k.startswith(component_prefix)
    }
    if "lora_alpha" not in config:
        return factors
    patterns = config.get("alpha_pattern") or {}
    # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches a suffix of the name
    pattern = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
    alpha = float(patterns[pattern] if pattern is not None else config["lora_alpha"])
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(rank): the same as alpha·sqrt(rank) / rank
        alpha *= factors.rank**0.5
    return LoraFactors(factors.down, factors.up, factors.mid, alpha)
