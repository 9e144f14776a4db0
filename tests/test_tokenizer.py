"""CLIPTokenizer against reference ids from tools/make_fixtures_tokenizer.py (70 strings).

References (tests/fixtures/tokenizer/reference_ids.json): OpenAI CLIP's SimpleTokenizer, the slow
ftfy transformers 4.57 CLIPTokenizer (SD 1.x rows padded with EOS, SD 2.x rows with pad_token "!"
= 0) and open_clip's tokenize (SD 2.x rows), all from the same BPE file. Our ids equal OpenAI CLIP's
on every string. The references themselves differ on a few strings, each one listed below:

- transformers 4 (slow) skips CLIP's ``html.unescape`` and relies on ftfy, which leaves HTML entities
  alone when the text holds a literal "<": "&amp;" stays 3 tokens there (TRANSFORMERS4_DIFFS).
  open_clip and OpenAI CLIP unescape; so do we.
- open_clip renames the special tokens "<start_of_text>"/"<end_of_text>", so a literal
  "<|endoftext|>" in a prompt is BPE-split there instead of becoming id 49407 (OPEN_CLIP_DIFFS).
- transformers (4 and 5) with pad_token "!" treats "!" as an added special token and splits it out
  of the text before BPE, so in SD 2.x rows "hello!!!" gives "!" "!" "!" (id 0 three times) instead
  of CLIP's single "!!!</w>" (PAD_BANG_DIFFS). open_clip, which SD 2.x was trained with, does not;
  nor do we: ``pad_token_id`` only changes the padding.

transformers 5.x (transformers5_ids.json; Rust ``tokenizers`` backend) normalizes with NFC +
whitespace collapse + lowercase only, with no ftfy and no HTML unescaping, and lowercases per
character; it differs from OpenAI CLIP on TRANSFORMERS5_DIFFS:

- HTML entities stay literal ("&amp;", "&lt;", "&quot;", "&#39;", "&nbsp;", ...);
- ftfy's fixes are missing: curly quotes and dashes are not straightened, ligatures (ﬁ) and
  fullwidth forms (Ｆ, １) are not expanded, mojibake (cafÃ©) is not repaired, terminal escape codes
  and control characters are kept, U+0085 is whitespace instead of ftfy's C1 fix to "…";
- Greek final sigma lowercases to "σ" (Python's str.lower gives "ς" at word ends);
- "ǅ" lowercases to "ǆ" (ftfy first splits the ligature into "dž");
- "<|ENDOFTEXT|>" in capitals is not matched as a special token (it is matched before lowercasing).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.config import TokenizerConfig
from tf_diffusion.presets import get_preset
from tf_diffusion.tokenizer import CLIPTokenizer, clean_text, vocab_from_merges

BOS, EOS = 49406, 49407

TRANSFORMERS4_DIFFS = {"<b>bold</b> &amp; more", "a < b &amp;&amp; c > d"}
OPEN_CLIP_DIFFS = {
    "<|startoftext|> inside text <|endoftext|>",
    "trailing special<|endoftext|>",
    "UPPER <|ENDOFTEXT|> case special",
}
PAD_BANG_DIFFS = {
    "Привет, мир! Съешь же ещё этих мягких французских булок",
    "hello!!! what??? ...wow... --- *** ### @@@",
}
TRANSFORMERS5_DIFFS = {
    "ΣΊΣΥΦΟΣ ΟΔΟΣ",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "<b>bold</b> &amp; more",
    "&amp;amp; double escaped &amp;lt;3",
    "&quot;quoted&quot; &#39;apos&#39; &#x263A; &copy; 2024",
    "&nbsp;non&nbsp;breaking entity",
    "a < b &amp;&amp; c > d",
    "“curly quotes” and ‘single ones’ — em dash – en dash …",
    "ﬁne ligatures ﬂow ﬀ",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "mojibake: cafÃ© naÃ¯ve â€œquotedâ€\x9d",
    "line\u2028separator\u2029paragraph\x85next",
    "control\x07chars and \x1b[31mred\x1b[0m terminal codes",
    "UPPER <|ENDOFTEXT|> case special",
    "İstanbul ß straße ǅ",
}


def _load(fixtures_dir, name: str) -> dict:
    return json.loads((fixtures_dir / "tokenizer" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference() -> dict:
    path = pathlib.Path(__file__).parent / "fixtures" / "tokenizer" / "reference_ids.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sd1() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def sd2() -> CLIPTokenizer:
    return CLIPTokenizer(pad_token_id=0)


def _texts(data: dict) -> list[str]:
    return [case["text"] for case in data["cases"]]


def test_fixture_covers_the_tricky_cases(reference):
    texts = _texts(reference)
    assert len(texts) >= 50
    lengths = [len(case["clip"]) for case in reference["cases"]]
    assert sum(n > 75 for n in lengths) >= 5  # truncated prompts
    assert 75 in lengths and 76 in lengths  # exactly full, and one token over


def test_vocabulary_equals_the_reference(sd1, reference):
    # The reference hashes OpenAI CLIP's encoder (== transformers' vocab) in id order and its merges.
    tokens = [t for t, _ in sorted(sd1.vocab.items(), key=lambda kv: kv[1])]
    assert sd1.vocab_size == reference["vocab_size"] == 49408
    digest = hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8")).hexdigest()
    assert digest == reference["vocab_sha256"]
    merges = hashlib.sha256(
        json.dumps([list(m) for m in sd1.merges], ensure_ascii=False).encode()
    ).hexdigest()
    assert merges == reference["merges_sha256"]
    assert (sd1.vocab["<|startoftext|>"], sd1.vocab["<|endoftext|>"], sd1.vocab["!"]) == (BOS, EOS, 0)


def test_encode_equals_openai_clip(sd1, reference):
    for case in reference["cases"]:
        assert sd1.encode(case["text"]) == case["clip"], case["text"]


def test_reference_differences_are_the_documented_ones(reference, fixtures_dir):
    cases = reference["cases"]
    assert {c["text"] for c in cases if c["transformers4"] != c["clip"]} == TRANSFORMERS4_DIFFS
    opened = {c["text"] for c in cases if c["open_clip_sd2"] != c["transformers4_sd2"]}
    assert opened == OPEN_CLIP_DIFFS | TRANSFORMERS4_DIFFS | PAD_BANG_DIFFS
    fast = _load(fixtures_dir, "transformers5_ids.json")["cases"]
    assert [c["text"] for c in fast] == _texts(reference)
    assert {
        f["text"] for f, c in zip(fast, cases, strict=True) if f["ids"] != c["clip"]
    } == TRANSFORMERS5_DIFFS


def test_sd1_rows_equal_transformers4(sd1, reference):
    cases = reference["cases"]
    rows = sd1(_texts(reference))
    assert rows.dtype == np.int32 and rows.shape == (len(cases), 77)
    for row, case in zip(rows.tolist(), cases, strict=True):
        if case["text"] in TRANSFORMERS4_DIFFS:
            # open_clip's row (which unescapes HTML like CLIP), padded with EOS instead of 0.
            expected = np.array(case["open_clip_sd2"])
            expected[int(np.argmax(expected == EOS)) :] = EOS
            assert row == expected.tolist(), case["text"]
        else:
            assert row == case["transformers4_sd1"], case["text"]


def test_sd2_rows_equal_open_clip_and_transformers4(sd2, reference):
    rows = sd2(_texts(reference)).tolist()
    for row, case in zip(rows, reference["cases"], strict=True):
        # Every row meets at least one of the two padded references (the diff sets are disjoint).
        if case["text"] not in OPEN_CLIP_DIFFS:
            assert row == case["open_clip_sd2"], case["text"]
        if case["text"] not in TRANSFORMERS4_DIFFS | PAD_BANG_DIFFS:
            assert row == case["transformers4_sd2"], case["text"]


def test_rows_equal_transformers5_where_it_agrees_with_clip(sd1, sd2, fixtures_dir):
    fast = _load(fixtures_dir, "transformers5_ids.json")["cases"]
    same = [c for c in fast if c["text"] not in TRANSFORMERS5_DIFFS]
    assert len(same) == len(fast) - len(TRANSFORMERS5_DIFFS)
    assert sd1([c["text"] for c in same]).tolist() == [c["sd1"] for c in same]
    same = [c for c in same if c["text"] not in PAD_BANG_DIFFS]
    assert sd2([c["text"] for c in same]).tolist() == [c["sd2"] for c in same]


def test_truncation_keeps_bos_and_eos(sd1, sd2):
    text = " ".join(["cat"] * 100)
    ids = sd1.encode(text)
    assert len(ids) == 100
    row = sd1(text)[0]
    assert row[0] == BOS and row[76] == EOS and row[1:76].tolist() == ids[:75]
    assert sd2(text)[0].tolist() == row.tolist()  # no room left for padding
    short = sd2("cat")[0].tolist()
    assert short[:3] == [BOS, 2368, EOS] and short[3:] == [0] * 74


def test_accepts_str_list_tuple_and_configs(sd1):
    assert sd1("a photo of a cat").shape == (1, 77)
    np.testing.assert_array_equal(sd1(("a", "b")), sd1(["a", "b"]))
    sd2 = CLIPTokenizer(config=get_preset("sd-v2-1").tokenizer)
    assert sd2.pad_token_id == 0 and sd2.max_length == 77
    assert CLIPTokenizer(TokenizerConfig()).pad_token_id == EOS
    short = CLIPTokenizer(TokenizerConfig(max_length=8, pad_token_id=0))
    assert short(" ".join(["cat"] * 20)).tolist() == [[BOS] + [2368] * 6 + [EOS]]


def test_clean_text_follows_clip():
    assert clean_text("  Fish &amp;amp; Chips\t\n  ＣＡＴ ") == "fish & chips cat"
    assert clean_text("<b>x</b> &amp; y") == "<b>x</b> & y"  # unescaped despite the "<"


def test_decode(sd1, sd2):
    assert sd1.decode(sd1("A photo of a CAT, café 東京 🐱")[0]) == "a photo of a cat , café 東京 🐱"
    assert sd2.decode(sd2("a dog")[0]) == "a dog"  # stops at EOS: the 0 padding is "!"
    assert sd1.decode(sd1("a dog")[0][:3], skip_special_tokens=False) == "<|startoftext|>a dog"
    assert sd1.decode(np.array([], dtype=np.int32)) == ""


def test_small_transformers_folder(fixtures_dir):
    # Written by transformers 4.57 save_pretrained: 600 merges, pad_token "!", model_max_length 16.
    tok = CLIPTokenizer.from_pretrained_folder(fixtures_dir / "tokenizer" / "small_sd2")
    data = _load(fixtures_dir, "small_sd2_ids.json")
    assert (tok.max_length, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (16, 0, 1112, 1113)
    assert tok.vocab_size == 1114
    # The reference is transformers' slow tokenizer: skip the strings where it departs from CLIP.
    cases = [c for c in data["cases"] if c["text"] not in TRANSFORMERS4_DIFFS | PAD_BANG_DIFFS]
    assert len(cases) == len(data["cases"]) - 4
    assert tok([c["text"] for c in cases]).tolist() == [c["row"] for c in cases]
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_small_folder_from_files(fixtures_dir):
    folder = fixtures_dir / "tokenizer" / "small_sd2"
    tok = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    assert (tok.max_length, tok.pad_token_id) == (77, 1113)  # no config: 77 positions, EOS padding
    ids = tok.encode("a photo")
    assert ids == [320, 816, 531]  # "photo" is two symbols with only 600 merges
    assert tok("a photo")[0].tolist() == [1112, *ids, 1113] + [1113] * 72
    with pytest.raises(ValueError, match="bos_token_id=49406"):
        CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", config=TokenizerConfig())


@pytest.mark.parametrize("pad", [EOS, 0])
def test_save_round_trip(tmp_path, reference, pad):
    tok = CLIPTokenizer(pad_token_id=pad)
    tok.save(tmp_path / "tokenizer")
    merges = (tmp_path / "tokenizer" / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len([m for m in merges if m]) == 1 + 48894
    vocab = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tok.vocab
    # The pipeline root (holding tokenizer/) is accepted as well as the tokenizer folder.
    key, skip = (
        ("transformers4_sd1", TRANSFORMERS4_DIFFS) if pad == EOS else ("open_clip_sd2", OPEN_CLIP_DIFFS)
    )
    cases = [c for c in reference["cases"] if c["text"] not in skip]
    for folder in (tmp_path, tmp_path / "tokenizer"):
        loaded = CLIPTokenizer.from_pretrained_folder(folder)
        assert loaded.config == tok.config
        assert loaded([c["text"] for c in cases]).tolist() == [c[key] for c in cases]
    again = CLIPTokenizer.from_files(
        tmp_path / "tokenizer" / "vocab.json", tmp_path / "tokenizer" / "merges.txt"
    )
    assert again.vocab == tok.vocab and again.merges == tok.merges


def test_vocab_from_merges_layout():
    vocab = vocab_from_merges([("i", "n"), ("t", "h")])
    assert len(vocab) == 512 + 2 + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512 and vocab["th"] == 513
    assert vocab["<|startoftext|>"] == 514 and vocab["<|endoftext|>"] == 515


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", 5], {"a": 1}, np.array(["a"])])
def test_bad_texts(sd1, bad):
    with pytest.raises(ValueError, match="must be a str"):
        sd1(bad)


def test_bad_inputs(sd1, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        sd1([])
    with pytest.raises(ValueError, match="int 12"):
        sd1.encode(12)
    with pytest.raises(ValueError, match="id 99999"):
        sd1.decode([320, 99999])
    with pytest.raises(ValueError, match="1-D"):
        sd1.decode([[320]])
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        sd1.decode(["a"])
    with pytest.raises(ValueError, match="pad_token_id=50000"):
        CLIPTokenizer(pad_token_id=50000)
    with pytest.raises(ValueError, match="eos_token_id=1"):
        CLIPTokenizer(TokenizerConfig(eos_token_id=1))
    with pytest.raises(ValueError, match="max_length=1 "):
        CLIPTokenizer(TokenizerConfig(max_length=1))
    with pytest.raises(ValueError, match="TokenizerConfig"):
        CLIPTokenizer(config="sd-v1-5")
    with pytest.raises(ValueError, match="both vocab and merges"):
        CLIPTokenizer(vocab={"a": 0})
    with pytest.raises(ValueError, match="do not belong together"):
        CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    with pytest.raises(ValueError, match="not a tokenizer folder"):
        CLIPTokenizer.from_pretrained_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_bad_folder_files(tmp_path, fixtures_dir):
    small = fixtures_dir / "tokenizer" / "small_sd2"
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((small / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    with pytest.raises(ValueError, match="model_max_length=1000000000000000019884624838656"):
        CLIPTokenizer.from_pretrained_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": {"content": "<pad>"}}')
    with pytest.raises(ValueError, match="pad_token '<pad>'"):
        CLIPTokenizer.from_pretrained_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    with pytest.raises(ValueError, match="bos_token is '<s>'"):
        CLIPTokenizer.from_pretrained_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        CLIPTokenizer.from_pretrained_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree symbols here\n")
    with pytest.raises(ValueError, match="line 3"):
        CLIPTokenizer.from_pretrained_folder(tmp_path)


def test_loads_a_transformers5_tokenizer_json_folder(tmp_path):
    # transformers 5 saves only tokenizer.json (the `tokenizers` BPE model) and tokenizer_config.json.
    import json as _json

    from tf_diffusion.tokenizer import CLIPTokenizer as Ours

    reference = Ours(pad_token_id=0)
    reference.save(tmp_path / "plain")
    vocab = _json.loads((tmp_path / "plain" / "vocab.json").read_text(encoding="utf-8"))
    merges = [
        line
        for line in (tmp_path / "plain" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        if line
    ]
    folder = tmp_path / "v5"
    folder.mkdir()
    model = {"type": "BPE", "vocab": vocab, "merges": [m.split(" ") for m in merges]}
    (folder / "tokenizer.json").write_text(
        _json.dumps({"model": model, "added_tokens": []}), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        _json.dumps({"pad_token": "!", "model_max_length": 77}), encoding="utf-8"
    )
    loaded = Ours.from_pretrained_folder(folder)
    assert loaded.config.pad_token_id == 0
    texts = ["a photo of an astronaut", "caf\u00e9 \u6771\u4eac, 42 cats"]
    assert (loaded(texts) == reference(texts)).all()
