"""AUTOMATIC1111's prompt syntax: attention parsing, 75-token chunks with comma backtracking, emphasis."""

from __future__ import annotations

import pytest
import torch

from sd_core.prompt_syntax import (
    BREAK,
    ChunkedPrompt,
    chunk_prompt,
    emphasize,
    parse_prompt_attention,
)
from sd_core.tokenizer import bundled_tokenizer

# A fake vocabulary: the word "17" is token 17, "," is COMMA, any other word is WORD; whitespace separates.
BOS, EOS, PAD, COMMA, WORD = 1001, 1002, 1003, 1000, 999


def number_tokens(text: str) -> list[int]:
    words = text.replace(",", " , ").split()
    return [COMMA if word == "," else int(word) if word.isdigit() else WORD for word in words]


def number_tokenize(texts: list[str]) -> list[list[int]]:
    return [number_tokens(text) for text in texts]


def numbers(first: int, last: int) -> str:
    """The prompt "first first+1 ... last": one token per number."""
    return " ".join(str(i) for i in range(first, last + 1))


def chunk_numbers(text: str, **kwargs) -> ChunkedPrompt:
    return chunk_prompt(text, number_tokenize, bos_id=BOS, eos_id=EOS, comma_id=COMMA, **kwargs)


def framed(ids: list[int], pad: int = EOS) -> tuple[int, ...]:
    """[BOS] + ids + [EOS], padded to 77: with EOS (CLIP), or EOS then `pad` (A1111's OpenCLIP)."""
    if pad == EOS:
        return (BOS, *ids, *[EOS] * (76 - len(ids)))
    return (BOS, *ids, EOS, *[pad] * (75 - len(ids)))


# --- parse_prompt_attention ---------------------------------------------------------------------

