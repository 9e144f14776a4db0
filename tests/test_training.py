"""Training: loss goes down, checkpoints resume exactly, EMA math, caption dropout, MirroredStrategy."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tf_diffusion.config import CLIPTextConfig, PipelineConfig, UNetConfig, VAEConfig  # noqa: E402
from tf_diffusion.training import (  # noqa: E402
    DiffusionTrainer,
    TrainingConfig,
    VAETrainer,
    dataset_from_arrays,
    draw_timesteps,
    drop_captions,
    ema_decay_at,
    latest_checkpoint,
)

# A micro model: 16x16 images, factor-2 VAE, one-level UNet, one-layer 16-wide text encoder.
MICRO = PipelineConfig(
    name="micro",
    text_encoder=CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ),
    unet=UNetConfig(
        model_channels=16,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_levels=(True,),
        num_heads=2,
        context_dim=16,
        norm_groups=8,
    ),
    vae=VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, scaling_factor=1.0),
    default_size=16,
)


def _pipeline():
    from tf_diffusion.pipeline import StableDiffusion

    return StableDiffusion(MICRO)


def _batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 16, 16, 3), np.float32) - 1.0
    for i in range(n):  # one bright square per image, so there is something to learn
        y, x = rng.integers(0, 10, size=2)
        images[i, y : y + 6, x : x + 6, i % 3] = 1.0
    captions = ["a red square", "a green square", "a blue square", "a square"][:n]
    return images, captions


@pytest.fixture(scope="module")
def sd():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    return _pipeline()


def _uint8(images):
    return np.round(images * 127.5 + 127.5).astype(np.uint8)


def test_ema_math_then_loss_decreases_on_a_fixed_batch(sd):
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(10_000, 0.999) == 0.999
    assert ema_decay_at(1, 0.5, warmup=False) == 0.5

    images, captions = _batch()
    batch = (tf.constant(images), tf.constant(sd.tokenizer(captions)))
    config = TrainingConfig(learning_rate=2e-3, ema_decay=0.9, ema_warmup=False)
    trainer = DiffusionTrainer(sd, "unet+text_encoder", config)
    before = trainer.compute_loss(batch, seeds=range(4))
    w0 = [v.numpy() for v in trainer.trainable_variables]
    np.testing.assert_array_equal(trainer.ema_variables[0].numpy(), w0[0])
    trainer.train_step(batch)
    w1 = [v.numpy() for v in trainer.trainable_variables]
    assert not np.allclose(w0[-1], w1[-1])
    for ema, a, b in zip(trainer.ema_variables, w0, w1, strict=True):
        np.testing.assert_allclose(ema.numpy(), 0.9 * a + 0.1 * b, rtol=1e-5, atol=1e-7)

    # export_ema gives the EMA values in checkpoint layout and leaves the live weights alone.
    exported = trainer.export_ema(dtype="float16")
    assert sorted(exported) == ["text_encoder", "unet"]
    conv = "input_blocks.0.0.weight"  # torch (out, in, kh, kw) <- keras (kh, kw, in, out)
    index = [k for _, k, _ in trainer._params].index(conv)
    expected = np.transpose(trainer.ema_variables[index].numpy(), (3, 2, 0, 1)).astype(np.float16)
    np.testing.assert_array_equal(exported["unet"][conv], expected)
    assert exported["unet"][conv].dtype == np.float16
    np.testing.assert_array_equal(trainer.trainable_variables[index].numpy(), w1[index])

    for _ in range(19):
        trainer.train_step(batch)
    after = trainer.compute_loss(batch, seeds=range(4))
    assert trainer.step == 20
    assert after < 0.8 * before, (before, after)


def test_vae_reconstruction_loss_decreases():
    keras = pytest.importorskip("keras")
    from tf_diffusion.vae import AutoencoderKL

    keras.utils.set_random_seed(1)
    vae = AutoencoderKL(MICRO.vae)
    images, _ = _batch()
    trainer = VAETrainer(vae, TrainingConfig(learning_rate=3e-3, ema_decay=None, reconstruction_loss="l1+l2"))
    batch = (tf.constant(images),)
    before = trainer.compute_loss(batch, seeds=range(2))
    for _ in range(20):
        logs = trainer.train_step(batch)
    assert set(logs) == {"loss", "rec", "kl", "grad_norm"}
    assert trainer.compute_loss(batch, seeds=range(2)) < 0.7 * before


def test_vae_decoder_only_keeps_the_encoder():
    from tf_diffusion.vae import AutoencoderKL
    from tf_diffusion.weights.state_dict import state_dict

    vae = AutoencoderKL(MICRO.vae)
    before = state_dict(vae)
    trainer = VAETrainer(vae, TrainingConfig(learning_rate=1e-2, ema_decay=None), train="vae_decoder")
    trainer.train_step((tf.constant(_batch()[0]),))
    after = state_dict(vae)
    for key in before:
        changed = not np.array_equal(before[key], after[key])
        assert changed == key.startswith(("decoder.", "post_quant_conv.")), key
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in trainer.export_ema()["vae"])


@pytest.mark.slow  # two trainers and a checkpoint round trip; test_train_lora's resume test stays in the default run
def test_checkpoint_resume_gives_identical_next_step(tmp_path):
    keras = pytest.importorskip("keras")
    images, captions = _batch()
    config = TrainingConfig(learning_rate=1e-3, ema_decay=0.9, seed=3)

    keras.utils.set_random_seed(0)
    a = _pipeline()
    # Every batch of this unshuffled pipeline is the same four images.
    data = dataset_from_arrays(_uint8(images), captions, a.tokenizer, batch_size=4, shuffle=False)
    batch = next(iter(data))
    ta = DiffusionTrainer(a, "unet", config)
    assert len(ta.fit(data, 3, checkpoint_dir=tmp_path, progress=False)) == 3
    assert os.path.basename(latest_checkpoint(tmp_path)) == "ckpt-00000003.safetensors"
    logs_a = ta.train_step(batch)

    keras.utils.set_random_seed(7)  # different initial weights, overwritten by the checkpoint
    b = _pipeline()
    b.text_encoder.set_weights(a.text_encoder.get_weights())  # frozen components come from the caller
    b.vae.set_weights(a.vae.get_weights())
    tb = DiffusionTrainer(b, "unet", config)
    history = tb.fit(lambda start: data, 4, checkpoint_dir=tmp_path, progress=False, keep_checkpoints=1)
    assert tb.step == 4 and len(history) == 1
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["ckpt-00000004.safetensors"]

    assert logs_a["loss"] == pytest.approx(history[0]["loss"], rel=1e-6)
    for va, vb in zip(ta.trainable_variables, tb.trainable_variables, strict=True):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-6, atol=1e-7)
    for ea, eb in zip(ta.ema_variables, tb.ema_variables, strict=True):
        np.testing.assert_allclose(ea.numpy(), eb.numpy(), rtol=1e-6, atol=1e-7)
    for oa, ob in zip(ta.optimizer.variables, tb.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(oa.numpy()), np.asarray(ob.numpy()), rtol=1e-6, atol=1e-9)

    with pytest.raises(ValueError, match="not a diffusion checkpoint training 'unet\\+text_encoder'"):
        DiffusionTrainer(b, "unet+text_encoder", config).load_checkpoint(latest_checkpoint(tmp_path))


def test_caption_dropout_rate():
    ids = tf.fill((20_000, 77), 7)
    empty = tf.range(77)
    dropped = drop_captions(ids, empty, 0.1, seed=tf.constant([1, 2], tf.int64)).numpy()
    is_empty = (dropped == np.arange(77)).all(axis=1)
    kept = (dropped == 7).all(axis=1)
    assert np.all(is_empty | kept)
    assert 0.09 < is_empty.mean() < 0.11
    assert (drop_captions(ids[:100], empty, 0.0, seed=[0, 0]).numpy() == 7).all()
    assert (drop_captions(ids[:100], empty, 1.0, seed=[0, 0]).numpy() == np.arange(77)).all()


def test_high_noise_fraction_moves_that_share_of_timesteps_to_the_noisier_half():
    seed = tf.constant([3, 4], tf.int64)
    uniform = draw_timesteps(seed, 10_000, 1000).numpy()
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert 0.48 < (uniform >= 500).mean() < 0.52
    biased = draw_timesteps(seed, 10_000, 1000, high_noise_fraction=0.5).numpy()
    np.testing.assert_array_equal(biased[5000:], uniform[5000:])  # the rest keep the uniform draw
    assert biased[:5000].min() >= 500 and biased[:5000].max() <= 999
    # Uniform over [500, 999]: every value reachable, mean near 749.5.
    assert len(np.unique(biased[:5000])) == 500 and abs(biased[:5000].mean() - 749.5) < 8
    assert 0.74 < (biased >= 500).mean() < 0.76
    # A later start: the moved share is uniform over [850, 999], the rest untouched.
    late = draw_timesteps(seed, 10_000, 1000, high_noise_fraction=0.5, high_noise_start=0.85).numpy()
    np.testing.assert_array_equal(late[5000:], uniform[5000:])
    assert late[:5000].min() >= 850 and late[:5000].max() <= 999
    assert len(np.unique(late[:5000])) == 150 and abs(late[:5000].mean() - 924.5) < 3


def test_config_errors():
    with pytest.raises(ValueError, match="high_noise_fraction=-0.1"):
        TrainingConfig(high_noise_fraction=-0.1)
    with pytest.raises(ValueError, match="high_noise_start=1.0"):
        TrainingConfig(high_noise_start=1.0)
    with pytest.raises(ValueError, match="caption_dropout=1.5"):
        TrainingConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="reconstruction_loss='ssim'"):
        TrainingConfig(reconstruction_loss="ssim")
    with pytest.raises(ValueError, match="train='vae'"):
        DiffusionTrainer(_pipeline(), "vae")
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        dataset_from_arrays(np.zeros((5, 8, 8, 3), np.uint8), ["a"] * 4, lambda c: np.zeros((len(c), 77)), 2)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    from test_training import MICRO, _batch, _uint8
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import DiffusionTrainer, TrainingConfig, dataset_from_arrays

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        sd = StableDiffusion(MICRO)
    trainer = DiffusionTrainer(sd, "unet+text_encoder", TrainingConfig(ema_decay=0.99), strategy=strategy)
    images, captions = _batch()
    data = dataset_from_arrays(_uint8(images), captions, sd.tokenizer, batch_size=4)
    w0 = trainer.trainable_variables[-1].numpy().copy()
    history = trainer.fit(data, 2, progress=False)
    var = trainer.trainable_variables[-1].value
    copies = [v.numpy() for v in var.values]
    assert len(copies) == 2 and np.array_equal(copies[0], copies[1])
    assert not np.allclose(w0, copies[0])
    assert all(np.isfinite(h["loss"]) for h in history) and trainer.step == 2
    print("OK", history[-1]["loss"])
    """
)


@pytest.mark.slow  # about a minute: a process with two logical CPUs trains under MirroredStrategy
def test_mirrored_strategy_on_two_logical_cpus():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, tests_dir],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=os.path.dirname(tests_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_train_subcommand_parses():
    import argparse

    from tf_diffusion.cli import train as train_cli

    parser = argparse.ArgumentParser(prog="tf-diffusion")
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train",
            "--preset",
            "tiny-shapes",
            "--data",
            "d",
            "--steps",
            "5",
            "--checkpoint-dir",
            "c",
            "--train",
            "vae",
        ]
    )
    assert (args.func, args.preset, args.train, args.steps, args.lr) == (
        train_cli.run,
        "tiny-shapes",
        "vae",
        5,
        1e-5,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(
            [
                "train",
                "--preset",
                "x",
                "--data",
                "d",
                "--steps",
                "5",
                "--checkpoint-dir",
                "c",
                "--train",
                "all",
            ]
        )
