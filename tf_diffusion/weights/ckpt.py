"""Read ``torch.save`` checkpoints (``.ckpt``, ``.pt``, ``.bin``) without torch and without running them.

A torch checkpoint is a pickle, and a pickle can call any importable function.
This reader never imports anything a file names and never uses CPython's
unpickler: our own small interpreter (``pickle_vm``) runs the pickle's opcodes
and asks this module about every global, call, ``BUILD``, persistent id and
dict key. Allowed globals map to our own safe stand-ins; every other one is
refused with ``UnsafeCheckpointError`` before anything runs.

Allowed globals (all that stock ``torch.save`` and SD 1.x/2.x checkpoints use):

- tensor rebuilders: ``torch._utils._rebuild_tensor_v2`` / ``_v3``,
  ``_rebuild_parameter`` / ``_with_state``, ``torch._tensor._rebuild_from_type_v2``
  for plain ``torch.Tensor`` / ``torch.nn.parameter.Parameter``;
- storage types (``torch.FloatStorage`` ... ``torch.UntypedStorage``, also
  ``torch.cuda.*``) and dtypes (``torch.float16`` ...), as inert markers;
- containers and scalars: ``collections.OrderedDict``, ``builtins.set`` /
  ``frozenset`` / ``complex`` / ``slice``, ``torch.Size`` (read as a tuple),
  each built by a checking function;
- numpy scalars as Lightning stores them: ``numpy.core.multiarray.scalar``
  (also ``numpy._core``), ``numpy.dtype``, ``_codecs.encode``: plain numeric
  dtypes only, the scalar rebuilt from kind, size and byte order with an exact
  byte count;
- placeholders: Lightning's ``ModelCheckpoint`` callback (found under
  ``"callbacks"`` in SD 1.x checkpoints) loads as an inert ``PickledObject``
  that records its arguments and state; nothing of Lightning is imported.
  Callers may name more placeholder globals.

``BUILD`` (pickled state) is applied only to placeholders, to an
``OrderedDict``'s attributes (torch's ``_metadata``) and, for a numpy dtype,
only a plain state (no subarray, fields or names; byte order ``<``, ``>``,
``|`` or ``=``). Dict keys and set items must be str, bytes, bool, None,
integers whose hash is themselves, placeholders, or short tuples of str,
bytes, bool and None: anything else could overflow the C stack when hashed or
be crafted to collide.

Two container formats: the zip format (``<archive>/data.pkl`` plus one
``<archive>/data/<key>`` record per storage; torch >= 1.6) and the legacy
format (consecutive pickles followed by raw storages). Tensors are lazy: a
storage is read from the (memory-mapped) file only when a tensor is converted.
Only little-endian checkpoints are supported.

Sizes are checked against the file before anything is allocated: zip entries
must lie inside the file; a deflated entry may declare at most
``MAX_DEFLATE_RATIO`` times its compressed size (plus ``DEFLATE_SLACK`` bytes
for tiny entries) and all of them together at most that ratio times the file
size; tensors with more elements than their storage (stride-0 expanded views)
may hold at most the file's size in all (plus ``EXPANDED_SLACK``), so 4 bytes
cannot be viewed as 2**63 elements. So peak memory while loading stays within
a small multiple of the file's size (``benchmarks/hostile_memory.py``). A
deflated storage shared by several tensors is inflated once and kept only until
each of its tensors has been read.

A file that shrinks while its tensors are alive: each read checks the file's
size first and reports the truncation, but a file cut by another process in
the instant between that check and the copy can still end the process with
SIGBUS (the price of memory-mapping; do not rewrite checkpoints being loaded).
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import mmap
import os
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

from tf_diffusion.weights.lazy import BFLOAT16, FLOAT8, LazyTensor
from tf_diffusion.weights.pickle_vm import PickleRefused, unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Legit checkpoints store storages uncompressed; tools that re-zip them with deflate
# get about 1.1:1 on float weights. A declared size above this ratio of the compressed
# size is refused (deflate reaches 1032:1 on zeros: a 1.4 MB file declaring 1 GiB).
MAX_DEFLATE_RATIO = 16
# Small entries (byteorder, version, a small data.pkl) may beat the ratio honestly.
DEFLATE_SLACK = 1 << 20
_INFLATE_CHUNK = 1 << 20
# Expanded (stride-0) tensors may materialise at most the file's size plus this, in all.
EXPANDED_SLACK = 1 << 20
# Container items that calls may take per byte of pickle (see _Policy._spend).
WORK_PER_BYTE = 8
_ZIP_MAX_VERSION = 63  # the highest "version needed to extract" zipfile itself reads
_LOCAL_HEADER = 30
_CENTRAL_HEADER = 46

# Lightning callbacks keyed by class in old checkpoints' "callbacks" dict; never imported.
DEFAULT_PLACEHOLDERS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle asks for something outside the allow-list; nothing was run."""


class PickledObject:
    """Inert stand-in for an object of a class we do not import; keeps its arguments and state.

    Each placeholder global becomes a fresh subclass whose ``global_name`` is
    the pickled ``module.name``; the class object itself stands in where the
    pickle stores the class (as Lightning's "callbacks" keys do).
    """

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.global_name}>"


