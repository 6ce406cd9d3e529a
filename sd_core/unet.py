"""The conditional UNet of SD1.x / SD2.x / SDXL, parameter-for-parameter diffusers' UNet2DConditionModel.

SDXL adds `addition_embed_type="text_time"`: the pooled text vector and the micro-conditioning values
(original size, crop, target size or aesthetic score), each value sinusoid-embedded, go through one more
MLP (`add_embedding`) whose output is added to the timestep embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from sd_core.attention import Transformer2D, set_attention_slice
from sd_core.blocks import ACTIVATIONS, ResnetOptions, TimestepEmbedding, activation, timestep_sinusoids
from sd_core.diffusers_config import as_lists, as_tuples, read_config, unsupported
from sd_core.stages import AttentionFactory, DownBlock, MidBlock, UpBlock

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
# Options config.json may give per resolution level or as one int for all levels.
PER_BLOCK_KEYS = (
    "layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "num_attention_heads"
)

ADDITION_EMBED_TYPES = (None, "text_time")
# diffusers UNet2DConditionModel options we don't build, each with the value(s) that leave the UNet as built.
_FIXED: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type_num_heads": (64,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


@dataclass(frozen=True)
class UNetConfig:
    """The architecture options of an SD1/SD2 UNet; defaults are diffusers' UNet2DConditionModel defaults."""

    sample_size: int | tuple[int, int] | None = None  # latent size the model was trained at
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # Heads per transformer (int or per block). config.json calls this "attention_head_dim", a misnomer
    # diffusers keeps for compatibility; the head width is channels // heads.
    num_attention_heads: int | tuple[int, ...] = 8
    use_linear_projection: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False  # SD2: attention math in float32
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # SDXL: "text_time" adds the pooled text vector and the micro-conditioning to the timestep embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid width per micro-conditioning value (256)
    projection_class_embeddings_input_dim: int | None = None  # pooled width + values x that width

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, as_tuples(getattr(self, f.name)))
        n = len(self.block_out_channels)
        for key, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            if len(types) != n or any(t not in allowed for t in types):
                raise unsupported("UNet", key, types, f"{n} of {allowed}, one per block_out_channels")
        for key in PER_BLOCK_KEYS:
            value = getattr(self, key)
            if not isinstance(value, int) and (len(value) != n or not all(isinstance(v, int) for v in value)):
                raise unsupported("UNet", key, value, f"an int or a flat list of {n} ints")
        if self.act_fn not in ACTIVATIONS:
            raise unsupported("UNet", "act_fn", self.act_fn, " or ".join(ACTIVATIONS))
        if not isinstance(self.norm_num_groups, int):
            raise unsupported("UNet", "norm_num_groups", self.norm_num_groups, "an int")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise unsupported("UNet", "addition_embed_type", self.addition_embed_type, "None or 'text_time'")
        text_time_sizes = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type == "text_time" and not all(isinstance(v, int) for v in text_time_sizes):
            raise unsupported(
                "UNet",
                "addition_time_embed_dim / projection_class_embeddings_input_dim",
                text_time_sizes,
                "two ints with addition_embed_type 'text_time'",
            )

    def time_id_width(self, pooled_width: int) -> int:
        """How many micro-conditioning values (time ids) the added embedding expects next to a pooled text
        vector `pooled_width` wide; ValueError if the widths do not add up."""
        rest = self.projection_class_embeddings_input_dim - pooled_width
        if rest <= 0 or rest % self.addition_time_embed_dim:
            raise ValueError(
                "UNet config: projection_class_embeddings_input_dim="
                f"{self.projection_class_embeddings_input_dim} is not the pooled text width {pooled_width} "
                f"plus a multiple of addition_time_embed_dim={self.addition_time_embed_dim}; the text "
                "encoder does not belong to this UNet"
            )
        return rest // self.addition_time_embed_dim

    def per_block(self, key: str) -> tuple[int, ...]:
        """One value per resolution level, for options config.json may give as a single int."""
        value = getattr(self, key)
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else value

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers UNet2DConditionModel config.json dict; ValueError for what isn't SD1/SD2."""
        config = dict(config)
        if isinstance(config.get("only_cross_attention"), list) and not any(config["only_cross_attention"]):
            config["only_cross_attention"] = False
        supported = {f.name for f in fields(cls)} | {"attention_head_dim"}
        picked = read_config(config, "UNet", supported, _FIXED, ignored={"dropout"})  # dropout: training only
        heads = picked.pop("attention_head_dim", 8)
        if picked.get("num_attention_heads") is None:
            picked["num_attention_heads"] = heads
        return cls(**picked)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config.json dict that `UNet2DConditionModel.from_config` builds the same model from."""
        d = {"_class_name": "UNet2DConditionModel"}
        d.update({f.name: as_lists(getattr(self, f.name)) for f in fields(self)})
        d["attention_head_dim"] = d.pop("num_attention_heads")
        return d


class UNet(nn.Module):
    """SD1.x/SD2.x conditional UNet: (noisy latent, timestep, text states) -> noise (or v) prediction."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        layers = config.per_block("layers_per_block")
        temb_dim = 4 * channels[0]
        resnet = ResnetOptions(temb_dim, config.norm_num_groups, config.norm_eps, config.act_fn)

        k_in, k_out = config.conv_in_kernel, config.conv_out_kernel
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], k_in, padding=(k_in - 1) // 2)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim, config.act_fn)

        self.down_blocks = nn.ModuleList()
        for level, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(
                DownBlock(
                    channels[max(level - 1, 0)],
                    channels[level],
                    layers[level],
                    resnet,
                    add_downsample=level < n - 1,
                    downsample_padding=config.downsample_padding,
                    make_attention=self._transformer(level) if block_type == "CrossAttnDownBlock2D" else None,
                )
            )
        mid_resnet = replace(resnet, output_scale_factor=config.mid_block_scale_factor)
        self.mid_block = MidBlock(channels[-1], mid_resnet, self._transformer(n - 1))

        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            level = n - 1 - i  # up block i mirrors down block `level`
            num_layers = layers[level] + 1
            # Each resnet concatenates one skip state: the mirrored down block's outputs (channels[level]),
            # and last the state that entered that down block (channels[level - 1]; conv_in's at level 0).
            skip_channels = [channels[level]] * (num_layers - 1) + [channels[max(level - 1, 0)]]
            self.up_blocks.append(
                UpBlock(
                    channels[min(level + 1, n - 1)],
                    channels[level],
                    num_layers,
                    resnet,
                    add_upsample=level > 0,
                    skip_channels=skip_channels,
                    make_attention=self._transformer(level) if block_type == "CrossAttnUpBlock2D" else None,
                )
            )

        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim)

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = activation(config.act_fn)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, k_out, padding=(k_out - 1) // 2)

    def _transformer(self, level: int) -> AttentionFactory:
        c = self.config
        return partial(
            Transformer2D,
            heads=c.per_block("num_attention_heads")[level],
            context_dim=c.per_block("cross_attention_dim")[level],
            num_layers=c.per_block("transformer_layers_per_block")[level],
            norm_groups=c.norm_num_groups,
            linear_projection=c.use_linear_projection,
            upcast=c.upcast_attention,
        )

    def embed_timestep(self, timestep: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
        """Timestep (0-d, [B] or a number) -> [B, 4*C0] embedding in the sample's dtype."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t[None] if t.ndim == 0 else t).expand(sample.shape[0])
        c = self.config
        sinusoids = timestep_sinusoids(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        return self.time_embedding(sinusoids.to(sample.dtype))  # sinusoids are float32, the model may not be

    def embed_additions(
        self, text_embeds: torch.Tensor, time_ids: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """SDXL's added embedding: pooled text [B, P] and time ids [B, k], each id sinusoid-embedded."""
        c = self.config
        width, flip, shift = c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift
        sinusoids = timestep_sinusoids(time_ids.flatten(), width, flip, shift)
        added = torch.cat([text_embeds, sinusoids.reshape(text_embeds.shape[0], -1)], dim=-1)
        return self.add_embedding(added.to(dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample [B, C_in, h, w], timestep 0-d or [B], encoder_hidden_states [B, L, D] -> [B, C_out, h, w].
        A "text_time" UNet (SDXL) also takes the pooled text `text_embeds` [B, P] and `time_ids` [B, k]."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.embed_timestep(timestep, sample)
        if self.config.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("a 'text_time' UNet (SDXL) needs text_embeds and time_ids")
            temb = temb + self.embed_additions(text_embeds, time_ids, temb.dtype)
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, context)
            skips.extend(states)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            # Upsample to the size of the skip state that comes next, so sizes that are not a multiple of
            # 2**levels (e.g. 8x6 latents) come back right; for multiples this is exactly 2x.
            size = skips[-len(block.resnets) - 1].shape[-2:] if block.upsamplers is not None else None
            x = block(x, temb, context, skips, size)

        return self.conv_out(self.conv_act(self.conv_norm_out(x)))

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Attend `slice_size` (batch, head) pairs at a time to save memory; None for all at once."""
        set_attention_slice(self, slice_size)
