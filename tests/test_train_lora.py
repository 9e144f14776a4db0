"""LoRA training and saving: the training layers compute what diffusers computes with the file we save.

tools/make_fixtures_lora_train.py attached a ``LoraNetwork`` to the tiny pipeline (UNet: attention, projections,
feed-forward and the 3x3 ResBlock ``conv1``; text encoder: attention and MLP; rank 4, alpha 2), gave its
factors seeded values, saved it with ``save_lora`` in kohya and in diffusers format, loaded each file with
diffusers' ``load_lora_weights`` into the tiny diffusers pipeline and recorded its UNet and text-encoder outputs.
"""

import json

import numpy as np
import pytest
from test_lora import FIXTURES, build, err, te_out, unet_out

tf = pytest.importorskip("tensorflow")

from tf_diffusion.adapters.lora_training import (  # noqa: E402
    LoraNetwork,
    base_model_version,
    lora_state_dict,
    save_lora,
)
from tf_diffusion.training import LoraTrainer, LoraTrainingConfig, TrainingConfig  # noqa: E402
from tf_diffusion.weights.safetensors_io import load_safetensors, open_safetensors  # noqa: E402

TOLERANCE = 1e-4  # float32 components against the reference
FOLDER = FIXTURES / "lora_train"
CASES = json.loads((FOLDER / "cases.json").read_text())


@pytest.fixture(scope="module")
def io():
    with np.load(FOLDER / "io.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def sd():
    model = build(FIXTURES)
    yield model
    model.unload_lora_weights()


@pytest.fixture(autouse=True)
def clean(sd):
    sd.unload_lora_weights()
    yield
    sd.unload_lora_weights()


def set_factors(network, path):
    """Give the network the factors of a diffusers-format file we saved (torch layout there)."""
    tensors = load_safetensors(path)
    assert len(tensors) == 2 * len(network.layers)
    for entry in network.layers:
        name = f"{entry.component}.{entry.diffusers_name}"
        down, up = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        if down.ndim == 2:  # linear: torch (r, in) / (out, r) -> keras (in, r) / (r, out)
            entry.down.assign(down.T)
            entry.up.assign(up.T)
        else:  # conv: torch (r, in, kh, kw) / (out, r, 1, 1) -> keras (kh, kw, in, r) / (1, 1, r, out)
            entry.down.assign(np.transpose(down, (2, 3, 1, 0)))
            entry.up.assign(np.transpose(up, (2, 3, 1, 0)))
    return network


def fixture_network(sd):
    """The fixture tool's network with its factors."""
    network = LoraNetwork.attach(
        sd,
        CASES["rank"],
        CASES["alpha"],
        unet_targets=CASES["unet_targets"],
        text_encoder_targets=CASES["text_encoder_targets"],
    )
    return set_factors(network, FOLDER / "diffusers.safetensors")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_files_load_in_our_loader_as_in_diffusers(sd, io, fmt):
    assert err(unet_out(sd, io), io["unet_base"]) <= TOLERANCE
    sd.load_lora_weights(FOLDER / f"{fmt}.safetensors")
    assert err(unet_out(sd, io), io[f"unet_{fmt}"]) <= TOLERANCE
    assert err(te_out(sd, io), io[f"te_{fmt}"]) <= TOLERANCE


def test_training_layers_compute_what_diffusers_does_with_the_file(sd, io):
    base = [v.numpy().copy() for v in sd.unet.weights + sd.text_encoder.weights]
    network = fixture_network(sd)
    try:
        assert err(unet_out(sd, io), io["unet_kohya"]) <= TOLERANCE
        assert err(te_out(sd, io), io["te_kohya"]) <= TOLERANCE
        # The base weights are not touched; only calls are wrapped.
        for a, v in zip(base, sd.unet.weights + sd.text_encoder.weights, strict=True):
            np.testing.assert_array_equal(a, v.numpy())
        # What we save now is what diffusers was shown: the same names and values.
        for fmt in ("kohya", "diffusers"):
            saved = load_safetensors(FOLDER / f"{fmt}.safetensors")
            ours = lora_state_dict(network, fmt)
            assert sorted(ours) == sorted(saved)
            for key, value in ours.items():
                np.testing.assert_array_equal(value, saved[key], err_msg=key)
    finally:
        network.detach()
    assert err(unet_out(sd, io), io["unet_base"]) <= TOLERANCE  # detached: the base model again


def test_kohya_names_and_metadata(sd):
    with open_safetensors(FOLDER / "kohya.safetensors") as f:
        meta = dict(f.metadata)
        keys = list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    # A1111's Lora hashes: the stored sshs_model_hash is the SHA-256 of the bytes after the header.
    import hashlib

    data = (FOLDER / "kohya.safetensors").read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[start:]).hexdigest()
    with open_safetensors(FOLDER / "diffusers.safetensors") as f:
        peft = json.loads(f.metadata["lora_adapter_metadata"])
    assert peft["unet.r"] == 4 and peft["unet.lora_alpha"] == 2.0 and peft["text_encoder.lora_alpha"] == 2.0
    assert base_model_version(sd.config) == "sd_v1"


