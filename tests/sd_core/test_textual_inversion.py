"""Textual inversion against diffusers' `load_textual_inversion`: file formats, tokens, errors, images."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sd_core import Img2ImgPipeline
from sd_core.adapters.textual_inversion import add_embedding, expand_prompt, load_embedding_file
from sd_core.tiny_configs import TINY_CONFIGS
from sd_core.tokenizer import bundled_tokenizer
from tests.conftest import diffusers_images, make_images

TOLERANCE = 1e-4
WIDTH = {"v1": 32, "v2": 64}  # the tiny models' text widths
# (file or folder, token=): loaded in this order on both sides.
EMBEDDINGS = [
    ("CharTurner.pt", None),  # A1111; its stored name is "charturnerv2"
    ("cat-toy", None),  # diffusers folder with learned_embeds.safetensors for "<cat-toy>"
    ("multi-vec.safetensors", None),  # 3 vectors for "<multi-vec>"
    ("cat-toy", "<my-tok>"),  # the same file under another token
]
SETTINGS = dict(strength=0.7, guidance_scale=7.5, num_inference_steps=6)
# scenario -> (prompts, negative prompts); base outputs are taken before any embedding is loaded.
SCENARIOS = {
    "a1111_pt": (["a charturnerv2 of a fox", "charturnerv2, a harbour at night"], ["blurry", "low quality"]),
    "diffusers_folder": (["a <cat-toy> backpack", "a photo of a <cat-toy>"], ["blurry", "low quality"]),
    "three_vectors": (["an oil painting of a <multi-vec> fox", "a harbour"], ["blurry", "<multi-vec>, low"]),
    "token_override": (["a <my-tok> on a table", "<my-tok>"], ["blurry", "low quality"]),
}


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, name: str, vecs: torch.Tensor) -> Path:
    """What A1111's `Embedding.save` writes (vector saved while training, so it requires grad)."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vecs.clone().requires_grad_()},
        "name": name,
        "step": 1500,
        "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(data, path)
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def embedding_dirs(tmp_path_factory) -> dict[str, Path]:
    """Per family, the files named in EMBEDDINGS."""
    dirs = {}
    for family, width in WIDTH.items():
        folder = tmp_path_factory.mktemp(f"embeddings-{family}")
        write_a1111_pt(folder / "CharTurner.pt", "charturnerv2", vectors(2, width, 1))
        write_safetensors(
            folder / "cat-toy" / "learned_embeds.safetensors", {"<cat-toy>": vectors(1, width, 2)[0]}
        )
        write_safetensors(folder / "multi-vec.safetensors", {"<multi-vec>": vectors(3, width, 3)})
        dirs[family] = folder
    return dirs


def run_ours(pipe: Img2ImgPipeline, scenario: str) -> np.ndarray:
    """Our pipeline; it expands multi-vector tokens in prompts and negative prompts itself."""
    prompts, negatives = SCENARIOS[scenario]
    return pipe(
        make_images(2), prompts, negative_prompts=negatives, seeds=[3, 4], output_type="np", **SETTINGS
    )


def run_oracle(pipe, scenario: str) -> np.ndarray:
    prompts, negatives = SCENARIOS[scenario]
    return diffusers_images(pipe, make_images(2), prompts, (3, 4), negative_prompt=negatives, **SETTINGS)


@pytest.fixture(scope="module", params=["v1", "v2"])
def loaded(request, model_dirs, embedding_dirs):
    """(ours, diffusers, base outputs): both pipelines with every embedding in EMBEDDINGS loaded."""
    family = request.param
    ours = Img2ImgPipeline.from_pretrained(model_dirs[family])
    oracle = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        str(model_dirs[family]), safety_checker=None
    )
    base = {scenario: run_ours(ours, scenario) for scenario in SCENARIOS}
    for name, token in EMBEDDINGS:
        path = embedding_dirs[family] / name
        ours.load_textual_inversion(path, token=token, allow_pickle=True)
        oracle.load_textual_inversion(str(path), token=token)
    return ours, oracle, base


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_images_match_diffusers(loaded, scenario):
    ours, oracle, base = loaded
    expected = run_oracle(oracle, scenario)
    # Every row must change, or an embedding that is silently ignored on both sides would pass.
    assert np.abs(expected - base[scenario]).reshape(2, -1).max(axis=1).min() > 1e-3
    assert np.abs(run_ours(ours, scenario) - expected).max() <= TOLERANCE


