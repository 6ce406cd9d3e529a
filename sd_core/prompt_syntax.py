"""AUTOMATIC1111's prompt syntax, text side: attention weights, 75-token chunks, and "Original" emphasis.

`(word)` weighs x1.1, `[word]` /1.1, `(word:1.3)` x1.3, brackets nest by multiplying, `\\(` `\\)` `\\[`
`\\]` `\\\\` are literal characters, and `BREAK` starts a new chunk. A prompt of any length becomes
chunks of 75 tokens, each framed as [BOS] + 75 + [EOS] = 77 and encoded on its own; the caller
concatenates the encoded chunks along the token axis. The caller owns the tokenizer and the encoder.

Written from stable-diffusion-webui (AUTOMATIC1111/stable-diffusion-webui), behaviour for behaviour:
- `modules/prompt_parser.py`: `parse_prompt_attention`, its regexes `re_attention` and `re_break`;
- `modules/sd_hijack_clip.py`: `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` (with its
  `next_chunk`), `empty_chunk` and `process_tokens` (the padding rule), and
  `FrozenCLIPEmbedderWithCustomWords` (`comma_token = vocab.get(',</w>')`, `id_pad = id_end`);
- `modules/sd_hijack_open_clip.py`: the OpenCLIP embedders set `id_pad = 0`;
- `modules/shared_options.py`: `comma_padding_backtrack` defaults to 20;
- `modules/sd_emphasis.py`: `EmphasisOriginal.after_transformers`.
Textual-inversion embeddings inside chunks (A1111's `fixes`) are not handled here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
ROUND_BRACKET_FACTOR = 1.1
# A1111 multiplies by 1/1.1 (not divides by 1.1); the two differ in the last bit.
SQUARE_BRACKET_FACTOR = 1 / 1.1
BREAK = ("BREAK", -1.0)

Tokenize = Callable[[list[str]], list[list[int]]]
"""Texts -> token ids per text, without BOS/EOS and without truncation."""

_ATTENTION_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)       # \( \) \[ \] \\ are literals; a lone backslash is dropped
    | [(\[]                         # opens a bracket
    | :(?P<weight>[+-]?[.\d]+)\)    # closes a round bracket with an explicit weight
    | [)\]]                         # closes one with its default factor
    | [^\\()\[\]:]+ | :             # plain text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class _Fragment:
    """A piece of prompt text whose weight still changes as enclosing brackets close."""

    text: str
    weight: float


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs, equal-weight neighbours merged; a `BREAK` is the pair ("BREAK", -1).

    Unclosed brackets still apply to everything after them; a stray `)` or `]` is plain text.
    A BREAK inside brackets gets its weight multiplied too, and is then no longer a break (as in A1111).
    """
    fragments: list[_Fragment] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment.weight *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        if match["escape"]:
            fragments.append(_Fragment(token[1:], 1.0))
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif match["weight"] is not None and open_round:
            scale_from(open_round.pop(), _explicit_weight(match["weight"], text))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:
            for i, part in enumerate(_BREAK_WORD.split(token)):
                if i > 0:
                    fragments.append(_Fragment(*BREAK))
                fragments.append(_Fragment(part, 1.0))

    # Unclosed brackets, round ones first, each in the order it was opened: float products depend on it.
    for start in open_round:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_BRACKET_FACTOR)

    merged: list[_Fragment] = []
    for fragment in fragments or [_Fragment("", 1.0)]:
        if merged and merged[-1].weight == fragment.weight:
            merged[-1].text += fragment.text
        else:
            merged.append(fragment)
    return [(fragment.text, fragment.weight) for fragment in merged]


def _explicit_weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"prompt weight {number!r} is not a number in prompt {prompt!r}") from None


@dataclass(frozen=True)
class PromptChunk:
    """One encoder input: 77 token ids ([BOS] + 75 + [EOS], padded) and the weight of each position."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class ChunkedPrompt:
    """A prompt's chunks, and its length in tokens as A1111 counts it (its `token_count`)."""

    chunks: tuple[PromptChunk, ...]
    token_count: int


