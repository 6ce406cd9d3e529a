"""Which of our modules an adapter key means, for the UNet and each text tower of a model family.

Adapter files name their target modules three ways: kohya/A1111 flatten the module path with `_`
(`lora_unet_down_blocks_0_attentions_0_proj_in`), in diffusers' or in CompVis/sgm block names
(`lora_unet_input_blocks_1_1_proj_in`, SDXL's `lora_unet_input_blocks_4_1_transformer_blocks_0_...`);
PEFT/diffusers files keep the dotted path under a component prefix (`unet.down_blocks.0.attentions.0.proj_in`,
`text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj`). Which prefix names which text tower is the
family's (`TextTower.kohya_prefixes`: SD's `lora_te_`, SDXL's `lora_te1_` / `lora_te2_`, and ComfyUI's
`lora_te_` for the refiner's one tower); the PEFT prefix is the component's name, as diffusers'
`load_lora_weights` reads it. Because `_` also occurs inside names (`to_q`, `proj_in`), a flattened name
is resolved by looking it up among the flattened names of a real module tree, never by rewriting it;
CompVis names come from the same key map the single-file loader uses (`sd_core.ldm_keys`), so sgm block
numbers follow the UNet's own layout (diffusers does this arithmetic in
`lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers`; ComfyUI in `comfy/lora.py`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_core.families import FAMILIES, ModelFamily, bundled_config, family_named
from sd_core.ldm_keys import UNetLayout, unet_key_map
from sd_core.unet import UNet, UNetConfig

UNET = "unet"
KOHYA_UNET_PREFIX = "lora_unet_"
NESTED_TEXT = "text_model."  # transformers 4's level inside CLIPTextModel; 5 keeps it only with projection


@dataclass(frozen=True)
class Target:
    """An adapter key's module in our naming, and how the file spelled it."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # our module name (diffusers' for the UNet, transformers 5's for text towers)
    naming: str  # "kohya" or "peft"


@dataclass(frozen=True)
class LoraTargets:
    """Every key prefix of a model's components, and every spelling of its module names -> our name."""

    prefixes: dict[str, tuple[str, str]]  # key prefix -> (component, naming)
    names: dict[tuple[str, str], dict[str, str]]  # (component, naming) -> {spelling: our name}

    def resolve(self, module_key: str) -> Target | None:
        """The module an adapter key (its parameter suffix removed) targets; None if there is none."""
        for prefix, (component, naming) in self.prefixes.items():
            if module_key.startswith(prefix):
                module = self.names[component, naming].get(module_key.removeprefix(prefix))
                return Target(component, module, naming) if module else None
        return None


def key_prefixes(family: ModelFamily) -> dict[str, tuple[str, str]]:
    """{key prefix: (component, naming)} of the family's adapter files."""
    prefixes = {KOHYA_UNET_PREFIX: (UNET, "kohya"), f"{UNET}.": (UNET, "peft")}
    for tower in family.towers:
        prefixes |= {prefix: (tower.component, "kohya") for prefix in tower.kohya_prefixes}
        prefixes[f"{tower.component}."] = (tower.component, "peft")
    return prefixes


def text_key_prefixes(family: ModelFamily, aliases: bool = True) -> tuple[str, ...]:
    """How the family's adapter files prefix text-tower keys: kohya's (`aliases=False`: only each tower's
    own, without e.g. ComfyUI's `lora_te_` for the refiner) and PEFT's component names."""
    prefixes: list[str] = []
    for tower in family.towers:
        prefixes += tower.kohya_prefixes if aliases else tower.kohya_prefixes[:1]
        prefixes.append(f"{tower.component}.")
    return tuple(prefixes)


def text_prefixes_used(module_keys: Iterable[str]) -> set[str]:
    """The text-tower key prefixes, of any family, that adapter keys start with."""
    known = {prefix for family in FAMILIES.values() for prefix in text_key_prefixes(family)}
    return {prefix for key in module_keys for prefix in known if key.startswith(prefix)}


def families_using(prefixes: Iterable[str]) -> list[ModelFamily]:
    """The families whose own text-tower prefixes include all of `prefixes`: who an adapter file with
    those text keys was made for (`lora_te_`: SD 1.x / 2.x; `lora_te1_` + `lora_te2_`: SDXL base)."""
    wanted = set(prefixes)
    return [f for f in FAMILIES.values() if wanted <= set(text_key_prefixes(f, aliases=False))]


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules of `model` by name: what LoRA-family adapters patch."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def targets_of(models: Mapping[str, nn.Module], family: ModelFamily) -> LoraTargets:
    """The targets of a specific model, {component: module} ("unet" and the family's text towers), in any
    UNet layout, also on the meta device."""
    names: dict[tuple[str, str], dict[str, str]] = {}
    for component, model in models.items():
        ours = list(weighted_modules(model))
        if component == UNET:
            spellings = [(n, n) for n in ours]
            names[UNET, "peft"] = dict(spellings)
            compvis = list(zip(_ldm_module_names(model), ours, strict=True))
            names[UNET, "kohya"] = _flat_index(spellings + compvis)
        else:
            spellings = [(spelling, n) for n in ours for spelling in _text_spellings(n)]
            names[component, "peft"] = dict(spellings)
            names[component, "kohya"] = _flat_index(spellings)
    prefixes = {prefix: target for prefix, target in key_prefixes(family).items() if target[0] in models}
    return LoraTargets(prefixes, names)


def _text_spellings(name: str) -> set[str]:
    """A text module's name with and without transformers' `text_model.` level: files keep it (transformers
    4, and 5's CLIPTextModelWithProjection) or not (5's flat CLIPTextModel)."""
    bare = name.removeprefix(NESTED_TEXT)
    return {name, bare, NESTED_TEXT + bare}


@lru_cache(maxsize=4)
def standard_targets(family: str = "v2") -> LoraTargets:
    """Targets of a family's standard layout, built on the meta device (the default, SD 2.x's, also names
    every SD 1.x module: the module names are the same and its 23-layer text tower has SD1's 12)."""
    return targets_of(meta_models(bundled_config(family), family_named(family)), family_named(family))


def meta_models(configs: Mapping[str, Mapping[str, Any]], family: ModelFamily) -> dict[str, nn.Module]:
    """{component: model} that a model's config dicts describe ("unet" and the family's text towers),
    built as the loader builds them but on the meta device: every module and shape, no memory, no weights."""
    with torch.device("meta"):
        models: dict[str, nn.Module] = {UNET: UNet(UNetConfig.from_dict(configs[UNET]))}
        for tower in family.towers:
            fields = {k: v for k, v in configs[tower.component].items() if not k.startswith("_")}
            model_class = CLIPTextModelWithProjection if tower.projection else CLIPTextModel
            models[tower.component] = model_class(CLIPTextConfig(**fields))
    return models


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
