"""Building blocks with more than one way to compute them: Winograd convolution against a direct one."""

import numpy as np
import pytest
import tensorflow as tf

from tf_diffusion import layers


def reference_conv(x, w):
    """float64 direct convolution (TensorFlow's conv2d), 'same' zero padding."""
    return tf.nn.conv2d(x.astype(np.float64), w.astype(np.float64), 1, "SAME").numpy()


# Relative to the output's largest magnitude; a float32 direct convolution is about 4e-7 here.
BOUND = {2: 2e-6, 4: 3e-5}


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 8, 12, 5, 7), (1, 32, 32, 64, 24), (1, 4, 4, 3, 2)])
@pytest.mark.parametrize("xla", [False, True])
def test_winograd_conv3x3_matches_direct_convolution(m, shape, xla):
    b, h, w, cin, cout = shape  # every size a multiple of both tiles
    rng = np.random.default_rng(sum(shape) + m)
    x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
    weight = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    fn = (
        tf.function(lambda x, w: layers.winograd_conv3x3(x, w, m), jit_compile=True)
        if xla
        else (lambda x, w: layers.winograd_conv3x3(tf.constant(x), tf.constant(w), m))
    )
    got = np.asarray(fn(x, weight))
    want = reference_conv(x, weight)
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= BOUND[m]


def test_conv2d_takes_winograd_only_where_it_applies(monkeypatch):
    calls = []
    original = layers.winograd_conv3x3
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda x, w, m: calls.append(m) or original(x, w, m))
    rng = np.random.default_rng(0)
    conv = layers.Conv2d(64, 8, 3, padding=1)
    strided = layers.Conv2d(64, 8, 3, stride=2, padding=1)
    x = tf.constant(rng.standard_normal((1, 32, 32, 64)).astype(np.float32))
    small = tf.constant(rng.standard_normal((1, 16, 16, 64)).astype(np.float32))

    def run(layer, x):
        with layers.winograd_convolutions():
            return np.asarray(layer(x))

    want = reference_conv(np.asarray(x), np.asarray(conv.weight)) + np.asarray(conv.bias)
    got = run(conv, x)
    assert calls == [layers.WINOGRAD_TILE]
    assert np.abs(got - want).max() / np.abs(want).max() <= BOUND[layers.WINOGRAD_TILE]
    run(strided, x)  # stride 2
    run(conv, small)  # under WINOGRAD_MIN_PIXELS
    run(layers.Conv2d(8, 8, 3, padding=1), x[..., :8])  # under WINOGRAD_MIN_CHANNELS
    np.asarray(conv(x))  # outside the context
    assert calls == [layers.WINOGRAD_TILE]
