"""GroupNorm + SiLU over large activations in row blocks, so the float32 intermediates stay small.

In TensorFlow graph (and eager) mode every elementwise op of a float32 GroupNorm on a bfloat16
activation writes a whole float32 tensor: the input's float32 copy, the centred values, their
squares, the scaled and the shifted ones, the SiLU. On the VAE decoder's full-resolution levels
(256 and 128 channels at 1024x1024 pixels) each is 0.5-1 GiB and several are alive at once: the
decode's peak (benchmarks/README.md, ``memory_phases.py``). Here the same maths runs over blocks of
rows, one after the other: two passes accumulate each group's sums in float32, a third normalises,
applies SiLU and casts each block to the next layer's dtype. Elementwise results are those of the
one-block form; the group statistics differ only in float32 summation order.
"""

from __future__ import annotations

import math

from keras import ops

from tf_diffusion import layers

# Activations with more elements than this run in row blocks of about this many elements.
NORM_BLOCK_ELEMENTS = 2**24


def norm_rows(shape) -> int | None:
    """Rows per block for an NHWC activation of static ``shape``, or None to run it in one block."""
    if any(d is None for d in shape) or math.prod(shape) <= NORM_BLOCK_ELEMENTS:
        return None
    per_row = shape[0] * shape[2] * shape[3]
    return max(1, NORM_BLOCK_ELEMENTS // per_row)


def _after(previous, fn):
    """``fn()``, its ops ordered after ``previous`` in a TensorFlow graph (else run as they come).

    The graph executor otherwise starts every block's first op at once (they depend on nothing
    but the input), and all the blocks' intermediates are alive together.
    """
    import tensorflow as tf

    if previous is None or tf.executing_eagerly():
        return fn()
    with tf.control_dependencies([previous]):
        return fn()


def group_norm_silu(norm: layers.GroupNorm, x, rows: int, dtype):
    """``silu(norm(x))`` for (B, H, W, C) ``x``, ``rows`` rows at a time, cast to ``dtype``."""
    b, h, w, c = x.shape
    g = norm.num_groups
    per_group = (g, c // g)
    blocks = [(i, min(h, i + rows)) for i in range(0, h, rows)]

    def grouped(i, j):  # rows i:j as float32 (B, n, G, C/G)
        return ops.reshape(ops.cast(x[:, i:j], "float32"), (b, -1) + per_group)

    def position_sum(fn):  # sum over all positions of fn(block) -> (B, 1, G, C/G), block by block
        total = None
        for i, j in blocks:
            part = _after(total, lambda i=i, j=j: ops.sum(fn(grouped(i, j)), axis=1, keepdims=True))
            total = part if total is None else total + part
        return total

    count = float(h * w)
    # As GroupNorm: the mean over positions, then over each group's channels.
    mean = ops.mean(position_sum(lambda z: z) / count, axis=3, keepdims=True)
    var = ops.mean(position_sum(lambda z: ops.square(z - mean)) / count, axis=3, keepdims=True)
    scale = ops.rsqrt(var + norm.eps) * ops.reshape(ops.cast(norm.weight, "float32"), per_group)
    bias = ops.reshape(ops.cast(norm.bias, "float32"), per_group)
    out, previous = [], var
    for i, j in blocks:

        def block(i=i, j=j):
            y = ops.reshape((grouped(i, j) - mean) * scale + bias, (b, j - i, w, c))
            return ops.cast(ops.silu(y), dtype)

        previous = _after(previous, block)
        out.append(previous)
    return ops.concatenate(out, axis=1)