class _ChunkFiller:
    """A1111's `tokenize_line` loop: appends tokens to the open chunk and closes chunks when due."""

    def __init__(self, chunk_length: int, comma_id: int | None, comma_backtrack: int):
        self.chunk_length = chunk_length
        self.comma_id = comma_id
        self.comma_backtrack = comma_backtrack
        self.closed: list[tuple[list[int], list[float]]] = []
        self.token_count = 0
        self._start_chunk([], [])

    def _start_chunk(self, token_ids: list[int], weights: list[float]) -> None:
        self.token_ids, self.weights = token_ids, weights
        self.last_comma = -1  # position of the open chunk's last comma

    def add(self, token_id: int, weight: float) -> None:
        if token_id == self.comma_id:
            self.last_comma = len(self.token_ids)
        elif self._tail_after_comma_fits_backtrack():
            self._move_tail_after_comma_to_next_chunk()
        if len(self.token_ids) == self.chunk_length:
            self.close()
        self.token_ids.append(token_id)
        self.weights.append(weight)

    def _tail_after_comma_fits_backtrack(self) -> bool:
        """The chunk is full, and its last comma is at most `comma_backtrack` positions from its end."""
        return (
            self.comma_backtrack != 0
            and len(self.token_ids) == self.chunk_length
            and self.last_comma != -1
            and self.chunk_length - self.last_comma <= self.comma_backtrack
        )

    def _move_tail_after_comma_to_next_chunk(self) -> None:
        """The comma ends this chunk; the tokens after it, with their weights, open the next one."""
        cut = self.last_comma + 1
        tail_ids, tail_weights = self.token_ids[cut:], self.weights[cut:]
        del self.token_ids[cut:], self.weights[cut:]
        self.close()
        self._start_chunk(tail_ids, tail_weights)

    def close(self, is_last: bool = False) -> None:
        """Only the last chunk counts its real length; every other chunk counts as full (A1111)."""
        self.token_count += len(self.token_ids) if is_last else self.chunk_length
        self.closed.append((self.token_ids, self.weights))
        self._start_chunk([], [])

    def finish(self) -> None:
        if self.token_ids or not self.closed:
            self.close(is_last=True)


def _framed(
    token_ids: list[int], weights: list[float], bos_id: int, eos_id: int, pad_id: int, chunk_length: int
) -> PromptChunk:
    """[BOS] + tokens + EOS up to `chunk_length` + [EOS]; with a distinct pad id, every position after
    the first EOS becomes pad (A1111's `process_tokens`). BOS, EOS and padding weigh 1."""
    fill = chunk_length - len(token_ids)
    ids = [bos_id, *token_ids, *[eos_id] * fill, eos_id]
    if pad_id != eos_id:
        first_eos = ids.index(eos_id)
        ids[first_eos + 1 :] = [pad_id] * (len(ids) - first_eos - 1)
    return PromptChunk(tuple(ids), (1.0, *weights, *[1.0] * fill, 1.0))


def chunk_prompt(
    text: str,
    tokenize: Tokenize,
    *,
    bos_id: int,
    eos_id: int,
    comma_id: int | None,
    pad_id: int | None = None,
    chunk_length: int = CHUNK_LENGTH,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> ChunkedPrompt:
    """A prompt as A1111 feeds it to CLIP: chunks of `chunk_length` tokens with per-token weights.

    `tokenize` gets every parsed fragment at once. `BREAK` closes the open chunk (an empty one too).
    When a chunk is full, the next token is not a comma, and the chunk's last comma lies within
    `comma_backtrack` tokens of its end, the tokens after that comma move to the next chunk; 0 turns
    this off. `comma_id` is the vocabulary's ",</w>" (None: no comma handling).

    Padding: `pad_id=None` pads with EOS, as A1111 does for CLIP (SD1, SDXL's first encoder). A1111's
    OpenCLIP encoders (SD2, SDXL's second) pad with id 0 after the first EOS: pass the tokenizer's pad
    id (CLIP's "!" is 0). An empty prompt gives one chunk, A1111's `empty_chunk`; a batch row with
    fewer chunks than its batchmates is filled with that chunk in A1111.
    """
    fragments = parse_prompt_attention(text)
    filler = _ChunkFiller(chunk_length, comma_id, comma_backtrack)
    token_lists = tokenize([fragment_text for fragment_text, _ in fragments])
    for token_ids, (fragment_text, weight) in zip(token_lists, fragments, strict=True):
        if (fragment_text, weight) == BREAK:
            filler.close()
            continue
        for token_id in token_ids:
            filler.add(token_id, weight)
    filler.finish()

    pad = eos_id if pad_id is None else pad_id
    chunks = tuple(_framed(ids, weights, bos_id, eos_id, pad, chunk_length) for ids, weights in filler.closed)
    return ChunkedPrompt(chunks, filler.token_count)


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's vector by its weight, then restore the mean.

    hidden: [..., 77, D], one encoded chunk per row; weights: [77] or [..., 77]. The mean is taken per
    row over that chunk's tokens and channels. A1111 takes it over the whole batch of rows at one chunk
    index, so a row there depends on its batchmates; per row, ours is identical at batch size 1 and a
    row's result never depends on the others. Computed in at least float32 (a half-precision mean
    would round the rescale factor), returned in `hidden`'s dtype.
    """
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    original = hidden.to(compute_dtype)
    weighted = original * weights.to(device=hidden.device, dtype=compute_dtype).unsqueeze(-1)
    original_mean = original.mean(dim=(-2, -1), keepdim=True)
    weighted_mean = weighted.mean(dim=(-2, -1), keepdim=True)
    return (weighted * (original_mean / weighted_mean)).to(hidden.dtype)
