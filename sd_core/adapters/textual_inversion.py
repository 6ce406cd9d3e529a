"""Textual inversion: new CLIP tokens whose embedding rows are learned vectors, added as diffusers adds them.

Replicates diffusers 0.42's `load_textual_inversion` (`tokenizer.add_tokens`, `resize_token_embeddings`,
the vectors written at the new tokens' ids) and `maybe_convert_prompt` (a k-vector token `tok` is
rewritten `tok tok_1 … tok_{k-1}` in prompts and negative prompts), so prompts encode identically.

A model with several text towers (SDXL) gets the token in every tower, each with the file's tensor for
it (`TextTower.embedding_key`: clip_l, clip_g): what diffusers' docs do by calling
`load_textual_inversion` once per tower with the same token (`loaders/textual_inversion.py`), and what
ComfyUI does by `embedding_key` (`comfy/sdxl_clip.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from sd_core.adapters.embedding_files import SDXL_KEYS, LoadedEmbedding, load_embedding_file
from sd_core.families import FAMILIES, ModelFamily

if TYPE_CHECKING:  # sd_core.text_encoder imports this module (expand_prompt)
    from sd_core.text_encoder import TowerEncoder

__all__ = [
    "LoadedEmbedding",
    "add_embedding",
    "add_embedding_to_towers",
    "check_embedding_width",
    "embedding_keys",
    "expand_prompt",
    "load_embedding_file",
]

log = logging.getLogger(__name__)


def _added_siblings(token: str, added: dict[str, int]) -> list[str]:
    """`token_1`, `token_2`, … while they are added tokens: what `expand_prompt` appends to `token`."""
    siblings: list[str] = []
    while f"{token}_{len(siblings) + 1}" in added:
        siblings.append(f"{token}_{len(siblings) + 1}")
    return siblings


def expand_prompt(text: str, tokenizer: CLIPTokenizer) -> str:
    """diffusers' `maybe_convert_prompt` for one string: each added token is followed by its `_i` siblings.

    Quirks kept for parity: tokens are matched on the tokenizer's output, which CLIP's normaliser
    lower-cases, so a token with capitals is never expanded; the rewrite is a plain substring replace.
    """
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(text)):
        if token in added:
            text = text.replace(token, " ".join([token, *_added_siblings(token, added)]))
    return text


def _labels(families: Sequence[ModelFamily]) -> str:
    return " / ".join(family.label for family in families)


def embedding_keys(emb: LoadedEmbedding, family: ModelFamily) -> dict[str, str | None]:
    """{component: embedding key} of the tensor each of the family's text towers takes from `emb`. A file
    may hold tensors for towers the model lacks (an SDXL file's clip_l on the refiner: unused); a tower
    without its tensor is a ValueError naming the families, or the tensor that is missing."""
    keys = {}
    for tower in family.towers:
        key = tower.embedding_key
        if key not in emb.vectors:
            raise ValueError(_missing_tensor(emb, family, tower.component, key))
        keys[tower.component] = key
    return keys


def _missing_tensor(emb: LoadedEmbedding, family: ModelFamily, component: str, key: str | None) -> str:
    readers = [f for f in FAMILIES.values() if any(t.embedding_key in emb.vectors for t in f.towers)]
    what = f"textual inversion {emb.token!r} ({emb.source})"
    if None in emb.vectors:
        return (
            f"{what} is a one-tensor embedding, the kind {_labels(readers)} models read, but this model is "
            f"{family.label}, whose text towers each need their own tensor ({', '.join(SDXL_KEYS)} in one "
            "file): use an embedding trained for SDXL"
        )
    if key is None:
        return (
            f"{what} is an SDXL embedding ({', '.join(map(str, emb.vectors))} tensors) but this model is "
            f"{family.label}, which reads one-tensor embeddings: use an embedding trained for {family.label}"
        )
    return (
        f"{what} has no {key!r} tensor, which {family.label}'s {component} needs (the file holds "
        f"{', '.join(map(str, emb.vectors))})"
    )


def check_embedding_width(text_encoder: CLIPTextModel, emb: LoadedEmbedding, key: str | None = None) -> None:
    """ValueError naming both widths unless `emb`'s vectors for embedding key `key` fit the text encoder's
    token embeddings (shapes only: a meta-device text encoder does)."""
    width, got = text_encoder.get_input_embeddings().embedding_dim, emb.widths[key]
    if got != width:
        tensor = f" {key!r}" if key else ""
        raise ValueError(
            f"textual inversion {emb.token!r} ({emb.source}) has {got}-wide{tensor} vectors but this text "
            f"encoder's token embeddings are {width}-wide: it is probably for another model family "
            "(SD1.x embeddings are 768-wide, SD2.x 1024-wide, SDXL's clip_l 768 and clip_g 1280)"
        )


def _check_can_add(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    emb: LoadedEmbedding,
    allow_override: bool,
    key: str | None,
) -> None:
    check_embedding_width(text_encoder, emb, key)
    vocab = tokenizer.get_vocab()
    taken = [t for t in emb.tokens if t in vocab]
    # Siblings beyond this embedding's vectors would still be appended to the token by expand_prompt.
    stale = _added_siblings(emb.token, tokenizer.added_tokens_encoder)[emb.num_vectors - 1 :]
    if (taken or stale) and not allow_override:
        raise ValueError(
            f"token(s) {taken + stale} already in the tokenizer's vocabulary: choose another token= "
            "or pass allow_override=True to overwrite their embeddings"
        )
    if stale:
        raise ValueError(
            f"{emb.token!r} is already added with {emb.num_vectors + len(stale)} vectors and cannot be "
            f"overridden with {emb.num_vectors}: prompts would still expand to {stale}"
        )


def add_embedding_to_towers(
    towers: Sequence[TowerEncoder], family: ModelFamily, emb: LoadedEmbedding, allow_override: bool = False
) -> list[str]:
    """Add `emb`'s tokens to every text tower of a `family` model, each tower with its own tensor of the
    file; returns the tokens. Every tower is checked before any is changed."""
    keys = embedding_keys(emb, family)
    for tower in towers:
        _check_can_add(tower.tokenizer, tower.model, emb, allow_override, keys[tower.tower.component])
    for tower in towers:
        add_embedding(tower.tokenizer, tower.model, emb, allow_override, keys[tower.tower.component])
    return emb.tokens


def add_embedding(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    emb: LoadedEmbedding,
    allow_override: bool = False,
    key: str | None = None,
) -> list[str]:
    """Add `emb`'s tokens to `tokenizer` and its vectors (those of embedding key `key`: None for the
    one-tensor formats) to `text_encoder` (both mutated); returns the tokens.

    Tokens already in the vocabulary are refused unless `allow_override`, which overwrites their rows.
    Everything is checked before anything is changed.
    """
    _check_can_add(tokenizer, text_encoder, emb, allow_override, key)
    vocab = tokenizer.get_vocab()
    rows_needed = len(tokenizer) + sum(t not in vocab for t in emb.tokens)
    if rows_needed > text_encoder.get_input_embeddings().num_embeddings:
        # The new rows' initial values are overwritten below, so skip the mean/covariance initialisation.
        text_encoder.resize_token_embeddings(rows_needed, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector in zip(emb.tokens, emb.vectors[key], strict=True):
            tokenizer.add_tokens(token)
            weight[tokenizer.convert_tokens_to_ids(token)] = vector.to(weight.device, weight.dtype)
    if emb.num_vectors > 1 and tokenizer.tokenize(emb.token) != [emb.token]:
        log.warning(
            "textual inversion %r has %d vectors but the tokenizer normalises it to %r, so prompts will "
            "not be expanded and only its first vector is used (diffusers behaves the same); "
            "pass a lower-case token= to use them all",
            emb.token,
            emb.num_vectors,
            tokenizer.tokenize(emb.token),
        )
    return emb.tokens
