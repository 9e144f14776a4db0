"""Write reference token ids for tests/test_tokenizer.py from the reference CLIP tokenizers.

References, all built from the CLIP BPE file shipped in tf_diffusion/data:
- OpenAI CLIP's ``SimpleTokenizer`` (clip/simple_tokenizer.py of the PyPI package openai-clip 1.0.1,
  the original code), for the unpadded ids;
- open_clip's ``tokenize`` (open_clip/tokenizer.py of open-clip-torch 3.3.0), the SD 2.x tokenizer:
  rows padded with 0;
- the slow (Python, ftfy) ``transformers.CLIPTokenizer`` of transformers 4.x, as diffusers used it for
  SD 1.x (pad with EOS) and SD 2.x (pad_token "!", id 0) for years, loading a vocab.json/merges.txt
  folder written from the same BPE file;
- the ``transformers.CLIPTokenizer`` of transformers 5.x (Rust ``tokenizers`` backend, no ftfy),
  recorded so the tests can document where it differs.

Run it twice, once per transformers major version (the two cannot share an environment):

    # transformers 4.x: writes reference_ids.json and the small_sd2/ folder fixture
    python3 -m venv /tmp/venv_tok
    /tmp/venv_tok/bin/pip install "transformers<5" ftfy regex numpy torch==2.13.0
    pip download --no-deps openai-clip open-clip-torch -d /tmp/clip   # then unpack both
    /tmp/venv_tok/bin/python tools/make_fixtures_tokenizer.py \
        --openai-clip /tmp/clip/openai-clip-1.0.1/clip --open-clip /tmp/clip/open_clip

    # transformers 5.x (the project venv): writes transformers5_ids.json
    python tools/make_fixtures_tokenizer.py --openai-clip /tmp/clip/openai-clip-1.0.1/clip

Each run also saves tf_diffusion's tokenizer with ``CLIPTokenizer.save`` and checks that transformers
loads that folder and gives the same ids as the reference folder (printed; nothing is written for it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import pathlib
import sys
import tempfile

import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
BPE_FILE = ROOT / "tf_diffusion" / "data" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77
SMALL_MERGES = 600  # the small folder fixture keeps this many merges
SMALL_MAX_LENGTH = 16

LONG_EN = (
    "a breathtaking ultra detailed matte painting of an ancient floating city above the clouds at golden "
    "hour, intricate gothic architecture, waterfalls pouring off the edges, flocks of birds, volumetric "
    "light, god rays, cinematic composition, highly detailed, sharp focus, 8k resolution, trending on "
    "artstation, by greg rutkowski and thomas kinkade and studio ghibli, masterpiece, best quality"
)

# The strings compared; the tests read them from the fixture, so add cases here only.
TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand   runs    of     spaces",
    "tab\tseparated\tvalues\t\t\tend",
    "café crème brûlée",
    "naïve façade, Zoë, Ångström, São Paulo",
    "Vietnamese: Tiếng Việt có dấu",
    "e\u0301 combining acute, a\u0308 combining diaeresis",
    "Ελληνικά κείμενα",
    "ΣΊΣΥΦΟΣ ΟΔΟΣ",
    "Привет, мир! Съешь же ещё этих мягких французских булок",
    "東京タワーの夜景",
    "一只可爱的猫在阳光下睡觉",
    "한국어 텍스트 예시",
    "مرحبا بالعالم",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "emoji 🐱🐶🎨🔥",
    "family 👨\u200d👩\u200d👧\u200d👦 with zero width joiners",
    "flags 🇺🇸🇯🇵🇩🇪",
    "skin tone 👍🏽 and variation ❤️ ☺️",
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "<b>bold</b> &amp; more",
    "&amp;amp; double escaped &amp;lt;3",
    "&quot;quoted&quot; &#39;apos&#39; &#x263A; &copy; 2024",
    "&nbsp;non&nbsp;breaking entity",
    "a < b &amp;&amp; c > d",
    "“curly quotes” and ‘single ones’ — em dash – en dash …",
    "don't can't won't it's we're they've I'm you'll he'd",
    "DON'T CAN'T IT'S WE'RE",
    "rock'n'roll o'clock 'quoted' '' '",
    "'s",
    "hello!!! what??? ...wow... --- *** ### @@@",
    "(masterpiece:1.2), [best quality], {highres}, <lora:foo:0.8>",
    "1234567890",
    "3.14159 and 2,718 and 1e-10 and -42 and 1,000,000",
    "Ⅻ ½ ² ³ ٣ ४ ①",
    "ﬁne ligatures ﬂow ﬀ",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "mojibake: cafÃ© naÃ¯ve â€œquotedâ€\x9d",
    "zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "non\u00a0breaking\u00a0space and ideographic\u3000space",
    "line\u2028separator\u2029paragraph\u0085next",
    "control\x07chars and \x1b[31mred\x1b[0m terminal codes",
    "<|startoftext|> inside text <|endoftext|>",
    "trailing special<|endoftext|>",
    "UPPER <|ENDOFTEXT|> case special",
    "İstanbul ß straße ǅ",
    "x",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "hyper-realistic, 8k, ultra-detailed, octane render, trending on artstation",
    "user@example.com https://example.com/path?q=1&x=2#frag",
    "C++ & C# vs. F#; x_y_z __init__ snake_case camelCase",
    "math ∑∫√∞ ≠ ≤ ≥ ± × ÷",
    "𝕳𝖊𝖑𝖑𝖔 𝓌𝑜𝓇𝓁𝒹",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "numbers 000111 and 2023-01-01 12:30",
    " ".join(["a"] * 75),
    " ".join(["a"] * 76),
    " ".join(["a"] * 200),
    LONG_EN,
    LONG_EN + ", " + LONG_EN,
    "猫" * 100,
    "🐱" * 60,
    "x" * 500,
    "\n".join(["line"] * 90),
]


def load_module(path: pathlib.Path, name: str):
    """Import one reference source file by path, without its package's heavy __init__."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_vocab_folder(folder: pathlib.Path, encoder: dict, ranks: dict) -> None:
    """vocab.json + merges.txt as transformers' CLIP conversion wrote them for the hub."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode("utf-8")).hexdigest()


def rows(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True)
    return [list(map(int, r)) for r in out["input_ids"]]


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    out = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [list(map(int, r)) for r in out["input_ids"]]


def clip_row(ids: list[int]) -> list[int]:
    """OpenAI CLIP ids in open_clip's row layout (BOS, ids, EOS kept last when cut, zeros), to print differences."""
    row = [49406, *ids[: MAX_LENGTH - 2], 49407]
    return row + [0] * (MAX_LENGTH - len(row))


