"""Overlapping tiles with cross-faded seams: diffusers' AutoencoderKL tiled_encode / tiled_decode."""

from __future__ import annotations

from collections.abc import Callable

import torch


def blend_into(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows (dim=2) or columns (dim=3) of `tile` from the last ones of
    `previous`, in place: weight y/extent on `tile` and 1 - y/extent on `previous` (diffusers' blend_v/h)."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    ramp = torch.arange(extent, device=tile.device, dtype=torch.float64) / extent  # y / extent
    shape = (extent, 1) if dim == 2 else (extent,)
    w_tile = ramp.to(tile.dtype).reshape(shape)
    w_previous = (1 - ramp).to(tile.dtype).reshape(shape)
    head = tile.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail * w_previous + head * w_tile)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_in: int, tile_out: int, overlap: float
) -> torch.Tensor:
    """Run `fn` (mapping tile_in-sized tiles to tile_out-sized ones) over overlapping tiles of x [B, C, H, W].

    Tiles start every int(tile_in * (1 - overlap)) pixels. Each output tile is blended with its upper, then
    its left neighbour over int(tile_out * overlap) pixels (neighbours already blended, as in diffusers) and
    cropped to its first tile_out - blend rows and columns; the crops are stitched together.
    """
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [
        [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                blend_into(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                blend_into(row[j - 1], tile, extent, dim=3)
    return torch.cat([torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in rows], dim=2)
