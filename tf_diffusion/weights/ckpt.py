"""Read ``torch.save`` checkpoints (``.ckpt``, ``.pt``, ``.bin``) without torch and without running them.

A torch checkpoint is a pickle, and a pickle can call any importable function.
This reader never imports anything a file names: a restricted unpickler maps
an allow-list of global names to our own safe stand-ins and refuses every
other one with ``UnsafeCheckpointError`` before anything runs.

Allowed globals (all that stock ``torch.save`` and SD 1.x/2.x checkpoints use):

- tensor rebuilders: ``torch._utils._rebuild_tensor_v2`` / ``_v3``,
  ``_rebuild_parameter`` / ``_with_state``, ``torch._tensor._rebuild_from_type_v2``
  for plain ``torch.Tensor`` / ``torch.nn.parameter.Parameter``;
- storage types (``torch.FloatStorage`` ... ``torch.UntypedStorage``, also
  ``torch.cuda.*``) and dtypes (``torch.float16`` ...), as inert markers;
- containers and scalars: ``collections.OrderedDict``, ``builtins.set`` /
  ``frozenset`` / ``complex`` / ``slice``, ``torch.Size`` (read as a tuple);
- numpy scalars as Lightning stores them: ``numpy.core.multiarray.scalar``
  (also ``numpy._core``), ``numpy.dtype``, ``_codecs.encode``, rebuilt by our
  own checked functions (no object dtypes);
- placeholders: Lightning's ``ModelCheckpoint`` callback (found under
  ``"callbacks"`` in SD 1.x checkpoints) loads as an inert ``PickledObject``
  that records its arguments and state; nothing of Lightning is imported.
  Callers may name more placeholder globals.

Two container formats: the zip format (``<archive>/data.pkl`` plus one
``<archive>/data/<key>`` record per storage; torch >= 1.6) and the legacy
format (consecutive pickles followed by raw storages). Tensors are lazy: a
storage is read from the (memory-mapped) file only when a tensor is converted.
Only little-endian checkpoints are supported.
"""

from __future__ import annotations

import _compat_pickle
import io
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

from tf_diffusion.weights.lazy import BFLOAT16, LazyTensor

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Lightning callbacks keyed by class in old checkpoints' "callbacks" dict; never imported.
DEFAULT_PLACEHOLDERS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle names a global outside the allow-list; nothing was run."""


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
}
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
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
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

    # Slots and a refusing __setstate__: a pickle's BUILD cannot alter these shared objects.
    __slots__ = ("kind", "name", "dtype")

    def __init__(self, kind: str, name: str, dtype: np.dtype | None = None):
        self.kind, self.name, self.dtype = kind, name, dtype

    def __setstate__(self, state):
        raise TypeError(f"cannot set state on {self!r}")

    def __repr__(self) -> str:
        return f"torch.{self.name}" if self.kind != "class" else self.name


class _Call:
    """An allowed callable, wrapped so a pickle cannot set attributes on our functions."""

    __slots__ = ("name", "func")

    def __init__(self, name: str, func):
        self.name, self.func = name, func

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def __setstate__(self, state):
        raise TypeError(f"cannot set state on {self.name}")

    def __repr__(self) -> str:
        return self.name


# --- storages and tensors --------------------------------------------------------------------


class _Record:
    """Where one storage's bytes live in the file (offset known once the archive is parsed)."""

    __slots__ = ("source", "key", "nbytes", "offset", "member")

    def __init__(self, source, key: str, nbytes: int):
        self.source, self.key, self.nbytes = source, key, nbytes
        self.offset = None  # absolute file offset of an uncompressed storage
        self.member = None  # zip member name of a compressed one

    def read(self):
        return self.source.read(self)


class _StorageRef:
    """A storage as the pickle refers to it: a record viewed as one dtype, maybe from a byte offset."""

    __slots__ = ("record", "dtype", "byte_offset", "nbytes")

    def __init__(self, record: _Record, dtype: np.dtype, byte_offset: int, nbytes: int):
        self.record, self.dtype, self.byte_offset, self.nbytes = record, dtype, byte_offset, nbytes

    def __setstate__(self, state):
        raise TypeError("cannot set state on a storage")


