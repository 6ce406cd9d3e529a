"""Resolution stages shared by the UNet and the VAE: a down block, the mid block and an up block.

One class per stage covers diffusers' variants, which differ only in what they are handed:
  DownBlock: CrossAttnDownBlock2D, DownBlock2D (no attention), DownEncoderBlock2D (no attention, no temb).
  MidBlock:  UNetMidBlock2DCrossAttn (a Transformer2D), UNetMidBlock2D (the VAE's SpatialSelfAttention).
  UpBlock:   CrossAttnUpBlock2D, UpBlock2D (skip connections), UpDecoderBlock2D (no skips, no temb).
`make_attention(channels)` builds the attention module that follows each resnet; it is called as
`attention(x, context)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sd_core.blocks import Downsample2D, ResnetBlock2D, ResnetOptions, Upsample2D

AttentionFactory = Callable[[int], nn.Module]


def _attentions(make_attention: AttentionFactory | None, channels: int, count: int) -> nn.ModuleList | None:
    return nn.ModuleList(make_attention(channels) for _ in range(count)) if make_attention else None


class DownBlock(nn.Module):
    """`num_layers` x (resnet [+ attention]), then an optional stride-2 downsample.

    Returns the output and every intermediate state (the UNet's skip connections).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        options: ResnetOptions,
        add_downsample: bool,
        downsample_padding: int = 1,
        make_attention: AttentionFactory | None = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, options)
            for i in range(num_layers)
        )
        self.attentions = _attentions(make_attention, out_channels, num_layers)
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class MidBlock(nn.Module):
    """resnet, [attention], resnet at the lowest resolution."""

    def __init__(self, channels: int, options: ResnetOptions, make_attention: AttentionFactory | None):
        super().__init__()
        self.attentions = _attentions(make_attention, channels, 1)
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, options) for _ in range(2))

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """`num_layers` x (concat a skip state, resnet [+ attention]), then an optional 2x upsample.

    `skip_channels[i]` is the width of the skip state resnet i consumes (UNet); empty for no skips (VAE).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        options: ResnetOptions,
        add_upsample: bool,
        skip_channels: Sequence[int] = (),
        make_attention: AttentionFactory | None = None,
    ):
        super().__init__()
        skip_channels = list(skip_channels) or [0] * num_layers
        self.resnets = nn.ModuleList(
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skips, out_channels, options)
            for i, skips in enumerate(skip_channels)
        )
        self.attentions = _attentions(make_attention, out_channels, num_layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        skips: list[torch.Tensor] | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """`skips` are consumed from the end (the most recent down-path state first) and popped."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