def test_tokens_and_embedding_matrix_equal_diffusers(loaded):
    ours, oracle, _ = loaded
    assert ours.tokenizer.added_tokens_encoder == oracle.tokenizer.added_tokens_encoder
    assert torch.equal(
        ours.text_encoder.get_input_embeddings().weight, oracle.text_encoder.get_input_embeddings().weight
    )


def test_expand_prompt_equals_diffusers_maybe_convert_prompt(tmp_path):
    tokenizer, text_encoder = bundled_tokenizer(), tiny_text_encoder()
    for token, count in [("<multi-vec>", 3), ("<one>", 1), ("<Up>", 2), ("star", 2)]:
        path = write_safetensors(
            tmp_path / f"{count}-{len(token)}.safetensors", {token: vectors(count, 32, 0)}
        )
        add_embedding(tokenizer, text_encoder, load_embedding_file(path), allow_override=True)
    prompts = [
        "a <multi-vec> fox, <multi-vec><multi-vec>",
        "<MULTI-VEC> and <one>",
        "<Up> or <up>",
        "stars in a star field",
        "already <multi-vec> <multi-vec>_1 <multi-vec>_2",
        "",
    ]
    expected = diffusers.loaders.TextualInversionLoaderMixin().maybe_convert_prompt(prompts, tokenizer)
    assert [expand_prompt(p, tokenizer) for p in prompts] == expected


# -- formats and identity ----------------------------------------------------------------------------


def tiny_text_encoder(family: str = "v1") -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**TINY_CONFIGS[family]["text_encoder"])).eval()


def test_a1111_pt_token_is_its_stored_name(tmp_path):
    path = write_a1111_pt(tmp_path / "CharTurner.pt", "charturnerv2", vectors(2, 32, 0))
    emb = load_embedding_file(path, allow_pickle=True)
    assert (emb.name, emb.token, emb.format) == ("charturnerv2", "charturnerv2", "a1111")
    assert torch.equal(emb.vectors[None], vectors(2, 32, 0))


def test_emb_params_file_is_named_after_its_file_stem(tmp_path):
    path = write_safetensors(tmp_path / "EasyStyle.safetensors", {"emb_params": vectors(4, 32, 0)})
    emb = load_embedding_file(path)
    assert (emb.token, emb.format, emb.num_vectors) == ("EasyStyle", "emb_params", 4)


def test_identity_is_file_hash_tokens_and_vector_count(tmp_path):
    path = write_safetensors(tmp_path / "learned_embeds.safetensors", {"<fox>": vectors(3, 32, 0)})
    emb = load_embedding_file(path)
    assert emb.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert emb.tokens == ["<fox>", "<fox>_1", "<fox>_2"]
    assert emb.num_vectors == 3


def test_token_argument_replaces_the_stored_name(tmp_path):
    path = write_safetensors(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": vectors(1, 32, 0)})
    tokenizer, text_encoder = bundled_tokenizer(), tiny_text_encoder()
    emb = load_embedding_file(path, token="<my-tok>")
    assert add_embedding(tokenizer, text_encoder, emb) == ["<my-tok>"]
    assert "<cat-toy>" not in tokenizer.get_vocab()
    token_id = tokenizer.convert_tokens_to_ids("<my-tok>")
    assert tokenizer("a <my-tok>").input_ids[2] == token_id
    assert torch.equal(text_encoder.get_input_embeddings().weight[token_id], emb.vectors[None][0])


def test_bare_tensor_loads_under_the_given_token(tmp_path):
    torch.save(vectors(2, 32, 0), tmp_path / "bare.pt")
    emb = load_embedding_file(tmp_path / "bare.pt", token="<bare>", allow_pickle=True)
    assert (emb.name, emb.tokens, emb.format) == (None, ["<bare>", "<bare>_1"], "tensor")


# -- errors ----------------------------------------------------------------------------------------


def test_wrong_width_names_both_widths_and_the_family(tmp_path):
    path = write_safetensors(tmp_path / "sd2.safetensors", {"<wide>": vectors(1, 64, 0)})
    with pytest.raises(ValueError, match=r"64-wide .* 32-wide: it is probably for another model family"):
        add_embedding(bundled_tokenizer(), tiny_text_encoder(), load_embedding_file(path))


def test_token_already_added_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "a.safetensors", {"<fox>": vectors(2, 32, 0)})
    tokenizer, text_encoder = bundled_tokenizer(), tiny_text_encoder()
    add_embedding(tokenizer, text_encoder, load_embedding_file(path))
    with pytest.raises(ValueError, match=r"\['<fox>', '<fox>_1'\] already in .* allow_override=True"):
        add_embedding(tokenizer, text_encoder, load_embedding_file(path))


