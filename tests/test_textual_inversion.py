"""Textual inversion: A1111 and diffusers embeddings give diffusers' ``load_textual_inversion`` encodings.

tools/make_fixtures_textual_inversion.py wrote the embeddings (A1111 ``.pt`` / ``.safetensors``, diffusers
``learned_embeds.safetensors`` / ``.bin``; one, two and three vectors) and, with each loaded into diffusers'
pipeline on the tiny text encoder, ``encode_prompt``'s hidden states for prompts and negative prompts.
"""

import json

import numpy as np
import pytest
from test_lora import FIXTURES, build, err

from tf_diffusion.adapters.textual_inversion import TextualInversionError, loaded_embeddings

TOLERANCE = 1e-4
FOLDER = FIXTURES / "textual_inversion"


@pytest.fixture(scope="module")
def sd():
    model = build(FIXTURES)
    model.load_textual_inversion(FOLDER / "inkwash.pt")
    model.load_textual_inversion(FOLDER / "easyneg.safetensors")
    model.load_textual_inversion(FOLDER / "cat-toy")
    model.load_textual_inversion(FOLDER / "learned_embeds.bin")
    return model


@pytest.fixture(scope="module")
def io():
    with np.load(FOLDER / "ti_io.npz") as data:
        return dict(data)


CASES = {
    name: (prompt, negative)
    for name, prompt, negative in json.loads((FOLDER / "ti_cases.json").read_text())["cases"]
}


def test_words_and_vector_counts(sd):
    words = {w: e.num_vectors for w, e in loaded_embeddings(sd).items()}
    # A1111 files are named by their stem (not the .pt's own "name"); diffusers files by their key.
    assert words == {"inkwash": 3, "easyneg": 2, "<cat-toy>": 1, "<blob>": 1}


@pytest.mark.parametrize("case", ["plain", "negative", "diffusers", "bin", "two"])
def test_encodings_match_diffusers(sd, io, case):
    prompt, negative = CASES[case]
    hidden = sd.encode_prompts([negative, prompt])
    assert err(hidden[1], io[f"{case}_cond"][0]) <= TOLERANCE, case
    assert err(hidden[0], io[f"{case}_uncond"][0]) <= TOLERANCE, case


def test_weighted_and_long_prompts(sd, io):
    # A weight on the word scales its vectors' hidden states, then the mean is restored (A1111's rule),
    # applied here to diffusers' encoding.
    prompt, _ = CASES["plain"]
    weighted = sd.encode_prompts(["a photo of (inkwash:1.3) style"])[0]
    reference = io["plain_cond"][0].astype(np.float64)
    weights = np.ones(77)
    weights[4:7] = 1.3  # BOS, a, photo, of, then the three vectors
    scaled = reference * weights[:, None]
    expected = scaled * (reference.mean() / scaled.mean())
    assert err(weighted, expected) <= TOLERANCE
    assert err(sd.encode_prompts(["a photo of (InkWash:1.0) style"])[0], io["plain_cond"][0]) <= TOLERANCE
    # Past 75 tokens: the word in the second chunk.
    filler = json.loads((FOLDER / "ti_cases.json").read_text())["filler"]
    long = sd.encode_prompts([filler + " inkwash style"])[0]
    assert long.shape[0] == 154
    assert err(long[:77], io["filler_cond"][0]) <= TOLERANCE
    assert err(long[77:], io["second_chunk_cond"][0]) <= TOLERANCE


def test_prompts_without_embeddings_are_unchanged(sd, io):
    plain = sd.encode_prompts(["a cat on a table"])[0]
    assert err(plain, io["negative_base"][0]) <= TOLERANCE
    assert err(sd.encode_prompts(["inkwashes"])[0], sd.encode_prompts(["inkwashes"])[0]) == 0.0


def test_generate_uses_the_embedding_in_both_prompts(sd):
    from tf_diffusion.execution import ExecutionOptions

    kwargs = dict(
        num_steps=1, guidance_scale=5.0, seed=1, scheduler="ddim", output_type="latent", progress=False,
        execution=ExecutionOptions(compile="eager"),  # eager: no loop compile, so the test stays fast
    )  # fmt: skip
    base = sd.generate("a cat", negative_prompt="blurry", **kwargs)
    with_neg = sd.generate("a cat", negative_prompt="easyneg", **kwargs)
    assert err(with_neg, base) > 1e-4
    assert with_neg.info.extra_params["TI hashes"].startswith("easyneg: ")
    assert len(with_neg.info.extra_params["TI hashes"].split(": ")[1]) == 12
    assert "TI hashes" not in base.info.extra_params


def test_bad_embeddings_are_refused_and_nothing_changes(sd, tmp_path):
    from tf_diffusion.weights.safetensors_io import save_safetensors

    before = dict(loaded_embeddings(sd))
    with pytest.raises(TextualInversionError, match=r"48-wide vectors.*32-wide token embeddings"):
        sd.load_textual_inversion(FOLDER / "bad" / "wide.safetensors")
    with pytest.raises(TextualInversionError, match="already loaded"):
        sd.load_textual_inversion(FOLDER / "inkwash.pt")
    save_safetensors(
        {"clip_l": np.zeros((1, 32), np.float32), "clip_g": np.zeros((1, 64), np.float32)},
        tmp_path / "xl.safetensors",
    )
    with pytest.raises(TextualInversionError, match="SDXL embedding"):
        sd.load_textual_inversion(tmp_path / "xl.safetensors")
    save_safetensors(
        {"a": np.zeros((32,), np.float32), "b": np.zeros((32,), np.float32)}, tmp_path / "two.safetensors"
    )
    with pytest.raises(TextualInversionError, match="expected string_to_param"):
        sd.load_textual_inversion(tmp_path / "two.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((FOLDER / "easyneg.safetensors").read_bytes()[:-7])
    with pytest.raises(ValueError):
        sd.load_textual_inversion(tmp_path / "cut.safetensors", token="cut")
    with pytest.raises(FileNotFoundError):
        sd.load_textual_inversion(tmp_path / "missing.pt")
    assert loaded_embeddings(sd) == before
