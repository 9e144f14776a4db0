"""The trainers under ``KERAS_BACKEND=jax`` (``training.jax_step``), each group of checks in one JAX subprocess
(this test process is TensorFlow) that writes its measurements to a JSON file the test reads.

Default run (the micro pipeline of tests/test_training.py): LoRA steps (UNet + text encoder, EMA) with one
compilation, and a checkpoint restored into the same trainer and into a fresh one takes the identical next
step. Slow: on the SD 1.x tiny pipeline of tests/fixtures/pipeline, the training LoRA layers compute what
diffusers computes with the fixture file (tests/fixtures/lora_train), a few steps lower the loss and the
saved file reloads to the trained model; SDXL's step loss and gradients against diffusers'
train_text_to_image_lora_sdxl.py (tests/fixtures/sdxl_train), textual inversion, mixed_bfloat16, and
keras.distribution.DataParallel on two virtual CPU devices. JAX against TensorFlow from the same weights,
and the command line on JAX: tests/test_train_jax_parity.py.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]

PRELUDE = """
import json, sys
import numpy as np
import keras
sys.path.insert(0, {tests!r})
assert keras.backend.backend() == "jax", keras.backend.backend()
from test_lora import FIXTURES, build, err, te_out, unet_out
from tf_diffusion.training import LoraTrainer, LoraTrainingConfig, TrainingConfig
out = {{}}
def done():
    with open({result!r}, "w") as f:
        json.dump(out, f)
"""

SD1 = """
from test_train_lora import fixture_network
with np.load(FIXTURES / "lora_train" / "io.npz") as f:
    io = dict(f)
sd = build(FIXTURES)
network = fixture_network(sd)
out["fixture_unet"] = err(unet_out(sd, io), io["unet_kohya"])
out["fixture_te"] = err(te_out(sd, io), io["te_kohya"])
network.detach()
out["base_unet"] = err(unet_out(sd, io), io["unet_base"])

images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
batch = (images, np.asarray(sd.tokenizer(["a red circle", "a blue star"]), np.int32))
unet_before = [np.array(v.numpy()) for v in sd.unet.weights]
config = TrainingConfig(learning_rate=1e-2, text_encoder_learning_rate=1e-3, ema_decay=0.5, caption_dropout=0.0)
trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2, alpha=4, seed=3))
out["before"] = trainer.compute_loss(batch, seeds=range(3))
history = trainer.fit([batch] * 4, steps=4, checkpoint_dir={ckpt!r}, progress=False)
out["losses"] = [h["loss"] for h in history]
out["after"] = trainer.compute_loss(batch, seeds=range(3))
out["traces"] = trainer._step_fn.traces[0]
out["step"] = trainer.step
out["base_unchanged"] = all(
    np.array_equal(a, v.numpy()) for a, v in zip(unet_before, sd.unet.weights, strict=True)
)
out["dtypes"] = sorted({{str(v.dtype) for v in trainer.trainable_variables}})
path = trainer.save_lora({lora!r})
with trainer.ema_weights():
    live_unet, live_te = unet_out(sd, io), te_out(sd, io)
