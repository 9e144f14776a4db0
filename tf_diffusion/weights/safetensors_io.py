"""Read and write the safetensors format with numpy alone.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {str: str}}``, then the raw little-endian tensor bytes, with
offsets relative to the end of the header. The tensors tile the data region
exactly (no gaps, no overlaps), as the reference library requires.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np

from tf_diffusion.fileio import clean_stale, open_regular, publish, sync_folder, temp_prefix
from tf_diffusion.weights.lazy import BFLOAT16, FLOAT8, LazyTensor

# Little-endian on disk whatever the host; bfloat16 and 1-byte types have no byte order in numpy.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BFLOAT16,
    "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    # 8-bit floats (ml_dtypes' types; the format's E4M3 is torch's float8_e4m3fn, with no infinities)
    "F8_E4M3": FLOAT8["float8_e4m3fn"],
    "F8_E4M3FNUZ": FLOAT8["float8_e4m3fnuz"],
    "F8_E5M2": FLOAT8["float8_e5m2"],
    "F8_E5M2FNUZ": FLOAT8["float8_e5m2fnuz"],
    "F8_E8M0": FLOAT8["float8_e8m0fnu"],
}
# Known to the format but with no numpy type we load.
UNSUPPORTED_DTYPES = (
    "F6_E2M3",
    "F6_E3M2",
    "F4",
)
# The reference writer orders tensors by this rank (largest first), then by name,
# which keeps every tensor aligned to its item size; we write the same order.
_RANK = ["BOOL", "U8", "I8", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
# The reference reader refuses larger headers.
MAX_HEADER_BYTES = 100_000_000


def _code_of(dtype: np.dtype) -> str | None:
    """The safetensors code of a numpy dtype, in either byte order; None if it has none."""
    little = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for code, known in DTYPES.items():
        if little == known:
            return code
    return None


class SafetensorsFile(Mapping):
    """A safetensors file opened for lazy reading; a read-only mapping name -> LazyTensor.

    The file is memory-mapped; a tensor's bytes are copied out only when it is
    converted with ``np.asarray``. Use as a context manager, or call ``close``;
    tensors cannot be read after closing.

    Attributes:
        path: the file's path.
        metadata: the ``__metadata__`` dict (str -> str); empty when the file has none.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mmap = None
        self._closed = False
        # FileNotFoundError / IsADirectoryError name the path themselves.
        with open_regular(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError(
                    f"{self.path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length"
                )
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                raise ValueError(
                    f"{self.path}: header length {header_len} runs past the end of the file ({size} bytes); "
                    "truncated or not a safetensors file"
                )
            if header_len > MAX_HEADER_BYTES:
                raise ValueError(f"{self.path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(header_len)
            if len(raw) != header_len:
                raise ValueError(f"{self.path}: the file shrank while its header was read")
            self.metadata, entries = _parse_header(raw, self.path)
            self._data_start = 8 + header_len
            data_len = size - self._data_start
            _check_layout(entries, data_len, self.path)
            if data_len:
                try:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:
                    raise ValueError(f"{self.path}: cannot map the file for reading: {e}") from None
                if len(self._mmap) != size:
                    self.close()
                    raise ValueError(f"{self.path}: the file changed size while it was opened")
        self._tensors = {
            name: LazyTensor(shape, dtype, self._reader(name, shape, dtype, begin), f"{self.path}:{name}")
            for name, (dtype, shape, begin, _) in entries.items()
        }

    def _reader(self, name, shape, dtype, begin):
        def read() -> np.ndarray:
            if self._closed:
                raise ValueError(f"{self.path}: file is closed; cannot read tensor {name!r}")
            count = int(np.prod(shape, dtype=np.int64))
            if count == 0:
                return np.zeros(shape, dtype.newbyteorder("="))
            flat = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_start + begin)
            # astype to the native order copies, so the array does not pin the mapping.
            array = flat.reshape(shape).astype(dtype.newbyteorder("="), copy=True)
            del flat
            self._release(self._data_start + begin, count * dtype.itemsize)
            return array

        return read

    def _release(self, start: int, length: int) -> None:
        # The bytes were copied out: drop their pages from this process's resident memory (they
        # stay in the page cache), so reading a whole checkpoint costs one tensor, not the file.
        if hasattr(mmap, "MADV_DONTNEED"):
            first = start // mmap.PAGESIZE * mmap.PAGESIZE
            self._mmap.madvise(mmap.MADV_DONTNEED, first, start + length - first)

    def __getitem__(self, name: str) -> LazyTensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        """Unmap the file; later reads raise ValueError."""
        self._closed = True
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


# A valid header nests three levels ({name: {"shape": [...]}}); anything deeper is refused before
# json parses it, so a hostile header cannot drive the parser's recursion.
MAX_DEPTH = 3
# Offsets and shape entries are u64 in the format: at most 20 digits. Longer numbers are refused
# before Python converts them (a 5,000-digit int is slow and hits the int-conversion limit).
_MAX_DIGITS = 20
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN = b"[{"
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


class _HeaderError(Exception):
    """Raised inside json's hooks; turned into a ValueError naming the file."""


def _check_text(text: str, what: str) -> str:
    # json decodes \ud800 escapes into lone surrogates, which are not Unicode text; the format's
    # reader refuses them, and they could not be written back as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _HeaderError(f"{what} {text!r} is not valid Unicode (a lone surrogate escape)") from None
    return text


def _object(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        _check_text(key, "name")
        if key in out:
            raise _HeaderError(f"name {key!r} appears twice in one object")
        if isinstance(value, str):
            _check_text(value, f"the value of {key!r}")
        out[key] = value
    return out


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise _HeaderError(
            f"a {len(text)}-digit number; offsets and shapes have at most {_MAX_DIGITS} digits"
        )
    return int(text)


def _not_allowed(text: str):
    raise _HeaderError(f"number {text[:40]!r} is not allowed: offsets and shapes are non-negative integers")


def _depth(raw: bytes) -> int:
    """How deep the JSON nests, counted outside strings, in bounded memory for any size."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    deepest, level, chunk = 0, 0, 1 << 20
    for start in range(0, len(brackets), chunk):
        part = np.frombuffer(brackets, np.uint8, count=min(chunk, len(brackets) - start), offset=start)
        step = np.where((part == _OPEN[0]) | (part == _OPEN[1]), 1, -1).astype(np.int32)
        levels = np.cumsum(step, dtype=np.int64) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _parse_header(raw: bytes, path: str):
    """Decode and check the JSON header -> (metadata, {name: (dtype, shape, begin, end)})."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    depth = _depth(raw)
    if depth > MAX_DEPTH:
        raise ValueError(
            f"{path}: header nests {depth} levels deep; a safetensors header has at most {MAX_DEPTH}"
        )
    try:
        header = json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=_integer,
            parse_float=_not_allowed,
            parse_constant=_not_allowed,
        )
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    except _HeaderError as e:
        raise ValueError(f"{path}: bad header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    # null is what the reference writer's Option<map> reads as "no metadata"; [], 0 or false are not maps.
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(
            f"{path}: __metadata__ must be an object of string keys and string values, got {_brief(metadata)}"
        )
    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(
                f"{where}: entry must be an object with dtype, shape and data_offsets, got {_brief(info)}"
            )
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str):
            raise ValueError(f"{where}: dtype must be a string such as 'F32', got {_brief(code)}")
        if code in UNSUPPORTED_DTYPES:
            raise ValueError(
                f"{where}: dtype {code} is not supported (no numpy type); supported: {', '.join(DTYPES)}"
            )
        if code not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {code[:40]!r}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative ints, got {_brief(shape)}")
        if (
            not (
                isinstance(offsets, list)
                and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets)
            )
            or offsets[0] > offsets[1]
        ):
            raise ValueError(
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_brief(offsets)}"
            )
        dtype = DTYPES[code]
        span = offsets[1] - offsets[0]
        extent = _extent(shape, dtype.itemsize)
        if extent > _MAX_EXTENT:
            raise ValueError(
                f"{where}: shape {_brief(shape)} of {code} is larger than any array can be "
                f"({'more than 2**64' if extent > _U64 else extent} bytes)"
            )
        nbytes = 0 if 0 in shape else extent
        if span != nbytes:
            raise ValueError(
                f"{where}: data_offsets {offsets} span {span} bytes, "
                f"but shape {_brief(shape)} of {code} needs {nbytes}"
            )
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    return metadata, entries