def test_vocabulary_token_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "a.safetensors", {"cat": vectors(1, 32, 0)})
    with pytest.raises(ValueError, match=r"\['cat'\] already in the tokenizer's vocabulary"):
        add_embedding(bundled_tokenizer(), tiny_text_encoder(), load_embedding_file(path))


def test_allow_override_overwrites_the_rows_in_place(tmp_path):
    first = write_safetensors(tmp_path / "a.safetensors", {"<fox>": vectors(2, 32, 0)})
    second = write_safetensors(tmp_path / "b.safetensors", {"<fox>": vectors(2, 32, 1)})
    tokenizer, text_encoder = bundled_tokenizer(), tiny_text_encoder()
    add_embedding(tokenizer, text_encoder, load_embedding_file(first))
    rows, ids = len(tokenizer), tokenizer.convert_tokens_to_ids(["<fox>", "<fox>_1"])
    add_embedding(tokenizer, text_encoder, load_embedding_file(second), allow_override=True)
    weight = text_encoder.get_input_embeddings().weight
    assert len(tokenizer) == weight.shape[0] == rows
    assert torch.equal(weight[ids], vectors(2, 32, 1))


def test_override_with_fewer_vectors_is_refused(tmp_path):
    tokenizer, text_encoder = bundled_tokenizer(), tiny_text_encoder()
    three = write_safetensors(tmp_path / "a.safetensors", {"<fox>": vectors(3, 32, 0)})
    one = write_safetensors(tmp_path / "b.safetensors", {"<fox>": vectors(1, 32, 0)})
    add_embedding(tokenizer, text_encoder, load_embedding_file(three))
    with pytest.raises(ValueError, match=r"already added with 3 vectors .* overridden with 1"):
        add_embedding(tokenizer, text_encoder, load_embedding_file(one), allow_override=True)


def test_pickle_is_refused_without_opt_in(tmp_path):
    path = write_a1111_pt(tmp_path / "style.pt", "style", vectors(1, 32, 0))
    with pytest.raises(ValueError, match=r"style\.pt is a pickle file.*allow_pickle=True"):
        load_embedding_file(path)


def test_bare_tensor_without_token_is_refused(tmp_path):
    torch.save(vectors(1, 32, 0), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"bare\.pt holds a bare tensor .* pass token="):
        load_embedding_file(tmp_path / "bare.pt", allow_pickle=True)


def test_sdxl_file_holds_one_tensor_per_tower_under_its_file_stem(tmp_path):
    path = write_safetensors(
        tmp_path / "xl-style.safetensors", {"clip_l": vectors(2, 768, 0), "clip_g": vectors(2, 1280, 1)}
    )
    emb = load_embedding_file(path)
    assert (emb.token, emb.format, emb.num_vectors) == ("xl-style", "sdxl", 2)
    assert emb.widths == {"clip_l": 768, "clip_g": 1280}
    assert torch.equal(emb.vectors["clip_g"], vectors(2, 1280, 1))


def test_sdxl_file_with_different_vector_counts_is_refused(tmp_path):
    path = write_safetensors(
        tmp_path / "xl.safetensors", {"clip_l": vectors(2, 768, 0), "clip_g": vectors(3, 1280, 1)}
    )
    with pytest.raises(ValueError, match=r"different numbers of vectors \(clip_l 2, clip_g 3\)"):
        load_embedding_file(path)


def test_truncated_safetensors_is_refused_naming_the_file(tmp_path):
    path = write_safetensors(tmp_path / "cut.safetensors", {"<fox>": vectors(2, 32, 0)})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors file"):
        load_embedding_file(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_embedding_file(tmp_path / "nothing.safetensors")


def test_capitalised_multi_vector_token_warns_that_only_one_vector_is_used(tmp_path, caplog):
    path = write_safetensors(tmp_path / "a.safetensors", {"<Fox>": vectors(2, 32, 0)})
    with caplog.at_level(logging.WARNING, logger="sd_core.adapters.textual_inversion"):
        add_embedding(bundled_tokenizer(), tiny_text_encoder(), load_embedding_file(path))
    assert "only its first vector is used" in caplog.text
