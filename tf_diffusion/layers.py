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
import contextvars
import math

import keras
from keras import ops

# How a torch tensor maps onto each variable kind:
#   "plain":  same shape (biases, norms, embeddings)
#   "linear": torch (out, in)        -> keras (in, out)
#   "conv":   torch (out, in, kh, kw) -> keras (kh, kw, in, out)
PLAIN, LINEAR, CONV = "plain", "linear", "conv"


# True while a model is built whose every variable is assigned from a checkpoint next.
_TO_BE_LOADED = contextvars.ContextVar("tf_diffusion_to_be_loaded", default=False)


@contextlib.contextmanager
def weights_to_be_loaded():
    """Build layers whose random initial values would be overwritten at once: they start as zeros.

    ``from_pretrained`` builds under this only when the checkpoint has every key of the model, so no
    variable keeps its start value. Drawing torch's random start values costs more than building the
    variables (0.6 of the 2.2 s that loading the default model takes, and seconds at full size).
    """
    token = _TO_BE_LOADED.set(True)
    try:
        yield
    finally:
        _TO_BE_LOADED.reset(token)


def _random(initializer: keras.initializers.Initializer) -> keras.initializers.Initializer:
    return keras.initializers.Zeros() if _TO_BE_LOADED.get() else initializer


def _uniform(bound: float) -> keras.initializers.Initializer:
    # torch's default init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return _random(keras.initializers.RandomUniform(-bound, bound))


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
            return ops.conv(x, self.weight, strides=1, padding="same") + self.bias
        if any(self.padding):
            x = ops.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        y = ops.conv(x, self.weight, strides=self.stride, padding="valid")
        return y + self.bias


def upsample_nearest(x, size=None):
    """Nearest-neighbour upsampling of (B, H, W, C) to ``size`` (h, w); None doubles H and W.

    As torch's interpolate(mode="nearest"): output index i reads source index floor(i * in / out).
    """
    h, w = x.shape[1], x.shape[2]
    if size is None or (h is not None and w is not None and tuple(size) == (2 * h, 2 * w)):
        return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)
    for axis, out in ((1, size[0]), (2, size[1])):
        src = ops.shape(x)[axis]
        index = (ops.arange(out, dtype="int32") * src) // out
        x = ops.take(x, index, axis=axis)
    return x


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
            # XLA on a CPU reduces one axis at a time faster than both at once (benchmarks/README.md).
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


class RMSNorm(keras.layers.Layer):
    """RMS norm with a learned scale over the last axis, in float32 (T5LayerNorm, diffusers' RMSNorm)."""

    LAYOUT = {"weight": PLAIN}

    def __init__(self, dim: int, eps: float, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.dim, self.eps = dim, eps
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.built = True

    def call(self, x):
        x = ops.cast(x, "float32")
        return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.eps) * self.weight


class Embedding(keras.layers.Layer):
    """nn.Embedding: a (num, dim) table indexed by integer ids."""

    LAYOUT = {"weight": PLAIN}

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = self.add_weight(
            shape=(num_embeddings, embedding_dim),
            initializer=_random(keras.initializers.RandomNormal(stddev=0.02)),
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
        self.built = True

    def call(self, x):
        value, gate = ops.split(self.proj(x), 2, axis=-1)
        return value * ops.gelu(gate, approximate=False)


class SiLU(keras.layers.Layer):
    """Parameter-free placeholder for nn.SiLU, keeping Sequential indices aligned."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights: nothing to build

    def call(self, x):
        return ops.silu(x)


class Identity(keras.layers.Layer):
    """Parameter-free placeholder for nn.Dropout / nn.Identity at inference."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights: nothing to build

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

    def heads(x, t):  # (B, T, C) -> (B, h, T, d)
        return ops.transpose(ops.reshape(x, (b, t, num_heads, d)), (0, 2, 1, 3))

    q, k, v = heads(q, tq), heads(k, tk), heads(v, tk)
    k_t = ops.transpose(k, (0, 1, 3, 2))  # (B, h, d, Tk)

    def rows(q_rows, mask_rows):  # (B, h, n, d) -> (B, h, n, d)
        scores = ops.matmul(q_rows, k_t) * (1.0 / math.sqrt(d))
        scores = ops.cast(scores, "float32")
        if mask_rows is not None:
            # Broadcast explicitly: TensorFlow's oneDNN rewrite fuses matmul * scale + mask into one
            # kernel that is very slow with a (1, 1, Tq, Tk) mask in float32 (benchmarks/README.md).
            scores = scores + ops.broadcast_to(mask_rows, ops.shape(scores))
        return ops.matmul(ops.cast(ops.softmax(scores, axis=-1), v.dtype), v)

    chunk = _query_chunk(q.shape[2], k.shape[2], num_heads)
    if chunk is None:
        out = rows(q, mask)  # (B, h, Tq, d)
    else:
        # Row blocks of the score matrix, so the (B, h, Tq, Tk) float32 scores never exist at
        # once (peak memory, benchmarks/README.md). Every row is computed exactly as in the
        # one-block form.
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