def test_default_targets_are_the_attention_projections(sd):
    network = LoraNetwork.attach(sd, 2, text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    try:
        unet = {e.path.rsplit(".", 2)[-2:][-1] for e in network.layers if e.component == "unet"}
        assert unet == {"to_q", "to_k", "to_v", "0"}
        assert all(".attn" in e.path for e in network.layers if e.component == "unet")
        te = {e.path.rsplit(".", 1)[-1] for e in network.layers if e.component == "text_encoder"}
        assert te == {"q_proj", "k_proj", "v_proj", "out_proj"}
        # kaiming-uniform down (bound 1/sqrt(fan_in)), zero up: the model starts unchanged.
        entry = network.layers[0]
        bound = 1 / np.sqrt(entry.down.shape[0])
        down = entry.down.numpy()
        assert np.abs(down).max() <= bound and np.abs(down).max() > 0.5 * bound
        assert not network.layers[0].up.numpy().any()
    finally:
        network.detach()


def test_train_save_reload_and_resume(sd, io, tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    batch = (tf.constant(images), tf.constant(sd.tokenizer(["a red circle", "a blue star"])))
    unet_before = [v.numpy().copy() for v in sd.unet.weights]
    config = TrainingConfig(
        learning_rate=1e-2, text_encoder_learning_rate=1e-3, ema_decay=0.5, caption_dropout=0.0
    )
    lora = LoraTrainingConfig(rank=2, alpha=4, seed=3)
    trainer = LoraTrainer(sd, "unet+text_encoder", config, lora=lora)
    try:
        # One AdamW per learning rate: the text encoder's factors move with their own.
        assert [opt.learning_rate.numpy() for opt, _ in trainer._optimizers] == pytest.approx([1e-2, 1e-3])
        before = trainer.compute_loss(batch, seeds=range(3))
        trainer.fit([batch] * 6, steps=6, checkpoint_dir=tmp_path / "ckpt", progress=False)
        after = trainer.compute_loss(batch, seeds=range(3))
        assert after < before, (before, after)
        for a, v in zip(unet_before, sd.unet.weights, strict=True):
            np.testing.assert_array_equal(a, v.numpy())
        paths = {
            fmt: trainer.save_lora(tmp_path / f"{fmt}.safetensors", fmt) for fmt in ("kohya", "diffusers")
        }
        with open_safetensors(paths["kohya"]) as f:
            meta = dict(f.metadata)
        assert meta["ss_steps"] == "6" and meta["ss_text_encoder_lr"] == "0.001"
        assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4"
        with trainer.ema_weights():  # the files hold the EMA factors
            live_unet, live_te = unet_out(sd, io), te_out(sd, io)
        assert err(live_unet, io["unet_base"]) > 1e-4 and err(live_te, io["te_base"]) > 1e-4
        expected = trainer.train_step(batch)["loss"]
        factors = [v.numpy() for v in trainer.trainable_variables]
    finally:
        trainer.network.detach()
    for fmt, path in paths.items():
        sd.load_lora_weights(path, adapter_name=fmt)
        sd.set_adapters([fmt])
        assert err(unet_out(sd, io), live_unet) <= 1e-5, fmt
        assert err(te_out(sd, io), live_te) <= 1e-5, fmt
    sd.unload_lora_weights()
    with pytest.raises(FileExistsError):
        trainer.save_lora(paths["kohya"])

    # A new trainer resumes from the checkpoint and takes the same next step.
    resumed = LoraTrainer(sd, "unet+text_encoder", config, lora=lora)
    try:
        resumed.load_checkpoint(tmp_path / "ckpt" / "ckpt-00000006.safetensors")
        assert resumed.step == 6
        assert resumed.train_step(batch)["loss"] == pytest.approx(expected, rel=1e-6)
        for a, v in zip(factors, resumed.trainable_variables, strict=True):
            np.testing.assert_allclose(a, v.numpy(), rtol=1e-6, atol=1e-7)
    finally:
        resumed.network.detach()
    other = LoraTrainer(sd, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2, alpha=8, seed=3))
    try:
        with pytest.raises(ValueError, match="another setup"):
            other.load_checkpoint(tmp_path / "ckpt" / "ckpt-00000006.safetensors")
    finally:
        other.network.detach()


def test_bad_settings_are_refused_and_nothing_is_attached(sd, tmp_path):
    calls = {id(layer): layer.__dict__.get("call") for layer in sd.unet._flatten_layers()}
    with pytest.raises(ValueError, match="rank"):
        LoraNetwork.attach(sd, 0)
    with pytest.raises(ValueError, match="alpha"):
        LoraNetwork.attach(sd, 2, -1.0)
    with pytest.raises(ValueError, match=r"\['to_z'\] match no"):
        LoraNetwork.attach(sd, 2, unet_targets=("to_q", "to_z"))
    with pytest.raises(ValueError, match="larger than"):
        LoraNetwork.attach(sd, 10_000)
    with pytest.raises(ValueError, match="rank"):
        LoraTrainingConfig(rank=1.5)
    with pytest.raises(ValueError, match="text_encoder_learning_rate"):
        TrainingConfig(text_encoder_learning_rate=0.0)
    assert calls == {id(layer): layer.__dict__.get("call") for layer in sd.unet._flatten_layers()}
    network = LoraNetwork.attach(sd, 2)
    try:
        with pytest.raises(ValueError, match="already has a LoRA network"):
            LoraNetwork.attach(sd, 2)
        with pytest.raises(ValueError, match="format"):
            save_lora(network, tmp_path / "x.safetensors", "lycoris")
        with pytest.raises(ValueError, match=".safetensors"):
            save_lora(network, tmp_path / "x.pt")
    finally:
        network.detach()
    assert not list(tmp_path.iterdir())


def test_mixed_precision_keeps_float32_factors():
    import keras
    from test_training import MICRO, _batch

    from tf_diffusion.pipeline import StableDiffusion

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        micro = StableDiffusion(MICRO)
        images, captions = _batch(2)
        batch = (tf.constant(images), tf.constant(micro.tokenizer(captions)))
        config = TrainingConfig(learning_rate=1e-2, ema_decay=None)
        trainer = LoraTrainer(micro, "unet+text_encoder", config, lora=LoraTrainingConfig(rank=2))
        start = [v.numpy().copy() for v in trainer.trainable_variables]
        logs = [trainer.train_step(batch) for _ in range(2)]
        assert all(np.isfinite(h["loss"]) for h in logs)
        assert all(v.dtype == "float32" for v in trainer.trainable_variables)
        moved = [
            not np.array_equal(a, v.numpy()) for a, v in zip(start, trainer.trainable_variables, strict=True)
        ]
        assert all(moved)  # down and up of every layer, UNet and text encoder
        entry = trainer.network.layers[0]
        assert entry.delta(tf.ones((1, entry.down.shape[0]), "bfloat16")).dtype == "bfloat16"
        trainer.network.detach()
    finally:
        keras.config.set_dtype_policy(previous)


def test_dreambooth_prior_preservation_adds_the_class_loss():
    import keras
    from test_training import MICRO, _batch, _uint8

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import dataset_from_arrays, dataset_with_prior

    keras.utils.set_random_seed(0)
    micro = StableDiffusion(MICRO)
    images, _ = _batch(4)
    instance = dataset_from_arrays(_uint8(images[:2]), ["a zqx dog"] * 2, micro.tokenizer, 2)
    prior = dataset_from_arrays(_uint8(images[2:]), ["a dog"] * 2, micro.tokenizer, 1)
    config = TrainingConfig(learning_rate=1e-3, ema_decay=None, prior_loss_weight=0.5, caption_dropout=0.0)
    trainer = LoraTrainer(micro, "unet", config, lora=LoraTrainingConfig(rank=2))
    try:
        history = trainer.fit(dataset_with_prior(instance, prior), steps=2, progress=False)
        for logs in history:
            assert logs["loss"] == pytest.approx(logs["instance"] + 0.5 * logs["prior"], rel=1e-5)
            assert logs["prior"] > 0 and logs["instance"] > 0
        batch = next(iter(instance))
        with pytest.raises(ValueError, match="class_images"):
            trainer.compute_loss(batch)
    finally:
        trainer.network.detach()
    with pytest.raises(ValueError, match="prior_loss_weight"):
        TrainingConfig(prior_loss_weight=-1.0)


MIRRORED_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from test_training import MICRO, _batch, _uint8
from tf_diffusion.pipeline import StableDiffusion
from tf_diffusion.training import LoraTrainer, LoraTrainingConfig, TrainingConfig, dataset_from_arrays

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    sd = StableDiffusion(MICRO)
config = TrainingConfig(ema_decay=None, learning_rate=1e-2, text_encoder_learning_rate=1e-3)
trainer = LoraTrainer(sd, "unet+text_encoder", config, strategy=strategy, lora=LoraTrainingConfig(rank=2))
images, captions = _batch()
data = dataset_from_arrays(_uint8(images), captions, sd.tokenizer, batch_size=4)
history = trainer.fit(data, 2, progress=False)
for v in trainer.trainable_variables:
    copies = [c.numpy() for c in v.value.values]
    assert len(copies) == 2 and np.array_equal(copies[0], copies[1])
assert trainer.network.layers[0].up.numpy().any()
assert all(np.isfinite(h["loss"]) for h in history) and trainer.step == 2
print("OK", history[-1]["loss"])
"""


@pytest.mark.slow  # about a minute: a process with two logical CPUs trains a LoRA under MirroredStrategy
def test_lora_under_mirrored_strategy_on_two_logical_cpus():
    import os
    import subprocess
    import sys

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, tests_dir],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=os.path.dirname(tests_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_base_model_versions_follow_sd_scripts(sd):
    from types import SimpleNamespace

    def config(width, prediction, sdxl=False):
        return SimpleNamespace(
            is_sdxl=sdxl,
            text_encoder=SimpleNamespace(hidden_size=width),
            scheduler=SimpleNamespace(prediction_type=prediction),
        )

    assert base_model_version(sd.config) == "sd_v1"
    assert base_model_version(config(768, "v_prediction")) == "sd_v1_v"
    assert base_model_version(config(1024, "epsilon")) == "sd_v2"
    assert base_model_version(config(1024, "v_prediction")) == "sd_v2_v"
    assert base_model_version(config(768, "epsilon", sdxl=True)) == "sdxl_base_v1-0"


def test_attach_and_detach_drop_compiled_loops(sd):
    # A compiled loop holds the calls it traced; generate() must retrace to see the wrapper (and to lose
    # it). A real generate() before and after takes minutes of compiling here, so this checks the cache.
    sd.executor.compiled("probe", lambda: "traced before attaching")
    network = LoraNetwork.attach(sd, 2)
    assert sd.executor.compiled("probe", lambda: "retraced") == "retraced"
    network.detach()
    assert sd.executor.compiled("probe", lambda: "again") == "again"
