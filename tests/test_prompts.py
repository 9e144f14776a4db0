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


# Behaviour the web UI documents beyond its own examples, and how we treat what it mishandles.
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("(a: 1.5 )", [("a", 1.5)]),
        ("((a:2))", [("a", 2 * 1.1)]),
        ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),  # crossing groups: each weighs its span
        ("a ) b ]", [("a ) b ]", 1.0)]),  # a closer with nothing open is text
        ("(a:1.5", [("a:1.5", 1.1)]),  # an unclosed weight is text in an unclosed group
        ("a:1.5)", [("a:1.5)", 1.0)]),  # a weight with no open group is text
        ("(a:x)", [("a:x", 1.1)]),
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # not a number: text (the web UI raises here)
        ("(a:" + "9" * 400 + ")", [("a:" + "9" * 400, 1.1)]),  # overflows to inf: text
        ("(a:-1)", [("a", -1.0)]),
        ("(a:0)", [("a", 0.0)]),
        ("x()y", [("xy", 1.0)]),  # an empty group vanishes and its neighbours merge
        ("a \\b \\\\ c", [("a b \\ c", 1.0)]),  # a backslash before anything else is dropped
        ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
        ("a BREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),  # still a boundary inside brackets
        ("aBREAK b_BREAK BREAKs break", [("aBREAK b_BREAK BREAKs break", 1.0)]),  # only the word alone
        ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
        ("BREAK", [("BREAK", -1.0)]),
        ("()", [("", 1.0)]),
        ("(" * 10_000 + "a", [("a", 1e4)]),  # capped at MAX_WEIGHT, finite in float32
    ],
)
def test_parse_edge_cases(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


# ---- Property tests (Hypothesis; TF_DIFFUSION_FUZZ=long runs many more examples) -------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tf_diffusion.prompts import BREAK, MAX_WEIGHT  # noqa: E402

SYNTAX = "()[]\\:"
# Fragments that exercise every rule, mixed with arbitrary text.
_FRAGMENTS = st.sampled_from(
    [
        "(",
        ")",
        "[",
        "]",
        "\\",
        "\\(",
        "\\)",
        ":",
        ":1.5)",
        ": 0.5 )",
        ":1.2.3)",
        "BREAK",
        " BREAK ",
        ",",
        " ",
        "a",
    ]
)
prompts = st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=30).map("".join)


def _weights_of(pieces):
    return [w for t, w in pieces if (t, w) != BREAK]


@given(st.one_of(st.text(), prompts))
def test_parse_never_raises_and_weights_are_finite(text):
    pieces = parse_prompt_attention(text)
    assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)
    for w in _weights_of(pieces):
        assert np.isfinite(w) and abs(w) <= MAX_WEIGHT
        assert np.isfinite(np.float32(w))
    if ":" not in text:  # only an explicit weight can be zero or negative
        assert all(w > 0 for w in _weights_of(pieces))
    for a, b in zip(pieces, pieces[1:], strict=False):  # adjacent equal weights are merged
        assert a == BREAK or b == BREAK or a[1] != b[1]


def _no_break(text: str) -> bool:
    return "BREAK" not in text


@given(st.text().filter(lambda s: not any(c in s for c in SYNTAX) and _no_break(s)))
def test_text_without_syntax_is_one_piece(text):
    assert parse_prompt_attention(text) == [(text, 1.0)]


def _oracle(text: str) -> list[tuple[str, float]]:
    """Per-character weights for prompts with brackets but no weights, escapes or BREAK: 1.1 per open
    round group times 1/1.1 per open square group; a closer with nothing of its kind open is text."""
    out, rounds, squares = [], 0, 0
    for char in text:
        if char == "(":
            rounds += 1
        elif char == "[":
            squares += 1
        elif char == ")" and rounds:
            rounds -= 1
        elif char == "]" and squares:
            squares -= 1
        else:
            out.append((char, 1.1**rounds * (1 / 1.1) ** squares))
    return out


_bracketed = st.lists(st.sampled_from(["(", ")", "[", "]", "a", "b ", " ", ","]), max_size=40).map("".join)


@given(_bracketed)
def test_each_character_weighs_by_the_groups_open_around_it(text):
    pieces = parse_prompt_attention(text)
    got = [(char, w) for t, w in pieces for char in t]
    want = _oracle(text)
    assert "".join(c for c, _ in got) == "".join(c for c, _ in want)  # the text minus the syntax
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


@given(st.text(alphabet=st.characters(blacklist_characters="\\"), max_size=40).filter(_no_break))
def test_escaped_syntax_is_literal(text):
    escaped = "".join("\\" + c if c in "()[]" else c for c in text)
    pieces = parse_prompt_attention(escaped)
    assert "".join(t for t, _ in pieces) == text
    assert all(w == 1.0 for _, w in pieces)


@given(
    st.text(alphabet="abc ,.", min_size=1, max_size=20),
    st.floats(min_value=0.01, max_value=100, allow_nan=False).map(lambda w: round(w, 4)),
    st.integers(0, 6),
)
def test_explicit_weight_in_nested_groups(text, weight, depth):
    prompt = "(" * depth + f"({text}:{weight})" + ")" * depth
    assert parse_prompt_attention(prompt) == [(text, pytest.approx(weight * 1.1**depth, rel=1e-12))]


@given(st.lists(st.text(alphabet="abc ,", max_size=10), min_size=1, max_size=6))
def test_break_splits_into_runs(parts):
    pieces = parse_prompt_attention(" BREAK ".join(parts))
    assert sum(p == BREAK for p in pieces) == len(parts) - 1
    runs, current = [], ""
    for piece in pieces:
        if piece == BREAK:
            runs.append(current)
            current = ""
        else:
            current += piece[0]
    runs.append(current)
    # BREAK swallows the whitespace around it, within the run of text it stands in.
    expected = [p.rstrip() if i < len(parts) - 1 else p for i, p in enumerate(parts)]
    expected = [p.lstrip() if i > 0 else p for i, p in enumerate(expected)]
    assert runs == expected


def test_full_chunk_followed_by_a_comma_is_kept_whole(tokenizer):
    # 75 cats fill the chunk and the next token is the comma itself: no backtrack, the comma opens chunk 2.
    cats = " ".join(["cat"] * 60) + ", " + " ".join(["cat"] * 14)
    text = cats + ", dog"
    chunks = tokenize_weighted(tokenizer, text)
    comma = tokenizer.encode(",")[0]
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[1, 1] == comma and chunks.ids[0, 76] == 49407 and chunks.ids[0, 75] != 49407


def test_comma_too_early_does_not_move_words(tokenizer):
    # The only comma is 21 tokens before the chunk's end: the chunk is cut at 75 tokens.
    text = " ".join(["cat"] * 54) + ", " + " ".join(["dog"] * 30)
    chunks = tokenize_weighted(tokenizer, text)
    assert chunks.ids.shape == (2, 77) and chunks.ids[0, 75] != 49407
    assert np.sum(chunks.ids[1] == tokenizer.encode("dog")[0]) == 10


def test_break_at_either_end(tokenizer):
    assert tokenize_weighted(tokenizer, "a cat BREAK").ids.shape == (1, 77)
    lead = tokenize_weighted(tokenizer, "BREAK a cat")
    assert lead.ids.shape == (2, 77) and list(lead.ids[0, :2]) == [49406, 49407]
    assert tokenize_weighted(tokenizer, "a BREAK BREAK b").ids.shape == (3, 77)
