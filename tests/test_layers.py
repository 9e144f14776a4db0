"""Building blocks with more than one way to compute them: Winograd convolution against a direct one.

The other ways live in ``tf_diffusion.execution`` (kernels, and the processors that pick them).
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_diffusion import execution, layers, vae
from tf_diffusion.execution import cpu, kernels
from tf_diffusion.execution.options import _scope


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
        tf.function(lambda x, w: kernels.winograd_conv3x3(x, w, m), jit_compile=True)
        if xla
        else (lambda x, w: kernels.winograd_conv3x3(tf.constant(x), tf.constant(w), m))
    )
    got = np.asarray(fn(x, weight))
    want = reference_conv(x, weight)
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= BOUND[m]


def rule(op, key, names):
    """A fixed choice for Conv2d: F(4) from 16 input channels and 4 tiles of 4x4, else F(2) from 8
    channels and 16 tiles of 2x2, where the sizes allow (``names``)."""
    assert op == "conv3x3", op
    b, h, w, cin, _, _ = key
    if "f4" in names and cin >= 16 and b * (h // 4) * (w // 4) >= 4:
        return "f4"
    if "f2" in names and cin >= 8 and b * (h // 2) * (w // 2) >= 16:
        return "f2"
    return "direct"


XLA_WINOGRAD = execution.ExecutionOptions(compile="xla", winograd=True, choose=rule)


def test_conv2d_takes_winograd_only_where_it_applies(monkeypatch):
    calls = []
    original = cpu.winograd_conv3x3
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda x, w, m: calls.append(m) or original(x, w, m))
    rng = np.random.default_rng(0)

    def run(x, cin, stride=1, dtype=None):
        conv = execution.apply(layers.Conv2d(cin, 8, 3, stride=stride, padding=1, dtype=dtype))
        x = tf.constant(x[..., :cin])
        got = np.asarray(tf.cast(execution.compile(conv, XLA_WINOGRAD)(x), tf.float32))
        if stride == 1 and dtype is None:
            want = reference_conv(np.asarray(x), np.asarray(conv.weight)) + np.asarray(conv.bias)
            assert np.abs(got - want).max() / np.abs(want).max() <= BOUND[calls[-1] if calls else 2]
        return calls.pop() if calls else 0

    x = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    assert run(x, 16) == 4  # 4 tiles of 4x4
    assert run(x, 12) == 2  # too few channels for F(4), enough for F(2) (16 tiles of 2x2)
    assert run(np.concatenate([x[:, :6, :6]] * 2), 16) == 2  # 6 is no multiple of 4 (18 tiles of 2x2)
    assert run(x[:, :4, :4], 16) == 0  # 1 tile of 4x4, 4 of 2x2
    assert run(np.concatenate([x[:, :4, :4]] * 4), 16) == 4  # the batch's tiles count
    assert run(x, 4) == 0  # too few channels for either
    assert run(x[:, :7, :7], 16) == 0  # odd
    assert run(x, 16, stride=2) == 0
    assert run(x, 16, dtype="bfloat16") == 0  # float32 only
    conv = execution.apply(layers.Conv2d(16, 8, 3, padding=1))
    np.asarray(conv(tf.constant(x)))  # outside any options: the direct convolution
    np.asarray(execution.compile(conv, XLA_WINOGRAD.replace(winograd=False))(tf.constant(x)))
    with execution.options(XLA_WINOGRAD):
        np.asarray(conv(tf.constant(x)))  # options alone do not make an eager call XLA
    assert calls == []


@pytest.mark.parametrize(
    "shape, names",
    [  # (batch, side, input channels): the SD 1.5 UNet at 512 (batch 2) and its VAE decoder
        ((2, 64, 320), ("direct", "f2", "f4")),
        ((2, 16, 1280), ("direct", "f2", "f4")),
        ((2, 10, 64), ("direct", "f2")),  # 10 is no multiple of 4
        ((2, 5, 64), ("direct",)),
        ((1, 512, 128), ("direct",)),  # the tiles would exceed WINOGRAD_MAX_OPERAND_BYTES
    ],
)
def test_winograd_candidates_follow_the_sizes(shape, names):
    # The autotuner only ever sees candidates that compute this convolution.
    seen = []

    def record(op, key, offered):
        seen.append((op, key, offered))
        return offered[0]

    b, side, cin = shape
    conv = layers.Conv2d(cin, 8, 3, padding=1)
    opts = execution.ExecutionOptions(compile="xla", winograd=True, choose=record)
    with execution.options(opts), _scope(in_xla=True):  # as inside an XLA function
        assert cpu.conv_tile(conv, (b, side, side, cin)) == 0
    assert seen == [("conv3x3", (b, side, side, cin, 8, "float32"), names)]
    assert cpu.conv_tile(conv, (b, side, side, cin)) == 0  # outside the context: never asked
    assert len(seen) == 1


@pytest.mark.parametrize("m", [0, 2, 4])
def test_conv3x3_as_operand_filter_and_result_matches_direct_convolution(m):
    # The three parts a ResBlock runs around a graph-mode matmul: im2col (m = 0) or Winograd tiles.
    rng = np.random.default_rng(m)
    x = rng.standard_normal((2, 8, 12, 6)).astype(np.float32)
    weight = (rng.standard_normal((3, 3, 6, 5)) / np.sqrt(54)).astype(np.float32)
    a = kernels.conv3x3_operand(tf.constant(x), m)
    got = np.asarray(
        kernels.conv3x3_result(tf.matmul(a, kernels.conv3x3_filter(tf.constant(weight), m)), m, (8, 12))
    )
    want = reference_conv(x, weight)
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= BOUND.get(m, 1e-6)


def test_resblock_plan_falls_back_to_one_island():
    # Graph-mode matmuls are only offered under islands, in float32, at static sizes; there the
    # ResBlock's candidates are one island, graph matmuls and (if allowed) prepared filters.
    from tf_diffusion.config import UNetConfig
    from tf_diffusion.unet import ResBlock

    seen = []

    def record(op, key, names):
        seen.append((op, names))
        return tile if op == "conv3x3" else "graph"

    tile = "f4"

    cfg = UNetConfig(norm_groups=4)
    block = ResBlock(8, 8, 16, cfg)
    opts = execution.ExecutionOptions(
        compile="islands", winograd=True, graph_matmuls=True, prepared_filters=True, choose=record
    )
    assert cpu.resblock_plan(block, (2, 8, 8, 8)) == ("island", None)  # outside the options
    with execution.options(opts):
        assert cpu.resblock_plan(block, (2, 8, 8, 8)) == ("graph", 4)
        assert cpu.resblock_plan(block, (None, 8, 8, 8)) == ("island", None)
        assert ("resblock", ("island", "graph", "prepared")) in seen
        tile = "direct"  # im2col: the filter is the weight reshaped, nothing to prepare
        assert cpu.resblock_plan(block, (2, 8, 8, 8)) == ("graph", 0)
        assert seen[-1] == ("resblock", ("island", "graph"))
    with execution.options(opts.replace(graph_matmuls=False)):
        assert cpu.resblock_plan(block, (2, 8, 8, 8)) == ("island", None)
    with layers.dtype_policy_scope("bfloat16"):
        half = ResBlock(8, 8, 16, cfg)
    with execution.options(opts):
        assert cpu.resblock_plan(half, (2, 8, 8, 8)) == ("island", None)


def nearest_then_conv(x, weight, bias):
    """float64 reference: nearest-neighbour 2x upsampling, then a 3x3 'same' convolution."""
    up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
    return reference_conv(up, np.asarray(weight)) + np.asarray(bias, np.float64)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 4), (1, 8, 8, 32, 16), (1, 1, 1, 3, 2)])
@pytest.mark.parametrize("xla", [False, True])
def test_subpixel_conv3x3_matches_upsampling_then_convolving(shape, xla):
    b, h, w, cin, cout = shape  # odd sizes too: the phases need no tiling
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
    weight = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    fn = tf.function(kernels.subpixel_conv3x3, jit_compile=True) if xla else kernels.subpixel_conv3x3
    got = np.asarray(fn(tf.constant(x), tf.constant(weight)))
    want = nearest_then_conv(x, weight, 0.0)
    assert got.shape == want.shape == (b, 2 * h, 2 * w, cout)
    # The summed taps round once more than a direct float32 convolution (about 4e-7 here).
    assert np.abs(got - want).max() / np.abs(want).max() <= 2e-6


def test_upsample_takes_the_subpixel_form_only_inside_the_options(monkeypatch):
    calls = []
    original = cpu.subpixel_conv3x3
    monkeypatch.setattr(cpu, "subpixel_conv3x3", lambda x, w: calls.append(x.shape) or original(x, w))
    rng = np.random.default_rng(1)
    up = execution.apply(vae.Upsample(6))
    x = tf.constant(rng.standard_normal((2, 6, 4, 6)).astype(np.float32))
    want = nearest_then_conv(x, up.conv.weight, up.conv.bias)
    plain = np.asarray(up(x))
    assert calls == []
    opts = execution.ExecutionOptions(
        compile="xla",
        winograd=True,
        choose=lambda op, key, names: "subpixel" if "subpixel" in names else names[0],
    )
    fast = np.asarray(execution.compile(up, opts)(x))
    for policy in ("bfloat16", "mixed_bfloat16"):  # float32 only, in the layer's compute dtype
        with layers.dtype_policy_scope(policy):
            low = execution.apply(vae.Upsample(6))
        execution.compile(low, opts)(x)
    assert calls == [x.shape]
    for got in (plain, fast):
        assert np.abs(got - want).max() / np.abs(want).max() <= 2e-6


def reference_attention(q, k, v):
    """float64 softmax(q k^T) v over (N, T, d) arrays (q already scaled)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ k.transpose(0, 2, 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("budget", [None, 7 * 5, 3 * 13 * 5, 2**20])
def test_head_attention_blocks_match_one_softmax(budget):
    # Budgets that cut rows (7 of 13, a remainder of 6), groups of heads (3 of 4, a remainder of
    # 1) and nothing at all; None stands for dynamic sizes (one block).
    rng = np.random.default_rng(2)
    n, tq, tk, d = 4, 13, 5, 3
    q, k, v = (rng.standard_normal((n, t, d)).astype(np.float32) * 2 for t in (tq, tk, tk))
    want = reference_attention(q, k, v)
    if budget is None:
        spec = tf.TensorSpec((None, None, d), tf.float32)
        kt_spec = tf.TensorSpec((None, d, None), tf.float32)
        fn = tf.function(kernels.head_attention, input_signature=[spec, kt_spec, spec])
    else:
        fn = tf.function(lambda q, k_t, v: kernels.head_attention(q, k_t, v, budget))
    got = np.asarray(fn(q, np.ascontiguousarray(k.transpose(0, 2, 1)), v))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    if budget == 7 * 5:  # blocks of 7 rows of one head each
        ops = fn.get_concrete_function(q, k.transpose(0, 2, 1), v).graph.get_operations()
        assert sum(op.type == "Softmax" for op in ops) == n * 2


def test_split_and_merge_heads_invert_each_other():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    heads = np.asarray(kernels.split_heads(tf.constant(x), 3))
    assert heads.shape == (6, 5, 4)
    np.testing.assert_array_equal(heads[1 * 3 + 2], x[1, :, 8:12])  # batch 1, head 2
    np.testing.assert_array_equal(np.asarray(kernels.merge_heads(tf.constant(heads), 3)), x)


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 10, 64), (1, 5, 96)])
def test_group_norm_matches_the_float64_definition(shape, xla):
    # nn.GroupNorm: each group's mean and biased variance over its positions and channels, then a
    # per-channel affine. An offset of 50 over a spread of 3 makes a one-pass E[x^2] - E[x]^2 fail.
    rng = np.random.default_rng(0)
    groups, channels = 8, shape[-1]
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
    norm = layers.GroupNorm(groups, channels, 1e-5)
    norm.weight.assign(rng.standard_normal(channels).astype(np.float32))
    norm.bias.assign(rng.standard_normal(channels).astype(np.float32))
    fn = tf.function(norm, jit_compile=True) if xla else norm
    out = np.asarray(fn(tf.constant(x)))
    grouped = x.astype(np.float64).reshape(shape[0], -1, groups, channels // groups)
    mean, var = grouped.mean(axis=(1, 3), keepdims=True), grouped.var(axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(shape)
    expected = normed * norm.weight.numpy() + norm.bias.numpy()
    assert np.abs(out - expected).max() <= 2e-5