def write_json(path: pathlib.Path, data: dict) -> None:
    """JSON with one case a line, so the fixture stays readable and diffs stay small."""
    data = dict(data)
    cases = data.pop("cases")
    head = json.dumps(data, ensure_ascii=False, indent=1)[: -len("\n}")]
    body = ",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in cases)
    path.write_text(f'{head},\n "cases": [\n{body}\n ]\n}}\n', encoding="utf-8")
    if json.loads(path.read_text(encoding="utf-8"))["cases"] != cases:
        raise SystemExit(f"{path} does not read back")


def check_saved_folder(texts: list[str], reference_dir: pathlib.Path) -> None:
    """Our CLIPTokenizer.save output must load in transformers and give the reference folder's ids."""
    sys.path.insert(0, str(ROOT))
    from tf_diffusion.tokenizer import CLIPTokenizer as OurTokenizer

    for pad_id, pad_token in ((49407, "<|endoftext|>"), (0, "!")):
        with tempfile.TemporaryDirectory() as tmp:
            OurTokenizer(pad_token_id=pad_id).save(tmp)
            loaded = transformers.CLIPTokenizer.from_pretrained(tmp)
            direct = transformers.CLIPTokenizer(
                str(reference_dir / "vocab.json"), str(reference_dir / "merges.txt"), pad_token=pad_token
            )
            same = rows(loaded, texts, MAX_LENGTH) == rows(direct, texts, MAX_LENGTH)
            print(
                f"transformers {transformers.__version__} loads CLIPTokenizer.save(pad {pad_id}): same ids={same}"
            )
            if not same:
                raise SystemExit("saved folder does not reproduce the reference ids")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--openai-clip", type=pathlib.Path, required=True, help="folder of clip/simple_tokenizer.py"
    )
    parser.add_argument(
        "--open-clip", type=pathlib.Path, help="folder of open_clip/tokenizer.py (transformers 4 run)"
    )
    args = parser.parse_args()
    major = int(transformers.__version__.split(".")[0])
    OUT.mkdir(parents=True, exist_ok=True)

    clip = load_module(args.openai_clip / "simple_tokenizer.py", "openai_clip_simple_tokenizer")
    original = clip.SimpleTokenizer(str(BPE_FILE))
    if len(original.encoder) != 49408:
        raise SystemExit(f"OpenAI CLIP vocabulary has {len(original.encoder)} entries, expected 49408")

    with tempfile.TemporaryDirectory() as tmp:
        full = pathlib.Path(tmp) / "full"
        write_vocab_folder(full, original.encoder, original.bpe_ranks)
        sd1 = transformers.CLIPTokenizer(str(full / "vocab.json"), str(full / "merges.txt"))
        sd2 = transformers.CLIPTokenizer(str(full / "vocab.json"), str(full / "merges.txt"), pad_token="!")
        if sd1.get_vocab() != original.encoder or sd2.pad_token_id != 0:
            raise SystemExit("transformers' CLIPTokenizer vocabulary differs from OpenAI CLIP's")
        print(
            f"transformers {transformers.__version__} vocabulary == OpenAI CLIP vocabulary ({len(original.encoder)})"
        )

        sd1_rows, sd2_rows, hf_ids = (
            rows(sd1, TEXTS, MAX_LENGTH),
            rows(sd2, TEXTS, MAX_LENGTH),
            encode(sd1, TEXTS),
        )
        clip_ids = [original.encode(t) for t in TEXTS]
        check_saved_folder(TEXTS, full)

        if major >= 5:
            cases = [
                {"text": t, "ids": e, "sd1": r1, "sd2": r2}
                for t, e, r1, r2 in zip(TEXTS, hf_ids, sd1_rows, sd2_rows, strict=True)
            ]
            data = {
                "reference": f"transformers {transformers.__version__} CLIPTokenizer (tokenizers backend)",
                "cases": cases,
            }
            write_json(OUT / "transformers5_ids.json", data)
            differ = [c["text"] for c, o in zip(cases, clip_ids, strict=True) if c["ids"] != o]
            print(
                f"wrote transformers5_ids.json: {len(cases)} strings, {len(differ)} differ from OpenAI CLIP"
            )
            for text in differ:
                print("   ", repr(text[:70]))
            return

        if args.open_clip is None:
            raise SystemExit("the transformers 4 run needs --open-clip")
        open_clip = load_module(args.open_clip / "tokenizer.py", "open_clip_tokenizer")
        open_clip_rows = open_clip.tokenize(TEXTS, context_length=MAX_LENGTH).tolist()

        merges = [pair for pair, _ in sorted(original.bpe_ranks.items(), key=lambda kv: kv[1])]
        cases = [
            {
                "text": t,
                "clip": c,
                "transformers4": h,
                "transformers4_sd1": r1,
                "transformers4_sd2": r2,
                "open_clip_sd2": o,
            }
            for t, c, h, r1, r2, o in zip(
                TEXTS, clip_ids, hf_ids, sd1_rows, sd2_rows, open_clip_rows, strict=True
            )
        ]
        data = {
            "references": {
                "clip": "OpenAI CLIP SimpleTokenizer.encode (openai-clip 1.0.1)",
                "transformers4": f"transformers {transformers.__version__} slow CLIPTokenizer, no special tokens",
                "transformers4_sd1": "the same, padding='max_length', max_length=77, truncation=True",
                "transformers4_sd2": "the same with pad_token='!'",
                "open_clip_sd2": "open_clip.tokenize (open-clip-torch 3.3.0), context_length=77",
            },
            "bpe_sha256": hashlib.sha256(BPE_FILE.read_bytes()).hexdigest(),
            "vocab_size": len(original.encoder),
            # Tokens in id order and merges in rank order, hashed as compact JSON lists.
            "vocab_sha256": sha256_json(
                [t for t, _ in sorted(original.encoder.items(), key=lambda kv: kv[1])]
            ),
            "merges_sha256": sha256_json([list(m) for m in merges]),
            "cases": cases,
        }
        write_json(OUT / "reference_ids.json", data)
        print(f"wrote reference_ids.json: {len(cases)} strings")
        for case in cases:
            if case["transformers4"] != case["clip"]:
                print(f"    transformers 4 differs from OpenAI CLIP on {case['text'][:70]!r}")
            if case["open_clip_sd2"] != clip_row(case["clip"]):
                print(f"    open_clip differs from OpenAI CLIP on {case['text'][:70]!r}")

        # A small transformers-written folder: 600 merges, pad "!" and model_max_length 16.
        small = pathlib.Path(tmp) / "small"
        with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
            small_merges = [tuple(line.split()) for line in f.read().split("\n")[1 : SMALL_MERGES + 1]]
        symbols = list(clip.bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in small_merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        write_vocab_folder(
            small, {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(small_merges)}
        )
        small_tok = transformers.CLIPTokenizer(
            str(small / "vocab.json"),
            str(small / "merges.txt"),
            pad_token="!",
            model_max_length=SMALL_MAX_LENGTH,
        )
        small_tok.save_pretrained(OUT / "small_sd2")
        data = {
            "reference": f"transformers {transformers.__version__} slow CLIPTokenizer from small_sd2/, "
            f"padding='max_length', max_length={SMALL_MAX_LENGTH}, truncation=True",
            "max_length": SMALL_MAX_LENGTH,
            "cases": [
                {"text": t, "ids": e, "row": r}
                for t, e, r in zip(
                    TEXTS, encode(small_tok, TEXTS), rows(small_tok, TEXTS, SMALL_MAX_LENGTH), strict=True
                )
            ],
        }
        write_json(OUT / "small_sd2_ids.json", data)
        print(f"wrote small_sd2/ ({len(tokens)} tokens) and small_sd2_ids.json")


if __name__ == "__main__":
    main()
