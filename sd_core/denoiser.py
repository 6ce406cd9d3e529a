"""The UNet as the denoise loop calls it: conditioning stacked once per call, rows of one conditioning
length batched together, and classifier-free guidance with per-row scales and guidance rescale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd_core.prompt_encoder import TextConditioning
from sd_core.unet import UNet


@dataclass(frozen=True)
class _Group:
    rows: torch.Tensor | None  # indices into the batch; None: every row
    states: torch.Tensor  # [n, L, D]
    text_embeds: torch.Tensor | None  # [n, P]
    time_ids: torch.Tensor | None  # [n, k]


class Denoiser:
    """`denoiser(x, t)`: the UNet's prediction for x [N, C, h, w] under the conditioning it was built with.

    Rows whose token states differ in length (A1111 long prompts) cannot share a UNet call; they run in
    one call per length, so a row's result never depends on how long its batchmates' prompts are.
    """

    def __init__(self, unet: UNet, text: TextConditioning, time_ids: torch.Tensor | None):
        self.unet = unet
        lengths = [state.shape[0] for state in text.states]
        groups = {}
        for row, length in enumerate(lengths):
            groups.setdefault(length, []).append(row)
        self.groups = [self._group(text, time_ids, rows, len(groups) == 1) for rows in groups.values()]

    @staticmethod
    def _group(text: TextConditioning, time_ids: torch.Tensor | None, rows: list[int], whole: bool) -> _Group:
        states = torch.stack([text.states[row] for row in rows])
        index = None if whole else torch.tensor(rows, device=states.device)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor if tensor is None or index is None else tensor[index]

        return _Group(index, states, pick(text.pooled), pick(time_ids))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 1:
            group = self.groups[0]
            return self.unet(x, t, group.states, group.text_embeds, group.time_ids)
        parts = [self.unet(x[g.rows], t, g.states, g.text_embeds, g.time_ids) for g in self.groups]
        out = torch.empty((x.shape[0], *parts[0].shape[1:]), dtype=parts[0].dtype, device=x.device)
        for group, part in zip(self.groups, parts, strict=True):
            out[group.rows] = part
        return out


def guide(prediction: torch.Tensor, scales: torch.Tensor, rescales: torch.Tensor | None) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] prediction, per row: `scales` and `rescales` are
    [B, 1, 1, 1]. Rows with scale <= 1 take the conditional prediction (diffusers turns CFG off for
    them); `rescales` > 0 applies guidance rescale (Lin et al. 2023, diffusers' rescale_noise_cfg)."""
    uncond, cond = prediction.chunk(2)
    guided = uncond + scales * (cond - uncond)
    if rescales is not None:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = torch.where(rescales > 0, rescales * rescaled + (1 - rescales) * guided, guided)
    return torch.where(scales > 1, guided, cond)
