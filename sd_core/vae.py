"""The SD1.x / SD2.x VAE, parameter-for-parameter diffusers' AutoencoderKL: images <-> latent Gaussians."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from torch import nn

from sd_core.attention import SpatialSelfAttention, set_attention_slice
from sd_core.blocks import ACTIVATIONS, ResnetOptions
from sd_core.diffusers_config import as_lists, read_config, unsupported
from sd_core.stages import DownBlock, MidBlock, UpBlock
from sd_core.tiling import tiled_apply

# AutoencoderKL options that would change the latent space's meaning (SD3/Flux/SDXL-style latent stats).
_FIXED: dict[str, tuple[Any, ...]] = {key: (None,) for key in ("shift_factor", "latents_mean", "latents_std")}
_EPS = 1e-6  # diffusers' Encoder/Decoder norms
BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclass(frozen=True)
class VAEConfig:
    """The architecture options of an SD1/SD2 VAE; defaults are diffusers' AutoencoderKL defaults."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32  # image size trained at; the default tile size for tiled encode/decode
    scaling_factor: float = 0.18215  # the UNet sees latents * scaling_factor
    force_upcast: bool = True  # run this VAE in float32 even when the rest is fp16 (a pipeline's job)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if self.act_fn not in ACTIVATIONS:
            raise unsupported("VAE", "act_fn", self.act_fn, " or ".join(ACTIVATIONS))
        if not isinstance(self.sample_size, int):
            raise unsupported("VAE", "sample_size", self.sample_size, "an int")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers AutoencoderKL config.json dict; ValueError for what isn't an SD1/SD2 VAE."""
        supported = {f.name for f in fields(cls)} | {"down_block_types", "up_block_types"}
        picked = read_config(config, "VAE", supported, _FIXED)
        n = len(picked.get("block_out_channels", cls.block_out_channels))
        for key, block_type in BLOCK_TYPES.items():
            types = picked.pop(key, (block_type,))
            if types != (block_type,) * n:
                raise unsupported("VAE", key, types, f"{n} x {block_type!r} (one per block_out_channels)")
        return cls(**picked)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config.json dict that `AutoencoderKL.from_config` builds the same model from."""
        d = {"_class_name": "AutoencoderKL"}
        d.update({f.name: as_lists(getattr(self, f.name)) for f in fields(self)})
        d.update({key: [kind] * len(self.block_out_channels) for key, kind in BLOCK_TYPES.items()})
        return d


def _resnet_options(config: VAEConfig) -> ResnetOptions:
    return ResnetOptions(temb_channels=None, groups=config.norm_num_groups, eps=_EPS, act_fn=config.act_fn)


def _mid_block(config: VAEConfig) -> MidBlock:
    attention = partial(SpatialSelfAttention, norm_groups=config.norm_num_groups, eps=_EPS)
    channels = config.block_out_channels[-1]
    return MidBlock(channels, _resnet_options(config), attention if config.mid_block_add_attention else None)


class Encoder(nn.Module):
    """Image [B, C, H, W] -> Gaussian moments [B, 2 * latent, H / f, W / f] (before quant_conv)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        n = len(channels)
        options = _resnet_options(config)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(
                    channels[max(level - 1, 0)],
                    channels[level],
                    config.layers_per_block,
                    options,
                    add_downsample=level < n - 1,
                    downsample_padding=0,
                )
                for level in range(n)
            ]
        )
        self.mid_block = _mid_block(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] (after post_quant_conv) -> image [B, C, h * f, w * f]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        n = len(channels)
        options = _resnet_options(config)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        self.mid_block = _mid_block(config)
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    channels[min(level + 1, n - 1)],
                    channels[level],
                    config.layers_per_block + 1,
                    options,
                    add_upsample=level > 0,
                )
                for level in reversed(range(n))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """diffusers' randn_tensor for one generator: a CPU generator draws on the CPU, then the noise moves."""
    rand_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {generator.device} generator")
        rand_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class DiagonalGaussian:
    """The posterior q(z | x) from moments [B, 2 * latent, h, w]: mean and log-variance halves."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def take(self, index: torch.Tensor) -> DiagonalGaussian:
        """The posterior of rows `index` (rows may repeat): one encoded image serving several outputs."""
        taken = DiagonalGaussian.__new__(DiagonalGaussian)
        taken.mean, taken.logvar, taken.std = self.mean[index], self.logvar[index], self.std[index]
        return taken

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the whole batch drawn at once from `generator` (diffusers' .sample)."""
        noise = _randn(tuple(self.mean.shape), generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise

    def sample_rows(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Row i drawn from generators[i] alone, as diffusers does encoding image[i:i+1] with generator[i];
        a row's latent never depends on the rows next to it."""
        rows = self.mean.shape[0]
        if len(generators) != rows:
            raise ValueError(f"need one generator per row: got {len(generators)} for {rows} rows")
        row_shape = (1, *self.mean.shape[1:])
        noise = torch.cat([_randn(row_shape, g, self.mean.device, self.mean.dtype) for g in generators])
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    """SD1.x/SD2.x VAE: encode images in [-1, 1] to a latent Gaussian, decode latents back to images."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.tile_sample_size: int | None = None  # None: tiling off
        self.tile_overlap = 0.25

    @property
    def scale_factor_spatial(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def enable_tiling(self, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Encode/decode images larger than `tile_sample_size` (default config.sample_size) tile by tile."""
        self.tile_sample_size = tile_sample_size or self.config.sample_size
        self.tile_overlap = overlap

    def disable_tiling(self) -> None:
        self.tile_sample_size = None

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Attend `slice_size` (batch, head) pairs at a time to save memory; None for all at once."""
        set_attention_slice(self, slice_size)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images [B, C, H, W] in [-1, 1] -> posterior over latents [B, latent, H / f, W / f].

        One image at a time, as diffusers' img2img encodes `image[i:i+1]` for each row's generator: a
        batched convolution rounds differently, and a sampler that clips its x0 estimate (DDIM's
        clip_sample) grows such 1e-7 differences a hundredfold. The encoder runs once per image, so
        batching it would save little."""
        return DiagonalGaussian(torch.cat([self._encode_moments(row) for row in x.split(1)]))

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        tile = self.tile_sample_size
        if tile is not None and max(x.shape[-2:]) > tile:
            latent_tile = int(tile / self.scale_factor_spatial)
            return tiled_apply(self._moments, x, tile, latent_tile, self.tile_overlap)
        return self._moments(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent, h, w] (already divided by scaling_factor) -> images [B, C, h * f, w * f]."""
        tile = self.tile_sample_size
        if tile is not None:
            latent_tile = int(tile / self.scale_factor_spatial)
            if max(z.shape[-2:]) > latent_tile:
                return tiled_apply(self._image, z, latent_tile, tile, self.tile_overlap)
        return self._image(z)


_LEGACY_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_vae_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE checkpoints name the mid-block attention query/key/value/proj_attn; diffusers renames
    them on load to to_q/to_k/to_v/to_out.0, and so does this (other keys pass through)."""
    return {
        _LEGACY_ATTENTION_KEY.sub(lambda m: f"{m[1]}{_LEGACY_NAMES[m[2]]}.", key): value
        for key, value in state_dict.items()
    }
