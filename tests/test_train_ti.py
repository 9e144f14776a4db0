"""Textual-inversion training: only the new word's vectors train; the saved A1111 file reads as diffusers reads it.

tools/make_fixtures_lora_train.py saved a ``TextualInversionTrainer``'s two seeded vectors with
``save_embedding`` (A1111 ``.safetensors``, ``emb_params``), loaded the file with diffusers'
``load_textual_inversion`` into the tiny pipeline and recorded ``encode_prompt``'s states for two prompts.
"""

import json

import numpy as np
import pytest
from test_lora import FIXTURES, build, err

tf = pytest.importorskip("tensorflow")

from tf_diffusion.adapters.textual_inversion import read_embedding  # noqa: E402
from tf_diffusion.training import TextualInversionTrainer, TrainingConfig  # noqa: E402
from tf_diffusion.weights.safetensors_io import load_safetensors  # noqa: E402

TOLERANCE = 1e-4
FOLDER = FIXTURES / "lora_train"
CASES = json.loads((FOLDER / "cases.json").read_text())
TOKEN = CASES["ti_token"]
FILE = FOLDER / f"{TOKEN}.safetensors"


@pytest.fixture(scope="module")
def io():
    with np.load(FOLDER / "io.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def sd():
    return build(FIXTURES)


def test_saved_embedding_reads_as_diffusers_reads_it(sd, io):
    assert sorted(load_safetensors(FILE)) == ["emb_params"]
    sd.load_textual_inversion(FILE)
    try:
        for i, (prompt, negative) in enumerate(CASES["ti_prompts"]):
            hidden = sd.encode_prompts([negative, prompt])
            assert err(hidden[1], io[f"ti_cond_{i}"][0]) <= TOLERANCE
            assert err(hidden[0], io[f"ti_uncond_{i}"][0]) <= TOLERANCE
    finally:
        sd.unload_textual_inversion()


def test_training_encodes_as_the_loader_then_learns_only_the_vectors(sd, io, tmp_path):
    config = TrainingConfig(learning_rate=5e-2, ema_decay=None, caption_dropout=0.0)
    trainer = TextualInversionTrainer(sd, TOKEN, 2, "square", config)
    # Initialised from the init text's token embedding, repeated over the vectors.
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight.numpy()
    square = sd.tokenizer.encode("square")
    np.testing.assert_array_equal(trainer.vectors.numpy(), table[[square[0], square[0]]])
    ids = trainer.tokenize(["a photo of sq-token on grass"])
    tok, vocab = sd.tokenizer, sd.config.text_encoder.vocab_size
    want = [
        tok.bos_token_id,
        *tok.encode("a photo of"),
        vocab,
        vocab + 1,
        *tok.encode("on grass"),
        tok.eos_token_id,
    ]
    assert list(ids[0, : len(want)]) == want  # the word as two new ids past the vocabulary

    # The training forward pass with the file's vectors gives diffusers' encoding.
    trainer.vectors.assign(read_embedding(FILE).vectors)
    prompt = CASES["ti_prompts"][0][0]
    hidden = np.asarray(trainer._encode_text(tf.constant(trainer.tokenize([prompt]))))
    assert err(hidden[0], io["ti_cond_0"][0]) <= TOLERANCE

    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    batch = (tf.constant(images), tf.constant(trainer.tokenize(["a sq-token", "sq-token on grass"])))
    weights = [v.numpy().copy() for v in sd.unet.weights + sd.text_encoder.weights]
    # The gradient reaches the vectors: a small step against it lowers the loss of one fixed draw.
    seed = tf.constant([0, 7], tf.int64)
    with tf.GradientTape() as tape:
        loss = trainer._replica_loss(batch, seed)[0]
    grad = tf.convert_to_tensor(tape.gradient(loss, trainer.vectors))  # (n, D), from IndexedSlices
    assert grad is not None and float(tf.norm(grad)) > 0
    start = trainer.vectors.numpy().copy()
    trainer.vectors.assign(start - 1e-2 * grad.numpy() / float(tf.norm(grad)))
    assert float(trainer._replica_loss(batch, seed)[0]) < float(loss)
    trainer.vectors.assign(start)
    for _ in range(3):
        trainer.train_step(batch)
    assert np.abs(trainer.vectors.numpy() - start).max() > 1e-3
    for a, v in zip(weights, sd.unet.weights + sd.text_encoder.weights, strict=True):
        np.testing.assert_array_equal(a, v.numpy())

    path = trainer.save_embedding(tmp_path / f"{TOKEN}.safetensors")
    embedding = read_embedding(path)
    assert embedding.token == TOKEN and embedding.num_vectors == 2
    np.testing.assert_array_equal(embedding.vectors, trainer.vectors.numpy())
    with pytest.raises(FileExistsError):
        trainer.save_embedding(path)
    with pytest.raises(ValueError, match=".safetensors"):
        trainer.save_embedding(tmp_path / "x.pt")


def test_bad_settings(sd):
    with pytest.raises(ValueError, match="num_vectors"):
        TextualInversionTrainer(sd, "<w>", 0)
    with pytest.raises(ValueError, match="init_text"):
        TextualInversionTrainer(sd, "<w>", 1, "")
    with pytest.raises(ValueError, match="token"):
        TextualInversionTrainer(sd, " w", 1)
    sd.load_textual_inversion(FILE)
    try:
        with pytest.raises(ValueError, match="already loaded"):
            TextualInversionTrainer(sd, TOKEN.upper(), 1)
    finally:
        sd.unload_textual_inversion()
