"""Other ways to compute the model's operations, each giving the reference's numbers.

Pure functions on tensors; the processors in ``cpu.py`` decide where each runs. Timings that
motivated each form are in benchmarks/README.md.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

# ------------------------------------------------------- Winograd 3x3 convolution
#
# Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
# Neural Networks", 2015): (m+2)^2 matmuls over overlapping (m+2)x(m+2) input tiles in place of
# 9 m^2 multiply-adds per m x m output tile (F(2x2): 16 for 36; F(4x4): 36 for 144). Whether the
# fewer multiplications outweigh the transforms' memory traffic depends on the machine and the
# shape, so ``cpu.py`` measures it (benchmarks/README.md, "Winograd").
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
WINOGRAD_TILES = tuple(sorted(_WINOGRAD))


def winograd_conv3x3(x, weight, m: int):
    """3x3 stride-1 convolution (no bias) with zero padding 1 by Winograd F(m x m, 3 x 3).

    Each transform is one matmul with a Kronecker product of the 1-D transform with itself, over
    the (m+2)^2 positions of every tile: a few large ops instead of one op per tile element, so
    XLA compiles it quickly.

    Args:
        x: (B, H, W, C_in) with H and W multiples of m.
        weight: (3, 3, C_in, C_out).
        m: the output tile, 2 or 4.

    Returns:
        (B, H, W, C_out).
    """
    products = ops.matmul(conv3x3_operand(x, m), conv3x3_filter(weight, m))
    return conv3x3_result(products, m, x.shape[1:3])


# A 3x3 convolution as one (batched) matmul between two elementwise parts: ``conv3x3_operand``
# (Winograd's transformed input tiles for m = 2 or 4, im2col patches for m = 0), a matmul with
# ``conv3x3_filter``, then ``conv3x3_result`` (Winograd's output transform, or a reshape). Under
# islands a ResBlock may run the matmul in graph mode between islands (``cpu.py``).


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


def winograd_tile_of_filter(u) -> int:
    """m of a transformed filter ((m+2)^2, C_in, C_out); 0 for an im2col one (9*C_in, C_out)."""
    return 0 if len(u.shape) == 2 else math.isqrt(u.shape[0]) - 2


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


# ------------------------------------------------------ sub-pixel upsampling


def subpixel_conv3x3(x, weight):
    """3x3 'same' convolution (no bias) of ``x`` upsampled 2x by nearest neighbour, as four 2x2
    convolutions of ``x``.

    Each output phase (even/odd row, even/odd column) of a 3x3 convolution over a nearest-upsampled
    image sees 2x2 distinct source pixels, so it is a 2x2 convolution of ``x`` whose taps are the
    3x3 taps landing on the same source pixel, summed (Shi et al.'s sub-pixel convolution, read
    backwards): 16 multiply-adds per source pixel in place of 36, and the only new rounding is in
    the summed taps.

    Args:
        x: (B, H, W, C_in) with static H, W.
        weight: (3, 3, C_in, C_out).

    Returns:
        (B, 2H, 2W, C_out).
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


# ------------------------------------------------------------- attention forms


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


def split_blocks(x, size: int, axis: int) -> list:
    """``x`` cut along ``axis`` (static length) into blocks of ``size``, the last one shorter."""
    length = x.shape[axis]
    if length <= size:
        return [x]
    return ops.split(x, list(range(size, length, size)), axis=axis)


def head_attention(q, k_t, v, block_elements: int = 2**20):
    """Softmax attention, one cache-sized block of heads and query rows at a time.

    Args:
        q: (N, Tq, d) queries of N = batch x heads, already scaled by 1 / sqrt(d).
        k_t: (N, d, Tk) keys, transposed; v: (N, Tk, d) values.
        block_elements: score elements (heads x rows x keys) per block.

    Returns:
        (N, Tq, d); dynamic sizes run as one block.
    """
    n, tq, tk = q.shape[0], q.shape[1], k_t.shape[2]
    if n is None or tq is None or tk is None:
        return ops.matmul(ops.softmax(ops.matmul(q, k_t), axis=-1), v)
    rows = max(1, min(tq, block_elements // tk))
    group = max(1, min(n, block_elements // (rows * tk)))
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


def fused_attention(q, k, v, num_heads: int, mode: str):
    """(B, Tq, C) attention from JAX's fused kernel, or None where the explicit form must run.

    Args:
        q: (B, Tq, C) queries; k, v: (B, Tk, C), unscaled, no mask.
        num_heads: heads to split C into.
        mode: "auto" (cuDNN flash attention where it applies: head_dim a multiple of 8 up to
            128), "xla" (``jax.nn.dot_product_attention``'s XLA form) or "off" (None).

    Returns:
        (B, Tq, C), or None off JAX's GPU backend, for float32 or for dynamic sizes.
    """
    if mode == "off" or keras.backend.backend() != "jax":
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
    cudnn = mode == "auto" and d % 8 == 0 and d <= 128
    out = jax.nn.dot_product_attention(q4, k4, v4, implementation="cudnn" if cudnn else "xla")
    return ops.reshape(out, (-1, tq, num_heads * d))