# Every example in A1111's `parse_prompt_attention` docstring (modules/prompt_parser.py), verbatim.
A1111_DOCSTRING_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_DOCSTRING_EXAMPLES)
def test_parse_matches_every_a1111_docstring_example_exactly(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("\\(a\\)", [("(a)", 1.0)]),
        ("\\[a\\]", [("[a]", 1.0)]),
        ("a\\\\b", [("a\\b", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash escapes nothing and is dropped
        ("(\\(a\\))", [("(a)", 1.1)]),
    ],
)
def test_escaped_brackets_and_backslashes_are_literal_text(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_nested_weights_multiply_in_closing_order():
    assert parse_prompt_attention("((a:1.5))") == [("a", 1.5 * 1.1)]
    assert parse_prompt_attention("[(a:2)]") == [("a", 2 * (1 / 1.1))]
    assert parse_prompt_attention("[[a]]") == [("a", 1 / 1.1 / 1.1)]


def test_unclosed_brackets_weigh_everything_to_the_end():
    assert parse_prompt_attention("a [b") == [("a ", 1.0), ("b", 1 / 1.1)]
    assert parse_prompt_attention("a (b") == [("a ", 1.0), ("b", 1.1)]
    assert parse_prompt_attention("([a") == [("a", 1.1 * (1 / 1.1))]


def test_stray_closing_brackets_and_colons_are_plain_text():
    assert parse_prompt_attention("a) b] c:1.3) d:e") == [("a) b] c:1.3) d:e", 1.0)]


def test_a_non_numeric_explicit_weight_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'1.2.3' is not a number"):
        parse_prompt_attention("(a:1.2.3)")


def test_empty_prompt_is_one_empty_fragment():
    assert parse_prompt_attention("") == [("", 1.0)]


def test_break_splits_fragments_and_eats_surrounding_whitespace():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("BREAK a") == [("", 1.0), BREAK, ("a", 1.0)]
    assert parse_prompt_attention("a BREAK") == [("a", 1.0), BREAK, ("", 1.0)]
    assert BREAK == ("BREAK", -1)


def test_break_must_be_an_uppercase_whole_word():
    assert parse_prompt_attention("a break b") == [("a break b", 1.0)]
    assert parse_prompt_attention("BREAKING aBREAK") == [("BREAKING aBREAK", 1.0)]


def test_break_inside_brackets_is_weighted_like_text_as_in_a1111():
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


# --- chunk_prompt with a one-token-per-word vocabulary -------------------------------------------


def test_short_prompt_is_one_chunk_framed_and_padded_with_eos():
    prompt = chunk_numbers("(5:1.5) 6 7")
    (chunk,) = prompt.chunks
    assert chunk.token_ids == framed([5, 6, 7])
    assert chunk.weights == (1.0, 1.5, 1.0, 1.0, *[1.0] * 72, 1.0)
    assert prompt.token_count == 3


def test_a_distinct_pad_id_fills_everything_after_the_first_eos():
    (chunk,) = chunk_numbers("5 6 7", pad_id=PAD).chunks
    assert chunk.token_ids == framed([5, 6, 7], pad=PAD)


def test_empty_prompt_is_one_chunk_of_padding():
    for text in ("", "()"):
        prompt = chunk_numbers(text)
        assert [c.token_ids for c in prompt.chunks] == [framed([])]
        assert prompt.chunks[0].weights == (1.0,) * 77
        assert prompt.token_count == 0
    assert chunk_numbers("", pad_id=PAD).chunks[0].token_ids == framed([], pad=PAD)


def test_exactly_75_tokens_fill_one_chunk():
    prompt = chunk_numbers(numbers(1, 75))
    assert [c.token_ids for c in prompt.chunks] == [(BOS, *range(1, 76), EOS)]
    assert prompt.token_count == 75


def test_the_76th_token_opens_a_second_chunk():
    prompt = chunk_numbers(numbers(1, 76))
    assert [c.token_ids for c in prompt.chunks] == [(BOS, *range(1, 76), EOS), framed([76])]
    assert prompt.token_count == 76


def test_full_chunks_keep_their_final_eos_even_with_a_distinct_pad():
    prompt = chunk_numbers(numbers(1, 76), pad_id=PAD)
    assert [c.token_ids for c in prompt.chunks] == [(BOS, *range(1, 76), EOS), framed([76], pad=PAD)]


def test_break_closes_the_current_chunk():
    prompt = chunk_numbers("1 2 BREAK 3")
    assert [c.token_ids for c in prompt.chunks] == [framed([1, 2]), framed([3])]
    assert prompt.token_count == 75 + 1  # a closed chunk counts as full


def test_break_at_the_start_gives_an_empty_first_chunk_and_at_the_end_nothing_more():
    assert [c.token_ids for c in chunk_numbers("BREAK 1").chunks] == [framed([]), framed([1])]
    assert [c.token_ids for c in chunk_numbers("1 BREAK").chunks] == [framed([1])]


def test_a_lowercase_break_is_a_word_not_a_chunk_boundary():
    assert [c.token_ids for c in chunk_numbers("1 break 2").chunks] == [framed([1, WORD, 2])]


def test_comma_within_backtrack_of_the_chunk_end_moves_the_tail_to_the_next_chunk():
    # 60 tokens, a comma at position 60 (15 from the end), then 14 tokens fill the chunk; one more overflows.
    prompt = chunk_numbers(f"{numbers(1, 60)} , ({numbers(61, 75)}:1.2)")
    first, second = prompt.chunks
    assert first.token_ids == framed([*range(1, 61), COMMA])
    assert second.token_ids == framed(list(range(61, 76)))
    assert second.weights[1:16] == (1.2,) * 15 and second.weights[16:] == (1.0,) * 61
    assert prompt.token_count == 75 + 15


def test_comma_further_back_than_backtrack_does_not_move_anything():
    prompt = chunk_numbers(f"{numbers(1, 50)} , {numbers(51, 75)}")
    assert [c.token_ids for c in prompt.chunks] == [
        (BOS, *range(1, 51), COMMA, *range(51, 75), EOS),
        framed([75]),
    ]


def test_comma_backtrack_limit_is_inclusive_and_zero_turns_it_off():
    text = f"{numbers(1, 55)} , {numbers(56, 75)}"  # the comma is 20 positions from the chunk's end
    assert chunk_numbers(text).chunks[0].token_ids == framed([*range(1, 56), COMMA])
    assert chunk_numbers(text, comma_backtrack=19).chunks[0].token_ids[-2] == 74
    assert chunk_numbers(text, comma_backtrack=0).chunks[0].token_ids[-2] == 74


def test_a_comma_arriving_at_a_full_chunk_opens_the_next_chunk():
    prompt = chunk_numbers(f"{numbers(1, 75)} , 76")
    assert [c.token_ids for c in prompt.chunks] == [(BOS, *range(1, 76), EOS), framed([COMMA, 76])]


def test_weights_follow_their_tokens_into_later_chunks():
    prompt = chunk_numbers(f"{numbers(1, 74)} (75 76:1.3) [77]")
    first, second = prompt.chunks
    assert first.weights[74:] == (1.0, 1.3, 1.0)  # token 74, token 75, EOS
    assert second.token_ids[:3] == (BOS, 76, 77)
    assert second.weights[:4] == (1.0, 1.3, 1 / 1.1, 1.0)
    assert all(len(c.token_ids) == len(c.weights) == 77 for c in prompt.chunks)


# --- chunk_prompt with the real CLIP tokenizer ----------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizer():
    return bundled_tokenizer()


def tokenize_with(tokenizer):
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_long_prompt_chunks_equal_fragments_tokenized_one_by_one(clip_tokenizer):
    fragments = [
        ("a detailed watercolour painting of an old stone lighthouse on a rocky coast at dusk ", 1.0),
        ("with warm golden light spilling from its lamp room across the dark churning sea", 1.3),
        (
            " while seagulls circle overhead and fishing boats return to the small harbour below the cliffs ",
            1.0,
        ),
        ("soft clouds glowing pink and orange above the distant hills", 1 / 1.1),
        (
            " in the style of a nineteenth century maritime illustration"
            " with fine ink linework and soft washes on faded paper that has yellowed with age",
            1.0,
        ),
    ]
    plain, emphasised, plain_2, softened, plain_3 = (text for text, _ in fragments)
    prompt = f"{plain}({emphasised}:1.3){plain_2}[{softened}]{plain_3}"
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in fragments:
        fragment_ids = clip_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
    assert 75 < len(ids) <= 150 and clip_tokenizer.get_vocab()[",</w>"] not in ids

    result = chunk_prompt(
        prompt,
        tokenize_with(clip_tokenizer),
        bos_id=clip_tokenizer.bos_token_id,
        eos_id=clip_tokenizer.eos_token_id,
        comma_id=clip_tokenizer.get_vocab()[",</w>"],
    )
    bos, eos = 49406, 49407
    assert [c.token_ids for c in result.chunks] == [
        (bos, *ids[:75], eos),
        (bos, *ids[75:], *[eos] * (76 - len(ids[75:]))),
    ]
    assert result.chunks[0].weights == (1.0, *weights[:75], 1.0)
    assert result.chunks[1].weights == (1.0, *weights[75:], *[1.0] * (76 - len(ids[75:])))
    assert result.token_count == len(ids)


def test_sd2_tokenizer_pad_reproduces_a1111_openclip_padding(clip_tokenizer):
    sd2_tokenizer = bundled_tokenizer(pad_token="!")
    (chunk,) = chunk_prompt(
        "a (red:1.2) fox, at dusk",
        tokenize_with(sd2_tokenizer),
        bos_id=sd2_tokenizer.bos_token_id,
        eos_id=sd2_tokenizer.eos_token_id,
        comma_id=sd2_tokenizer.get_vocab()[",</w>"],
        pad_id=sd2_tokenizer.pad_token_id,
    ).chunks
    ids = clip_tokenizer("a red fox, at dusk", add_special_tokens=False)["input_ids"]
    assert chunk.token_ids == (49406, *ids, 49407, *[0] * (75 - len(ids)))
    assert chunk.weights[:3] == (1.0, 1.0, 1.2)


def test_tag_list_prompt_breaks_after_a_comma_and_loses_no_tokens(clip_tokenizer):
    tags = ", ".join(["highly detailed oil painting of a red fox"] * 12)  # 8 tokens and a comma, repeated
    comma = clip_tokenizer.get_vocab()[",</w>"]
    result = chunk_prompt(tags, tokenize_with(clip_tokenizer), bos_id=49406, eos_id=49407, comma_id=comma)
    ids = clip_tokenizer(tags, add_special_tokens=False)["input_ids"]
    first_real = [t for t in result.chunks[0].token_ids[1:] if t != 49407]
    assert first_real[-1] == comma and len(first_real) == 8 * 9  # the 9th tag moved whole to chunk 2
    kept = [t for chunk in result.chunks for t in chunk.token_ids if t not in (49406, 49407)]
    assert kept == ids


# --- emphasize ------------------------------------------------------------------------------------


def hidden_states(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) + 0.5


def test_weights_of_one_leave_hidden_states_unchanged():
    hidden = hidden_states(77, 16)
    assert torch.equal(emphasize(hidden, torch.ones(77)), hidden)


def test_emphasis_preserves_the_chunk_mean():
    hidden, weights = hidden_states(77, 16), torch.ones(77)
    weights[3:6] = 1.4
    assert torch.allclose(emphasize(hidden, weights).mean(), hidden.mean(), atol=1e-6)


def test_emphasis_scales_each_token_by_its_weight_times_the_mean_ratio():
    hidden, weights = hidden_states(77, 16), torch.ones(77)
    weights[5] = 1.5
    ratio = hidden.mean() / (hidden * weights[:, None]).mean()
    result = emphasize(hidden, weights)
    assert torch.allclose(result[5], hidden[5] * 1.5 * ratio)
    assert torch.allclose(result[0], hidden[0] * ratio)


def test_emphasis_of_a_row_does_not_depend_on_its_batchmates():
    batch, weights = hidden_states(3, 77, 16), torch.ones(77)
    weights[10] = 0.7
    result = emphasize(batch, weights)
    for row in range(3):
        assert torch.allclose(result[row], emphasize(batch[row], weights))


def test_emphasis_returns_the_input_dtype():
    hidden, weights = hidden_states(77, 8).half(), torch.full((77,), 1.2)
    assert emphasize(hidden, weights).dtype == torch.float16
