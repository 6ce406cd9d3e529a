"""The CLIP tokenizer: from a model folder, or built offline from the bundled CLIP BPE vocabulary.

`data/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's 49,408-token BPE vocabulary as shipped in the
open_clip_torch wheel (MIT licence, see data/LICENSE.clip-bpe). Single-file checkpoints carry no
tokenizer, so this is what makes loading them work without the Hugging Face Hub.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and merge list, built like OpenAI's SimpleTokenizer."""
    raw = resources.files("sd_core").joinpath("data").joinpath(_BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def bundled_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's tokenizer from the bundled vocabulary; SD2 checkpoints pad with "!" instead of EOS."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


def save_bundled_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write the bundled vocabulary as a diffusers `tokenizer/` folder (vocab.json + merges.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """A model folder's tokenizer, capped at CLIP's 77 positions whatever its config says."""
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.model_max_length > MAX_LENGTH:
        tokenizer.model_max_length = MAX_LENGTH
    return tokenizer
