"""Textual inversion: new CLIP tokens whose embedding rows are learned vectors, added as diffusers adds them.

Replicates diffusers 0.42's `load_textual_inversion` (`tokenizer.add_tokens`, `resize_token_embeddings`,
the vectors written at the new tokens' ids) and `maybe_convert_prompt` (a k-vector token `tok` is
rewritten `tok tok_1 … tok_{k-1}` in prompts and negative prompts), so prompts encode identically.
"""

from __future__ import annotations

import logging

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from sd_core.adapters.embedding_files import LoadedEmbedding, load_embedding_file

__all__ = [
    "LoadedEmbedding",
    "add_embedding",
    "check_embedding_width",
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


def check_embedding_width(text_encoder: CLIPTextModel, emb: LoadedEmbedding) -> None:
    """ValueError naming both widths unless `emb`'s vectors fit the text encoder's token embeddings
    (shapes only: a meta-device text encoder does)."""
    width = text_encoder.get_input_embeddings().embedding_dim
    if emb.width != width:
        raise ValueError(
            f"textual inversion {emb.token!r} ({emb.source}) has {emb.width}-wide vectors but this text "
            f"encoder's token embeddings are {width}-wide: it is probably for another model family "
            "(SD1.x embeddings are 768-wide, SD2.x 1024-wide)"
        )


def _check_can_add(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, emb: LoadedEmbedding, allow_override: bool
) -> None:
    check_embedding_width(text_encoder, emb)
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


def add_embedding(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, emb: LoadedEmbedding, allow_override: bool = False
) -> list[str]:
    """Add `emb`'s tokens to `tokenizer` and its vectors to `text_encoder` (both mutated); returns the tokens.

    Tokens already in the vocabulary are refused unless `allow_override`, which overwrites their rows.
    Everything is checked before anything is changed.
    """
    _check_can_add(tokenizer, text_encoder, emb, allow_override)
    vocab = tokenizer.get_vocab()
    rows_needed = len(tokenizer) + sum(t not in vocab for t in emb.tokens)
    if rows_needed > text_encoder.get_input_embeddings().num_embeddings:
        # The new rows' initial values are overwritten below, so skip the mean/covariance initialisation.
        text_encoder.resize_token_embeddings(rows_needed, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, vector in zip(emb.tokens, emb.vectors, strict=True):
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