# --- dtypes ----------------------------------------------------------------------------------

_NP = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": BFLOAT16,
    "complex128": np.dtype("<c16"),
    "complex64": np.dtype("<c8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint64": np.dtype("<u8"),
    "uint32": np.dtype("<u4"),
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
    **FLOAT8,
}
_FLOAT8_TYPES = frozenset(FLOAT8.values())
_DTYPE_ALIASES = {
    "double": "float64",
    "float": "float32",
    "half": "float16",
    "cdouble": "complex128",
    "cfloat": "complex64",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}
# Known torch dtypes with no numpy type here: loading a tensor of one is an error naming it.
_UNSUPPORTED_DTYPES = (
    "float4_e2m1fn_x2",
    "complex32",
    "chalf",
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
_UNSUPPORTED_STORAGES = (
    "QInt8Storage",
    "QInt32Storage",
    "QUInt8Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
)


class _Marker:
    """An inert named value standing in for a torch dtype, storage type or class."""

    __slots__ = ("kind", "name", "dtype")

    def __init__(self, kind: str, name: str, dtype: np.dtype | None = None):
        self.kind, self.name, self.dtype = kind, name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}" if self.kind != "class" else self.name


class _Call:
    """An allowed callable under its pickled name; ``is_type`` marks the ones NEWOBJ may use."""

    __slots__ = ("name", "func", "is_type")

    def __init__(self, name: str, func, is_type: bool = False):
        self.name, self.func, self.is_type = name, func, is_type

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


