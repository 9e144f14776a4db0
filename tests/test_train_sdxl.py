"""SDXL LoRA training: the conditioning transformers computes, time ids as diffusers' SDXL scripts record them,
learning, saving and reloading, and the refusals.

The tiny SDXL folder and its reference outputs (tests/fixtures/sdxl, tools/make_fixtures_sdxl.py) give both
encoders' penultimate states and the projected pooled output for fixed ids; the trainer's conditioning must
be those. diffusers' ``train_text_to_image_lora_sdxl.py`` conditions the UNet on
``original_size + crops_coords_top_left + target_size``: for images used as they are (no resize, no crop)
that is (H, W, 0, 0, H, W).
"""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import FIXTURES
from tf_diffusion.training import (
    DiffusionTrainer,
    LoraTrainer,
    LoraTrainingConfig,
    TextualInversionTrainer,
    TrainingConfig,
    dataset_from_arrays,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def sd():
    from tf_diffusion import StableDiffusion

    model = StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-diffusers")
    yield model
    model.unload_lora_weights()


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURES / "sdxl" / "reference.npz") as f:
        return dict(f)


def _trainer(sd, train="unet+text_encoder", **config):
    config = TrainingConfig(**{"learning_rate": 1e-2, "ema_decay": None, "caption_dropout": 0.0, **config})
    return LoraTrainer(sd, train, config, lora=LoraTrainingConfig(rank=2, alpha=4, seed=1))


def test_conditioning_is_what_the_reference_encoders_compute(sd, ref):
    trainer = _trainer(sd)
    try:
        ids = tf.constant(np.stack([ref["ids"], ref["ids_2"]], axis=1))  # (B, 2, 77)
        context, pooled = trainer._encode_text_sdxl(ids)  # LoRA up factors start at zero: the base model
        want = np.concatenate([ref["text_encoder/penultimate"], ref["text_encoder_2/penultimate"]], axis=-1)
        assert context.shape == want.shape
        assert np.abs(context.numpy() - want).max() < TOL
        assert np.abs(pooled.numpy() - ref["text_encoder_2/text_embeds"]).max() < TOL
        images = tf.zeros((3, 16, 24, 3))
        np.testing.assert_array_equal(trainer._time_ids(images).numpy(), [[16, 24, 0, 0, 16, 24]] * 3)
        # Both tokenizers' ids, each padded its own way (diffusers' SDXL folders: EOS and "!").
        ids = trainer.tokenize(["a red circle", "a blue star"])
        assert ids.shape == (2, 2, 77)
        np.testing.assert_array_equal(ids[:, 0], sd.tokenizer(["a red circle", "a blue star"]))
        np.testing.assert_array_equal(ids[:, 1], sd.tokenizer_2(["a red circle", "a blue star"]))
        assert not np.array_equal(ids[:, 0], ids[:, 1])
    finally:
        trainer.network.detach()


def test_lora_training_learns_saves_and_reloads(sd, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue star"]
    unet_before = [v.numpy().copy() for v in sd.unet.weights]
    trainer = _trainer(sd)
    try:
        data = dataset_from_arrays(images, captions, trainer.tokenize, 2, shuffle=False)
        batch = next(iter(data))
        assert batch[1].shape == (2, 2, 77)
        before = trainer.compute_loss(batch, seeds=range(3))
        trainer.fit(data, steps=5, progress=False)
        after = trainer.compute_loss(batch, seeds=range(3))
        assert after < before, (before, after)
        moved = {c: 0.0 for c in ("unet", "text_encoder", "text_encoder_2")}
        for entry in trainer.network.layers:  # up factors start at zero: gradients reached every part
            moved[entry.component] = max(moved[entry.component], float(np.abs(entry.up.numpy()).max()))
        assert all(v > 0 for v in moved.values()), moved
        for a, v in zip(unet_before, sd.unet.weights, strict=True):
            np.testing.assert_array_equal(a, v.numpy())  # the base weights do not train
        path = trainer.save_lora(tmp_path / "sdxl.safetensors")
        x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
        context = rng.standard_normal((1, 77, 72)).astype(np.float32)
        pooled = rng.standard_normal((1, 32)).astype(np.float32)
        time_ids = np.array([[16, 16, 0, 0, 16, 16]], np.float32)
        live = np.asarray(sd.unet(x, np.array([500.0]), context, pooled, time_ids))
    finally:
        trainer.network.detach()
    base = np.asarray(sd.unet(x, np.array([500.0]), context, pooled, time_ids))
    assert np.abs(live - base).max() > 1e-4
    sd.load_lora_weights(path)
    try:
        loaded = np.asarray(sd.unet(x, np.array([500.0]), context, pooled, time_ids))
        assert np.abs(loaded - live).max() < 1e-5
    finally:
        sd.unload_lora_weights()


def test_refusals(sd):
    with pytest.raises(ValueError, match="fine-tuning SDXL's text encoders"):
        DiffusionTrainer(sd, "unet+text_encoder")
    with pytest.raises(ValueError, match="textual-inversion training is for SD 1.x"):
        TextualInversionTrainer(sd, "<new>")
    refiner = sd.config.replace(requires_aesthetics_score=True)
    original = sd.config
    try:
        sd.config = refiner
        with pytest.raises(ValueError, match="refiner"):
            DiffusionTrainer(sd, "unet")
    finally:
        sd.config = original
