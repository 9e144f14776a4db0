"""The project's noise: one counter-based generator, computed the same way on the host and in graph ops.

Every image has its own seed. A batch generated with ``seed=s`` gives image ``b`` the seed ``s + b``
(as the AUTOMATIC1111 web UI numbers them), and everything random about that image is a function of
its seed alone, so it can be reproduced by itself, in any batch, through any path:
``generate()`` on TensorFlow or JAX, the CLI, sharded generation (the host draws, then the batch is
split) and the exported SavedModel (the same arithmetic as TensorFlow ops).

Each image draws from separate *streams*, one per use:

====================  ======  ==========================================
stream                 number  shape per image
====================  ======  ==========================================
``LATENTS``            0       (h, w, C): the initial latents
``IMAGE_POSTERIOR``    1       (h, w, C): the VAE posterior sample of the init image
``MASKED_POSTERIOR``   2       (h, w, C): that of the masked image (inpainting)
``STEPS``              3       (E, h, w, C): one draw per model evaluation (stochastic samplers)
====================  ======  ==========================================

Element ``j`` of a stream (row-major order) is a standard normal made by the Box-Muller transform
from two uniforms, which come from 32-bit hashes of the counters ``2j`` and ``2j + 1`` keyed by
(seed, stream). The hash is Chris Wellons' "lowbias32" integer mixer, applied twice; all integer
arithmetic is modulo 2**32, and the float arithmetic is float32 on both sides, so host and graph
agree to float32 rounding of ``log``/``cos`` (about 1e-7).

``latents=`` in ``generate()`` still hands in noise drawn any other way (diffusers' own, say).
"""

from __future__ import annotations

import numpy as np

LATENTS, IMAGE_POSTERIOR, MASKED_POSTERIOR, STEPS = 0, 1, 2, 3
MAX_SEED = 2**63 - 1

_MASK = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_STREAM_SALT, _KEY_SALT = 0x9E3779B9, 0x85EBCA6B
_TWO_PI = np.float32(2.0 * np.pi)


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as an int in [0, MAX_SEED], or a ValueError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{what} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def random_seed() -> int:
    """A fresh seed in [0, 2**32), the range A1111 draws from, to report and reuse."""
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])


# ------------------------------------------------------------------ host (NumPy)


def _mix(x: np.ndarray) -> np.ndarray:
    # uint64 arrays holding 32-bit values; products wrap mod 2**64, so their low 32 bits are exact.
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(_MUL1)) & np.uint64(_MASK)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(_MUL2)) & np.uint64(_MASK)
    return x ^ (x >> np.uint64(16))


def _keys(seed: int, stream: int) -> tuple[np.uint64, np.uint64]:
    lo, hi = np.uint64(seed & _MASK), np.uint64((seed >> 32) & _MASK)
    salted = np.uint64((stream * _STREAM_SALT) & _MASK)
    key = _mix(np.asarray(lo ^ _mix(np.asarray(hi ^ salted))))
    key2 = _mix(np.asarray((key + np.uint64(_KEY_SALT)) & np.uint64(_MASK)))
    return key, key2


