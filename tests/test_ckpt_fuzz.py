"""Fuzz the torch checkpoint reader: random opcode streams, mutated real pickles, mutated zip and legacy files.

The property: ``load_ckpt`` (and reading every tensor it returns) either
returns or raises ``ValueError`` (``UnsafeCheckpointError`` is one), never
another exception, a crash or runaway memory, and never runs a payload.
Bounded to a few hundred examples per fuzzer by default (about 20 s in all);
``TF_DIFFUSION_FUZZ=long`` runs 20x more, ``TF_DIFFUSION_FUZZ=<n>`` runs n per fuzzer.
An escape becomes a file in tests/fixtures/hostile/ (see test_ckpt_hostile.test_regression_files).
"""

import os
import pathlib
import resource
import shutil
import struct
import tempfile
import zipfile

import numpy as np
import pytest
from hostile_pickles import dumps, tensor, torch_legacy, torch_zip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.lazy import read_all

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "ckpt"
_FUZZ = os.environ.get("TF_DIFFUSION_FUZZ", "")


def _examples(default: int) -> int:
    if _FUZZ.isdigit():
        return int(_FUZZ)
    return default * 20 if _FUZZ == "long" else default


FUZZ = dict(
    deadline=None,
    database=None,  # escapes are kept as regression files, not in a local database
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
WORK = pathlib.Path(tempfile.mkdtemp(prefix="tf_diffusion_fuzz_"))
MARKER = WORK / "MARKER"


def check_load(path: pathlib.Path) -> None:
    """The property, for one file."""
    try:
        read_all(load_ckpt(path), limit=10_000)
    except ValueError as e:
        assert str(path) in str(e), f"error without the path: {e}"
    assert not MARKER.exists(), "a payload ran"


# --- random opcode streams -------------------------------------------------------------------------

_GLOBALS = [
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nfloat16\n",
    b"ccollections\nOrderedDict\n",
    b"cnumpy\ndtype\n",
    b"cnumpy.core.multiarray\nscalar\n",
    b"c_codecs\nencode\n",
    b"cbuiltins\nset\n",
    b"cbuiltins\nfrozenset\n",
    b"cbuiltins\ncomplex\n",
    b"cbuiltins\nslice\n",
    b"ctorch\nSize\n",
    b"ctorch._tensor\n_rebuild_from_type_v2\n",
    b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n",
    b"cos\nsystem\n",
]
_SIMPLE = list(b"N\x88\x89)]}\x8f(tldeus a\x90\x910\x85\x86\x87R\x81\x92bQ\x94\x93o12.")
_SIMPLE = [bytes([c]) for c in _SIMPLE if c != ord(" ")]


def _arg_ops():
    u1 = st.integers(0, 255).map(lambda n: bytes([n]))
    u4 = st.integers(0, 2**32 - 1).map(lambda n: struct.pack("<I", n))
    i4 = st.integers(-(2**31), 2**31 - 1).map(lambda n: struct.pack("<i", n))
    text = st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass"))
    return st.one_of(
        st.sampled_from(_SIMPLE),
        u1.map(lambda b: b"K" + b),
        st.integers(0, 65535).map(lambda n: b"M" + struct.pack("<H", n)),
        i4.map(lambda b: b"J" + b),
        st.integers(0, 8).map(lambda n: b"q" + bytes([n])),  # BINPUT small
        st.integers(0, 8).map(lambda n: b"h" + bytes([n])),  # BINGET small
        u4.map(lambda b: b"r" + b),
        u4.map(lambda b: b"j" + b),
        text.map(lambda t: b"X" + struct.pack("<I", len(t)) + t),
        st.tuples(u4, text).map(lambda a: b"X" + a[0] + a[1]),  # length that lies
        text.map(lambda t: b"\x8c" + bytes([min(len(t), 255)]) + t[:255]),
        st.binary(max_size=12).map(lambda b: b"C" + bytes([len(b)]) + b),
        st.floats(allow_nan=True).map(lambda f: b"G" + struct.pack(">d", f)),
        st.binary(max_size=12).map(lambda b: b"\x8a" + bytes([len(b)]) + b),
        st.sampled_from(_GLOBALS),
        st.integers(-(10**30), 10**30).map(lambda n: b"I%d\n" % n),
        st.integers(0, 10**6).map(lambda n: b"p%d\n" % n),
        st.integers(0, 10**6).map(lambda n: b"g%d\n" % n),
        st.sampled_from([b"Vstorage\n", b"V0\n", b"Vcpu\n", b"Vf8\n", b"V<\n", b"Vlatin1\n"]),
        u1.map(lambda b: b"\x82" + b),
        st.integers(0, 64).map(lambda n: b"\x95" + struct.pack("<Q", n)),
        st.integers(0, 6).map(lambda n: b"\x80" + bytes([n])),
        st.sampled_from([b"\x97", b"\x98", b"Pfoo\n", b"\x8d" + struct.pack("<Q", 2**40)]),
        st.just(dumps(tensor("0", 16, (4, 4), (4, 1)))[2:-1]),  # a whole valid tensor
        st.just(b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nK\x10tQ"),  # a storage
    )


@settings(max_examples=_examples(200), **FUZZ)
@given(ops=st.lists(_arg_ops(), max_size=40), stop=st.booleans(), layout=st.sampled_from(["zip", "legacy"]))
def test_fuzz_random_opcode_streams(ops, stop, layout):
    data = b"\x80\x02" + b"".join(ops) + (b"." if stop else b"")
    path = WORK / "ops.ckpt"
    storages = {"0": np.arange(16, dtype="<f4").tobytes()}
    torch_zip(path, data, storages) if layout == "zip" else torch_legacy(path, data, storages)
    check_load(path)


# --- mutations of real checkpoints written by torch -------------------------------------------------

_SOURCES = {
    name: (FIXTURES / name).read_bytes() for name in ("lightning.ckpt", "views.ckpt", "metadata.ckpt")
}
_PICKLES = {}
for _name, _blob in _SOURCES.items():
    with zipfile.ZipFile(FIXTURES / _name) as _zf:
        _PICKLES[_name] = {info.filename: _zf.read(info.filename) for info in _zf.infolist()}


def _mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, where, value in edits:
        if not buf:
            break
        pos = where % len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif kind == "set":
            buf[pos] = value % 256
        elif kind == "delete":
            del buf[pos : pos + 1 + value % 8]
        elif kind == "insert":
            buf[pos:pos] = bytes([value % 256]) * (1 + value % 3)
        elif kind == "dup":
            buf[pos:pos] = buf[pos : pos + 1 + value % 16]
        elif kind == "cut":
            del buf[pos:]
    return bytes(buf)


_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "delete", "insert", "dup", "cut"]),
        st.integers(0, 2**20),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=_examples(400), **FUZZ)