def _int(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"{what} must be a tuple of non-negative ints, got {values!r}")
    return tuple(values)


def _make_tensor(storage, offset, size, stride, dtype: np.dtype, metadata) -> LazyTensor:
    """A LazyTensor viewing ``storage`` like torch's as_strided(size, stride, offset)."""
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor storage must come from the checkpoint's storages, got {storage!r}")
    offset = _int(offset, "storage offset")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if len(size) != len(stride):
        raise ValueError(f"bad tensor layout: offset {offset}, size {size}, stride {stride}")
    available = storage.nbytes // dtype.itemsize
    count = int(np.prod(size, dtype=object))
    needed = 0 if count == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if needed > available:
        raise ValueError(
            f"tensor of size {size}, stride {stride} at offset {offset} needs {needed} elements, "
            f"its storage {storage.record.key!r} holds {available}"
        )
    flags = dict(metadata or {})
    negate, conjugate = bool(flags.pop("neg", False)), bool(flags.pop("conj", False))
    native = dtype.newbyteorder("=")

    def read() -> np.ndarray:
        if count == 0:
            return np.zeros(size, native)
        raw = storage.record.read()
        flat = np.frombuffer(raw, dtype=dtype, count=available, offset=storage.byte_offset)
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride], writeable=False
        )
        array = np.array(view, dtype=native, order="C", copy=True)
        if negate:
            array = np.negative(array)
        if conjugate:
            array = np.conj(array)
        return array

    return LazyTensor(size, native, read, f"{storage.record.source.path}:storage {storage.record.key}")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor storage must come from the checkpoint's storages, got {storage!r}")
    return _make_tensor(storage, offset, size, stride, storage.dtype, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not (isinstance(dtype, _Marker) and dtype.kind == "dtype"):
        raise ValueError(f"tensor dtype must be a torch dtype, got {dtype!r}")
    if dtype.dtype is None:
        raise ValueError(f"tensors of dtype torch.{dtype.name} are not supported (no numpy type)")
    return _make_tensor(storage, offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    # A Parameter is its data here; requires_grad and hooks mean nothing without torch.
    if not isinstance(data, LazyTensor):
        raise ValueError(f"a Parameter must wrap a tensor, got {data!r}")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    allowed = {"torch.Tensor", "torch.nn.parameter.Parameter"}
    if not (isinstance(new_type, _Marker) and new_type.name in allowed):
        raise UnsafeCheckpointError(f"refusing to rebuild a tensor as {new_type!r}; only {sorted(allowed)}")
    if not isinstance(func, _Call) or not isinstance(args, tuple):
        raise ValueError(f"bad tensor rebuild call {func!r}{args!r}")
    return func(*args)


# --- harmless non-torch globals ----------------------------------------------------------------


def _numpy_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise ValueError(f"numpy.dtype from a pickle must be given a string, got {spec!r}")
    dtype = np.dtype(spec)
    if dtype.hasobject:
        raise UnsafeCheckpointError(f"refusing numpy object dtype {spec!r}")
    return dtype


def _numpy_scalar(dtype, data=None):
    # Plain numbers only: a dtype's pickled state (BUILD) may claim fields, but not change its kind.
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise UnsafeCheckpointError(f"refusing numpy scalar of dtype {dtype!r} from {type(data).__name__}")
    if len(data) != dtype.itemsize:
        raise ValueError(f"numpy scalar of dtype {dtype} needs {dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding, errors)


def _torch_size(dims=()):
    return _ints(tuple(dims), "torch.Size")


_CALLS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _torch_size,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "_codecs.encode": _codecs_encode,
}
# Built-in types: a pickle cannot set attributes on them, so they need no wrapper.
_TYPES = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.slice": slice,
}


def _allowed_globals() -> dict[str, Any]:
    table: dict[str, Any] = dict(_TYPES)
    table.update({name: _Call(name, func) for name, func in _CALLS.items()})
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


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages go to ``archive.storage``."""

    def __init__(self, file, archive, placeholders: dict[str, type]):
        super().__init__(file, encoding="utf-8")
        self._archive, self._placeholders = archive, placeholders

    def find_class(self, module: str, name: str):
        # Name the global as Python's own unpickler would resolve it (protocol-2 pickles use
        # Python 2 names: __builtin__.eval, commands.call; _compat_pickle is the stdlib's table
        # for that), but import nothing.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            py3_module, py3_name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            py3_module, py3_name = _compat_pickle.IMPORT_MAPPING.get(module, module), name
        full = f"{py3_module}.{py3_name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if full in self._placeholders:
            return self._placeholders[full]
        pickled = f" (pickled as '{module}.{name}')" if full != f"{module}.{name}" else ""
        raise UnsafeCheckpointError(
            f"{self._archive.path}: refusing to load global {full!r}{pickled}: not on the allow-list of "
            "tensor and container types (nothing was run). If it is harmless metadata, pass it in "
            "placeholder_globals."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) in (5, 6)):
            raise ValueError(f"unsupported persistent id {pid!r}; only torch storages are supported")
        storage_type, key, _location, numel = pid[1:5]
        if not (isinstance(storage_type, _Marker) and storage_type.kind == "storage"):
            raise ValueError(f"persistent id names {storage_type!r}, not a torch storage type")
        if storage_type.dtype is None:
            raise ValueError(f"storages of type torch.{storage_type.name} are not supported")
        if not isinstance(key, str):
            raise ValueError(f"storage key must be a string, got {key!r}")
        dtype = storage_type.dtype
        nbytes = _int(numel, "storage size") * dtype.itemsize
        return self._archive.storage(key, dtype, nbytes, pid[5] if len(pid) == 6 else None)


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
        self._mmap = mmap.mmap(fileobj.fileno(), 0, access=mmap.ACCESS_READ)

    def read(self, record: _Record):
        if record.member is not None:
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(record.member)
        return memoryview(self._mmap)[record.offset : record.offset + record.nbytes]

    def _ref(self, record: _Record, dtype: np.dtype, byte_offset: int, nbytes: int) -> _StorageRef:
        if byte_offset + nbytes > record.nbytes:
            raise ValueError(
                f"{self.path}: storage view of {nbytes} bytes at {byte_offset} exceeds storage "
                f"{record.key!r} of {record.nbytes} bytes"
            )
        return _StorageRef(record, dtype, byte_offset, nbytes)


class _ZipArchive(_Archive):
    """torch.save's zip format: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>`` storages."""

    def __init__(self, path: str, size: int, fileobj):
        super().__init__(path, size, fileobj)
        try:
            zf = zipfile.ZipFile(fileobj)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a valid zip archive (truncated or corrupt?): {e}") from None
        with zf:
            self.infos = {info.filename: info for info in zf.infolist()}
            pickles = [name for name in self.infos if name.count("/") == 1 and name.endswith("/data.pkl")]
            if any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in self.infos):
                raise ValueError(
                    f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint"
                )
            if len(pickles) != 1:
                raise ValueError(
                    f"{path}: zip archive has {len(pickles)} '<archive>/data.pkl' records, expected one; "
                    "not a torch.save checkpoint"
                )
            self.prefix = pickles[0][: -len("data.pkl")]
            byteorder = self.infos.get(self.prefix + "byteorder")
            if byteorder is not None and zf.read(byteorder).strip() != b"little":
                raise ValueError(f"{path}: only little-endian checkpoints are supported")
            try:
                self.pickle = zf.read(pickles[0])
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
                raise ValueError(f"{path}: cannot read {pickles[0]}: {e}") from None

    def storage(self, key: str, dtype: np.dtype, nbytes: int, view) -> _StorageRef:
        if view is not None:
            raise ValueError(f"{self.path}: storage views are not used by the zip format; got {view!r}")
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
            record.member = name
            return record
        # The data follows the local header, whose extra field (torch's alignment padding)
        # may differ from the central directory's: read its lengths from the file.
        head = info.header_offset
        if head + 30 > self.size or self._mmap[head : head + 4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt local header for {name!r}")
        name_len, extra_len = struct.unpack("<HH", self._mmap[head + 26 : head + 30])
        record.offset = head + 30 + name_len + extra_len
        if record.offset + nbytes > self.size:
            raise ValueError(f"{self.path}: truncated: storage {name!r} runs past the end of the file")
        return record


class _LegacyArchive(_Archive):
    """torch.save(..., _use_new_zipfile_serialization=False): pickles then raw storages."""

    def __init__(self, path: str, size: int, fileobj):
        super().__init__(path, size, fileobj)
        self._dtypes: dict[str, np.dtype] = {}

    def storage(self, key: str, dtype: np.dtype, nbytes: int, view) -> _StorageRef:
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = _Record(self, key, nbytes)
            self._dtypes[key] = dtype  # the first reference's dtype is the one torch wrote it with
        if view is None:
            return self._ref(record, dtype, 0, nbytes)
        # Old torch storage views: (view_key, offset, size) in elements.
        if not (isinstance(view, tuple) and len(view) == 3):
            raise ValueError(f"{self.path}: bad storage view {view!r}")
        _, offset, count = view
        return self._ref(
            record,
            dtype,
            _int(offset, "view offset") * dtype.itemsize,
            _int(count, "view size") * dtype.itemsize,
        )

    def locate(self, keys, position: int) -> None:
        """Find each storage after the pickles: an int64 element count, then the bytes."""
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{self.path}: bad storage key list")
        for key in keys:
            record = self.records.get(key)
            if record is None:
                raise ValueError(f"{self.path}: storage {key!r} is listed but never used")
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
            raise ValueError(f"{self.path}: storages {sorted(missing)} are used but not stored")


def _unpickle(data, archive: _Archive, placeholders: dict[str, type], what: str):
    try:
        return _Unpickler(data, archive, placeholders).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a corrupt pickle raises almost anything; report it as bad data
        raise ValueError(f"{archive.path}: cannot read {what}: {type(e).__name__}: {e}") from e


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
            allow-list (e.g. ``posix.system``); nothing was executed.
        ValueError: a truncated or corrupt file, a missing ``data.pkl`` or
            storage, an unsupported dtype, or a file that is not a torch checkpoint.

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
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(512)
        if head.startswith(b"PK\x03\x04"):
            archive = _ZipArchive(path, size, f)
            return _unpickle(io.BytesIO(archive.pickle), archive, placeholders, f"{archive.prefix}data.pkl")
        if head[:1] == b"\x80":
            return _load_legacy(_LegacyArchive(path, size, f), f, placeholders)
        if head[257:262] == b"ustar":
            raise ValueError(f"{path}: tar-format checkpoints (torch < 0.4) are not supported")
        if not head:
            raise ValueError(f"{path}: empty file, not a torch checkpoint")
        raise ValueError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")


def _load_legacy(archive: _LegacyArchive, f, placeholders: dict[str, type]):
    f.seek(0)
    magic = _unpickle(f, archive, placeholders, "the magic number")
    if magic != LEGACY_MAGIC:
        raise ValueError(f"{archive.path}: a pickle, but not a torch checkpoint (no torch magic number)")
    if _unpickle(f, archive, placeholders, "the protocol version") != LEGACY_PROTOCOL:
        raise ValueError(f"{archive.path}: unsupported legacy protocol version")
    sys_info = _unpickle(f, archive, placeholders, "the system info")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError(f"{archive.path}: only little-endian checkpoints are supported")
    result = _unpickle(f, archive, placeholders, "the data pickle")
    keys = _unpickle(f, archive, placeholders, "the storage keys")
    archive.locate(keys, f.tell())
    return result
