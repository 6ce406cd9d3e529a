"""CompVis text-encoder weights <-> transformers 5 CLIPTextModel's flat keys (`encoder.layers.0...`).

SD 1.x stores a transformers CLIPTextModel under `cond_stage_model.transformer.`; SD 2.x stores an
OpenCLIP text tower under `cond_stage_model.model.`, with fused q/k/v projections. Keys here are relative
to those prefixes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

from sd_core.ldm_keys import KeyMap, ModuleRename

POSITION_IDS = "embeddings.position_ids"  # a buffer older transformers saved; never a weight

# OpenCLIP tensors CLIPTextModel has no use for: the contrastive head and the causal-mask buffer.
OPENCLIP_IGNORED = frozenset({"text_projection", "logit_scale", "attn_mask"})

_OPENCLIP_TOP_LEVEL = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm", "ln_final"),
)
_OPENCLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")
_FUSED_QKV = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_SPLIT_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)")
_FLAT_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def clip_to_flat(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x `cond_stage_model.transformer.*` -> flat keys; early files lack the `text_model.` level."""
    flat = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    flat.pop(POSITION_IDS, None)
    return flat


def flat_to_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"text_model.{key}": value for key, value in state_dict.items() if key != POSITION_IDS}


def openclip_to_flat(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SD 2.x OpenCLIP -> flat keys, keeping the first `num_layers` blocks (diffusers' SD2 uses 23 of 24)."""
    flat, renamed = {}, {}
    for key, value in state_dict.items():
        block = _RESBLOCK.match(key)
        if key in OPENCLIP_IGNORED or (block and int(block[1]) >= num_layers):
            continue
        fused = _FUSED_QKV.fullmatch(key)
        if fused:
            layer, param = fused.groups()
            for name, part in zip("qkv", value.chunk(3), strict=True):
                flat[f"encoder.layers.{layer}.self_attn.{name}_proj.{param}"] = part
        else:
            renamed[key] = value
    return flat | _openclip_key_map(num_layers).to_diffusers(renamed)


def flat_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = {int(match[1]) for key in state_dict if (match := _FLAT_LAYER.match(key))}
    fused = {
        f"transformer.resblocks.{layer}.attn.in_proj_{param}": torch.cat(
            [state_dict[f"encoder.layers.{layer}.self_attn.{name}_proj.{param}"] for name in "qkv"]
        )
        for layer in sorted(layers)
        for param in ("weight", "bias")
    }
    rest = {k: v for k, v in state_dict.items() if k != POSITION_IDS and not _SPLIT_QKV.fullmatch(k)}
    return fused | _openclip_key_map(len(layers)).to_ldm(rest)


def _openclip_key_map(num_layers: int) -> KeyMap:
    return KeyMap("OpenCLIP text encoder", tuple(_openclip_renames(num_layers)))


def _openclip_renames(num_layers: int) -> Iterator[ModuleRename]:
    for flat, ldm in _OPENCLIP_TOP_LEVEL:
        yield ModuleRename(flat, ldm)
    for layer in range(num_layers):
        for flat, ldm in _OPENCLIP_LAYER:
            yield ModuleRename(f"encoder.layers.{layer}.{flat}", f"transformer.resblocks.{layer}.{ldm}")