@given(source=st.sampled_from(sorted(_SOURCES)), edits=_EDITS)
def test_fuzz_mutated_data_pkl(source, edits):
    entries = dict(_PICKLES[source])
    name = next(n for n in entries if n.endswith("/data.pkl"))
    entries[name] = _mutate(entries[name], edits)
    path = WORK / "pkl.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)
    check_load(path)


def _header_positions(blob: bytes) -> list[int]:
    """Offsets of zip structures (local and central headers, end record) to aim mutations at."""
    out = []
    for signature in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"):
        pos = blob.find(signature)
        while pos >= 0:
            out.extend(range(pos, min(pos + 46, len(blob))))
            pos = blob.find(signature, pos + 1)
    return out


_TARGETS = {name: _header_positions(blob) for name, blob in _SOURCES.items()}


@settings(max_examples=_examples(200), **FUZZ)
@given(
    source=st.sampled_from(sorted(_SOURCES)),
    edits=_EDITS,
    aimed=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    deflate=st.booleans(),
)
def test_fuzz_mutated_zip_structure(source, edits, aimed, deflate):
    blob = _SOURCES[source]
    if deflate:  # the same archive re-zipped with deflate, as some tools do
        path = WORK / "src.ckpt"
        torch_zip_entries(path, _PICKLES[source])
        blob = path.read_bytes()
    targets = _header_positions(blob)
    buf = bytearray(blob)
    for which, value in aimed:
        buf[targets[which % len(targets)]] = value
    path = WORK / "zip.ckpt"
    path.write_bytes(_mutate(bytes(buf), edits))
    check_load(path)


def torch_zip_entries(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)


_LEGACY = {name: (FIXTURES / name).read_bytes() for name in ("legacy.ckpt", "views_legacy.ckpt")}


@settings(max_examples=_examples(400), **FUZZ)
@given(source=st.sampled_from(sorted(_LEGACY)), edits=_EDITS)
def test_fuzz_mutated_legacy_files(source, edits):
    path = WORK / "legacy.ckpt"
    path.write_bytes(_mutate(_LEGACY[source], edits))
    check_load(path)


@pytest.fixture(scope="module", autouse=True)
def memory_bound():
    # Peak memory over all fuzz examples: bounded, whatever the files claimed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    shutil.rmtree(WORK, ignore_errors=True)
    assert grown < 512 * 1024, f"fuzzing grew peak memory by {grown // 1024} MiB"
