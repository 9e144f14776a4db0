"""The trainers on JAX against the same trainers on TensorFlow, from the same weights, batch and seed.

The test process (TensorFlow) writes the micro pipeline of test_training (and a ControlNet for it) as
files; one subprocess per backend (``KERAS_BACKEND=tensorflow`` / ``jax``) loads them, runs two steps of
each trainer and writes its draws, losses and updated weights to an ``.npz`` the test compares. The draws
are TensorFlow stateless draws on both backends, so they must be equal; the losses and weights agree to
float32 rounding (the figures are in docs/training.md, "On JAX"). Also here: a fresh trainer on a fresh
pipeline resuming a JAX checkpoint takes the uninterrupted run's next step, and ``tf-diffusion train
--lora`` under ``KERAS_BACKEND=jax`` writes a LoRA file that loads back.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
tf = pytest.importorskip("tensorflow")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs under either backend: {folder} holds the pipeline ("model") and a ControlNet ("controlnet").
SCRIPT = """
import sys
import numpy as np
import keras
import tensorflow as tf
sys.path.insert(0, {tests!r})
from test_training import _batch
from tf_diffusion.controlnet import ControlNet
from tf_diffusion.pipeline import StableDiffusion
from tf_diffusion.training import (
    ControlNetTrainer, DiffusionTrainer, LoraTrainer, LoraTrainingConfig, TrainingConfig, VAETrainer,
)
assert keras.backend.backend() == {backend!r}, keras.backend.backend()
folder = {folder!r}
out = {{}}

def pipeline():
    return StableDiffusion.from_pretrained(folder + "/model")

def record(name, trainer, batch, steps=2):
    for step in range(steps):  # the draws of the step's seed (what both steps compute from)
        seed = tf.random.experimental.stateless_fold_in(tf.constant([trainer.config.seed, step], tf.int64), 0)
        for key, value in trainer._draw(tuple(batch), seed).items():
            out[f"{{name}}/draw{{step}}/{{key}}"] = np.asarray(value)
    start = [np.asarray(v.numpy()) for v in trainer.trainable_variables]
    for step in range(steps):
        for key, value in trainer.train_step(batch).items():
            out[f"{{name}}/log{{step}}/{{key}}"] = np.asarray(value)
    for i, v in enumerate(trainer.trainable_variables):
        out[f"{{name}}/weight/{{i:04d}}"] = np.asarray(v.numpy())
    moved = [float(np.abs(a - v.numpy()).max()) for a, v in zip(start, trainer.trainable_variables)]
    out[f"{{name}}/moved"] = np.asarray(min(moved))  # every trained variable changes
    for i, v in enumerate(trainer.ema_variables):
        out[f"{{name}}/ema/{{i:04d}}"] = np.asarray(v.numpy())

images, captions = _batch(2)
modes = {modes!r}
if "lora" in modes:
    sd = pipeline()
    batch = (images, np.asarray(sd.tokenizer(captions), np.int32))
    config = TrainingConfig(
        learning_rate=1e-2, text_encoder_learning_rate=1e-3, ema_decay=0.5, caption_dropout=0.5, seed=5
    )
    trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2, alpha=4, seed=3))
    rng = np.random.default_rng(1)  # non-zero ups, so the first step reaches the downs too
    for entry in trainer.network.layers:
        entry.up.assign(rng.normal(0, 0.1, tuple(entry.up.shape)).astype(np.float32))
    record("lora", trainer, batch)
    trainer.network.detach()
if "dreambooth" in modes:
    sd = pipeline()
    class_images, class_captions = _batch(3, seed=1)
    batch = (
        images, np.asarray(sd.tokenizer(["a zq square", "a zq square"]), np.int32),
        class_images, np.asarray(sd.tokenizer(class_captions[:3]), np.int32),
    )
    config = TrainingConfig(learning_rate=1e-3, ema_decay=None, prior_loss_weight=0.5, seed=7)
    record("dreambooth", DiffusionTrainer(sd, "unet", config), batch)
if "full" in modes:
    sd = pipeline()
    batch = (images, np.asarray(sd.tokenizer(captions), np.int32))
    config = TrainingConfig(learning_rate=1e-3, ema_decay=0.9, grad_clip_norm=0.5, seed=11)
    record("full", DiffusionTrainer(sd, "unet+text_encoder", config), batch)
if "controlnet" in modes:
    sd = pipeline()
    net = ControlNet.from_pretrained(folder + "/controlnet")
    hints = np.random.default_rng(2).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    batch = (images, np.asarray(sd.tokenizer(captions), np.int32), hints)
    config = TrainingConfig(learning_rate=1e-3, ema_decay=0.5, seed=13)
    # Three steps: the hint encoder's first convs sit behind two zero convs, so step 3 is their first move.
    record("controlnet", ControlNetTrainer(sd, net, config), batch, steps=3)
