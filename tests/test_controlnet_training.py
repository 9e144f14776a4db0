"""ControlNet training: ``controlnet_from_unet`` against diffusers' ``ControlNetModel.from_unet``, and
``ControlNetTrainer`` (frozen UNet, zero-conv start, falling loss, saved nets that reload)."""

import functools
import json
import pathlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tf_diffusion.controlnet import ControlNet, controlnet_from_unet  # noqa: E402
from tf_diffusion.testing import random_state_dict  # noqa: E402
from tf_diffusion.training import ControlNetTrainer, TrainingConfig, dataset_from_arrays  # noqa: E402
from tf_diffusion.weights.controlnet import controlnet_to_diffusers, convert_diffusers_controlnet  # noqa: E402
from tf_diffusion.weights.state_dict import load_state_dict, state_dict  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FLOAT32_TOL = 1e-4


def _tiny_unet():
    """The tiny SD1 UNet of tests/fixtures/unet (diffusers weights, our keys)."""
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.weights.diffusers_unet import (
        convert_diffusers_unet_state_dict,
        unet_config_from_diffusers,
    )

    folder = FIXTURES / "unet"
    config = unet_config_from_diffusers(json.loads((folder / "sd1_config.json").read_text()))
    unet = UNetModel(config)
    with np.load(folder / "sd1_weights.npz") as weights:
        load_state_dict(unet, convert_diffusers_unet_state_dict(dict(weights), config))
    return unet


def test_from_unet_matches_diffusers():
    """Zero-initialised tensors and, with the non-copied ones redrawn, residuals equal diffusers' from_unet."""
    meta = json.loads((FIXTURES / "controlnet" / "from_unet.json").read_text())
    unet = _tiny_unet()
    net = controlnet_from_unet(unet, hint_channels=tuple(meta["conditioning_embedding_out_channels"]))
    ours = controlnet_to_diffusers(state_dict(net), net.config)
    assert sorted(k for k, v in ours.items() if not np.any(v)) == meta["zero_keys"]
    assert set(meta["redrawn"]) <= set(ours)

    redrawn = random_state_dict({k: tuple(v) for k, v in meta["redrawn"].items()}, meta["seed"])
    load_state_dict(net, convert_diffusers_controlnet(redrawn, net.config), strict=False)
    with np.load(FIXTURES / "controlnet" / "from_unet.npz") as f:
        io = dict(f)
    down, mid = net(io["latents"], io["timesteps"], io["context"], io["hint"])
    errors = [np.abs(np.asarray(d) - io[f"down.{i}"]).max() for i, d in enumerate(down)]
    errors.append(np.abs(np.asarray(mid) - io["mid"]).max())
    assert len(down) == sum(k.startswith("down.") for k in io)
    print(f"from_unet residuals: max abs error {max(errors):.2e}")
    assert max(errors) < FLOAT32_TOL
    assert min(float(np.abs(io[f"down.{i}"]).max()) for i in range(len(down))) > 1e-2  # not trivially 0


@functools.cache
def _micro():
    import keras
    from test_training import _pipeline

    keras.utils.set_random_seed(0)
    return _pipeline()  # 16x16 images, factor-2 VAE


def _batch(sd, n=4):
    from test_training import _batch as images_and_captions

    images, captions = images_and_captions(n)
    hints = (images + 1.0) / 2.0  # the target image as its own hint: easy to learn from
    return tf.constant(images), tf.constant(sd.tokenizer(captions)), tf.constant(hints)


def _snapshot(model):
    return {k: v.copy() for k, v in state_dict(model).items()}


