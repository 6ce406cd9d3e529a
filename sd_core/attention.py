"""Attention: multi-head attention on SDPA, the UNet's transformer block and the VAE's spatial attention.

Every attention goes through `Attention`, so `set_attention_slice` reaches UNet and VAE alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def scaled_dot_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, H, L, d]; `slice_size` (batch, head) pairs at a time if given."""
    if slice_size is None:
        return F.scaled_dot_product_attention(q, k, v)
    b, h, q_len, d = q.shape
    # [1, B*H, L, d]: kept 4-D so each slice runs the same SDPA kernel as the unsliced call (3-D does not).
    q, k, v = (t.reshape(1, b * h, t.shape[2], d) for t in (q, k, v))
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[:, i : i + slice_size], k[:, i : i + slice_size], v[:, i : i + slice_size]
            )
            for i in range(0, b * h, slice_size)
        ],
        dim=1,
    )
    return out.reshape(b, h, q_len, d)


class Attention(nn.Module):
    """Multi-head (cross-)attention over tokens [B, L, C]; keys to_q, to_k, to_v, to_out.0 as in diffusers.

    `upcast` runs the attention math in float32 (SD2's `upcast_attention`); diffusers' default SDPA processor
    ignores that flag, so in fp16/bf16 this is the more accurate of the two, and in fp32 they are identical.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast = upcast
        self.slice_size: int | None = None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d]
            t = t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            return t.float() if self.upcast else t

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        out = scaled_dot_product(q, k, v, self.slice_size).to(x.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, L, H*d] -> [B, L, C]


def set_attention_slice(module: nn.Module, slice_size: int | None) -> None:
    """Make every `Attention` under `module` attend `slice_size` (batch, head) pairs at a time (None: all)."""
    if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
        raise ValueError(f"slice_size must be a positive int or None, got {slice_size!r}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.slice_size = slice_size


class GEGLU(nn.Module):
    """Linear to 2x width, then value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' net is [GEGLU, Dropout, Linear]; the Identity keeps the keys `net.0.*` and `net.2.*`.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2D(nn.Module):
    """Feature map [B, C, H, W] -> tokens -> transformer blocks -> feature map, plus the input (residual).

    `linear_projection` (SD2) makes proj_in/proj_out Linear layers on tokens instead of 1x1 convs (SD1).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        num_layers: int = 1,
        norm_groups: int = 32,
        linear_projection: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        dim_head = channels // heads
        inner_dim = heads * dim_head
        self.linear_projection = linear_projection
        self.output_memory_format = torch.contiguous_format
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, upcast) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # [B, HW, C]
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        # [B, C, H, W] copied to the layout of the convolution weights that follow (`output_memory_format`,
        # set with them by speed.set_memory_format): as the view stands it is NHWC, and NCHW weights would
        # reorder themselves to it on every call. diffusers always copies to NCHW, even after NHWC inputs.
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=self.output_memory_format)
        if not self.linear_projection:
            x = self.proj_out(x)
        return x + residual


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm, one head over all H*W positions, residual.

    diffusers builds it as `Attention(group_norm, residual_connection, rescale_output_factor)`; the VAE
    always uses a rescale factor of 1, so there is none here.
    """

    def __init__(self, channels: int, norm_groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps)

    def forward(self, x: torch.Tensor, context: None = None) -> torch.Tensor:
        """`context` is unused; it lets a mid block call every attention the same way."""
        b, c, h, w = x.shape
        # diffusers' order: tokens first, then GroupNorm on their [B, C, HW] view. Normalising the 4-D map
        # instead rounds differently when it is stored NHWC (as diffusers' image tensors are).
        tokens = x.reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        out = super().forward(tokens)
        return out.transpose(-1, -2).reshape(b, c, h, w) + x
