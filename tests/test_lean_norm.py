"""Row-blocked GroupNorm + SiLU (execution.lean): the VAE decode keeps diffusers' numbers.

The decoder's ResnetBlocks and its final norm run in row blocks above ``NORM_BLOCK_ELEMENTS``;
the threshold is lowered here so the tiny fixture VAEs (tests/test_vae.py, written by diffusers)
take that path, in graph mode as ``generate`` runs a reduced-precision decode on a CPU.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_vae import FIXTURES, TOL, loaded_model, max_error
from tf_diffusion import execution, layers
from tf_diffusion.execution import lean


def graph_decode(model, latents):
    fn = execution.compile(model.decode, execution.ExecutionOptions(compile="graph"))
    return keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(latents, "float32")))


@pytest.mark.parametrize("name", FIXTURES)
def test_blocked_decode_matches_diffusers(fixtures_dir, name, monkeypatch):
    model, io = loaded_model(fixtures_dir, name)
    execution.apply(model)
    calls = []
    blocked = lean.group_norm_silu
    monkeypatch.setattr(lean, "group_norm_silu", lambda *a: calls.append(a[2]) or blocked(*a))
    monkeypatch.setattr(lean, "NORM_BLOCK_ELEMENTS", 2 * 8 * 32 * 4)  # a few rows per block
    decoded = graph_decode(model, io["mean"])
    assert calls and min(calls) < 32  # the full-resolution norms ran in several blocks
    assert max_error(decoded, io["decoded"]) <= TOL


def test_blocked_norm_equals_one_block_in_bfloat16(monkeypatch):
    rng = np.random.default_rng(0)
    norm = layers.GroupNorm(4, 16, 1e-6)
    norm.weight.assign(rng.standard_normal(16).astype(np.float32))
    norm.bias.assign(rng.standard_normal(16).astype(np.float32))
    x = tf.constant(rng.standard_normal((2, 13, 6, 16)) * 3 + 1, tf.bfloat16)
    want = tf.cast(tf.nn.silu(norm(x)), tf.bfloat16)
    got = tf.function(lambda t: lean.group_norm_silu(norm, t, 4, "bfloat16"), autograph=False)(x)
    assert got.dtype == tf.bfloat16 and got.shape == x.shape
    err = np.abs(np.asarray(tf.cast(got, tf.float32)) - np.asarray(tf.cast(want, tf.float32)))
    # Statistics differ in float32 summation order only: at most one bfloat16 rounding step apart.
    assert err.max() <= 2**-7 * np.abs(np.asarray(tf.cast(want, tf.float32))).max()
    assert np.mean(err == 0) > 0.99


def test_small_activations_and_unknown_shapes_run_in_one_block():
    assert lean.norm_rows((1, 64, 64, 128)) is None
    assert lean.norm_rows((1, None, 64, 128)) is None
    assert lean.norm_rows((1, 1024, 1024, 256)) == lean.NORM_BLOCK_ELEMENTS // (1024 * 256)
