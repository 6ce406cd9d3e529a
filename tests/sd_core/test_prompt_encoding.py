"""Prompts through the core's text towers: the plain (diffusers) default, and the opt-in A1111 syntax
(weights, 75-token chunks, BREAK) checked against an independent computation with the same models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_core import Img2ImgPipeline
from sd_core.prompt_syntax import parse_prompt_attention
from tests.conftest import make_images

LONG = ", ".join(f"word{i} detail" for i in range(25))  # 124 CLIP tokens: two chunks


def with_trained_looking_final_norm(folder: Path, target: Path) -> Path:
    """A copy of a model whose text encoder's final LayerNorm has a non-zero bias, as trained CLIP models
    have. A freshly initialised one (bias 0) makes every token's states zero-mean, and A1111's emphasis
    divides by that mean."""
    shutil.copytree(folder, target)
    weights = target / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    generator = torch.Generator().manual_seed(0)
    for name in ("final_layer_norm.weight", "final_layer_norm.bias"):
        key = next(k for k in state if k.endswith(name))
        state[key] = state[key] + 0.2 * torch.randn(state[key].shape, generator=generator)
    save_file(state, str(weights), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def pipes(model_dirs, xl_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained-norm")
    folders = {f: with_trained_looking_final_norm(d, root / f) for f, d in model_dirs.items()}
    folders.update(xl_model_dirs)  # SDXL takes a hidden layer before the final LayerNorm
    return {family: Img2ImgPipeline.from_pretrained(folder) for family, folder in folders.items()}


def fragment_ids(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Token ids and weights of an A1111 prompt without BREAK, computed fragment by fragment."""
    ids, weights = [], []
    for fragment, weight in parse_prompt_attention(text):
        tokens = tokenizer(fragment, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    return ids, weights


def reference_states(tower, ids: list[int], weights: list[float], pad: int, clip_skip: int = 0):
    """One 77-token chunk encoded the A1111 way: [BOS] + ids + EOS padding, the family's hidden layer,
    each token scaled by its weight, then the chunk's mean restored."""
    tokenizer, model = tower.tokenizer, tower.model
    chunk = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    chunk += [pad] * (77 - len(chunk))
    chunk_weights = torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights)))
    with torch.no_grad():
        output = model(torch.tensor([chunk]), output_hidden_states=True)
        states = output.hidden_states[-(1 + tower.tower.layer_offset + clip_skip)][0]
        if tower.tower.final_layer_norm:
            states = getattr(model, "text_model", model).final_layer_norm(states)
    weighted = states * chunk_weights[:, None]
    pooled = output.text_embeds[0] if tower.tower.projection else None
    return weighted * (states.mean() / weighted.mean()), pooled


def pad_id(tower) -> int:
    """A1111 pads CLIP chunks with EOS and OpenCLIP ones with 0 ("!")."""
    tokenizer = tower.tokenizer
    return tokenizer.eos_token_id if tower.tower.pad_token != "!" else tokenizer.pad_token_id


@pytest.mark.parametrize("family", ["v1", "v2", "xl_base", "xl_refiner"])
def test_weighted_prompt_equals_an_independent_computation(pipes, family):
    encoder = pipes[family].prompt_encoder
    text = "a (red:1.4) fox in [deep] snow, ((sharp))"
    got = encoder.encode([text], syntax="a1111")
    expected, pooled = [], None
    for tower in encoder.towers:
        ids, weights = fragment_ids(tower.tokenizer, text)
        states, tower_pooled = reference_states(tower, ids, weights, pad_id(tower))
        expected.append(states)
        pooled = tower_pooled if tower_pooled is not None else pooled
    assert got.states[0].shape == (77, sum(s.shape[-1] for s in expected))
    assert torch.abs(got.states[0] - torch.cat(expected, dim=-1)).max() <= 1e-6
    if pooled is not None:
        assert torch.abs(got.pooled[0] - pooled).max() <= 1e-6


@pytest.mark.parametrize("family", ["v1", "xl_base"])
def test_long_prompt_is_encoded_in_75_token_chunks(pipes, family):
    encoder = pipes[family].prompt_encoder
    got = encoder.encode([LONG], syntax="a1111")
    expected = []
    for tower in encoder.towers:
        ids, weights = fragment_ids(tower.tokenizer, LONG)
        assert 75 < len(ids) <= 150
        # cut at a comma within the last 20 tokens of the first chunk, as A1111 backtracks
        comma = tower.tokenizer.get_vocab()[",</w>"]
        cut = max(i for i in range(75) if ids[i] == comma and 75 - i <= 20) + 1
        first, _ = reference_states(tower, ids[:cut], weights[:cut], pad_id(tower))
        second, _ = reference_states(tower, ids[cut:], weights[cut:], pad_id(tower))
        expected.append(torch.cat([first, second]))
    assert got.states[0].shape[0] == 154
    assert torch.abs(got.states[0] - torch.cat(expected, dim=-1)).max() <= 1e-6
    assert got.truncated == [False]


