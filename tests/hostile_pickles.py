"""Write pickles opcode by opcode, and wrap them in torch.save's zip and legacy layouts (no torch needed).

Hostile checkpoints name globals that need not be importable here (``idlelib``,
``torch``), so they cannot come from ``pickle.dumps``; ``dumps`` below writes
the opcodes a pickler of the given protocol would write for these values:

- ``G(module, name)``: a global (GLOBAL, or STACK_GLOBAL from protocol 4);
- ``Call(func, *args)``: ``func(*args)`` (REDUCE); ``New(cls, *args)``: NEWOBJ;
- ``Build(obj, state)``: BUILD; ``Pid(pid)``: a persistent id; ``Raw(b)``: bytes as they are;
- None, bools, ints, floats, str, bytes, tuples, lists and dicts as usual.
"""

from __future__ import annotations

import struct
import zipfile

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


class G:
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args


class New(Call):
    pass


class Build:
    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class Pid:
    def __init__(self, pid):
        self.pid = pid


class Raw:
    def __init__(self, data: bytes):
        self.data = data


def _str(text: str, protocol: int) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    if protocol == 0:
        return b"V" + text.encode("raw-unicode-escape") + b"\n"
    if protocol >= 4 and len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int, protocol: int) -> bytes:
    if protocol == 0:
        return b"I%d\n" % value if -(2**31) <= value < 2**31 else b"L%dL\n" % value
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    if protocol == 1:
        return b"L%dL\n" % value
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return (
        b"\x8a" + bytes([len(data)]) if len(data) < 256 else b"\x8b" + struct.pack("<I", len(data))
    ) + data


def _enc(value, p: int) -> bytes:
    if value is None:
        return b"N"
    if value is True or value is False:
        return (b"\x88" if value else b"\x89") if p >= 2 else (b"I01\n" if value else b"I00\n")
    if type(value) is int:
        return _int(value, p)
    if type(value) is float:
        return b"F%r\n" % value if p == 0 else b"G" + struct.pack(">d", value)
    if type(value) is str:
        return _str(value, p)
    if type(value) is bytes:
        if p >= 3:
            return (
                b"C" + bytes([len(value)]) if len(value) < 256 else b"B" + struct.pack("<I", len(value))
            ) + value
        return _enc(Call(G("_codecs", "encode"), value.decode("latin-1"), "latin1"), p)
    if type(value) is tuple:
        if p >= 2 and len(value) <= 3:
            return b"".join(_enc(v, p) for v in value) + (b")", b"\x85", b"\x86", b"\x87")[len(value)]
        return b"(" + b"".join(_enc(v, p) for v in value) + b"t"
    if type(value) is list:
        if p == 0:
            return b"(" + b"".join(_enc(v, p) for v in value) + b"l"
        return b"]" + (b"(" + b"".join(_enc(v, p) for v in value) + b"e" if value else b"")
    if type(value) is dict:
        body = b"".join(_enc(k, p) + _enc(v, p) for k, v in value.items())
        return b"(" + body + b"d" if p == 0 else b"}" + (b"(" + body + b"u" if value else b"")
    if isinstance(value, G):
        if p >= 4:
            return _str(value.module, p) + _str(value.name, p) + b"\x93"
        return b"c" + f"{value.module}\n{value.name}\n".encode()
    if isinstance(value, New) and p >= 2:
        return _enc(value.func, p) + _enc(tuple(value.args), p) + b"\x81"
    if isinstance(value, Call):
        return _enc(value.func, p) + _enc(tuple(value.args), p) + b"R"
    if isinstance(value, Build):
        return _enc(value.obj, p) + _enc(value.state, p) + b"b"
    if isinstance(value, Pid):
        if p == 0 and isinstance(value.pid, str):
            return b"P" + value.pid.encode() + b"\n"
        return _enc(value.pid, p) + b"Q"
    if isinstance(value, Raw):
        return value.data
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value, protocol: int = 2) -> bytes:
    """The pickle of ``value`` as a pickler of ``protocol`` would write it (protocol 4+ in one frame)."""
    body = _enc(value, protocol) + b"."
    if protocol < 2:
        return body
    if protocol >= 4:
        body = b"\x95" + struct.pack("<Q", len(body)) + body
    return b"\x80" + bytes([protocol]) + body


def tensor(key: str, numel: int, size, stride, offset: int = 0, storage: str = "FloatStorage"):
    """torch._utils._rebuild_tensor_v2 over the persistent storage ``key``, as torch.save writes it."""
    pid = Pid(("storage", G("torch", storage), key, "cpu", numel))
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        pid,
        offset,
        tuple(size),
        tuple(stride),
        False,
        Call(G("collections", "OrderedDict")),
    )


def torch_zip(path, data_pkl: bytes, storages=None, deflate=(), prefix: str = "archive"):
    """A zip in torch.save's layout; storages named in ``deflate`` (or all, if True) are deflated."""
    with zipfile.ZipFile(path, "w") as zf:
        compress = zipfile.ZIP_DEFLATED if deflate is True or "data.pkl" in deflate else zipfile.ZIP_STORED
        zf.writestr(f"{prefix}/data.pkl", data_pkl, compress_type=compress)
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, data in (storages or {}).items():
            compress = zipfile.ZIP_DEFLATED if deflate is True or key in deflate else zipfile.ZIP_STORED
            zf.writestr(f"{prefix}/data/{key}", data, compress_type=compress)
        zf.writestr(f"{prefix}/version", "3\n")
    return path


def torch_legacy(path, data_pkl: bytes, storages=None, itemsize: int = 4):
    """torch.save(..., _use_new_zipfile_serialization=False): magic, version, sys info, data, keys, storages."""
    storages = storages or {}
    parts = [dumps(LEGACY_MAGIC), dumps(1001), dumps(LEGACY_SYS_INFO), data_pkl, dumps(list(storages))]
    for data in storages.values():
        parts.append(struct.pack("<q", len(data) // itemsize) + data)
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    return path
