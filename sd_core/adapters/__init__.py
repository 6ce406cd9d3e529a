"""Adapters pinned for a whole run: LoRA-family deltas fused into the weights, textual-inversion tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterInfo:
    """What a run's metadata records of one loaded adapter."""

    kind: str  # "lora" or "textual_inversion"
    name: str  # file stem (LoRA) or token (textual inversion)
    sha256: str  # of the file's bytes
    # LoRA: the scale each component it patches was fused at: {"unet": s, "text_encoder": t, ...}
    scales: dict[str, float] = field(default_factory=dict)
    tokens: tuple[str, ...] = ()  # textual inversion: the tokens added (tok, tok_1, ...)