def test_break_starts_a_new_chunk(pipes):
    encoder = pipes["v1"].prompt_encoder
    tower = encoder.towers[0]
    got = encoder.encode(["a castle BREAK a dragon"], syntax="a1111").states[0]
    first, _ = reference_states(tower, *fragment_ids(tower.tokenizer, "a castle"), pad_id(tower))
    second, _ = reference_states(tower, *fragment_ids(tower.tokenizer, "a dragon"), pad_id(tower))
    assert got.shape[0] == 154
    assert torch.abs(got - torch.cat([first, second])).max() <= 1e-6


@pytest.mark.parametrize("family", ["v1", "v2", "xl_base"])
def test_a_short_unweighted_prompt_is_the_same_in_both_syntaxes(pipes, family):
    encoder = pipes[family].prompt_encoder
    plain = encoder.encode(["a fox in snow"], syntax="plain")
    a1111 = encoder.encode(["a fox in snow"], syntax="a1111")
    assert torch.equal(plain.states[0], a1111.states[0])


def test_plain_prompts_are_cut_at_77_tokens_and_say_so(pipes):
    pipe = pipes["xl_base"]
    pipe.set_scheduler("euler")
    images = make_images(2)
    pipe(images, [LONG, "short"], seeds=[1, 2], strength=0.5, num_inference_steps=4, output_type="np")
    assert pipe.last_call.truncated_prompts == [True, False]
    pipe(images, [LONG, "short"], seeds=[1, 2], strength=0.5, num_inference_steps=4, output_type="np",
         prompt_syntax="a1111")
    assert pipe.last_call.truncated_prompts == [False, False]


@pytest.mark.parametrize("family", ["v1", "xl_base"])
def test_rows_of_different_prompt_lengths_run_as_if_alone(pipes, family):
    """A long row (2 chunks), a short one, and negatives of other lengths: each row's image is what it
    would be alone (rows of one conditioning length share a UNet call)."""
    pipe = pipes[family]
    pipe.set_scheduler("euler_a")
    images = make_images(3, seed=3)
    prompts = [LONG, "a (small:1.2) house", "BREAK a tree BREAK at night"]
    negatives = ["blurry", LONG, None]
    kwargs = dict(strength=0.7, guidance_scale=6.0, num_inference_steps=6, output_type="np",
                  prompt_syntax="a1111")
    together = pipe(images, prompts, negative_prompts=negatives, seeds=[1, 2, 3], **kwargs)
    for row in range(3):
        alone = pipe(images[row : row + 1], prompts[row], negative_prompts=[negatives[row]], seeds=[row + 1],
                     **kwargs)
        assert np.abs(together[row] - alone[0]).max() <= 1e-5


def test_weights_change_the_image(pipes):
    pipe = pipes["v1"]
    pipe.set_scheduler("ddim")
    images = make_images(1, seed=4)
    kwargs = dict(strength=0.7, guidance_scale=6.0, num_inference_steps=6, seeds=[1], output_type="np",
                  prompt_syntax="a1111")
    plain = pipe(images, "a red fox", **kwargs)
    weighted = pipe(images, "a (red:1.5) fox", **kwargs)
    assert np.abs(plain - weighted).max() > 1e-3


def test_unknown_prompt_syntax_is_refused(pipes):
    with pytest.raises(ValueError, match="prompt_syntax must be one of plain, a1111"):
        pipes["v1"](make_images(1), "a fox", num_inference_steps=4, prompt_syntax="comfy")


def test_a_multi_vector_embedding_is_expanded_once_in_the_a1111_syntax(model_dirs, tmp_path):
    """`tok` becomes `tok tok_1` once, before the prompt is parsed (expanding it again would turn the
    expansion's own `tok` into a second `tok tok_1`)."""
    from tests.sd_core.test_textual_inversion import WIDTH, vectors, write_safetensors

    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    path = write_safetensors(tmp_path / "cat.safetensors", {"<cat>": vectors(2, WIDTH["v1"], 0)})
    pipe.load_textual_inversion(path)
    tower = pipe.prompt_encoder.towers[0]
    (chunk,) = tower.chunks("a <cat> on a mat", "a1111").chunks
    plain = tower.tokenizer("a <cat> <cat>_1 on a mat").input_ids
    assert list(chunk.token_ids[: len(plain)]) == plain
    encoder = pipe.prompt_encoder
    assert torch.equal(encoder.encode(["a <cat>"], syntax="plain").states[0],
                       encoder.encode(["a <cat>"], syntax="a1111").states[0])