def test_trainer_starts_at_the_unet_trains_only_the_net_and_saves(tmp_path):
    import keras

    sd = _micro()
    keras.utils.set_random_seed(1)  # the hint encoder's random start
    net = controlnet_from_unet(sd.unet, hint_channels=(8, 16))
    images, ids, hints = _batch(sd)
    x = tf.random.stateless_normal((4, 8, 8, 4), seed=(1, 2))
    t = tf.constant([10, 300, 600, 999])
    context = sd.text_encoder(ids)
    down, mid = net(x, t, context, hints)
    assert all(not np.any(np.asarray(d)) for d in [*down, mid])
    steered = sd.unet(x, t, context, down_residuals=down, mid_residual=mid)
    np.testing.assert_array_equal(np.asarray(steered), np.asarray(sd.unet(x, t, context)))

    frozen = {name: _snapshot(getattr(sd, name)) for name in ("unet", "text_encoder", "vae")}
    before = _snapshot(net)
    config = TrainingConfig(learning_rate=3e-3, ema_decay=0.5, ema_warmup=False)
    trainer = ControlNetTrainer(sd, net, config)
    batch = (images, ids, hints)
    start = trainer.compute_loss(batch, seeds=(1, 2, 3, 4))
    for _ in range(25):
        trainer.train_step(batch)
    end = trainer.compute_loss(batch, seeds=(1, 2, 3, 4))
    print(f"loss on a fixed batch: {start:.4f} -> {end:.4f}")
    assert end < 0.9 * start  # measured 1.126 -> 0.910
    for name, weights in frozen.items():
        now = state_dict(getattr(sd, name))
        assert all(np.array_equal(now[k], v) for k, v in weights.items()), f"{name} changed"
    after = state_dict(net)
    assert np.any(after["zero_convs.0.0.weight"]) and not np.array_equal(
        after["input_blocks.0.0.weight"], before["input_blocks.0.0.weight"]
    )

    # The saved folder holds the EMA weights; it reloads with the same residuals.
    loaded = ControlNet.from_pretrained(trainer.save_controlnet(tmp_path / "net"))
    assert loaded.config == net.config
    with trainer.ema_weights():
        want = net(x, 500, context, hints)
    got = loaded(x, 500, context, hints)
    for a, b in zip([*want[0], want[1]], [*got[0], got[1]], strict=True):
        assert np.any(np.asarray(a))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


def test_dataset_hints_and_bad_input():
    sd = _micro()
    images = np.zeros((4, 16, 16, 3), np.uint8)
    hints = np.full((4, 16, 16, 3), 255, np.uint8)
    batch = next(iter(dataset_from_arrays(images, ["a"] * 4, sd.tokenizer, 2, hints=hints)))
    assert len(batch) == 3 and float(batch[2].numpy().min()) == 1.0 and float(batch[0].numpy().max()) == -1.0
    with pytest.raises(ValueError, match="hints must be a uint8 array"):
        dataset_from_arrays(images, ["a"] * 4, sd.tokenizer, 2, hints=hints[:3])

    with pytest.raises(ValueError, match="hints are 4x the latents.*give it 2 hint_channels"):
        ControlNetTrainer(sd, controlnet_from_unet(sd.unet, hint_channels=(4, 8, 16)))
    other = controlnet_from_unet(_tiny_unet(), hint_channels=(4, 8))
    with pytest.raises(ValueError, match="made for another UNet"):
        ControlNetTrainer(sd, other)
    net = controlnet_from_unet(sd.unet, hint_channels=(4, 8))
    with pytest.raises(ValueError, match="prior_loss_weight=1.0"):
        ControlNetTrainer(sd, net, TrainingConfig(prior_loss_weight=1.0))
    trainer = ControlNetTrainer(sd, net)
    image_batch, ids, _ = _batch(sd)
    with pytest.raises(ValueError, match=r"\(images, token_ids, hints\) batches; got 2 parts"):
        trainer.compute_loss((image_batch, ids))


@pytest.mark.slow  # a CLI training run and five refused ones (about a minute of compiles); the trainer test stays in the default run
def test_cli_trains_a_controlnet(tmp_path, capsys):
    from PIL import Image

    from tf_diffusion.cli import main
    from tf_diffusion.families import components_of
    from tf_diffusion.weights.folder import write_folder

    sd = _micro()
    model = tmp_path / "model"
    model.mkdir()
    components = {name: state_dict(getattr(sd, name)) for name in components_of(sd.config)}
    write_folder(model, components, sd.config, sd.tokenizer)
    data, hints = tmp_path / "data", tmp_path / "hints"
    data.mkdir()
    hints.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square number {i}")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(hints / f"{i}.jpg")
    common = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--size", "16"]
    out = tmp_path / "net"
    argv = [*common, "--train", "controlnet", "--hints", str(hints), "--hint-channels", "4,8"]
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "c1"), "--out", str(out)]) == 0
    net = ControlNet.from_pretrained(out)
    assert net.config.hint_channels == (4, 8) and net.config.unet == sd.config.unet
    capsys.readouterr()
    bad = {
        "no hints": ([*common, "--train", "controlnet", "--checkpoint-dir", "c"], "needs --hints"),
        "hints alone": (
            [*common, "--hints", str(hints), "--checkpoint-dir", "c"],
            "only with --train controlnet",
        ),
        "widths": ([*argv[:-1], "x,8", "--checkpoint-dir", "c"], "--hint-channels 'x,8'"),
        "levels": ([*argv[:-1], "4,8,16", "--checkpoint-dir", "c"], "scales by 2, so give 2 widths"),
    }
    for name, (args, message) in bad.items():
        assert main(args) in (1, 2), name
        assert message in capsys.readouterr().err, name
    (hints / "1.jpg").unlink()
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "c2")]) in (1, 2)
    assert "no hint image 1.png|jpg|jpeg|webp" in capsys.readouterr().err
