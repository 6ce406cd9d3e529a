"""Building blocks shared by the UNet and the VAE: ResNet block, 2x down/up-sampling, timestep embedding.

Attribute names follow diffusers (`norm1`, `conv1`, `time_emb_proj`, ...) so state dicts load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def activation(name: str) -> nn.Module:
    """The activation diffusers' `get_activation(name)` returns."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


@dataclass(frozen=True)
class ResnetOptions:
    """What a ResNet block needs besides its channel counts."""

    temb_channels: int | None  # None: no timestep conditioning (the VAE)
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, timestep embedding added in between, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, options: ResnetOptions):
        super().__init__()
        self.norm1 = nn.GroupNorm(options.groups, in_channels, eps=options.eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        has_temb = options.temb_channels is not None
        self.time_emb_proj = nn.Linear(options.temb_channels, out_channels) if has_temb else None
        self.norm2 = nn.GroupNorm(options.groups, out_channels, eps=options.eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = activation(options.act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = options.output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (right/bottom) zero padding, as in the VAE."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`) upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def timestep_sinusoids(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> torch.Tensor:
    """[B] timesteps (int or float) -> [B, dim] float32 sinusoids; diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]  # [B, half]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP over the sinusoids; diffusers' TimestepEmbedding."""

    def __init__(self, in_channels: int, embed_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