if "vae" in modes:
    sd = pipeline()
    config = TrainingConfig(learning_rate=1e-3, ema_decay=0.5, reconstruction_loss="l1+l2", seed=19)
    record("vae", VAETrainer(sd.vae, config), (images,))
if "resume" in modes:
    # The uninterrupted run: two steps with a checkpoint, then the third.
    ckpt = folder + "/resume-" + keras.backend.backend()
    sd = pipeline()
    batch = (images, np.asarray(sd.tokenizer(captions), np.int32))
    config = TrainingConfig(learning_rate=1e-2, text_encoder_learning_rate=1e-3, ema_decay=0.5, seed=17)
    lora = LoraTrainingConfig(rank=2, alpha=4, seed=3)
    first = LoraTrainer(sd, "unet+text_encoder", config, lora=lora)
    first.fit([batch] * 2, steps=2, checkpoint_dir=ckpt, progress=False)
    out["resume/expected_loss"] = np.asarray(first.train_step(batch)["loss"])
    expected = [np.asarray(v.numpy()) for v in first.trainable_variables + first.ema_variables]
    first.network.detach()
    del first, sd
    # A fresh pipeline and a fresh trainer (another LoRA init seed would be refused: the setup is checked).
    sd = pipeline()
    fresh = LoraTrainer(sd, "unet+text_encoder", config, lora=lora)
    history = fresh.fit([batch], steps=3, checkpoint_dir=ckpt, progress=False)
    out["resume/steps_run"] = np.asarray(len(history))
    out["resume/step"] = np.asarray(fresh.step)
    out["resume/loss"] = np.asarray(history[0]["loss"])
    got = [np.asarray(v.numpy()) for v in fresh.trainable_variables + fresh.ema_variables]
    out["resume/max_diff"] = np.asarray(max(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
    fresh.network.detach()
np.savez({result!r}, **out)
"""

ALL_MODES = ("lora", "dreambooth", "full", "controlnet", "resume")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The micro pipeline (tests/test_training.py's MICRO) and a ControlNet for it, written as files."""
    import keras
    from test_training import MICRO

    from tf_diffusion.controlnet import controlnet_from_unet
    from tf_diffusion.families import components_of
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights.controlnet import save_controlnet
    from tf_diffusion.weights.folder import write_folder
    from tf_diffusion.weights.state_dict import state_dict

    folder = tmp_path_factory.mktemp("jax_parity")
    keras.utils.set_random_seed(0)
    sd = StableDiffusion(MICRO)
    (folder / "model").mkdir()
    components = {name: state_dict(getattr(sd, name)) for name in components_of(sd.config)}
    write_folder(folder / "model", components, sd.config, sd.tokenizer)
    # Factor-2 VAE: two hint levels give hints at the image size.
    save_controlnet(controlnet_from_unet(sd.unet, hint_channels=(8, 16)), folder / "controlnet")
    return folder


def _environment(backend: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_both(folder: pathlib.Path, modes: tuple[str, ...], timeout: int = 600) -> tuple[dict, dict]:
    """Run SCRIPT for ``modes`` under TensorFlow and JAX side by side; their (tf, jax) arrays."""
    procs = {}
    for backend in ("tensorflow", "jax"):
        result = folder / f"{'-'.join(modes)}-{backend}.npz"
        script = SCRIPT.format(
            tests=str(ROOT / "tests"), backend=backend, folder=str(folder), modes=modes, result=str(result)
        )
        procs[backend] = (
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=_environment(backend),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),  # fmt: skip
            result,
        )
    arrays = {}
    for backend, (proc, result) in procs.items():
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{backend}:\n{err[-4000:]}"
        with np.load(result) as f:
            arrays[backend] = dict(f)
    return arrays["tensorflow"], arrays["jax"]


def compare(tf_out: dict, jax_out: dict, name: str) -> dict:
    """For one mode: whether the draws are equal, the worst relative loss difference, the worst weight
    difference (relative to the weights' largest magnitude, at least 1) and the losses."""
    keys = sorted(k for k in tf_out if k.startswith(name + "/"))
    assert keys == sorted(k for k in jax_out if k.startswith(name + "/")), name
    draws = [k for k in keys if "/draw" in k]
    logs = [k for k in keys if "/log" in k]
    weights = [k for k in keys if "/weight/" in k or "/ema/" in k]
    assert draws and logs and weights, keys
    scale = max(1.0, max(float(np.abs(tf_out[k]).max()) for k in weights))
    return {
        "draws_equal": all(np.array_equal(tf_out[k], jax_out[k]) for k in draws),
        "loss_rel": max(
            abs(float(jax_out[k]) - float(tf_out[k])) / max(abs(float(tf_out[k])), 1e-12) for k in logs
        ),
        "weights": max(float(np.abs(jax_out[k] - tf_out[k]).max()) for k in weights) / scale,
        "losses": {k: (float(tf_out[k]), float(jax_out[k])) for k in logs},
        "moved": float(jax_out[f"{name}/moved"]),
    }


@pytest.mark.slow  # 85-110 s (a TensorFlow and a JAX process side by side)
def test_lora_step_and_fresh_resume_equal_tensorflow(files):
    tf_out, jax_out = run_both(files, ("lora", "resume"))
    lora = compare(tf_out, jax_out, "lora")
    assert lora["draws_equal"] and lora["moved"] > 0, lora
    assert lora["loss_rel"] <= 1e-5 and lora["weights"] <= 1e-5, lora  # measured 2e-7 and 8e-7
    # A fresh pipeline and trainer restoring the step-2 checkpoint take the uninterrupted run's step 3.
    for out in (tf_out, jax_out):
        assert int(out["resume/steps_run"]) == 1 and int(out["resume/step"]) == 3, out
        assert float(out["resume/loss"]) == pytest.approx(float(out["resume/expected_loss"]), rel=1e-6), out
        assert float(out["resume/max_diff"]) <= 1e-6, out  # measured 0.0 on both
    assert float(jax_out["resume/loss"]) == pytest.approx(float(tf_out["resume/loss"]), rel=1e-5)


@pytest.mark.slow  # about 3 minutes (a TensorFlow and a JAX process side by side)
def test_dreambooth_full_fine_tune_controlnet_and_vae_equal_tensorflow(files):
    tf_out, jax_out = run_both(files, ("dreambooth", "full", "controlnet", "vae"))
    for name in ("dreambooth", "full", "controlnet", "vae"):
        result = compare(tf_out, jax_out, name)
        assert result["draws_equal"] and result["moved"] > 0, (name, result)
        # measured: loss 3e-7 / 4e-7 / 3e-7 / 3e-7 relative, weights 1.4e-6 / 3.7e-6 / 1.4e-7 / 4.6e-6
        assert result["loss_rel"] <= 1e-5 and result["weights"] <= 2e-5, (name, result)
    # Prior preservation: both halves are logged, and the loss is instance + 0.5 * prior on JAX too.
    for step in (0, 1):
        logs = {k: float(jax_out[f"dreambooth/log{step}/{k}"]) for k in ("loss", "instance", "prior")}
        assert logs["loss"] == pytest.approx(logs["instance"] + 0.5 * logs["prior"], rel=1e-6), logs
        assert np.isfinite(list(logs.values())).all(), logs


CLI = """
import json, sys
import keras
from tf_diffusion.cli import main
runs = json.loads({runs!r})
codes = [main(argv) for argv in runs]
assert keras.backend.backend() == "jax", keras.backend.backend()
# The step that ran is JAX's (training.jax_step is imported only to build it).
assert "tf_diffusion.training.jax_step" in sys.modules
sys.exit(0 if codes == [2, 0] else 3)
"""


def test_cli_trains_a_lora_under_jax(files, tmp_path):
    import json

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.testing import write_captioned_images
    from tf_diffusion.weights.safetensors_io import open_safetensors

    data = tmp_path / "data"
    write_captioned_images(data)
    out = tmp_path / "lora.safetensors"
    argv = ["train", "--model", str(files / "model"), "--data", str(data), "--steps", "2", "--size", "16"]
    argv += ["--lora", "--rank", "2", "--train", "unet+text_encoder", "--lr", "1e-2"]
    argv += ["--checkpoint-dir", str(tmp_path / "ckpt")]
    runs = [[*argv, "--mirrored"], [*argv, "--out", str(out)]]
    done = subprocess.run(
        [sys.executable, "-c", CLI.format(runs=json.dumps(runs))], env=_environment("jax"), cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "--mirrored: MirroredStrategy is TensorFlow's" in done.stderr, done.stderr[-2000:]
    assert "wrote" in done.stdout and (tmp_path / "ckpt" / "ckpt-00000002.safetensors").exists(), done.stdout
    with open_safetensors(out) as f:
        assert f.metadata["ss_network_dim"] == "2", f.metadata
        keys = list(f.keys())
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    # The file loads back (here, on TensorFlow) and changes the UNet; unloading restores it exactly.
    sd = StableDiffusion.from_pretrained(files / "model")
    inputs = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype(np.float32)
    context = np.random.default_rng(2).normal(size=(1, 77, 16)).astype(np.float32)
    base = np.asarray(sd.unet(inputs, 500, context))
    sd.load_lora_weights(out)
    with_lora = np.asarray(sd.unet(inputs, 500, context))
    sd.unload_lora_weights()
    assert np.abs(with_lora - base).max() > 1e-4
    assert np.array_equal(np.asarray(sd.unet(inputs, 500, context)), base)
