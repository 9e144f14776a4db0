"""SDXL LoRA training: the conditioning transformers computes, time ids as diffusers' SDXL scripts record them,
one step's loss and gradients as diffusers' ``train_text_to_image_lora_sdxl.py`` computes them (tests/fixtures/
sdxl_train, tools/make_fixtures_sdxl_train.py), learning, saving and reloading, and the refusals.

The tiny SDXL folder and its reference outputs (tests/fixtures/sdxl, tools/make_fixtures_sdxl.py) give both
encoders' penultimate states and the projected pooled output for fixed ids; the trainer's conditioning must
be those. diffusers' ``train_text_to_image_lora_sdxl.py`` conditions the UNet on
``original_size + crops_coords_top_left + target_size``: for images used as they are (no resize, no crop)
that is (H, W, 0, 0, H, W).
"""

import numpy as np
import pytest
import tensorflow as tf
from test_train_lora import set_factors

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
def sd(tiny_sdxl):
    return tiny_sdxl  # tests/conftest.py


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


def test_lora_step_loss_and_gradients_are_the_diffusers_scripts(sd):
    """One step of diffusers' train_text_to_image_lora_sdxl.py (peft LoRAs on the UNet's and both encoders'
    attention, tools/make_fixtures_sdxl_train.py) with the same factors and draws: same loss and gradients."""
    folder = FIXTURES / "sdxl_train"
    with np.load(folder / "step.npz") as f:
        ref = dict(f)
    lora = LoraTrainingConfig(
        rank=2, alpha=4.0, unet_targets=("to_k", "to_q", "to_v", "to_out.0"),
        text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    )  # fmt: skip
    config = TrainingConfig(ema_decay=None, caption_dropout=0.0)
    trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=lora)
    try:
        set_factors(trainer.network, folder / "lora.safetensors")
        ids = tf.constant(np.stack([ref["ids"], ref["ids_2"]], axis=1))  # (B, 2, 77)
        np.testing.assert_array_equal(ids.numpy(), trainer.tokenize(["a red circle", "a blue star on grass"]))
        with tf.GradientTape() as tape:
            out, target = trainer.prediction_and_target(
                tf.constant(ref["latents"]), tf.constant(ref["t"]), tf.constant(ref["noise"]), ids,
                tf.constant(ref["time_ids"]),
            )  # fmt: skip
            loss = tf.reduce_mean(tf.square(out - target))
        grads = tape.gradient(loss, trainer.network.trainable_variables)
        assert abs(float(loss) - float(ref["loss"])) < TOL * float(ref["loss"]), (float(loss), ref["loss"])
        ours = {}
        for entry, (g_down, g_up) in zip(
            trainer.network.layers, zip(grads[::2], grads[1::2], strict=True), strict=True
        ):
            name = f"{entry.component}.{entry.diffusers_name}"
            for factor, g in (("lora_A", g_down), ("lora_B", g_up)):  # keras (in, r) / (r, out): torch's .T
                ours[f"{name}.{factor}.weight"] = np.zeros(1) if g is None else g.numpy().T
        names = [str(n) for n in ref["grad_names"]]
        assert sorted(ours) == names
        norms = np.array([np.linalg.norm(ours[n].astype(np.float64)) for n in names])
        reached = ref["grad_norms"] > 0
        assert reached.sum() > 300  # the reference's gradients reach nearly every factor
        rel = np.abs(norms - ref["grad_norms"])[reached] / ref["grad_norms"][reached]  # each tensor's own
        assert rel.max() < TOL, (np.array(names)[reached][int(rel.argmax())], rel.max())
        np.testing.assert_array_equal(norms == 0, ref["grad_norms"] == 0)  # CLIP-L's last layer: none
        for key in ref:
            if key.startswith("grad/"):
                want = ref[key]
                got = ours[key[len("grad/") :]]
                assert np.abs(got - want).max() < TOL * np.abs(want).max(), key
    finally:
        trainer.network.detach()
