"""SDXL textual inversion: A1111 / civitai ``clip_l`` + ``clip_g`` files and diffusers' two-call loading.

tools/make_fixtures_sdxl_lora.py (``textual_inversion()``) wrote an SDXL embedding with two vectors per
encoder (``inkxl``) and a one-vector negative embedding (``negxl``), loaded them the diffusers way into
the tiny ``StableDiffusionXLPipeline`` (``load_textual_inversion`` with ``clip_l`` into ``text_encoder`` /
``tokenizer`` and ``clip_g`` into ``text_encoder_2`` / ``tokenizer_2``) and recorded ``encode_prompt``'s
context and pooled embeddings for prompts and negative prompts that use them.
"""

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tf_diffusion.adapters.textual_inversion import TextualInversionError, loaded_embeddings
from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors

TOLERANCE = 1e-4
FOLDER = FIXTURES / "sdxl_lora"
CASES = json.loads((FOLDER / "ti_cases.json").read_text())


@pytest.fixture(scope="module")
def io():
    with np.load(FOLDER / "ti_io.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def sd():
    from tf_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-diffusers")


@pytest.fixture(autouse=True)
def clean(sd):
    sd.unload_textual_inversion()
    yield
    sd.unload_textual_inversion()


def encode(sd, texts):
    from tf_diffusion import sdxl

    return sdxl.encode_prompts(sd, texts, sd.executor)


def check(sd, io) -> dict:
    context, pooled = encode(sd, CASES["prompts"])
    negative, negative_pooled = encode(sd, CASES["negatives"])
    errs = {
        "context": float(np.abs(context - io["context"]).max()),
        "pooled": float(np.abs(pooled - io["pooled"]).max()),
        "negative_context": float(np.abs(negative - io["negative_context"]).max()),
        "negative_pooled": float(np.abs(negative_pooled - io["negative_pooled"]).max()),
    }
    print(", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOLERANCE, errs
    return errs


def test_a1111_sdxl_files_match_diffusers_encode_prompt(sd, io):
    assert sd.load_textual_inversion(FOLDER / "inkxl.safetensors") == "inkxl"
    assert sd.load_textual_inversion(FOLDER / "negxl.safetensors") == "negxl"
    loaded = loaded_embeddings(sd)
    assert {w: (e.vectors.shape, e.vectors_2.shape) for w, e in loaded.items()} == {
        "inkxl": ((2, 32), (2, 40)),
        "negxl": ((1, 32), (1, 40)),
    }
    check(sd, io)


def test_diffusers_two_calls_match(sd, io):
    for word in CASES["files"]:
        tensors = load_safetensors(FOLDER / f"{word}.safetensors")
        sd.load_textual_inversion(
            tensors["clip_l"], token=word, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer
        )
        sd.load_textual_inversion(
            tensors["clip_g"], token=word, text_encoder=sd.text_encoder_2, tokenizer=sd.tokenizer_2
        )
    check(sd, io)


def test_embedding_in_one_encoder_leaves_the_other_as_text(sd, io):
    tensors = load_safetensors(FOLDER / "inkxl.safetensors")
    sd.load_textual_inversion(tensors["clip_g"], token="inkxl", text_encoder=sd.text_encoder_2)
    plain = encode(sd, ["inkxl"])[0]
    sd.unload_textual_inversion()
    base = encode(sd, ["inkxl"])[0]
    # CLIP-L's half (the first 32 features) is the plain text's; bigG's half changes.
    assert np.array_equal(plain[..., :32], base[..., :32])
    assert float(np.abs(plain[..., 32:] - base[..., 32:]).max()) > 1e-2


def test_prompts_without_embeddings_are_unchanged(sd):
    base = encode(sd, ["a photo of a cat"])
    sd.load_textual_inversion(FOLDER / "inkxl.safetensors")
    after = encode(sd, ["a photo of a cat"])
    assert all(np.array_equal(a, b) for a, b in zip(base, after, strict=True))


def test_refiner_takes_the_clip_g_vectors():
    from tf_diffusion import StableDiffusion

    refiner = StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-refiner-diffusers")
    base = encode(refiner, ["a photo of inkxl"])
    refiner.load_textual_inversion(FOLDER / "inkxl.safetensors")
    assert loaded_embeddings(refiner)["inkxl"].vectors.shape == (2, 40)
    context, pooled = encode(refiner, ["a photo of inkxl"])
    assert context.shape == base[0].shape and float(np.abs(context - base[0]).max()) > 1e-2


def test_bad_embeddings_are_refused_and_nothing_changes(sd, tmp_path):
    sd.load_textual_inversion(FOLDER / "negxl.safetensors")
    before = dict(loaded_embeddings(sd))
    with pytest.raises(TextualInversionError, match="already loaded into text_encoder"):
        sd.load_textual_inversion(FOLDER / "negxl.safetensors")
    # An SD 1.x embedding (one set of vectors) on SDXL without saying which encoder.
    with pytest.raises(TextualInversionError, match="SD 1.x / 2.x embedding.*SDXL model"):
        sd.load_textual_inversion(FIXTURES / "textual_inversion" / "easyneg.safetensors")
    save_safetensors(
        {"clip_l": np.zeros((1, 32), np.float32), "clip_g": np.zeros((1, 64), np.float32)},
        tmp_path / "wide.safetensors",
    )
    with pytest.raises(TextualInversionError, match=r"clip_g are 64-wide.*text_encoder_2 takes 40-wide"):
        sd.load_textual_inversion(tmp_path / "wide.safetensors")
    save_safetensors(
        {"clip_l": np.zeros((2, 32), np.float32), "clip_g": np.zeros((1, 40), np.float32)},
        tmp_path / "counts.safetensors",
    )
    with pytest.raises(TextualInversionError, match="clip_l has 2 vectors and clip_g 1"):
        sd.load_textual_inversion(tmp_path / "counts.safetensors")
    save_safetensors({"clip_l": np.zeros((1, 32), np.float32)}, tmp_path / "half.safetensors")
    with pytest.raises(TextualInversionError, match=r"needs clip_l and clip_g; \['clip_g'\] missing"):
        sd.load_textual_inversion(tmp_path / "half.safetensors")
    with pytest.raises(
        TextualInversionError, match="text_encoder= is text_encoder but tokenizer= is tokenizer_2"
    ):
        sd.load_textual_inversion(
            np.zeros((1, 32)), token="x", text_encoder=sd.text_encoder, tokenizer=sd.tokenizer_2
        )
    with pytest.raises(TextualInversionError, match="token= is needed"):
        sd.load_textual_inversion(np.zeros((1, 32)), text_encoder=sd.text_encoder)
    assert loaded_embeddings(sd).keys() == before.keys()


def test_weighted_embedding_words(sd, io):
    """(inkxl:1.3): both encoders' hidden states at the embedding's positions scaled, each half's mean kept."""
    sd.load_textual_inversion(FOLDER / "inkxl.safetensors")
    prompt = CASES["prompts"][0].replace("inkxl", "(inkxl:1.3)")
    weighted = encode(sd, [prompt])[0][0].astype(np.float64)  # (77, 72)
    reference = io["context"][0].astype(np.float64)
    weights = np.ones(77)
    # The fixture's ids are the tokenizer's before diffusers expands the word into its two vectors' tokens:
    # the word's one id past the 1114-token vocabulary marks where the two vectors start.
    start = int(np.flatnonzero(io["ids"][0] >= 1114)[0])
    weights[start : start + 2] = 1.3
    expected = []
    for half in (reference[:, :32], reference[:, 32:]):
        scaled = half * weights[:, None]
        expected.append(scaled * (half.mean() / scaled.mean()))
    assert float(np.abs(weighted - np.concatenate(expected, -1)).max()) <= TOLERANCE


def test_generate_records_ti_hashes(sd):
    from tf_diffusion.execution import ExecutionOptions

    sd.load_textual_inversion(FOLDER / "negxl.safetensors")
    out = sd.generate(
        "a cat", negative_prompt="negxl", num_steps=1, guidance_scale=5.0, seed=1, height=16, width=16,
        output_type="latent", progress=False, execution=ExecutionOptions(compile="eager"),
    )  # fmt: skip
    assert out.info.extra_params["TI hashes"].startswith("negxl: ")
