"""Prompts -> the UNet's text conditioning, for every family: token states from each text tower,
concatenated on features, and (SDXL) the pooled vector of the projection tower.

Rows are kept apart: with the A1111 syntax a row's conditioning is as long as its own prompt (75-token
chunks), so rows, and a row's prompt and negative prompt, may differ in length; the denoiser groups
rows of one length (sd_core.denoiser). diffusers' semantics otherwise: `prompts_2` feeds the second
tower (default: `prompts`); a negative prompt of None is zeros where the model says
force_zeros_for_empty_prompt (SDXL base), else "" encoded; clip_skip applies to prompts only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sd_core.families import ModelFamily
from sd_core.text_encoder import TowerEncoder

_NEGATIVE_CACHE_SIZE = 64


@dataclass
class TextConditioning:
    """Per-row text conditioning. `states[i]` is row i's token states [L_i, D]; `pooled` [B, P] or None."""

    states: list[torch.Tensor]
    pooled: torch.Tensor | None
    truncated: list[bool]  # whether a row's prompt was cut at 77 tokens (plain syntax)

    def __len__(self) -> int:
        return len(self.states)

    def to(self, dtype: torch.dtype) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.to(dtype)
        return TextConditioning([s.to(dtype) for s in self.states], pooled, self.truncated)

    def cat(self, other: TextConditioning) -> TextConditioning:
        """These rows, then `other`'s (CFG: negatives first, as diffusers orders the UNet batch)."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return TextConditioning(self.states + other.states, pooled, self.truncated + other.truncated)


class PromptEncoder:
    """A family's text towers: texts -> TextConditioning; a batch's negative prompts cached."""

    def __init__(self, family: ModelFamily, towers: Sequence[TowerEncoder], zero_negatives: bool):
        self.family = family
        self.towers = list(towers)
        self.zero_negatives = zero_negatives  # diffusers' force_zeros_for_empty_prompt, from the model
        self._negatives: OrderedDict[tuple, tuple[list[torch.Tensor], torch.Tensor | None]] = OrderedDict()

    @property
    def max_clip_skip(self) -> int:
        return min(tower.max_clip_skip for tower in self.towers)

    def tower(self, component: str) -> TowerEncoder:
        return next(t for t in self.towers if t.tower.component == component)

    def encode(
        self,
        prompts: Sequence[str],
        prompts_2: Sequence[str | None] | None = None,
        clip_skip: int | None = None,
        syntax: str = "plain",
    ) -> TextConditioning:
        """Conditioning for `prompts` (and `prompts_2` for a second tower; None entries: the prompt)."""
        texts = [self._tower_texts(p, prompts_2[i] if prompts_2 else None) for i, p in enumerate(prompts)]
        states, pooled, truncated = self._encode_rows(texts, clip_skip, syntax)
        return TextConditioning(states, pooled, truncated)

    def encode_negative(
        self,
        negatives: Sequence[str | None],
        negatives_2: Sequence[str | None] | None,
        positive: TextConditioning,
        syntax: str = "plain",
    ) -> TextConditioning:
        """Unconditional conditioning, row by row: zeros shaped like the row's positive conditioning where
        the negative is None and the model zeroes empty negatives, else the encoded text (None = "").

        The encoded rows run as one batch in row order, as diffusers encodes them (a text encoder's
        rounding depends on its batch), and the result is cached for the next call with the same
        negatives: a job passes the same ones batch after batch."""
        encoded = [i for i, n in enumerate(negatives) if not (n is None and self.zero_negatives)]
        texts = tuple(
            self._tower_texts(negatives[i] or "", negatives_2[i] if negatives_2 else None) for i in encoded
        )
        key = (syntax, texts)
        if texts and key not in self._negatives:
            self._negatives[key] = self._encode_rows(texts, None, syntax)[:2]
            while len(self._negatives) > _NEGATIVE_CACHE_SIZE:
                self._negatives.popitem(last=False)
        states: list[torch.Tensor] = [torch.zeros_like(state) for state in positive.states]
        pooled = None if positive.pooled is None else torch.zeros_like(positive.pooled)
        if texts:
            self._negatives.move_to_end(key)
            encoded_states, encoded_pooled = self._negatives[key]
            for j, row in enumerate(encoded):
                states[row] = encoded_states[j]
                if pooled is not None:
                    pooled[row] = encoded_pooled[j]
        return TextConditioning(states, pooled, [False] * len(states))

    def clear_cache(self) -> None:
        """Forget cached negative embeddings (needed after the text encoders' weights change)."""
        self._negatives.clear()

    def _tower_texts(self, text: str, text_2: str | None) -> tuple[str, ...]:
        """The text each tower reads: the first tower the prompt, a second tower `text_2` if given."""
        return tuple(text if i == 0 or text_2 is None else text_2 for i in range(len(self.towers)))

    def _encode_rows(
        self, rows: Sequence[tuple[str, ...]], clip_skip: int | None, syntax: str
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[bool]]:
        """Each tower encodes every row's chunks in one batch; a row's chunks are concatenated on tokens,
        towers on features. A row whose towers chunk its texts differently is padded with empty chunks."""
        per_tower = [[tower.chunks(row[t], syntax) for row in rows] for t, tower in enumerate(self.towers)]
        counts = [max(len(tower_rows[r].chunks) for tower_rows in per_tower) for r in range(len(rows))]
        features, pooled = [], None
        for tower, tower_rows in zip(self.towers, per_tower, strict=True):
            empty = tower.empty_chunk(syntax)
            flat = [
                chunk
                for row, count in zip(tower_rows, counts, strict=True)
                for chunk in [*row.chunks, *[empty] * (count - len(row.chunks))]
            ]
            states, tower_pooled = tower.encode(flat, clip_skip)
            features.append(list(states.split(counts)))
            if tower_pooled is not None:  # A1111: the pooled vector of a row's first chunk
                starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
                pooled = tower_pooled[starts.to(tower_pooled.device)]
        states = [torch.cat([f[r].flatten(0, 1) for f in features], dim=-1) for r in range(len(rows))]
        truncated = [any(tower_rows[r].truncated for tower_rows in per_tower) for r in range(len(rows))]
        return states, pooled, truncated
