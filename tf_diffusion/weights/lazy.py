"""A tensor stored in a checkpoint file, read only when it is converted to numpy.

Shared by the safetensors and torch checkpoint readers, so a loader sees one
type: ``.shape`` and ``.dtype`` come from the file's header without reading
data; ``np.asarray(t)`` / ``t.numpy()`` read the bytes and return a fresh,
writable, C-contiguous array in native byte order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np

# ml_dtypes (a dependency of Keras and TensorFlow) gives numpy a bfloat16 that
# casts to float32 exactly; numpy has none of its own.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# The 8-bit floating formats checkpoints store (Flux and SD3.5 "fp8" files): weights only, upcast when they are
# assigned to a model's variables. E8M0 is the exponent-only scale type of microscaling formats.
FLOAT8 = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_EXTRA_FLOATS = frozenset((BFLOAT16, *FLOAT8.values()))


def is_floating(dtype) -> bool:
    """Whether a numpy dtype is a floating one, ml_dtypes' bfloat16 and float8 types included (numpy files
    some of those under kind 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype in _EXTRA_FLOATS


class LazyTensor:
    """A tensor whose bytes stay in the file until asked for.

    Attributes:
        shape: tuple of ints, as stored.
        dtype: numpy dtype (``ml_dtypes.bfloat16`` for bfloat16).
        source: where it lives, for messages (``file:key``).
    """

    # Slots and a refusing __setstate__ keep a pickle's BUILD opcode from
    # rewriting a tensor made while unpickling an untrusted checkpoint.
    __slots__ = ("shape", "dtype", "source", "_read")

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype, read: Callable[[], np.ndarray], source: str = ""
    ):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.source = source
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        # Exact: int64 arithmetic wraps a hostile 2**63-element shape to a negative count.
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """Read the tensor: a new array with this shape and dtype."""
        array = self._read()
        if array.shape != self.shape or array.dtype != self.dtype:
            # The readers build arrays from the same header; this guards their bookkeeping.
            raise ValueError(
                f"{self.source}: read an array of shape {array.shape} and dtype {array.dtype}, "
                f"expected {self.shape} {self.dtype}"
            )
        return array

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # The array is always new, so copy=False ("do not copy") is honoured too.
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        where = f", source={self.source!r}" if self.source else ""
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}{where})"

    def __setstate__(self, state):
        raise TypeError("LazyTensor cannot be rebuilt from pickled state")

    # Immutable: copies may share the object.
    def __copy__(self) -> LazyTensor:
        return self

    def __deepcopy__(self, memo) -> LazyTensor:
        return self


def derived(value, fn: Callable[[np.ndarray], np.ndarray], shape, dtype, source: str = "") -> LazyTensor:
    """A lazy tensor computed by ``fn`` from ``value`` (itself lazy or an array) when it is read.

    Used for the renames that also reshape, slice, join or cast (OpenCLIP's fused
    q/k/v, diffusers' linear attention weights), so conversions stay lazy and a
    writer can stream them one at a time.
    """

    def read() -> np.ndarray:
        return np.ascontiguousarray(fn(np.asarray(value))).astype(np.dtype(dtype), copy=False)

    return LazyTensor(shape, dtype, read, source or getattr(value, "source", ""))


def read_all(obj, limit: int | None = None) -> int:
    """Read every ``LazyTensor`` inside nested dicts, lists and tuples, as converting a whole file does.

    Args:
        obj: what a reader returned.
        limit: visit at most this many items (None: all).

    Returns:
        How many tensors were read.
    """
    todo, read, visited = [obj], 0, 0
    while todo and (limit is None or visited < limit):
        item, visited = todo.pop(), visited + 1
        if isinstance(item, LazyTensor):
            np.asarray(item)
            read += 1
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return read