_U64 = 1 << 64
# numpy refuses arrays whose non-zero dimensions multiply past this many bytes, even empty ones.
_MAX_EXTENT = 2**63 - 1


def _extent(shape: list[int], itemsize: int) -> int:
    """Bytes of ``shape`` with its zero dimensions left out; stops past 2**64, so no huge ints."""
    total = itemsize
    for d in shape:
        total *= d or 1
        if total > _U64:
            return total
    return total


def _brief(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_layout(entries, data_len: int, path: str) -> None:
    """The tensors must tile [0, data_len) exactly: no overlap, no gap, nothing missing."""
    end, last = 0, None
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < end:
            raise ValueError(f"{path}: tensor {name!r} (bytes {begin}..{stop}) overlaps tensor {last!r}")
        if begin > end:
            raise ValueError(
                f"{path}: {begin - end} unused bytes before tensor {name!r} at data offset {end}"
            )
        end, last = stop, name
    if end > data_len:
        raise ValueError(
            f"{path}: truncated: the header needs {end} bytes of tensor data, the file has {data_len}"
        )
    if end < data_len:
        raise ValueError(
            f"{path}: {data_len - end} bytes after the last tensor that no header entry describes"
        )


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Open a safetensors file for lazy reading.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        A read-only mapping from tensor name to ``LazyTensor`` (``.shape`` and
        ``.dtype`` need no data; ``np.asarray`` reads it), with ``.metadata``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not valid safetensors (short, truncated, bad
            header, overlapping or inconsistent offsets, unknown dtype); the
            message names the file and the problem.

    Example:
        >>> with open_safetensors("model.safetensors") as f:
        ...     w = np.asarray(f["model.diffusion_model.out.2.weight"])
    """
    return SafetensorsFile(path)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into memory (see ``open_safetensors``)."""
    with open_safetensors(path) as f:
        return {name: np.asarray(t) for name, t in f.items()}


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write tensors as a safetensors file, atomically.

    The file is written to a hidden temporary file in the same folder, fsynced and
    moved into place, so a failure or a kill leaves no partial file at ``path``;
    the next write of ``path`` removes a killed writer's temporary file. An existing
    ``path`` (a symlink included, which is never followed) is replaced only with ``overwrite``.
    Tensors are laid out as the reference writer does (by dtype size, then name).

    Args:
        tensors: name -> array (anything ``np.asarray`` accepts; bfloat16 as
            ``ml_dtypes.bfloat16``). ``LazyTensor`` values are read one at a time while writing.
        path: destination file.
        metadata: optional str -> str pairs stored as ``__metadata__``.
        overwrite: replace an existing file; otherwise an existing path is an error.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a name is not a non-empty string or is ``__metadata__``, a
            dtype cannot be stored, or metadata is not str -> str.
    """
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(
                f"tensor name {name!r} is not allowed: names are non-empty strings other than __metadata__"
            )
        # A LazyTensor is read only when its bytes are written, so large files stream tensor by tensor.
        array = value if isinstance(value, LazyTensor) else np.asarray(value)
        code = _code_of(array.dtype)
        if code is None:
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here; "
                f"allowed: {', '.join(str(d) for d in DTYPES.values())}"
            )
        # asarray, not ascontiguousarray, which would turn 0-d arrays into 1-d.
        if not isinstance(array, LazyTensor):
            array = np.asarray(array, dtype=DTYPES[code], order="C")
        arrays[name] = (code, array)
    if metadata is not None and not (
        isinstance(metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ValueError(f"metadata must map strings to strings, got {metadata!r}")

    order = sorted(arrays, key=lambda n: (-_RANK.index(arrays[n][0]), n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        code, array = arrays[name]
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data starts 8-byte aligned, as the reference does

    folder = os.path.dirname(os.path.abspath(path))
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in order:
                code, array = arrays[name]
                f.write(np.asarray(array, dtype=DTYPES[code], order="C").reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, overwrite)
        sync_folder(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
