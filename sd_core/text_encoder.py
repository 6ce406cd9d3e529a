"""Prompt -> CLIP hidden states, with diffusers' clip_skip semantics and cached negative prompts."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_core.adapters.textual_inversion import expand_prompt
from sd_core.weights import load_checked

log = logging.getLogger(__name__)

_NEGATIVE_CACHE_SIZE = 64


def normalise_text_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel is flat: drop the older `text_model.` prefix and position-id buffers."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key != "embeddings.position_ids":
            out[key] = value
    return out


def build_text_encoder(config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> CLIPTextModel:
    """A CLIPTextModel from its config.json dict and weights, every key and shape checked."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**fields))
    load_checked(model, normalise_text_keys(state_dict), "text encoder")
    # Buffers that are not in checkpoints (position ids) stay on meta after assign: rebuild them.
    model.embeddings.position_ids = torch.arange(model.config.max_position_embeddings).unsqueeze(0)
    return model.eval()


class PromptEncoder:
    """Tokenizes and encodes prompts exactly as diffusers' `encode_prompt` does.

    clip_skip=k (k >= 1) takes hidden_states[-(k + 1)] through the final LayerNorm; like diffusers it
    applies to the prompts only, never to the negative prompts. Negative-prompt embeddings are computed
    once per distinct text and kept (most runs use one negative prompt for every row).
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_model: CLIPTextModel):
        self.tokenizer = tokenizer
        self.text_model = text_model
        self._negatives: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def num_layers(self) -> int:
        return self.text_model.config.num_hidden_layers

    def _token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [expand_prompt(t, self.tokenizer) for t in texts]  # multi-vector TI tokens, as diffusers
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(
            list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for text, full in zip(texts, self.tokenizer(list(texts)).input_ids, strict=True):
            if len(full) > max_length:
                log.warning("prompt truncated to CLIP's %d tokens: %.80r", max_length, text)
        return ids.to(self.text_model.device)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], clip_skip: int | None = None) -> torch.Tensor:
        """[B, 77, D] conditioning for `prompts`."""
        ids = self._token_ids(prompts)
        if not clip_skip:
            return self.text_model(ids).last_hidden_state
        hidden = self.text_model(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return self.text_model.final_layer_norm(hidden)

    @torch.no_grad()
    def encode_negative(self, negative_prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77, D] unconditional embeddings, each distinct text encoded once and cached."""
        missing = [t for t in dict.fromkeys(negative_prompts) if t not in self._negatives]
        if missing:
            for text, emb in zip(missing, self.encode(missing), strict=True):
                self._negatives[text] = emb
        for text in negative_prompts:
            self._negatives.move_to_end(text)
        rows = [self._negatives[t] for t in negative_prompts]
        while len(self._negatives) > max(_NEGATIVE_CACHE_SIZE, len(set(negative_prompts))):
            self._negatives.popitem(last=False)
        return torch.stack(rows)

    def clear_cache(self) -> None:
        """Forget cached negative embeddings (needed after the text encoder's weights change)."""
        self._negatives.clear()
