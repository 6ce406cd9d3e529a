"""Speed settings of the core that leave the numbers alone (up to float rounding): the memory format of
the convolution weights, torch.compile of a module's forward, and finding repeated input rows."""

from __future__ import annotations

import torch
from torch import nn

from sd_core.attention import Transformer2D


def set_memory_format(modules: list[nn.Module], channels_last: bool) -> None:
    """Store every 4-D weight channels-last (NHWC) or contiguous (NCHW). oneDNN and cuDNN convolutions pick
    their output layout from the weight's, so activations follow without converting the inputs."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules:
        module.to(memory_format=memory_format)
        for transformer in module.modules():
            if isinstance(transformer, Transformer2D):
                transformer.output_memory_format = memory_format


def compile_forward(module: nn.Module, mode: str | None = None) -> None:
    """Replace `module.forward` by a torch.compile'd one (whole graph, static shapes: each new input shape
    compiles once). Compiling `forward` rather than the module keeps forward hooks outside the graph."""
    if hasattr(module, "eager_forward"):
        return
    module.eager_forward = module.forward  # for FLOP counters and debuggers, which compiled code hides
    module.forward = torch.compile(module.forward, fullgraph=True, dynamic=False, mode=mode)


PROBE_ELEMENTS = 256  # elements per row copied to the host to find candidate repeats


def distinct_rows(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(distinct rows in first-seen order, index of each row's copy in them), or (batch, None) when no row
    repeats: variants of one image are encoded once. Rows are compared exactly; a strided probe of each
    row, copied to the host in one transfer, picks the candidates, so distinct rows cost no full compare
    (torch.unique(dim=0) would sort whole rows, and on CUDA compares them one element at a time)."""
    if batch.shape[0] < 2:
        return batch, None
    flat = batch.flatten(1)
    probes = flat[:, :: max(1, flat.shape[1] // PROBE_ELEMENTS)].contiguous().view(torch.uint8).cpu().numpy()
    kept: list[int] = []  # first position of each distinct row
    by_probe: dict[bytes, list[int]] = {}  # probe bytes -> indices into `kept` of the rows with it
    index: list[int] = []
    for row, probe in enumerate(probes):
        candidates = by_probe.setdefault(probe.tobytes(), [])
        match = next((d for d in candidates if torch.equal(flat[row], flat[kept[d]])), None)
        if match is None:
            match = len(kept)
            candidates.append(match)
            kept.append(row)
        index.append(match)
    if len(kept) == batch.shape[0]:
        return batch, None
    return batch[kept], torch.tensor(index, device=batch.device)