out["live_moved"] = min(err(live_unet, io["unet_base"]), err(live_te, io["te_base"]))
# A restored checkpoint takes the step the run takes next: weights, EMA, optimizer state and step.
expected = trainer.train_step(batch)["loss"]
factors = [np.array(v.numpy()) for v in trainer.trainable_variables]
emas = [np.array(v.numpy()) for v in trainer.ema_variables]
trainer.load_checkpoint({ckpt!r} + "/ckpt-00000004.safetensors")
out["restored_step"] = trainer.step
out["next_loss"] = [expected, trainer.train_step(batch)["loss"]]
out["next_factors"] = max(float(np.abs(a - v.numpy()).max()) for a, v in zip(factors, trainer.trainable_variables))
out["next_ema"] = max(float(np.abs(a - v.numpy()).max()) for a, v in zip(emas, trainer.ema_variables))
out["traces_after_restore"] = trainer._step_fn.traces[0]
trainer.network.detach()
sd.load_lora_weights(path)
out["reloaded_unet"] = err(unet_out(sd, io), live_unet)
out["reloaded_te"] = err(te_out(sd, io), live_te)
sd.unload_lora_weights()
done()
"""


def run_jax(tmp_path, body: str, timeout: int = 600, env: dict | None = None, **paths) -> dict:
    """Run PRELUDE + body under KERAS_BACKEND=jax; the dict the script wrote."""
    result = tmp_path / "result.json"
    fields = {k: str(tmp_path / v) for k, v in paths.items()}
    script = PRELUDE.format(tests=str(ROOT / "tests"), result=str(result)) + body.format(**fields)
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(result.read_text())


QUICK = """
import tensorflow as tf
from test_training import MICRO, _batch
from tf_diffusion.pipeline import StableDiffusion
sd = StableDiffusion(MICRO)
images, captions = _batch(2)
batch = (images, np.asarray(sd.tokenizer(captions), np.int32))
config = TrainingConfig(learning_rate=1e-2, ema_decay=0.5, caption_dropout=0.0)
trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2))
start = [np.array(v.numpy()) for v in trainer.trainable_variables]
history = trainer.fit([batch] * 2, steps=2, checkpoint_dir={ckpt!r}, progress=False)
out["losses"] = [h["loss"] for h in history]
out["moved"] = all(not np.array_equal(a, v.numpy()) for a, v in zip(start, trainer.trainable_variables))
expected = trainer.train_step(batch)["loss"]
factors = [np.array(v.numpy()) for v in trainer.trainable_variables]
trainer.load_checkpoint({ckpt!r} + "/ckpt-00000002.safetensors")
out["restored_step"] = trainer.step
out["next_loss"] = [expected, trainer.train_step(batch)["loss"]]
out["next_factors"] = max(float(np.abs(a - v.numpy()).max()) for a, v in zip(factors, trainer.trainable_variables))
out["traces"] = trainer._step_fn.traces[0]
trainer.network.detach()
# A fresh trainer (new LoRA layers, optimizers, EMA and step function) resumes from the same checkpoint
# and takes that step too.
fresh = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2))
history = fresh.fit([batch], steps=3, checkpoint_dir={ckpt!r}, progress=False)
out["fresh_steps"] = [len(history), fresh.step]
out["fresh_loss"] = history[0]["loss"]
out["fresh_factors"] = max(float(np.abs(a - v.numpy()).max()) for a, v in zip(factors, fresh.trainable_variables))
fresh.network.detach()
try:
    LoraTrainer(sd, "unet", config, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
except ValueError as e:
    out["strategy_error"] = str(e)
done()
"""


def test_lora_steps_and_exact_restore_under_jax(tmp_path):
    out = run_jax(tmp_path, QUICK, ckpt="ckpt")
    assert all(np.isfinite(out["losses"])) and out["moved"], out
    assert out["restored_step"] == 2 and out["traces"] == 1, out  # four steps, one compilation
    assert out["next_loss"][1] == pytest.approx(out["next_loss"][0], rel=1e-6), out
    assert out["next_factors"] <= 1e-7, out
    # A fresh trainer resuming from ckpt-2 runs one step, the one the first trainer took (measured: 0.0).
    assert out["fresh_steps"] == [1, 3], out
    assert out["fresh_loss"] == pytest.approx(out["next_loss"][0], rel=1e-6), out
    assert out["fresh_factors"] <= 1e-6, out
    assert "tf.distribute" in out["strategy_error"] and "keras.distribution" in out["strategy_error"], out


@pytest.mark.slow  # about 2 minutes (building the fixture pipeline eagerly on JAX is most of it); the
# default run still covers JAX LoRA steps with one compilation and an exact checkpoint restore (above)
def test_lora_training_under_jax(tmp_path):
    out = run_jax(tmp_path, SD1, ckpt="ckpt", lora="lora.safetensors")
    assert out["fixture_unet"] <= 1e-4 and out["fixture_te"] <= 1e-4, out  # diffusers with the file
    assert out["base_unet"] <= 1e-4, out  # detached: the base model again
    assert out["after"] < out["before"], out
    assert out["step"] == 4 and out["traces"] == 1, out  # one compilation for four steps
    assert out["base_unchanged"] and out["dtypes"] == ["float32"], out
    assert out["live_moved"] > 1e-4, out
    assert out["reloaded_unet"] <= 1e-5 and out["reloaded_te"] <= 1e-5, out
    assert out["restored_step"] == 4 and out["traces_after_restore"] == 1, out
    assert out["next_loss"][1] == pytest.approx(out["next_loss"][0], rel=1e-6), out
    assert out["next_factors"] <= 1e-7 and out["next_ema"] <= 1e-7, out


EXTRAS = """
from keras import ops
from test_train_lora import set_factors
from test_training import MICRO, _batch
from tf_diffusion import StableDiffusion
from tf_diffusion.training import TextualInversionTrainer
from tf_diffusion.training.jax_step import value_and_grad

# SDXL: one step of diffusers' train_text_to_image_lora_sdxl.py (tools/make_fixtures_sdxl_train.py).
folder = FIXTURES / "sdxl_train"
with np.load(folder / "step.npz") as f:
    ref = dict(f)
sdxl = StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-diffusers")
lora = LoraTrainingConfig(
    rank=2, alpha=4.0, unet_targets=("to_k", "to_q", "to_v", "to_out.0"),
    text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
)
trainer = LoraTrainer(sdxl, "unet+text_encoder", TrainingConfig(ema_decay=None, caption_dropout=0.0), lora=lora)
set_factors(trainer.network, folder / "lora.safetensors")
ids = np.stack([ref["ids"], ref["ids_2"]], axis=1)
def loss_fn(latents, t, noise, ids, time_ids):
    out, target = trainer.prediction_and_target(latents, t, noise, ids, time_ids)
    return ops.mean(ops.square(out - target))
loss, grads = value_and_grad(trainer, loss_fn)(ref["latents"], ref["t"], ref["noise"], ids, ref["time_ids"])
assert [v for v in trainer.network.trainable_variables] == trainer.trainable_variables
norms = {{}}
for entry, g_down, g_up in zip(trainer.network.layers, grads[::2], grads[1::2], strict=True):
    name = f"{{entry.component}}.{{entry.diffusers_name}}"
    norms[f"{{name}}.lora_A.weight"] = float(np.linalg.norm(np.asarray(g_down, np.float64)))
    norms[f"{{name}}.lora_B.weight"] = float(np.linalg.norm(np.asarray(g_up, np.float64)))
names = [str(n) for n in ref["grad_names"]]
out["sdxl_names_match"] = sorted(norms) == names
got = np.array([norms[n] for n in names])
want = ref["grad_norms"]
reached = want > 0
out["sdxl_loss"] = [float(loss), float(ref["loss"])]
out["sdxl_reached"] = int(reached.sum())
out["sdxl_grad_rel"] = float((np.abs(got - want)[reached] / want[reached]).max())
out["sdxl_zero_same"] = bool(np.array_equal(got == 0, want == 0))
# A few SDXL LoRA steps through the trainer's own step.
images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
batch = (images, trainer.tokenize(["a red circle", "a blue star"]))
ups = [np.array(e.up.numpy()) for e in trainer.network.layers]
history = [trainer.train_step(batch) for _ in range(3)]
out["sdxl_losses"] = [h["loss"] for h in history]
out["sdxl_moved"] = min(
    max(float(np.abs(e.up.numpy() - u).max()) for e, u in zip(trainer.network.layers, ups) if e.component == c)
    for c in ("unet", "text_encoder", "text_encoder_2")
)
trainer.network.detach()
del sdxl, trainer

# Textual inversion: one step moves only the new vectors.
sd = build(FIXTURES)
ti = TextualInversionTrainer(sd, "<zqx>", 2, "cat", TrainingConfig(learning_rate=1e-2, ema_decay=None))
start = np.array(ti.vectors.numpy())
table = np.array(sd.text_encoder.text_model.embeddings.token_embedding.weight.numpy())
logs = ti.train_step((images, ti.tokenize(["a photo of <zqx>", "<zqx> on grass"])))
out["ti_loss"] = logs["loss"]
out["ti_moved"] = float(np.abs(ti.vectors.numpy() - start).max())
out["ti_table_same"] = bool(np.array_equal(table, sd.text_encoder.text_model.embeddings.token_embedding.weight.numpy()))

# mixed_bfloat16: the models compute in bfloat16, the factors stay float32 and all move.
keras.config.set_dtype_policy("mixed_bfloat16")
micro = StableDiffusion(MICRO)
images, captions = _batch(2)
mp = LoraTrainer(micro, "unet+text_encoder", TrainingConfig(learning_rate=1e-2, ema_decay=None),
                 lora=LoraTrainingConfig(rank=2))
start = [np.array(v.numpy()) for v in mp.trainable_variables]
history = [mp.train_step((images, micro.tokenizer(captions))) for _ in range(2)]
out["mp_losses"] = [h["loss"] for h in history]
out["mp_dtypes"] = sorted({{str(v.dtype) for v in mp.trainable_variables}})
out["mp_all_moved"] = all(not np.array_equal(a, v.numpy()) for a, v in zip(start, mp.trainable_variables))
out["mp_compute"] = str(micro.unet.dtype_policy.compute_dtype)
done()
"""


@pytest.mark.slow  # 2-4 minutes; the default run still covers SD 1.x LoRA training, saving and resuming on JAX
def test_sdxl_gradients_textual_inversion_and_mixed_precision_under_jax(tmp_path):
    out = run_jax(tmp_path, EXTRAS, timeout=900)
    loss, want = out["sdxl_loss"]
    assert abs(loss - want) < 1e-4 * want, out
    assert out["sdxl_names_match"] and out["sdxl_reached"] > 300, out
    assert out["sdxl_grad_rel"] < 1e-4 and out["sdxl_zero_same"], out
    assert all(np.isfinite(out["sdxl_losses"])) and out["sdxl_moved"] > 0, out
    assert np.isfinite(out["ti_loss"]) and out["ti_moved"] > 0 and out["ti_table_same"], out
    assert all(np.isfinite(out["mp_losses"])) and out["mp_dtypes"] == ["float32"], out
    assert out["mp_all_moved"] and out["mp_compute"] == "bfloat16", out


DATA_PARALLEL = """
import jax
assert len(jax.devices()) == 2, jax.devices()
images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
config = TrainingConfig(learning_rate=1e-2, text_encoder_learning_rate=1e-3, ema_decay=0.5, caption_dropout=0.0)
runs = []
for distributed in (False, True):
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    sd = build(FIXTURES)
    batch = (images, np.asarray(sd.tokenizer(["a red circle", "a blue star"]), np.int32))
    trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2, alpha=4, seed=3))
    losses = [trainer.train_step(batch)["loss"] for _ in range(2)]
    runs.append((losses, [np.array(v.numpy()) for v in trainer.trainable_variables]))
    trainer.network.detach()
keras.distribution.set_distribution(None)
out["losses"] = [runs[0][0], runs[1][0]]
out["factors"] = max(float(np.abs(a - b).max()) for a, b in zip(runs[0][1], runs[1][1], strict=True))
out["factor_scale"] = max(float(np.abs(a).max()) for a in runs[0][1])
done()
"""


@pytest.mark.slow  # 2-3 minutes; the default run covers the one-device step this splits across two devices
def test_data_parallel_on_two_cpu_devices_equals_one_device(tmp_path):
    out = run_jax(tmp_path, DATA_PARALLEL, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    one, two = out["losses"]
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert out["factors"] <= 1e-5 * max(1.0, out["factor_scale"]), out
