"""One text tower: a CLIP text model and its tokenizer, turning texts into the UNet's token states.

How the states are taken is the family's (`TextTower`): SD1/SD2 use the last layer through the final
LayerNorm, SDXL the penultimate layer as it is; `clip_skip=k` moves k layers further back. A prompt is
one 77-token chunk (diffusers' plain prompts: longer ones are cut) or, with the A1111 syntax, weighted
chunks of 75 tokens that are encoded one by one and concatenated (sd_core.prompt_syntax).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sd_core.adapters.textual_inversion import expand_prompt
from sd_core.families import TextTower
from sd_core.prompt_syntax import PromptChunk, chunk_prompt, emphasize
from sd_core.weights import load_checked

log = logging.getLogger(__name__)

PROMPT_SYNTAXES = ("plain", "a1111")
_PROJECTION_KEY = "text_projection.weight"
_NESTED = "text_model."  # the level transformers 5 keeps only in CLIPTextModelWithProjection


def normalise_text_keys(state_dict: Mapping[str, torch.Tensor], projection: bool) -> dict[str, torch.Tensor]:
    """Keys as the model class names them: transformers 5's CLIPTextModel is flat (`encoder.layers...`),
    CLIPTextModelWithProjection keeps `text_model.` and adds `text_projection`; position-id buffers,
    which older files carry, are dropped."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix(_NESTED)
        if key == "embeddings.position_ids":
            continue
        out[key if not projection or key == _PROJECTION_KEY else _NESTED + key] = value
    return out


def build_text_encoder(
    config: Mapping, state_dict: Mapping[str, torch.Tensor], projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text model from its config.json dict and weights, every key and shape checked."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        model = model_class(CLIPTextConfig(**fields))
    load_checked(model, normalise_text_keys(state_dict, projection), "text encoder")
    # Buffers that are not in checkpoints (position ids) stay on meta after assign: rebuild them.
    _text_model(model).embeddings.position_ids = torch.arange(model.config.max_position_embeddings)[None]
    return model.eval()


def _text_model(model: CLIPTextModel | CLIPTextModelWithProjection) -> CLIPTextModel:
    """The transformer itself (CLIPTextModelWithProjection nests it under `text_model`)."""
    return getattr(model, "text_model", model)


@dataclass(frozen=True)
class TowerChunks:
    """A text as a tower's encoder inputs: one or more 77-token chunks, and whether the text was cut."""

    chunks: tuple[PromptChunk, ...]
    truncated: bool = False


class TowerEncoder:
    """A family's text tower with its tokenizer and model: texts -> chunks -> token states."""

    def __init__(self, tower: TextTower, tokenizer: CLIPTokenizer, model: CLIPTextModel):
        self.tower = tower
        self.tokenizer = tokenizer
        self.model = model

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def max_clip_skip(self) -> int:
        """The deepest clip_skip that still leaves one transformer layer."""
        return self.num_layers - self.tower.layer_offset - 1

    def chunks(self, text: str, syntax: str) -> TowerChunks:
        """`text` as chunks: one (cut at 77 tokens, as diffusers does) for "plain", A1111's for "a1111"."""
        text = expand_prompt(text, self.tokenizer)  # multi-vector TI tokens, as diffusers does
        if syntax == "a1111":
            return TowerChunks(self._a1111_chunks(text))
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids
        truncated = len(self.tokenizer(text).input_ids) > max_length
        if truncated:
            log.warning("prompt truncated to CLIP's %d tokens: %.80r", max_length, text)
        return TowerChunks((PromptChunk(tuple(ids), (1.0,) * len(ids)),), truncated)

    def empty_chunk(self, syntax: str) -> PromptChunk:
        """What pads a row's chunk list to another tower's length: the encoding input of ""."""
        return self.chunks("", syntax).chunks[0]

    def _a1111_chunks(self, text: str) -> tuple[PromptChunk, ...]:
        tokenizer = self.tokenizer

        def tokenize(texts: list[str]) -> list[list[int]]:  # `text` is TI-expanded already (chunks())
            return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]

        pad = tokenizer.pad_token_id
        return chunk_prompt(
            text,
            tokenize,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            comma_id=tokenizer.get_vocab().get(",</w>"),
            pad_id=None if pad == tokenizer.eos_token_id else pad,
        ).chunks

    @torch.no_grad()
    def encode(
        self, chunks: Sequence[PromptChunk], clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token states [n, 77, D], projected pooled vectors [n, P] or None) of n chunks."""
        ids = torch.tensor([chunk.token_ids for chunk in chunks], device=self.model.device)
        output = self.model(ids, output_hidden_states=True)
        states = output.hidden_states[-(1 + self.tower.layer_offset + (clip_skip or 0))]
        if self.tower.final_layer_norm:
            states = self._final_layer_norm(states)
        weights = [chunk.weights for chunk in chunks]
        if any(w != 1.0 for row in weights for w in row):
            states = emphasize(states, torch.tensor(weights))
        return states, (output.text_embeds if self.tower.projection else None)

    def _final_layer_norm(self, states: torch.Tensor) -> torch.Tensor:
        return _text_model(self.model).final_layer_norm(states)
