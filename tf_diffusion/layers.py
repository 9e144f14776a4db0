"""Torch-faithful building blocks shared by the text encoder, UNet and VAE.

Every parametric layer here stores its variables under the PyTorch parameter
names (``weight``, ``bias``), in Keras layout, and declares that layout in
``LAYOUT`` so that one function (``tf_diffusion.weights.state_dict``) can
translate a checkpoint tensor into a variable. Layers are built in
``__init__`` from explicit sizes, as in PyTorch, so a model is complete
(every variable exists) as soon as it is constructed.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
from keras import ops

# How a torch tensor maps onto each variable kind:
#   "plain":  same shape (biases, norms, embeddings)
#   "linear": torch (out, in)        -> keras (in, out)
#   "conv":   torch (out, in, kh, kw) -> keras (kh, kw, in, out)
PLAIN, LINEAR, CONV = "plain", "linear", "conv"


def _uniform(bound: float) -> keras.initializers.Initializer:
    # torch's default init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return keras.initializers.RandomUniform(-bound, bound)


class Linear(keras.layers.Layer):
    """nn.Linear: y = x @ W + b, with W stored as (in, out)."""

    LAYOUT = {"weight": LINEAR, "bias": PLAIN}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = self.add_weight(
            shape=(in_features, out_features), initializer=_uniform(bound), name="weight"
        )
        self.bias = (
            self.add_weight(shape=(out_features,), initializer=_uniform(bound), name="bias") if bias else None
        )
        self.built = True

    def call(self, x):
        y = ops.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class Conv2d(keras.layers.Layer):
    """nn.Conv2d on NHWC tensors with explicit zero padding (top, bottom, left, right)."""

    LAYOUT = {"weight": CONV, "bias": PLAIN}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | tuple[int, int, int, int] = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride = stride
        # Explicit padding: Keras "same" pads asymmetrically for stride 2, torch does not.
        self.padding = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = self.add_weight(
            shape=(kernel_size, kernel_size, in_channels, out_channels),
            initializer=_uniform(bound),
            name="weight",
        )
        self.bias = self.add_weight(shape=(out_channels,), initializer=_uniform(bound), name="bias")
        self.built = True

    def call(self, x):  # (B, H, W, C_in) -> (B, H', W', C_out)
        top, bottom, left, right = self.padding
        k = self.weight.shape[0]
        if self.stride == 1 and k % 2 == 1 and self.padding == ((k - 1) // 2,) * 4:
            # Stride 1 with symmetric (k-1)/2 padding is exactly Keras "same": the conv kernel pads
            # itself, without a padded copy of the activation.
            if k == 1:
                # A 1x1 convolution is a matmul over channels; this avoids a conv kernel launch.
                return ops.matmul(x, ops.reshape(self.weight, self.weight.shape[2:])) + self.bias
            m = winograd_tile(x, self.weight)
            if m:
                return winograd_conv3x3(x, self.weight, m) + self.bias
            return ops.conv(x, self.weight, strides=1, padding="same") + self.bias
        if any(self.padding):
            x = ops.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        y = ops.conv(x, self.weight, strides=self.stride, padding="valid")
        return y + self.bias


def upsample_conv3x3(x, conv: Conv2d):
    """``conv`` (3x3, stride 1, padding 1) of ``x`` upsampled 2x by nearest neighbour.

    Inside ``winograd_convolutions`` (XLA on a CPU), in float32 (``x`` and ``conv``'s compute dtype)
    and at static sizes, computed without the upsampled copy (``subpixel_conv3x3``).
    """
    h, w = x.shape[1], x.shape[2]
    float32 = all(keras.backend.standardize_dtype(t) == "float32" for t in (x.dtype, conv.compute_dtype))
    if _winograd_on and h is not None and w is not None and float32:
        return subpixel_conv3x3(x, conv.weight) + conv.bias
    return conv(ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2))


def subpixel_conv3x3(x, weight):
    """3x3 'same' convolution (no bias) of ``x`` upsampled 2x by nearest neighbour, as four 2x2
    convolutions of ``x``.

    Each output phase (even/odd row, even/odd column) of a 3x3 convolution over a nearest-upsampled
    image sees 2x2 distinct source pixels, so it is a 2x2 convolution of ``x`` whose taps are the
    3x3 taps landing on the same source pixel, summed (Shi et al.'s sub-pixel convolution, read
    backwards): 16 multiply-adds per source pixel in place of 36, and the only new rounding is in
    the summed taps. The SD 1.5 UNet's 16x16 -> 32x32 upsampling at 1280 channels took 75 ms
    against 149 under XLA (benchmarks/results/cpu_blocks.json).

    x: (B, H, W, C_in) with static H, W; weight: (3, 3, C_in, C_out). Returns (B, 2H, 2W, C_out).
    """
    h, w = x.shape[1], x.shape[2]

    def taps(k, axis):  # 3 taps along ``axis`` -> per phase, 2 taps: (k0, k1 + k2), (k0 + k1, k2)
        t = [ops.take(k, i, axis=axis) for i in range(3)]
        return [ops.stack([t[0], t[1] + t[2]], axis=axis), ops.stack([t[0] + t[1], t[2]], axis=axis)]

    xp = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    # Phase 0 reads source offsets (-1, 0), phase 1 reads (0, +1): windows of xp from a or b.
    phases = [
        [
            ops.conv(xp[:, a : a + h + 1, b : b + w + 1], kernel, strides=1, padding="valid")
            for b, kernel in enumerate(taps(rows, 1))
        ]
        for a, rows in enumerate(taps(weight, 0))
    ]
    y = ops.stack([ops.stack(row, axis=3) for row in phases], axis=2)  # (B, H, 2, W, 2, C_out)
    return ops.reshape(y, (-1, 2 * h, 2 * w, weight.shape[3]))


class GroupNorm(keras.layers.Layer):
    """nn.GroupNorm over the last (channel) axis, computed in float32."""

    LAYOUT = {"weight": PLAIN, "bias": PLAIN}

    def __init__(self, num_groups: int, num_channels: int, eps: float, **kwargs):
        # Norms stay float32 under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm needs num_channels divisible by num_groups, got {num_channels} "
                f"channels and {num_groups} groups"
            )
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = self.add_weight(shape=(num_channels,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(num_channels,), initializer="zeros", name="bias")
        self.built = True

    def call(self, x):  # (B, ..., C)
        shape = ops.shape(x)
        g = self.num_groups
        per_group = (g, self.num_channels // g)
        grouped = ops.reshape(x, (shape[0], -1) + per_group)  # (B, N, G, C/G)

        def group_mean(z):
            # Over positions, then over each group's channels (equal counts, so the same mean):
            # XLA on a CPU reduces one axis at a time 25-40% faster than both axes at once
            # (benchmarks/README.md, "Quiet run 7").
            return ops.mean(ops.mean(z, axis=1, keepdims=True), axis=3, keepdims=True)

        centred = grouped - group_mean(grouped)
        scale = ops.rsqrt(group_mean(ops.square(centred)) + self.eps) * ops.reshape(self.weight, per_group)
        return ops.reshape(centred * scale + ops.reshape(self.bias, per_group), shape)


class LayerNorm(keras.layers.Layer):
    """nn.LayerNorm over the last axis, computed in float32."""

    LAYOUT = {"weight": PLAIN, "bias": PLAIN}

    def __init__(self, dim: int, eps: float, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.dim, self.eps = dim, eps
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(dim,), initializer="zeros", name="bias")
        self.built = True

    def call(self, x):
        mean = ops.mean(x, axis=-1, keepdims=True)
        var = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * ops.rsqrt(var + self.eps) * self.weight + self.bias


class Embedding(keras.layers.Layer):
    """nn.Embedding: a (num, dim) table indexed by integer ids."""

    LAYOUT = {"weight": PLAIN}

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = self.add_weight(
            shape=(num_embeddings, embedding_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="weight",
        )
        self.built = True

    def call(self, ids):
        return ops.take(self.weight, ids, axis=0)


class GEGLU(keras.layers.Layer):
    """GEGLU feed-forward input: proj to 2*dim_out, value * gelu(gate) with exact erf gelu."""

    def __init__(self, dim_in: int, dim_out: int, **kwargs):
        super().__init__(**kwargs)
        self.proj = Linear(dim_in, dim_out * 2)

    def call(self, x):
        value, gate = ops.split(self.proj(x), 2, axis=-1)
        return value * ops.gelu(gate, approximate=False)


class SiLU(keras.layers.Layer):
    """Parameter-free placeholder for nn.SiLU, keeping Sequential indices aligned."""

    def call(self, x):
        return ops.silu(x)


class Identity(keras.layers.Layer):
    """Parameter-free placeholder for nn.Dropout / nn.Identity at inference."""

    def call(self, x):
        return x


def run_sequential(layers, x):
    """Apply a list of layers in order, as nn.Sequential does."""
    for layer in layers:
        x = layer(x)
    return x


def attention(q, k, v, num_heads: int, mask=None):
    """Scaled dot-product attention on (B, T, C) projections, softmax in float32.

    Args:
        q: (B, Tq, C) queries; k, v: (B, Tk, C).
        num_heads: heads to split C into; head_dim = C // num_heads.
        mask: optional additive mask broadcastable to (B, heads, Tq, Tk).

    Returns:
        (B, Tq, C) attention output in q's dtype.
    """
    b, tq, c = ops.shape(q)[0], ops.shape(q)[1], q.shape[-1]
    tk = ops.shape(k)[1]
    d = c // num_heads
    fused = _fused_attention(q, k, v, num_heads, mask)
    if fused is not None:
        return fused

    def heads(x, t):  # (B, T, C) -> (B, h, T, d)
        return ops.transpose(ops.reshape(x, (b, t, num_heads, d)), (0, 2, 1, 3))

    q, k, v = heads(q, tq), heads(k, tk), heads(v, tk)
    k_t = ops.transpose(k, (0, 1, 3, 2))  # (B, h, d, Tk)

    def rows(q_rows, mask_rows):  # (B, h, n, d) -> (B, h, n, d)
        scores = ops.matmul(q_rows, k_t) * (1.0 / math.sqrt(d))
        scores = ops.cast(scores, "float32")
        if mask_rows is not None:
            # Broadcast explicitly: TensorFlow's oneDNN rewrite fuses matmul * scale + mask into one
            # kernel, and with a (1, 1, Tq, Tk) mask that kernel ran 250x slower on this CPU in
            # float32 (CLIP's causal mask: 1.5 s per prompt, benchmarks/README.md).
            scores = scores + ops.broadcast_to(mask_rows, ops.shape(scores))
        return ops.matmul(ops.cast(ops.softmax(scores, axis=-1), v.dtype), v)

    chunk = _query_chunk(q.shape[2], k.shape[2], num_heads)
    if chunk is None:
        out = rows(q, mask)  # (B, h, Tq, d)
    else:
        # Row blocks of the score matrix, so the (B, h, Tq, Tk) float32 scores never exist at
        # once: the SD 1.5 UNet at 512 in bfloat16 peaks 1.3 GB lower on CPU
        # (benchmarks/README.md). Every row is computed exactly as in the one-block form.
        per_row_mask = mask is not None and mask.shape[-2] not in (None, 1)
        out = ops.concatenate(
            [
                rows(q[:, :, i : i + chunk], mask[..., i : i + chunk, :] if per_row_mask else mask)
                for i in range(0, q.shape[2], chunk)
            ],
            axis=2,
        )
    return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, tq, c))


# Score elements per batch element in one row block of ``attention`` (heads x rows x keys);
# 2**23 float32 scores are 32 MB. None computes every score at once.
ATTENTION_BLOCK_ELEMENTS: int | None = 2**23


def _query_chunk(tq, tk, num_heads: int) -> int | None:
    """Query rows per block when the scores exceed ``ATTENTION_BLOCK_ELEMENTS``, else None."""
    budget = ATTENTION_BLOCK_ELEMENTS
    if budget is None or tq is None or tk is None or num_heads * tq * tk <= budget:
        return None  # small, or sizes only known at run time: one block
    return max(1, budget // (num_heads * tk))


# Score elements per block of ``head_attention`` (heads x rows x keys): 2**20 float32 scores are
# 4 MB, inside this CPU's 32 MB L3 cache with the block's matmul operands.
HEAD_ATTENTION_BLOCK_ELEMENTS = 2**20


def split_heads(x, num_heads: int):
    """(B, T, C) -> (B * num_heads, T, C // num_heads), batch-major."""
    b, t, c = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
    x = ops.reshape(x, (b, t, num_heads, c // num_heads))
    return ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (b * num_heads, t, c // num_heads))


def merge_heads(x, num_heads: int):
    """(B * num_heads, T, d) -> (B, T, num_heads * d); undoes ``split_heads``."""
    t, d = ops.shape(x)[1], x.shape[-1]
    x = ops.reshape(x, (-1, num_heads, t, d))
    return ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (-1, t, num_heads * d))


def head_attention(q, k_t, v):
    """Softmax attention, one cache-sized block of heads and query rows at a time.

    Args:
        q: (N, Tq, d) queries of N = batch x heads, already scaled by 1 / sqrt(d).
        k_t: (N, d, Tk) keys, transposed; v: (N, Tk, d) values.

    Returns:
        (N, Tq, d). The XLA islands' self-attention core (TensorFlow graph mode on a CPU, float32):
        ``attention``'s (B, heads, rows, Tk) blocks of the SD 1.5 UNet at 512 are 64 MB and leave
        the cache between the score matmul, the softmax and the value matmul; blocks of
        ``HEAD_ATTENTION_BLOCK_ELEMENTS`` stay in it (benchmarks/README.md, "Quiet run 5").
    """
    n, tq, tk = q.shape[0], q.shape[1], k_t.shape[2]
    if n is None or tq is None or tk is None:
        return ops.matmul(ops.softmax(ops.matmul(q, k_t), axis=-1), v)
    rows = max(1, min(tq, HEAD_ATTENTION_BLOCK_ELEMENTS // tk))
    group = max(1, min(n, HEAD_ATTENTION_BLOCK_ELEMENTS // (rows * tk)))
    # One split per operand rather than a slice per block keeps the graph small (it is traced
    # once per layer and block).
    qs, ks, vs = (split_blocks(z, group, 0) for z in (q, k_t, v))
    out = []
    for q_heads, k_heads, v_heads in zip(qs, ks, vs, strict=True):
        parts = [
            ops.matmul(ops.softmax(ops.matmul(q_rows, k_heads), axis=-1), v_heads)
            for q_rows in split_blocks(q_heads, rows, 1)
        ]
        out.append(parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1))
    return out[0] if len(out) == 1 else ops.concatenate(out, axis=0)


def split_blocks(x, size: int, axis: int) -> list:
    """``x`` cut along ``axis`` (static length) into blocks of ``size``, the last one shorter."""
    length = x.shape[axis]
    if length <= size:
        return [x]
    return ops.split(x, list(range(size, length, size)), axis=axis)


# Fused attention kernel for JAX on a GPU: "auto" uses jax.nn.dot_product_attention with cuDNN's
# flash attention where it applies (float16/bfloat16, no mask, head_dim a multiple of 8 up to 128),
# "xla" uses jax.nn.dot_product_attention's XLA form there, "off" always the explicit form above.
# Other backends and devices always use the explicit form. benchmarks/gpu/bench_gpu.py measures each.
FUSED_ATTENTION = "auto"
_FUSED_CHOICES = ("auto", "xla", "off")


def _fused_attention(q, k, v, num_heads: int, mask):
    """(B, Tq, C) output from a fused JAX kernel, or None where the explicit form must run."""
    if FUSED_ATTENTION not in _FUSED_CHOICES:
        raise ValueError(f"layers.FUSED_ATTENTION={FUSED_ATTENTION!r} must be one of {_FUSED_CHOICES}")
    if FUSED_ATTENTION == "off" or mask is not None or keras.backend.backend() != "jax":
        return None
    import jax

    if jax.default_backend() != "gpu":
        return None
    dtype = keras.backend.standardize_dtype(q.dtype)
    d = q.shape[-1] // num_heads
    if dtype not in ("float16", "bfloat16") or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    tq, tk = q.shape[1], k.shape[1]
    if tq is None or tk is None:
        return None
    q4 = ops.reshape(q, (-1, tq, num_heads, d))  # (B, T, heads, d): no transposes needed
    k4 = ops.reshape(k, (-1, tk, num_heads, d))
    v4 = ops.reshape(v, (-1, tk, num_heads, d))
    cudnn = FUSED_ATTENTION == "auto" and d % 8 == 0 and d <= 128
    out = jax.nn.dot_product_attention(q4, k4, v4, implementation="cudnn" if cudnn else "xla")
    return ops.reshape(out, (-1, tq, num_heads * d))


@contextlib.contextmanager
def dtype_policy_scope(dtype):
    """Build layers under ``dtype`` (a Keras dtype policy or its name); None keeps the global one.

    Keras does not pass a model's ``dtype`` on to the layers it creates, so a
    component given ``dtype="mixed_bfloat16"`` builds its sublayers in this scope.
    Norm layers pin float32 themselves and are unaffected.
    """
    if dtype is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# ------------------------------------------------------------------ XLA islands
#
# TensorFlow on a CPU, float32, SD 1.5 UNet step at 512 (benchmarks/README.md): XLA runs the
# convolutions and the elementwise work around them faster than graph mode (oneDNN kernels, one
# pass per op), but the big self-attention's (B, heads, 4096, 4096) scores slower (its matmuls
# and softmax are oneDNN's best work). Islands get both: the model is traced in graph mode and
# each block's dense work is its own XLA cluster, with the attention scores in between.
_islands_on = False


@contextlib.contextmanager
def xla_islands(enabled: bool = True):
    """While tracing a TensorFlow graph-mode function, compile each block's dense work with XLA.

    Only the UNet's blocks use it (``island``); outside this context they trace as usual.
    """
    global _islands_on
    previous, _islands_on = _islands_on, bool(enabled)
    try:
        yield
    finally:
        _islands_on = previous


def islands_active() -> bool:
    """Whether ``island`` compiles blocks now (inside ``xla_islands``, on TensorFlow)."""
    return _islands_on and keras.backend.backend() == "tensorflow"


def island(owner, name: str, fn):
    """``fn`` as its own XLA-compiled function (one per ``owner`` and ``name``) inside
    ``xla_islands``, else ``fn`` itself.

    ``fn`` must take every tensor it uses as an argument (it is traced once per input signature
    and reused); closing over ``owner``'s layers is fine.
    """
    if not islands_active():
        return fn
    import tensorflow as tf

    # Kept on the owner (outside Keras' attribute tracking), so the functions go with the model.
    per_owner = owner.__dict__.get("_xla_islands")
    if per_owner is None:
        per_owner = {}
        object.__setattr__(owner, "_xla_islands", per_owner)
    if name not in per_owner:

        def compiled(*args):
            with winograd_convolutions():  # an island is XLA on a CPU, where Winograd pays
                return fn(*args)

        per_owner[name] = tf.function(compiled, jit_compile=True, autograph=False)
    return per_owner[name]


# ------------------------------------------------------- Winograd 3x3 convolution
#
# Traced inside ``winograd_convolutions`` (XLA on a CPU: islands, and the pipeline's XLA loop and
# decode there), a float32 3x3 stride-1 convolution runs as Winograd's minimal filtering F(m x m,
# 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): (m+2)^2 matmuls
# over overlapping (m+2)x(m+2) input tiles in place of 9 m^2 multiply-adds per m x m output tile
# (F(2x2): 16 for 36; F(4x4): 36 for 144). XLA's direct convolution already runs near this CPU's
# float32 peak (410-460 GFLOP/s of 484), so only fewer multiplications make it faster, and only
# where they outweigh the transforms' memory traffic: the filter transform's (m+2)^2 x C_in x C_out
# floats, which dominate with few tiles, and the input and output tiles'.
#
# WINOGRAD_RULES: each eligible convolution takes the first (m, least input channels, least output
# tiles of m x m, batch included) rule it meets; none met: the direct convolution. From single
# convolutions under XLA (benchmarks/results/cpu_blocks.json, batch 2 = one guided UNet call):
# F(4) 18 ms against F(2) 29 and direct 36 at 64x64x320; 20 / 28 / 34 at 32x32x640; 5.6 / 7.5 / 8.9
# at 32x32x320; 27 against direct 36 at 16x16x1280 (F(2) 55: its 128 tiles cannot pay for its
# transformed filters); at 16x16x640 all three are within 20% (F(4) slowest) and at 8x8x1280 direct
# and F(2) within 4%, so both stay direct. With 128 channels (512x512x128, the VAE's last level)
# F(4) alone took 174 ms against 215, but it stays direct: untried in the decode, whose peak memory
# its tiles would raise, and the decoder's 128 -> 3 output convolution would make a 3-wide matmul.
# Rounding (relative to the output's scale; tests/test_layers.py): direct 4e-7, F(2) 1e-6, F(4)
# 1.5e-5 (its transforms' larger coefficients). An empty tuple turns Winograd off;
# ((2, 256, 256),) was the rule before F(4).
WINOGRAD_RULES = ((4, 1024, 32), (4, 256, 128), (2, 256, 256))
_WINOGRAD = {
    # m: (B^T input transform, G filter transform, A^T output transform)
    2: (
        ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1)),
    ),
    4: (
        (
            (4, 0, -5, 0, 1, 0),
            (0, -4, -4, 1, 1, 0),
            (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0),
            (0, 2, -1, -2, 1, 0),
            (0, 4, 0, -5, 0, 1),
        ),
        (
            (1 / 4, 0, 0),
            (-1 / 6, -1 / 6, -1 / 6),
            (-1 / 6, 1 / 6, -1 / 6),
            (1 / 24, 1 / 12, 1 / 6),
            (1 / 24, -1 / 12, 1 / 6),
            (0, 0, 1),
        ),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    ),
}


_winograd_on = False


@contextlib.contextmanager
def winograd_convolutions(enabled: bool = True):
    """While tracing: eligible 3x3 convolutions use Winograd and 2x upsamplings feeding a 3x3
    convolution the sub-pixel form (``upsample_conv3x3``); meant for XLA on a CPU."""
    global _winograd_on
    previous, _winograd_on = _winograd_on, bool(enabled)
    try:
        yield
    finally:
        _winograd_on = previous


def winograd_tile(x, weight) -> int:
    """The Winograd output tile for a stride-1 'same' convolution of ``x`` (0: direct convolution):
    the first of ``WINOGRAD_RULES`` that ``x`` meets, in float32 inside ``winograd_convolutions``."""
    if not _winograd_on or weight.shape[0] != 3:
        return 0
    return _winograd_rule(x.shape, x.dtype)


def _winograd_rule(shape, dtype) -> int:
    b, h, w, cin = shape
    if h is None or w is None or keras.backend.standardize_dtype(dtype) != "float32":
        return 0
    for m, min_channels, min_tiles in WINOGRAD_RULES:
        if h % m == 0 and w % m == 0 and cin >= min_channels and (b or 1) * (h // m) * (w // m) >= min_tiles:
            return m
    return 0


def winograd_conv3x3(x, weight, m: int):
    """3x3 stride-1 convolution with zero padding 1 by Winograd F(m x m, 3 x 3).

    x: (B, H, W, C_in) with H and W multiples of m; weight: (3, 3, C_in, C_out).
    Returns (B, H, W, C_out).

    Each transform is one matmul with a Kronecker product of the 1-D transform with itself, over
    the (m+2)^2 positions of every tile: a few large ops instead of one op per tile element, so
    XLA compiles an F(4) convolution in a fifth of the time (0.2 s against 1.3) and runs it as
    fast; F(2) runs up to 17% slower than in that older form, but ``WINOGRAD_RULES`` give it
    only what the F(4) rules leave.
    """
    products = ops.matmul(conv3x3_operand(x, m), conv3x3_filter(weight, m))
    return conv3x3_result(products, m, x.shape[1:3])


# A 3x3 convolution as one (batched) matmul between two elementwise parts: ``conv3x3_operand``
# (Winograd's transformed input tiles for m = 2 or 4, im2col patches for m = 0), a matmul with
# ``conv3x3_filter``, then ``conv3x3_result`` (Winograd's output transform, or a reshape). Inside
# ``xla_islands`` a ResBlock runs its two convolutions' matmuls in graph mode, on oneDNN, between
# XLA islands, where ``GRAPH_MATMUL_RULES`` say that pays: oneDNN's batched matmul took 10.7 ms
# against XLA's 14.8 at (36, 128, 640) x (36, 640, 640), F(4) at 32x32x640 with batch 2, and the
# ResBlock 34 ms against 40; at 8x8x1280 (direct, 128 positions) 19 against 25; no gain at 64x64,
# and a loss at 16x16, where the filter transform dominates (benchmarks/README.md, "Quiet run 7").
# Each rule: (m, least, most output tiles of m x m over the batch; for m = 0, output positions).
GRAPH_MATMUL_RULES = ((4, 64, 256), (0, 1, 128))


def graph_matmul_tile(shape, weight, dtype):
    """m for a 3x3 stride-1 'same' convolution of an input of ``shape`` by ``weight`` whose
    matmul may run in graph mode between islands (``GRAPH_MATMUL_RULES``), else None."""
    return _matmul_rule(shape, weight, dtype, GRAPH_MATMUL_RULES)


def _matmul_rule(shape, weight, dtype, rules):
    b, h, w = shape[:3]
    if b is None or h is None or w is None or tuple(weight.shape[:2]) != (3, 3):
        return None
    m = _winograd_rule(shape, dtype)
    for rule_m, least, most in rules:
        tiles = b * (h // m) * (w // m) if m else b * h * w
        if rule_m == m and least <= tiles <= most:
            return m
    return None


# Filters computed once per generate() call instead of in every call, where the filter transform
# outweighs the rest: F(4) with at most 64 tiles over the batch (the SD 1.5 UNet's 16x16 level at
# 512, batch 2: 17 ms against 27 for a 1280-channel convolution, 34 against 54 with 2560 inputs).
# They cost memory while they are held: 36/9 of those convolutions' weights (2.48 GB in float32 for
# the SD 1.5 UNet at 512, benchmarks/README.md, "Quiet run 7"). Each rule as in ``GRAPH_MATMUL_RULES``; () turns this off.
PREPARED_FILTER_RULES = ((4, 1, 64),)
_prepared = None


def prepared_filter_tile(shape, weight, dtype):
    """m for which a 3x3 convolution of an input of ``shape`` takes a prepared filter, else None."""
    return _matmul_rule(shape, weight, dtype, PREPARED_FILTER_RULES)


def filter_key(conv) -> str:
    """The key of ``conv``'s prepared filter."""
    return f"conv_{id(conv)}"


@contextlib.contextmanager
def prepared_filters(filters: dict | None):
    """While tracing: ResBlocks inside ``xla_islands`` take their convolutions' transformed
    filters from ``filters`` (``UNetModel.prepare_filters``; the traced function's arguments)."""
    global _prepared
    previous, _prepared = _prepared, filters
    try:
        yield
    finally:
        _prepared = previous


def prepared_filter(conv):
    """``conv``'s prepared filter inside ``prepared_filters``, else None."""
    return None if not _prepared else _prepared.get(filter_key(conv))


def winograd_tile_of_filter(u) -> int:
    """m of a transformed filter ((m+2)^2, C_in, C_out); 0 for an im2col one (9*C_in, C_out)."""
    return 0 if len(u.shape) == 2 else math.isqrt(u.shape[0]) - 2


def conv3x3_operand(x, m: int):
    """(B, H, W, C_in) -> the left matmul operand of a 3x3 'same' convolution: Winograd's
    transformed tiles ((m+2)^2, tiles, C_in) for m = 2 or 4, im2col patches (B*H*W, 9*C_in) for 0."""
    h, w, cin = x.shape[1], x.shape[2], x.shape[3]
    if m == 0:
        xp = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        patches = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
        return ops.reshape(ops.concatenate(patches, axis=-1), (-1, 9 * cin))
    bt = np.asarray(_WINOGRAD[m][0], np.float64)
    n = m + 2  # input tile side
    # Input tiles of side n at stride m: pad 1 before and m-1 after (the extra zeros only feed
    # discarded tile elements), then cut each spatial axis into (tiles, n).
    xp = ops.pad(x, [[0, 0], [1, m - 1], [1, m - 1], [0, 0]])
    d = _overlapping_tiles(
        _overlapping_tiles(xp, 1, h // m, m, n), 3, w // m, m, n
    )  # (B, th, n, tw, n, C_in)
    d = ops.reshape(ops.transpose(d, (2, 4, 0, 1, 3, 5)), (n * n, -1))
    v = ops.matmul(ops.convert_to_tensor(np.kron(bt, bt), x.dtype), d)  # V = B^T d B
    return ops.reshape(v, (n * n, -1, cin))


def conv3x3_filter(weight, m: int):
    """(3, 3, C_in, C_out) -> the right operand: G w G^T ((m+2)^2, C_in, C_out), or (9*C_in, C_out)."""
    cin, cout = weight.shape[2], weight.shape[3]
    if m == 0:
        return ops.reshape(weight, (9 * cin, cout))
    g = np.asarray(_WINOGRAD[m][1], np.float64)
    u = ops.matmul(ops.convert_to_tensor(np.kron(g, g), weight.dtype), ops.reshape(weight, (9, cin * cout)))
    return ops.reshape(u, ((m + 2) ** 2, cin, cout))


def conv3x3_result(products, m: int, size):
    """The matmul's ``products`` -> (B, H, W, C_out) for output ``size`` (H, W): Winograd's
    A^T M A, or a reshape of the im2col product."""
    h, w = size
    cout = products.shape[-1]
    if m == 0:
        return ops.reshape(products, (-1, h, w, cout))
    at = np.asarray(_WINOGRAD[m][2], np.float64)
    n = m + 2
    y = ops.matmul(ops.convert_to_tensor(np.kron(at, at), products.dtype), ops.reshape(products, (n * n, -1)))
    y = ops.transpose(
        ops.reshape(y, (m, m, -1, h // m, w // m, cout)), (2, 3, 0, 4, 1, 5)
    )  # (B, th, m, tw, m, C_out)
    return ops.reshape(y, (-1, h, w, cout))


def _overlapping_tiles(z, axis: int, tiles: int, m: int, n: int):
    """``z`` of length m * (tiles + 1) along ``axis`` -> tiles of n > m elements at stride m:
    that axis becomes (tiles, n); element j of tile t is z[m * t + j]."""
    shape = [-1] + list(z.shape[1:axis]) + [tiles, m] + list(z.shape[axis + 1 :])
    cut = [slice(None)] * len(z.shape)
    cut[axis] = slice(0, m * tiles)
    head = ops.reshape(z[tuple(cut)], shape)  # elements 0..m-1 of every tile
    cut[axis] = slice(m, m * tiles + m)
    tail = ops.reshape(z[tuple(cut)], shape)  # elements m..2m-1: the next tile's head
    keep = [slice(None)] * len(shape)
    keep[axis + 1] = slice(0, n - m)
    return ops.concatenate([head, tail[tuple(keep)]], axis=axis + 1)
