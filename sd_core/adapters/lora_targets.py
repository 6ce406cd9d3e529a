"""Which of our modules an adapter key means, for the UNet and the CLIP text encoder.

Adapter files name their target modules three ways: kohya/A1111 flatten the module path with `_`
(`lora_unet_down_blocks_0_attentions_0_proj_in`), in diffusers' or in CompVis block names
(`lora_unet_input_blocks_1_1_proj_in`); PEFT/diffusers files keep the dotted path under a component
prefix (`unet.down_blocks.0.attentions.0.proj_in`). Because `_` also occurs inside names (`to_q`,
`proj_in`), a flattened name is resolved by looking it up among the flattened names of a real module
tree, never by rewriting it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from sd_core.families import bundled_config
from sd_core.ldm_keys import UNetLayout, unet_key_map
from sd_core.unet import UNet, UNetConfig

UNET = "unet"
TEXT_ENCODER = "text_encoder"
# key prefix -> (component, naming); PEFT prefixes are the component names
KEY_PREFIXES = {
    "lora_unet_": (UNET, "kohya"),
    "lora_te_": (TEXT_ENCODER, "kohya"),
    "unet.": (UNET, "peft"),
    "text_encoder.": (TEXT_ENCODER, "peft"),
}


@dataclass(frozen=True)
class Target:
    """An adapter key's module in our naming, and how the file spelled it."""

    component: str  # "unet" or "text_encoder"
    module: str  # our (diffusers / flat transformers 5) module name
    naming: str  # "kohya" or "peft"


@dataclass(frozen=True)
class LoraTargets:
    """Per component and naming, every spelling of a module name an adapter key may use -> our name."""

    names: dict[tuple[str, str], dict[str, str]]  # (component, naming) -> {spelling: our name}

    def resolve(self, module_key: str) -> Target | None:
        """The module an adapter key (its parameter suffix removed) targets; None if there is none."""
        for prefix, (component, naming) in KEY_PREFIXES.items():
            if module_key.startswith(prefix):
                module = self.names[component, naming].get(module_key.removeprefix(prefix))
                return Target(component, module, naming) if module else None
        return None


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules of `model` by name: what LoRA-family adapters patch."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def targets_of(unet: nn.Module, text_encoder: nn.Module) -> LoraTargets:
    """The targets of a specific model (any UNet layout, also on the meta device)."""
    unet_names, text_names = list(weighted_modules(unet)), list(weighted_modules(text_encoder))
    unet_spellings = [(n, n) for n in unet_names] + list(
        zip(_ldm_module_names(unet), unet_names, strict=True)
    )
    # text-encoder keys may keep transformers 4's `text_model.` level, which transformers 5 dropped
    text_spellings = [(n, n) for n in text_names] + [(f"text_model.{n}", n) for n in text_names]
    return LoraTargets(
        {
            (UNET, "peft"): {n: n for n in unet_names},
            (UNET, "kohya"): _flat_index(unet_spellings),
            (TEXT_ENCODER, "peft"): dict(text_spellings),
            (TEXT_ENCODER, "kohya"): _flat_index(text_spellings),
        }
    )


@lru_cache(maxsize=1)
def standard_targets() -> LoraTargets:
    """Targets of the standard SD1.x/SD2.x layout (module names are the same in both families; a
    23-layer text tower names every layer of SD1's 12), built on the meta device."""
    return targets_of(*meta_modules(bundled_config("v2")))


def meta_modules(configs: Mapping[str, Mapping[str, Any]]) -> tuple[UNet, CLIPTextModel]:
    """The UNet and CLIP text encoder that a model's "unet" / "text_encoder" config dicts describe, built
    as the loader builds them but on the meta device: every module and shape, no memory, no weights."""
    text_fields = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_dict(configs["unet"]))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_fields))
    return unet, text_encoder


def _ldm_module_names(unet: nn.Module) -> list[str]:
    """CompVis names of the UNet's weighted modules, in `weighted_modules` order."""
    state = unet.state_dict()
    layout = UNetLayout.from_diffusers_keys(state.keys())
    weights = {f"{name}.weight": state[f"{name}.weight"] for name in weighted_modules(unet)}
    return [key.removesuffix(".weight") for key in unet_key_map(layout).to_ldm(weights)]


def _flat_index(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{name with "." -> "_": our name}, leaving out flattened names that two modules share (ambiguous)."""
    meanings: dict[str, set[str]] = defaultdict(set)
    for name, ours in pairs:
        meanings[name.replace(".", "_")].add(ours)
    return {flat: next(iter(ours)) for flat, ours in meanings.items() if len(ours) == 1}
