"""CompVis/LDM <-> diffusers parameter names for the SD UNet and VAE.

A key map is a table of module renames (`input_blocks.1.0.in_layers.0` <-> `down_blocks.0.resnets.0.norm1`);
a parameter key is renamed by the longest module prefix it starts with, so whole subtrees whose names agree
in both layouts (the UNet's transformer blocks) need one entry. The same table drives both directions,
which makes one the exact inverse of the other.

The table is generated from a layout (levels, resnets per level, which levels attend), which comes from a
diffusers config or, when there is none, from the key names of the state dict being converted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import count
from operator import attrgetter
from typing import Any

import torch


@dataclass(frozen=True)
class ModuleRename:
    """One module's name in diffusers/transformers and in the CompVis layout."""

    diffusers: str
    ldm: str
    conv1x1_in_ldm: bool = False  # a diffusers Linear that LDM stores as a 1x1 Conv2d (VAE attention)


@dataclass(frozen=True)
class KeyMap:
    """Renames state-dict keys between layouts; keys outside the table are an error, never dropped."""

    what: str
    renames: tuple[ModuleRename, ...]

    @cached_property
    def _by_ldm(self) -> dict[str, ModuleRename]:
        return {rename.ldm: rename for rename in self.renames}

    @cached_property
    def _by_diffusers(self) -> dict[str, ModuleRename]:
        return {rename.diffusers: rename for rename in self.renames}

    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._convert(state_dict, self._by_ldm, attrgetter("diffusers"), _conv1x1_to_linear)

    def to_ldm(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._convert(state_dict, self._by_diffusers, attrgetter("ldm"), _linear_to_conv1x1)

    def _convert(
        self,
        state_dict: Mapping[str, torch.Tensor],
        index: Mapping[str, ModuleRename],
        target: Callable[[ModuleRename], str],
        reshape: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out, unmapped = {}, []
        for key, value in state_dict.items():
            found = _longest_prefix(key, index)
            if found is None:
                unmapped.append(key)
                continue
            rename, rest = found
            new_key = f"{target(rename)}.{rest}" if rest else target(rename)
            out[new_key] = reshape(value) if rename.conv1x1_in_ldm else value
        if unmapped:
            raise ValueError(
                f"{len(unmapped)} {self.what} keys do not fit the layout of its config, "
                f"e.g. {sorted(unmapped)[:5]}"
            )
        return out


def _longest_prefix(key: str, index: Mapping[str, ModuleRename]) -> tuple[ModuleRename, str] | None:
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        rename = index.get(".".join(parts[:cut]))
        if rename is not None:
            return rename, ".".join(parts[cut:])
    return None


def _conv1x1_to_linear(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1) if tensor.ndim == 4 else tensor


def _linear_to_conv1x1(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


def _children(
    diffusers: str, ldm: str, pairs: Iterable[tuple[str, str]], conv1x1: Sequence[str] = ()
) -> Iterator[ModuleRename]:
    for diffusers_child, ldm_child in pairs:
        yield ModuleRename(f"{diffusers}.{diffusers_child}", f"{ldm}.{ldm_child}", diffusers_child in conv1x1)


# ---- UNet ----------------------------------------------------------------------------------------------

_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP_LEVEL = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
# diffusers block type -> whether it holds a (cross-)attention transformer after each resnet
_UNET_BLOCK_HAS_ATTENTION = {
    "CrossAttnDownBlock2D": True,
    "DownBlock2D": False,
    "CrossAttnUpBlock2D": True,
    "UpBlock2D": False,
}
_UNET_MID_BLOCK = "UNetMidBlock2DCrossAttn"


_UNET_ADDED_EMBEDDING = (  # SDXL's text_time embedding (sgm's ADM "label_emb")
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
)


@dataclass(frozen=True)
class UNetLayout:
    """All the UNet key names depend on: resnets per down level, which down/up levels attend, and whether
    there is SDXL's added embedding."""

    layers: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    added_embedding: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        if config.get("mid_block_type", _UNET_MID_BLOCK) != _UNET_MID_BLOCK:
            raise ValueError(
                f"unsupported UNet mid block {config['mid_block_type']!r}; only {_UNET_MID_BLOCK}"
            )
        down_attention = tuple(_has_attention(block) for block in config["down_block_types"])
        layers = config["layers_per_block"]
        return cls(
            tuple(layers for _ in down_attention) if isinstance(layers, int) else tuple(layers),
            down_attention,
            tuple(_has_attention(block) for block in config["up_block_types"]),
            config.get("addition_embed_type") == "text_time",
        )

    @classmethod
    def from_diffusers_keys(cls, keys: Collection[str]) -> UNetLayout:
        levels = _count_keys(keys, "down_blocks.{}.resnets.0.norm1.weight")
        return cls(
            tuple(
                _count_keys(keys, f"down_blocks.{level}.resnets.{{}}.norm1.weight") for level in range(levels)
            ),
            tuple(f"down_blocks.{level}.attentions.0.proj_in.weight" in keys for level in range(levels)),
            tuple(f"up_blocks.{level}.attentions.0.proj_in.weight" in keys for level in range(levels)),
            "add_embedding.linear_1.weight" in keys,
        )

    @classmethod
    def from_ldm_keys(cls, keys: Collection[str]) -> UNetLayout:
        """Walks `input_blocks` (a downsampler ends each level but the last), then `output_blocks`."""
        layers, down_attention = [0], [False]
        for index in count(1):
            if f"input_blocks.{index}.0.op.weight" in keys:
                layers.append(0)
                down_attention.append(False)
            elif f"input_blocks.{index}.0.in_layers.0.weight" in keys:
                layers[-1] += 1
                down_attention[-1] |= f"input_blocks.{index}.1.proj_in.weight" in keys
            else:
                break
        up_attention, index = [], 0
        for down_layers in reversed(layers):
            rows = range(index, index + down_layers + 1)
            up_attention.append(any(f"output_blocks.{row}.1.proj_in.weight" in keys for row in rows))
            index = rows.stop
        return cls(tuple(layers), tuple(down_attention), tuple(up_attention), "label_emb.0.0.weight" in keys)


def unet_key_map(layout: UNetLayout) -> KeyMap:
    """LDM `model.diffusion_model.*` (prefix stripped) <-> diffusers UNet2DConditionModel."""
    return KeyMap("UNet", tuple(_unet_renames(layout)))


def _has_attention(block_type: str) -> bool:
    if block_type not in _UNET_BLOCK_HAS_ATTENTION:
        supported = sorted(_UNET_BLOCK_HAS_ATTENTION)
        raise ValueError(f"unsupported UNet block {block_type!r}; supported: {supported}")
    return _UNET_BLOCK_HAS_ATTENTION[block_type]


def _count_keys(keys: Collection[str], template: str) -> int:
    """How many of template.format(0), template.format(1), ... are keys, counting up to the first miss."""
    return next(n for n in count() if template.format(n) not in keys)


def _unet_renames(layout: UNetLayout) -> Iterator[ModuleRename]:
    """Walks the blocks in LDM order, as its `input_blocks`/`output_blocks` counters do."""
    for diffusers, ldm in _UNET_TOP_LEVEL + (_UNET_ADDED_EMBEDDING if layout.added_embedding else ()):
        yield ModuleRename(diffusers, ldm)
    last = len(layout.layers) - 1

    ldm_index = 1  # input_blocks.0 is conv_in
    for level, (layers, attention) in enumerate(zip(layout.layers, layout.down_attention, strict=True)):
        for layer in range(layers):
            yield from _unet_layer(f"down_blocks.{level}", layer, f"input_blocks.{ldm_index}", attention)
            ldm_index += 1
        if level < last:
            yield ModuleRename(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{ldm_index}.0.op")
            ldm_index += 1

    yield from _children("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    yield ModuleRename("mid_block.attentions.0", "middle_block.1")
    yield from _children("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)

    ldm_index = 0
    for level, (down_layers, attention) in enumerate(
        zip(reversed(layout.layers), layout.up_attention, strict=True)
    ):
        for layer in range(down_layers + 1):
            yield from _unet_layer(f"up_blocks.{level}", layer, f"output_blocks.{ldm_index}", attention)
            ldm_index += 1
        if level < last:
            upsampler = f"output_blocks.{ldm_index - 1}.{2 if attention else 1}.conv"
            yield ModuleRename(f"up_blocks.{level}.upsamplers.0.conv", upsampler)


def _unet_layer(block: str, layer: int, ldm_block: str, attention: bool) -> Iterator[ModuleRename]:
    yield from _children(f"{block}.resnets.{layer}", f"{ldm_block}.0", _UNET_RESNET)
    if attention:  # LDM SpatialTransformer and diffusers Transformer2DModel share every inner name
        yield ModuleRename(f"{block}.attentions.{layer}", f"{ldm_block}.1")


# ---- VAE -----------------------------------------------------------------------------------------------

_VAE_RESNET = (
    *((name, name) for name in ("norm1", "conv1", "norm2", "conv2")),
    ("conv_shortcut", "nin_shortcut"),
)
_VAE_ATTENTION = (("group_norm", "norm"), *((f"to_{name}", name) for name in "qkv"), ("to_out.0", "proj_out"))
_VAE_ATTENTION_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")
_VAE_ENDS = (("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out"))


@dataclass(frozen=True)
class VAELayout:
    """All the VAE key names depend on: encoder levels (the decoder mirrors them) and resnets per level."""

    levels: int
    layers: int  # per encoder level; decoder levels hold one more

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VAELayout:
        return cls(len(config["down_block_types"]), config["layers_per_block"])

    @classmethod
    def from_diffusers_keys(cls, keys: Collection[str]) -> VAELayout:
        return cls(
            _count_keys(keys, "encoder.down_blocks.{}.resnets.0.norm1.weight"),
            _count_keys(keys, "encoder.down_blocks.0.resnets.{}.norm1.weight"),
        )

    @classmethod
    def from_ldm_keys(cls, keys: Collection[str]) -> VAELayout:
        return cls(
            _count_keys(keys, "encoder.down.{}.block.0.norm1.weight"),
            _count_keys(keys, "encoder.down.0.block.{}.norm1.weight"),
        )


def vae_key_map(layout: VAELayout) -> KeyMap:
    """LDM `first_stage_model.*` (prefix stripped) <-> diffusers AutoencoderKL."""
    return KeyMap("VAE", tuple(_vae_renames(layout)))


def _vae_renames(layout: VAELayout) -> Iterator[ModuleRename]:
    levels, layers = layout.levels, layout.layers
    for name in ("quant_conv", "post_quant_conv"):
        yield ModuleRename(name, name)
    for part in ("encoder", "decoder"):
        yield from _children(part, part, _VAE_ENDS)
        yield from _children(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        yield from _children(
            f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, _VAE_ATTENTION_LINEAR
        )
        yield from _children(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)

    for level in range(levels):
        block, ldm_block = f"encoder.down_blocks.{level}", f"encoder.down.{level}"
        for layer in range(layers):
            yield from _children(f"{block}.resnets.{layer}", f"{ldm_block}.block.{layer}", _VAE_RESNET)
        if level < levels - 1:
            yield ModuleRename(f"{block}.downsamplers.0.conv", f"{ldm_block}.downsample.conv")

    for level in range(levels):  # LDM numbers decoder levels from the full-resolution end
        block, ldm_block = f"decoder.up_blocks.{level}", f"decoder.up.{levels - 1 - level}"
        for layer in range(layers + 1):
            yield from _children(f"{block}.resnets.{layer}", f"{ldm_block}.block.{layer}", _VAE_RESNET)
        if level < levels - 1:
            yield ModuleRename(f"{block}.upsamplers.0.conv", f"{ldm_block}.upsample.conv")