def _short(value, limit: int = 80, depth: int = 0) -> str:
    """A repr for messages: never deep recursion, huge ints or megabytes of text."""
    if type(value) is int:
        return str(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
    if type(value) in (list, tuple):
        if len(value) > 8 or depth > 2:
            return f"a {type(value).__name__} of {len(value)} items"
        inner = ", ".join(_short(v, limit, depth + 1) for v in value)
        text = f"({inner}{',' if len(value) == 1 else ''})" if type(value) is tuple else f"[{inner}]"
    elif isinstance(value, (dict, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    else:
        try:
            text = repr(value)
        except Exception:  # a hostile __repr__ cannot exist here, but numpy reprs may fail
            return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- storages and tensors --------------------------------------------------------------------


class _Record:
    """Where one storage's bytes live in the file (offset known once the archive is parsed).

    A deflated storage is inflated when a tensor first reads it and kept while
    tensors that have not read it yet remain (``pending``), so a storage shared
    by many tensors is inflated once, and none stays in memory after.
    """

    __slots__ = ("source", "key", "nbytes", "offset", "info", "pending", "cache", "inflations")

    def __init__(self, source, key: str, nbytes: int):
        self.source, self.key, self.nbytes = source, key, nbytes
        self.offset = None  # absolute file offset of an uncompressed storage
        self.info = None  # the zip entry of a deflated one
        self.pending = 0  # tensors on this record that have not been read yet
        self.cache = None
        self.inflations = 0

    def read(self, first: bool):
        if self.info is None:
            return self.source.view(self)
        data = self.cache
        if data is None:
            data = self.source.inflate(self.info)
            self.inflations += 1
        if first:
            self.pending -= 1
        self.cache = data if self.pending > 0 else None
        return data


class _StorageRef:
    """A storage as the pickle refers to it: a record viewed as one dtype, maybe from a byte offset."""

    __slots__ = ("record", "dtype", "byte_offset", "nbytes")

    def __init__(self, record: _Record, dtype: np.dtype, byte_offset: int, nbytes: int):
        self.record, self.dtype, self.byte_offset, self.nbytes = record, dtype, byte_offset, nbytes


def _int(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {_short(value)}")
    return value


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"{what} must be a tuple of non-negative ints, got {_short(values)}")
    return tuple(values)


def _make_tensor(storage, offset, size, stride, dtype: np.dtype, metadata) -> LazyTensor:
    """A LazyTensor viewing ``storage`` like torch's as_strided(size, stride, offset)."""
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor storage must come from the checkpoint's storages, got {_short(storage)}")
    offset = _int(offset, "storage offset")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if len(size) != len(stride):
        raise ValueError(f"bad tensor layout: offset {offset}, size {_short(size)}, stride {_short(stride)}")
    available = storage.nbytes // dtype.itemsize
    count = math.prod(size)
    needed = 0 if count == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if needed > available:
        raise ValueError(
            f"tensor of size {_short(size)}, stride {_short(stride)} at offset {_short(offset)} needs "
            f"{_short(needed)} elements, its storage {storage.record.key!r} holds {available}"
        )
    if count > available:
        # Overlapping (stride-0, expanded) views hold more elements than their storage:
        # 4 bytes viewed as 2**63 elements would allocate what the file never held. They
        # are allowed up to the file's size in all (EXPANDED_SLACK for small files).
        storage.record.source.expand(count * dtype.itemsize, size)
    flags = dict(metadata) if isinstance(metadata, dict) else {}
    negate, conjugate = bool(flags.pop("neg", False)), bool(flags.pop("conj", False))
    native = dtype.newbyteorder("=")
    record = storage.record
    if count:
        record.pending += 1
    unread = [True]

    def read() -> np.ndarray:
        if count == 0:
            return np.zeros(size, native)
        raw = record.read(unread[0])
        unread[0] = False
        # numpy's as_strided cannot describe ml_dtypes' 8-bit floats: stride over same-sized unsigned
        # ints and reinterpret the copy (the bits are the same either way).
        carrier = np.dtype("u1") if dtype in _FLOAT8_TYPES else dtype
        flat = np.frombuffer(raw, dtype=carrier, count=available, offset=storage.byte_offset)
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride], writeable=False
        )
        array = np.array(view, order="C", copy=True)
        array = array.view(native) if carrier is not dtype else array.astype(native, copy=False)
        if negate:
            array = np.negative(array)
        if conjugate:
            array = np.conj(array)
        return array

    return LazyTensor(size, native, read, f"{record.source.path}:storage {record.key}")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor storage must come from the checkpoint's storages, got {_short(storage)}")
    return _make_tensor(storage, offset, size, stride, storage.dtype, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not (isinstance(dtype, _Marker) and dtype.kind == "dtype"):
        raise ValueError(f"tensor dtype must be a torch dtype, got {_short(dtype)}")
    if dtype.dtype is None:
        raise ValueError(f"tensors of dtype torch.{dtype.name} are not supported (no numpy type)")
    return _make_tensor(storage, offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    # A Parameter is its data here; requires_grad and hooks mean nothing without torch.
    if not isinstance(data, LazyTensor):
        raise ValueError(f"a Parameter must wrap a tensor, got {_short(data)}")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    allowed = {"torch.Tensor", "torch.nn.parameter.Parameter"}
    if not (isinstance(new_type, _Marker) and new_type.name in allowed):
        raise UnsafeCheckpointError(
            f"refusing to rebuild a tensor as {_short(new_type)}; only {sorted(allowed)}"
        )
    if not isinstance(func, _Call) or func.is_type or type(args) is not tuple:
        raise ValueError(f"bad tensor rebuild call {_short(func)}{_short(args)}")
    return func(*args)


# --- harmless non-torch globals ----------------------------------------------------------------

_PLAIN_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_BYTE_ORDERS = ("<", ">", "|", "=")


def _plain_dtype(spec: str) -> np.dtype:
    if type(spec) is not str or len(spec) > 8:
        raise UnsafeCheckpointError(
            f"numpy.dtype from a pickle must be given a short string, got {_short(spec)}"
        )
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad numpy dtype {spec!r}: {e}") from None
    if dtype.hasobject:
        raise UnsafeCheckpointError(f"refusing numpy object dtype {spec!r}")
    if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafeCheckpointError(f"refusing numpy dtype {spec!r}: only plain numeric dtypes are allowed")
    return dtype


def _dtype_state_is_plain(state) -> bool:
    """numpy's dtype state (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])."""
    if type(state) is not tuple or len(state) not in (8, 9):
        return False
    version, order, subarray, names, fields, elsize, alignment, flags = state[:8]
    return (
        type(version) is int
        and version in (3, 4)
        and type(order) is str
        and order in _BYTE_ORDERS
        and subarray is None
        and names is None
        and fields is None
        and type(elsize) is int
        and elsize == -1
        and type(alignment) is int
        and alignment == -1
        and type(flags) is int
        and flags == 0
        and (len(state) == 8 or state[8] is None)
    )


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if type(text) is not str or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode({type(text).__name__}, {_short(encoding)})")
    if errors != "strict":
        raise UnsafeCheckpointError(f"refusing _codecs.encode errors={_short(errors)}")
    return text.encode(encoding)


def _torch_size(dims=()):
    return _ints(tuple(dims) if isinstance(dims, (tuple, list)) else dims, "torch.Size")


# Dict keys and set items are hashed: a deeply nested tuple overflows the C stack
# (CPython's tuple hash does not check recursion), and integers, floats and tuples
# of ints can be crafted to share one hash (20k such keys: 10 s). Integers up to
# 2**61 - 2 in size hash to themselves, str and bytes hashes are salted per process.
_MAX_INT_KEY = 2**61 - 2
_MAX_TUPLE_KEY = 16


def _plain_tuple(key: tuple) -> bool:
    """A tuple of at most _MAX_TUPLE_KEY str/bytes/bool/None in all, nested or not (so each check is cheap)."""
    todo, seen = [key], 0
    while todo:
        for item in todo.pop():
            seen += 1
            if seen > _MAX_TUPLE_KEY:
                return False
            if type(item) is tuple:
                todo.append(item)
            elif type(item) is int:
                raise UnsafeCheckpointError("refusing a tuple of integers as a dict key or set item")
            elif not (type(item) in (str, bytes, bool) or item is None):
                return False
    return True


def _check_key(key) -> None:
    kind = type(key)
    if kind is str or kind is bytes or kind is bool or key is None:
        return
    if kind is int:
        if -_MAX_INT_KEY <= key <= _MAX_INT_KEY:
            return
        raise UnsafeCheckpointError(
            f"refusing an integer dict key or set item of {key.bit_length()} bits: beyond "
            "+-(2**61 - 2) integers can be chosen to share one hash"
        )
    if isinstance(key, (PickledObject, _Marker)) or (
        isinstance(key, type) and issubclass(key, PickledObject)
    ):
        return  # hashed by identity
    if kind is tuple and _plain_tuple(key):
        return
    raise UnsafeCheckpointError(
        f"refusing {_short(key)} ({kind.__name__}) as a dict key or set item: only str, bytes, bool, "
        f"None, integers, placeholders and tuples of up to {_MAX_TUPLE_KEY} str/bytes/bool/None in all"
    )


def _ordered_dict(*args):
    if not args:
        return OrderedDict()
    (items,) = args
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in items
    ):
        raise ValueError(f"OrderedDict from a pickle takes a list of pairs, got {_short(items)}")
    for key, _ in items:
        _check_key(key)
    return OrderedDict(items)


def _items(items, what: str):
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise ValueError(f"{what} from a pickle takes a list, got {_short(items)}")
    for item in items:
        _check_key(item)
    return items


def _set(items=()):
    return set(_items(items, "set"))


def _frozenset(items=()):
    return frozenset(_items(items, "frozenset"))


def _complex(real=0.0, imag=0.0):
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise ValueError(f"complex from a pickle takes two numbers, got {_short(real)}, {_short(imag)}")
    return complex(real, imag)


def _slice(*args):
    if not 1 <= len(args) <= 3 or not all(v is None or type(v) is int for v in args):
        raise ValueError(f"slice from a pickle takes up to three ints, got {_short(args)}")
    return slice(*args)


_CALLS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _torch_size,
    "_codecs.encode": _codecs_encode,
}
# Types the pickle may construct (REDUCE or NEWOBJ), each through a checking function.
_TYPES = {
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _set,
    "builtins.frozenset": _frozenset,
    "builtins.complex": _complex,
    "builtins.slice": _slice,
}
# Resolved per load, by the policy that owns the dtypes it makes.
_NUMPY_DTYPE = "numpy.dtype"
_NUMPY_SCALARS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


def _allowed_globals() -> dict[str, Any]:
    table: dict[str, Any] = {name: _Call(name, func) for name, func in _CALLS.items()}
    table.update({name: _Call(name, func, is_type=True) for name, func in _TYPES.items()})
    for cls in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        table[cls] = _Marker("class", cls)
    for storage, dtype in _STORAGES.items():
        for module in ("torch", "torch.cuda"):
            table[f"{module}.{storage}"] = _Marker("storage", storage, _NP[dtype])
    # torch pickles untyped storages (used with _rebuild_tensor_v3) by their defining module.
    table["torch.storage.UntypedStorage"] = table["torch.UntypedStorage"]
    for storage in _UNSUPPORTED_STORAGES:
        table[f"torch.{storage}"] = _Marker("storage", storage, None)
    for name in (*_NP, *_DTYPE_ALIASES, *_UNSUPPORTED_DTYPES):
        table[f"torch.{name}"] = _Marker("dtype", name, _NP.get(_DTYPE_ALIASES.get(name, name)))
    return table


_ALLOWED = _allowed_globals()


class _Policy:
    """What a torch checkpoint's pickle may do; storages go to ``archive.storage``."""

    def __init__(self, archive, placeholders: dict[str, type], size: int):
        self._archive, self._placeholders = archive, placeholders
        # Calls and BUILDs cost the length of the containers they take; a memoized list
        # passed to builtins.set again and again would otherwise cost time quadratic in size.
        self._work, self._budget = 0, WORK_PER_BYTE * size + (1 << 20)
        # numpy dtypes made by this load: private copies, so BUILD never touches numpy's own.
        self._dtypes: dict[int, np.dtype] = {}
        self._numpy = {_NUMPY_DTYPE: _Call(_NUMPY_DTYPE, self._numpy_dtype, is_type=True)}
        self._numpy.update({name: _Call(name, self._numpy_scalar) for name in _NUMPY_SCALARS})

    def _unsafe(self, message: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self._archive.path}: {message}")

    def find_class(self, module: str, name: str):
        # Name the global as Python's own unpickler would resolve it (protocol-2 pickles use
        # Python 2 names: __builtin__.eval, commands.call; _compat_pickle is the stdlib's table
        # for that), but import nothing.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            py3_module, py3_name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            py3_module, py3_name = _compat_pickle.IMPORT_MAPPING.get(module, module), name
        full = f"{py3_module}.{py3_name}"
        for table in (_ALLOWED, self._numpy, self._placeholders):
            if full in table:
                return table[full]
        pickled = f" (pickled as '{module}.{name}')" if full != f"{module}.{name}" else ""
        raise self._unsafe(
            f"refusing to load global {full!r}{pickled}: not on the allow-list of "
            "tensor and container types (nothing was run). If it is harmless metadata, pass it in "
            "placeholder_globals."
        )

    def _spend(self, values) -> None:
        for value in values:
            if type(value) in (list, tuple, dict, set, frozenset):
                self._work += len(value)
                if type(value) is tuple:  # _rebuild_from_type_v2 passes its arguments on
                    self._work += sum(len(v) for v in value if type(v) in (list, tuple, dict))
        if self._work > self._budget:
            raise ValueError(
                f"{self._archive.path}: the pickle asks for more work than its size allows "
                f"({self._work} container items in calls, at most {self._budget}): repeated calls "
                "on large memoized containers"
            )

    def call(self, func, args: tuple, kwargs: dict, opcode: str):
        self._spend(args)
        self._spend(kwargs.values())
        if isinstance(func, type) and issubclass(func, PickledObject):
            return func(*args, **kwargs)
        if isinstance(func, _Call):
            if opcode.startswith("NEWOBJ") and not func.is_type:
                raise self._unsafe(f"refusing {opcode} of {func.name}: not a type")
            return func(*args, **kwargs)
        raise self._unsafe(f"refusing {opcode} of {_short(func)}: not an allowed callable")

    def build(self, obj, state) -> None:
        if isinstance(obj, PickledObject):
            obj.__setstate__(state)
        elif type(obj) is OrderedDict:
            # torch's state dicts carry `_metadata` as an attribute; attributes only, no setattr.
            if not (type(state) is dict and all(type(k) is str for k in state)):
                raise self._unsafe(f"refusing OrderedDict state {_short(state)}: only attributes by name")
            self._spend((state,))
            vars(obj).update(state)
        elif isinstance(obj, np.dtype) and self._dtypes.get(id(obj)) is obj:
            if not _dtype_state_is_plain(state):
                raise self._unsafe(
                    f"refusing numpy dtype state {_short(state)}: only a plain byte order "
                    "(no subarray, fields or names)"
                )
            obj.__setstate__(state)
        else:
            raise self._unsafe(f"refusing to set pickled state on {_short(obj)} ({type(obj).__name__})")

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"):
            raise self._unsafe(f"unsupported persistent id {_short(pid)}; only torch storages are supported")
        storage_type, key, _location, numel = pid[1:5]
        if not (isinstance(storage_type, _Marker) and storage_type.kind == "storage"):
            raise ValueError(f"persistent id names {_short(storage_type)}, not a torch storage type")
        if storage_type.dtype is None:
            raise ValueError(f"storages of type torch.{storage_type.name} are not supported")
        if type(key) is not str:
            raise ValueError(f"storage key must be a string, got {_short(key)}")
        dtype = storage_type.dtype
        nbytes = _int(numel, "storage size") * dtype.itemsize
        return self._archive.storage(key, dtype, nbytes, pid[5] if len(pid) == 6 else None)

    def check_key(self, key) -> None:
        _check_key(key)

    def _numpy_dtype(self, spec, align=False, copy=False):
        if type(align) is not bool or type(copy) is not bool:
            raise ValueError(f"numpy.dtype flags must be bools, got {_short(align)}, {_short(copy)}")
        # A fresh copy: np.dtype("<f8") is numpy's own shared float64, which BUILD must never reach.
        dtype = np.dtype(_plain_dtype(spec), copy=True)
        self._dtypes[id(dtype)] = dtype
        return dtype

    def _numpy_scalar(self, dtype, data=None):
        if not (isinstance(dtype, np.dtype) and self._dtypes.get(id(dtype)) is dtype):
            raise self._unsafe(f"refusing numpy scalar of {_short(dtype)}: not a dtype from this file")
        if type(data) is not bytes:
            raise self._unsafe(f"refusing numpy scalar of dtype {dtype} from {type(data).__name__}")
        # Rebuilt from kind, size and byte order alone: whatever state the dtype was given,
        # the scalar reads exactly itemsize bytes that it owns.
        order = dtype.byteorder if dtype.byteorder in _BYTE_ORDERS else "="
        plain = _plain_dtype(f"{order}{dtype.kind}{dtype.itemsize}")
        if len(data) != plain.itemsize:
            raise ValueError(f"numpy scalar of dtype {plain} needs {plain.itemsize} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=plain, count=1)[0].copy()


def _placeholder_classes(names: Iterable[str]) -> dict[str, type]:
    # Fresh classes per load, so nothing a pickle does to them outlives it.
    return {
        name: type(
            name.rsplit(".", 1)[-1],
            (PickledObject,),
            # The qualname shows in repr: <class 'tf_diffusion.weights.ckpt.PickledObject[pkg.mod.Name]'>.
            {"global_name": name, "__module__": __name__, "__qualname__": f"PickledObject[{name}]"},
        )
        for name in names
    }


# --- containers --------------------------------------------------------------------------------


class _Archive:
    """A checkpoint file open for reading storages through a read-only memory map."""

    def __init__(self, path: str, size: int, fileobj):
        self.path, self.size = path, size
        self.records: dict[str, _Record] = {}
        try:
            self._mmap = mmap.mmap(fileobj.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # a pipe, a device, a file emptied since it was opened
            raise ValueError(f"{path}: cannot memory-map the file: {e}") from None

    expanded = 0

    def expand(self, nbytes: int, size) -> None:
        """Account for a tensor with more elements than its storage (an expanded view)."""
        self.expanded += nbytes
        if self.expanded > self.size + EXPANDED_SLACK:
            raise ValueError(
                f"{self.path}: expanded tensor of size {_short(size)} ({_short(nbytes)} bytes): expanded views "
                f"materialise {_short(self.expanded)} bytes in all, more than the file's {self.size} bytes"
            )

    def view(self, record: _Record):
        end = record.offset + record.nbytes
        # A mapped file cut short makes the next touch of its pages a SIGBUS; check first.
        now = self._mmap.size()
        if now < end:
            raise ValueError(
                f"{self.path}: the file shrank to {now} bytes while loaded; storage {record.key!r} "
                f"needs bytes up to {end}"
            )
        return memoryview(self._mmap)[record.offset : end]

    def _ref(self, record: _Record, dtype: np.dtype, byte_offset: int, nbytes: int) -> _StorageRef:
        if byte_offset + nbytes > record.nbytes:
            raise ValueError(
                f"{self.path}: storage view of {nbytes} bytes at {byte_offset} exceeds storage "
                f"{record.key!r} of {record.nbytes} bytes"
            )
        return _StorageRef(record, dtype, byte_offset, nbytes)


class _ZipArchive(_Archive):
    """torch.save's zip format: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>`` storages.

    zipfile only lists the central directory (read from the memory map, so no
    declared size makes it allocate); entries are read here, with every size
    checked against the file and the deflate ratio first.
    """

    def __init__(self, path: str, size: int, fileobj):
        super().__init__(path, size, fileobj)
        try:
            with zipfile.ZipFile(self._mmap) as zf:
                infos = zf.infolist()
        except Exception as e:  # BadZipFile, OSError, struct and unicode errors from a corrupt directory
            raise ValueError(f"{path}: not a valid zip archive (truncated or corrupt?): {e}") from None
        self.infos = {info.filename: info for info in infos}
        self._check_entries(infos)
        pickles = [name for name in self.infos if name.count("/") == 1 and name.endswith("/data.pkl")]
        if any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in self.infos):
            raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
        if len(pickles) != 1:
            raise ValueError(
                f"{path}: zip archive has {len(pickles)} '<archive>/data.pkl' records, expected one; "
                "not a torch.save checkpoint"
            )
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = self.infos.get(self.prefix + "byteorder")
        if byteorder is not None:
            if byteorder.file_size > 16 or bytes(self.read_entry(byteorder)).strip() != b"little":
                raise ValueError(f"{path}: only little-endian checkpoints are supported")
        self.pickle = bytes(self.read_entry(self.infos[pickles[0]]))

    def _check_entries(self, infos) -> None:
        if len(infos) * _CENTRAL_HEADER > self.size:
            raise ValueError(
                f"{self.path}: zip directory lists {len(infos)} entries, more than the file holds"
            )
        inflated = 0
        for info in infos:
            name = info.filename
            if info.flag_bits & 0x1:
                raise ValueError(f"{self.path}: zip entry {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(
                    f"{self.path}: zip entry {name!r} uses compression method {info.compress_type}; "
                    "only stored (0) and deflated (8) are supported"
                )
            if info.extract_version > _ZIP_MAX_VERSION:
                raise ValueError(
                    f"{self.path}: zip entry {name!r} needs zip version {info.extract_version / 10:.1f}; "
                    f"at most {_ZIP_MAX_VERSION / 10:.1f} is supported"
                )
            if info.header_offset + _LOCAL_HEADER + info.compress_size > self.size:
                raise ValueError(f"{self.path}: zip entry {name!r} lies past the end of the file")
            if info.compress_type == zipfile.ZIP_STORED:
                if info.file_size != info.compress_size:
                    raise ValueError(
                        f"{self.path}: stored zip entry {name!r} declares {info.file_size} bytes "
                        f"but holds {info.compress_size}"
                    )
                continue
            if info.file_size > MAX_DEFLATE_RATIO * info.compress_size + DEFLATE_SLACK:
                raise ValueError(
                    f"{self.path}: deflated zip entry {name!r} declares {info.file_size} bytes from "
                    f"{info.compress_size}: more than {MAX_DEFLATE_RATIO}:1 (MAX_DEFLATE_RATIO); "
                    "refusing a likely decompression bomb"
                )
            inflated += info.file_size
        if inflated > MAX_DEFLATE_RATIO * self.size + DEFLATE_SLACK:
            raise ValueError(
                f"{self.path}: deflated zip entries declare {inflated} bytes in all, more than "
                f"{MAX_DEFLATE_RATIO} times the file's {self.size} bytes; refusing a likely decompression bomb"
            )

    def _data_offset(self, info) -> int:
        # The data follows the local header, whose extra field (torch's alignment padding)
        # may differ from the central directory's: read its lengths from the file.
        head = info.header_offset
        if head + _LOCAL_HEADER > self.size or self._mmap[head : head + 4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt local header for zip entry {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", self._mmap[head + 26 : head + 30])
        start = head + _LOCAL_HEADER + name_len + extra_len
        if start + info.compress_size > self.size:
            raise ValueError(
                f"{self.path}: truncated: zip entry {info.filename!r} runs past the end of the file"
            )
        return start

    def read_entry(self, info):
        """A whole entry's bytes, CRC-checked (a memoryview of the map, or an inflated bytearray)."""
        start = self._data_offset(info)
        if info.compress_type == zipfile.ZIP_STORED:
            data = memoryview(self._mmap)[start : start + info.file_size]
        else:
            data = self._inflate(info, start)
        if zlib.crc32(data) != info.CRC:
            raise ValueError(f"{self.path}: zip entry {info.filename!r} is corrupt (bad CRC-32)")
        return data

    def inflate(self, info):
        return self.read_entry(info)

    def _inflate(self, info, start: int) -> bytearray:
        # Inflate into a buffer of the declared size, never past it, a chunk at a time.
        out = bytearray(info.file_size)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        source = memoryview(self._mmap)[start : start + info.compress_size]
        filled, fed = 0, 0
        try:
            while True:
                chunk = inflater.unconsumed_tail
                if not chunk:
                    if fed >= len(source) or inflater.eof:
                        break
                    chunk, fed = source[fed : fed + _INFLATE_CHUNK], fed + _INFLATE_CHUNK
                piece = inflater.decompress(chunk, min(_INFLATE_CHUNK, info.file_size - filled + 1))
                if filled + len(piece) > info.file_size:
                    raise ValueError("inflates past its declared size")
                out[filled : filled + len(piece)] = piece
                filled += len(piece)
                if inflater.eof:
                    break
        except zlib.error as e:
            raise ValueError(f"{self.path}: zip entry {info.filename!r} is corrupt (deflate: {e})") from None
        except ValueError as e:
            raise ValueError(f"{self.path}: zip entry {info.filename!r} {e}") from None
        finally:
            source.release()
        if not inflater.eof or filled != info.file_size:
            raise ValueError(
                f"{self.path}: zip entry {info.filename!r} is corrupt: inflated {filled} of "
                f"{info.file_size} declared bytes"
            )
        return out

    def storage(self, key: str, dtype: np.dtype, nbytes: int, view) -> _StorageRef:
        if view is not None:
            raise ValueError(f"{self.path}: storage views are not used by the zip format; got {_short(view)}")
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = self._locate(key, nbytes)
        return self._ref(record, dtype, 0, nbytes)

    def _locate(self, key: str, nbytes: int) -> _Record:
        name = f"{self.prefix}data/{key}"
        info = self.infos.get(name)
        if info is None:
            raise ValueError(f"{self.path}: storage record {name!r} is missing")
        if info.file_size != nbytes:
            raise ValueError(
                f"{self.path}: storage record {name!r} holds {info.file_size} bytes, expected {nbytes}"
            )
        record = _Record(self, key, nbytes)
        if info.compress_type != zipfile.ZIP_STORED:
            record.info = info
        else:
            record.offset = self._data_offset(info)
        return record


class _LegacyArchive(_Archive):
    """torch.save(..., _use_new_zipfile_serialization=False): pickles then raw storages."""

    def __init__(self, path: str, size: int, fileobj):
        super().__init__(path, size, fileobj)
        self._dtypes: dict[str, np.dtype] = {}

    def storage(self, key: str, dtype: np.dtype, nbytes: int, view) -> _StorageRef:
        record = self.records.get(key)
        if record is None:
            if nbytes > self.size:
                raise ValueError(f"{self.path}: storage {key!r} of {nbytes} bytes is larger than the file")
            record = self.records[key] = _Record(self, key, nbytes)
            self._dtypes[key] = dtype  # the first reference's dtype is the one torch wrote it with
        if view is None:
            return self._ref(record, dtype, 0, nbytes)
        # Old torch storage views: (view_key, offset, size) in elements.
        if not (type(view) is tuple and len(view) == 3):
            raise ValueError(f"{self.path}: bad storage view {_short(view)}")
        _, offset, count = view
        return self._ref(
            record,
            dtype,
            _int(offset, "view offset") * dtype.itemsize,
            _int(count, "view size") * dtype.itemsize,
        )

    def locate(self, keys, position: int) -> None:
        """Find each storage after the pickles: an int64 element count, then the bytes."""
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise ValueError(f"{self.path}: bad storage key list")
        for key in keys:
            record = self.records.get(key)
            if record is None:
                raise ValueError(f"{self.path}: storage {key!r} is listed but never used")
            if record.offset is not None:
                raise ValueError(f"{self.path}: storage {key!r} is listed twice")
            if position + 8 > self.size:
                raise ValueError(f"{self.path}: truncated before storage {key!r}")
            numel = int.from_bytes(self._mmap[position : position + 8], "little")
            nbytes = numel * self._dtypes[key].itemsize
            if nbytes != record.nbytes:
                raise ValueError(
                    f"{self.path}: storage {key!r} holds {nbytes} bytes, expected {record.nbytes}"
                )
            record.offset = position + 8
            position = record.offset + nbytes
            if position > self.size:
                raise ValueError(f"{self.path}: truncated: storage {key!r} runs past the end of the file")
        missing = set(self.records) - set(keys)
        if missing:
            raise ValueError(f"{self.path}: storages {sorted(missing)[:8]} are used but not stored")

    def unpickle(self, policy: _Policy, what: str):
        """The next pickle in the file, read from the memory map (reads never exceed the file)."""
        return _unpickle(self._mmap, self.size, self, policy, what)


def _unpickle(data, size: int, archive: _Archive, policy: _Policy, what: str):
    try:
        return unpickle(data, policy, size=size, passthrough=(UnsafeCheckpointError,))
    except UnsafeCheckpointError as e:
        if str(e).startswith(f"{archive.path}: "):
            raise
        raise UnsafeCheckpointError(f"{archive.path}: {what}: {e} (nothing was run)") from None
    except PickleRefused as e:
        raise UnsafeCheckpointError(f"{archive.path}: refusing {what}: {e} (nothing was run)") from None
    except Exception as e:  # ValueError from the interpreter; anything else is a bug reported with the path
        # The archive's own errors inside already name the file: name it once.
        message = str(e).replace(f"{archive.path}: ", "")
        raise ValueError(f"{archive.path}: cannot read {what}: {message}") from None


def load_ckpt(path: str | os.PathLike, *, placeholder_globals: Iterable[str] = ()) -> Any:
    """Load a ``torch.save`` checkpoint safely and lazily, without torch.

    Args:
        path: a ``.ckpt``, ``.pt`` or ``.bin`` file written by ``torch.save``
            (zip format, or the legacy format of ``_use_new_zipfile_serialization=False``).
        placeholder_globals: extra ``module.name`` globals to load as inert
            ``PickledObject`` placeholders (their code is never imported or run),
            for harmless metadata classes beyond Lightning's ModelCheckpoint.

    Returns:
        The saved object, nested as saved (e.g. ``{"state_dict": {...},
        "global_step": 123}``), with every tensor a ``LazyTensor``: ``.shape``
        and ``.dtype`` at once, values on ``np.asarray``. The file stays
        memory-mapped while any of its tensors is alive.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle names a global outside the
            allow-list (e.g. ``posix.system``), uses an opcode or state that is
            never allowed, or a dict key that could be crafted to collide;
            nothing was executed.
        ValueError: a truncated or corrupt file (bad CRC, corrupt deflate,
            unsupported zip features), sizes beyond what the file holds, a
            missing ``data.pkl`` or storage, an unsupported dtype, or a file
            that is not a torch checkpoint; the message names the file.

    Example:
        >>> ckpt = load_ckpt("v1-5-pruned-emaonly.ckpt")
        >>> unet = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.diffusion_model.")}
    """
    path = os.fspath(path)
    if isinstance(placeholder_globals, str):
        raise ValueError(
            f"placeholder_globals must be a list of 'module.name' strings, got {placeholder_globals!r}"
        )
    placeholders = _placeholder_classes((*DEFAULT_PLACEHOLDERS, *placeholder_globals))
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot open: {e.strerror or e}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(512)
        except OSError as e:  # a directory, a device that refuses reads
            raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
        if head.startswith(b"PK\x03\x04"):
            archive = _ZipArchive(path, size, f)
            data = archive.pickle
            policy = _Policy(archive, placeholders, len(data))
            return _unpickle(io.BytesIO(data), len(data), archive, policy, f"{archive.prefix}data.pkl")
        if head[:1] == b"\x80":
            return _load_legacy(_LegacyArchive(path, size, f), placeholders)
        if head[257:262] == b"ustar":
            raise ValueError(f"{path}: tar-format checkpoints (torch < 0.4) are not supported")
        if not head:
            raise ValueError(f"{path}: empty file, not a torch checkpoint")
        raise ValueError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")


def _load_legacy(archive: _LegacyArchive, placeholders: dict[str, type]):
    policy = _Policy(archive, placeholders, archive.size)
    magic = archive.unpickle(policy, "the magic number")
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise ValueError(f"{archive.path}: a pickle, but not a torch checkpoint (no torch magic number)")
    version = archive.unpickle(policy, "the protocol version")
    if type(version) is not int or version != LEGACY_PROTOCOL:
        raise ValueError(f"{archive.path}: unsupported legacy protocol version")
    sys_info = archive.unpickle(policy, "the system info")
    if isinstance(sys_info, dict) and sys_info.get("little_endian", True) is not True:
        raise ValueError(f"{archive.path}: only little-endian checkpoints are supported")
    result = archive.unpickle(policy, "the data pickle")
    keys = archive.unpickle(policy, "the storage keys")
    archive.locate(keys, archive._mmap.tell())
    return result
