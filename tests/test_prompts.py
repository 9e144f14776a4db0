"""A1111 prompt weighting and long-prompt chunking.

The expected parses are the examples documented in AUTOMATIC1111's
``modules/prompt_parser.py`` (parse_prompt_attention's docstring).
"""

import numpy as np
import pytest

from tf_diffusion.prompts import parse_prompt_attention, tokenize_weighted


@pytest.mark.parametrize(
    "text, expected",
    [
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
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ],
)
def test_parse_prompt_attention_matches_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="string"):
        parse_prompt_attention(["a"])


@pytest.fixture(scope="module")
def tokenizer():
    from tf_diffusion.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def test_plain_prompt_is_one_chunk_equal_to_the_tokenizer(tokenizer):
    text = "a photograph of an astronaut riding a horse"
    chunks = tokenize_weighted(tokenizer, text)
    assert chunks.ids.shape == (1, 77)
    np.testing.assert_array_equal(chunks.ids, tokenizer([text]))
    assert np.all(chunks.weights == 1.0)


def test_sd2_padding_after_eos(tokenizer):
    from tf_diffusion.config import TokenizerConfig
    from tf_diffusion.tokenizer import CLIPTokenizer

    sd2 = CLIPTokenizer(config=TokenizerConfig(pad_token_id=0))
    chunks = tokenize_weighted(sd2, "a red cat")
    np.testing.assert_array_equal(chunks.ids, sd2(["a red cat"]))


def test_weights_land_on_their_tokens(tokenizer):
    chunks = tokenize_weighted(tokenizer, "a (red:1.5) [cat]")
    ids = chunks.ids[0]
    red = tokenizer.encode("red")[0]
    cat = tokenizer.encode("cat")[0]
    assert chunks.weights[0, list(ids).index(red)] == pytest.approx(1.5)
    assert chunks.weights[0, list(ids).index(cat)] == pytest.approx(1 / 1.1)


def test_long_prompt_chunks_of_75(tokenizer):
    words = " ".join(["cat"] * 100)  # 100 tokens, no commas
    chunks = tokenize_weighted(tokenizer, words)
    assert chunks.ids.shape == (2, 77)
    cat = tokenizer.encode("cat")[0]
    assert np.sum(chunks.ids == cat) == 100
    assert list(chunks.ids[:, 0]) == [49406, 49406] and list(chunks.ids[0, -1:]) == [49407]


def test_long_prompt_breaks_at_a_late_comma(tokenizer):
    # 70 tokens, a comma, then 10 more: the chunk ends after the comma, moving 4 tokens on.
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    chunks = tokenize_weighted(tokenizer, text)
    comma = tokenizer.encode(",")[0]
    dog = tokenizer.encode("dog")[0]
    first = list(chunks.ids[0])
    assert first[71] == comma and first[72] == 49407  # BOS + 70 cats + comma, then padding
    assert np.sum(chunks.ids[1] == dog) == 10


def test_break_starts_a_new_chunk(tokenizer):
    chunks = tokenize_weighted(tokenizer, "a cat BREAK a dog")
    assert chunks.ids.shape == (2, 77)
    assert tokenizer.encode("dog")[0] in chunks.ids[1]