def _uniform(bits: np.ndarray) -> np.ndarray:
    # 24 bits -> (0, 1), exact in float32.
    return ((bits >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)


def normal(seed: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 standard normals of one image's stream, shaped ``shape``.

    Args:
        seed: the image's seed, in [0, MAX_SEED].
        stream: one of LATENTS, IMAGE_POSTERIOR, MASKED_POSTERIOR, STEPS.
        shape: the array's shape (row-major counters).
    """
    seed = check_seed(seed)
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape, dtype=np.int64))
    if count >= 2**31:
        raise ValueError(f"noise of shape {shape} has {count} elements; at most 2**31 - 1 per stream")
    key, key2 = _keys(seed, stream)
    counters = np.arange(2 * count, dtype=np.uint64)
    bits = _mix(_mix(counters ^ key) ^ key2)
    u1, u2 = _uniform(bits[0::2]), _uniform(bits[1::2])
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    return (radius * np.cos(_TWO_PI * u2)).astype(np.float32).reshape(shape)


def batch_normal(seeds, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """``normal`` for each seed, stacked: (len(seeds), *shape)."""
    return np.stack([normal(s, stream, shape) for s in seeds])


def image_seeds(seed: int | None, count: int) -> list[int]:
    """The seeds of a batch of ``count`` images: seed, seed + 1, ... (a fresh seed when None)."""
    first = random_seed() if seed is None else check_seed(seed)
    if first + count - 1 > MAX_SEED:
        raise ValueError(f"seed={first} leaves no room for {count} images (at most {MAX_SEED})")
    return [first + b for b in range(count)]


# ------------------------------------------------------------------ graph (TensorFlow)


def tf_batch_normal(seeds, stream: int, shape):
    """The same numbers as ``batch_normal`` as TensorFlow ops, for exported graphs.

    Args:
        seeds: (B,) int64 tensor of image seeds in [0, MAX_SEED].
        stream: a Python int stream number.
        shape: the per-image shape (Python ints).

    Returns:
        (B, *shape) float32 tensor.
    """
    import tensorflow as tf

    mask = tf.constant(_MASK, tf.int64)
    band, shift = tf.bitwise.bitwise_and, tf.bitwise.left_shift

    def mul(x, c: int):
        # (x * c) mod 2**32 with 16-bit halves of c, so no int64 product overflows.
        lo, hi = tf.constant(c & 0xFFFF, tf.int64), tf.constant(c >> 16, tf.int64)
        high = shift(band(x * hi, tf.constant(0xFFFF, tf.int64)), tf.constant(16, tf.int64))
        return band(x * lo + high, mask)

    def mix(x):
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.int64)))
        x = mul(x, _MUL1)
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.int64)))
        x = mul(x, _MUL2)
        return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.int64)))

    shape = [int(s) for s in shape]
    count = int(np.prod(shape, dtype=np.int64))
    seeds = tf.cast(seeds, tf.int64)
    lo = band(seeds, mask)
    hi = band(tf.bitwise.right_shift(seeds, tf.constant(32, tf.int64)), mask)
    salted = tf.constant((stream * _STREAM_SALT) & _MASK, tf.int64)
    key = mix(tf.bitwise.bitwise_xor(lo, mix(tf.bitwise.bitwise_xor(hi, salted))))[:, None]  # (B, 1)
    key2 = mix(band(key + tf.constant(_KEY_SALT, tf.int64), mask))
    counters = tf.range(2 * count, dtype=tf.int64)[None, :]
    bits = mix(tf.bitwise.bitwise_xor(mix(tf.bitwise.bitwise_xor(counters, key)), key2))

    def uniform(b):
        return (tf.cast(tf.bitwise.right_shift(b, tf.constant(8, tf.int64)), tf.float32) + 0.5) * (2.0**-24)

    u1, u2 = uniform(bits[:, 0::2]), uniform(bits[:, 1::2])
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(_TWO_PI * u2)
    return tf.reshape(z, [-1, *shape])


class NoiseSource:
    """Standard-normal float32 draws from ``np.random.default_rng(seed)``, in call order.

    Not the project's image noise (that is ``normal`` / ``batch_normal`` above); kept for callers that
    want a plain seeded NumPy stream, such as test fixtures that draw random weights.

    Args:
        seed: a non-negative integer; None draws a fresh seed (kept in ``.seed``).
    """

    def __init__(self, seed: int | None = None):
        self.seed = random_seed() if seed is None else check_seed(seed)
        self._rng = np.random.default_rng(self.seed)

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Draw a float32 standard-normal array of ``shape``."""
        return self._rng.standard_normal(tuple(int(s) for s in shape), dtype=np.float32)
