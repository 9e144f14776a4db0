"""Hostile checkpoints (issue 26): memory-safety, memory bombs, refusals, and one clear error each.

Each test reproduces a reported attack. Those that crashed or exhausted memory
with CPython's unpickler run in a subprocess with a memory limit, so a
segfault or a runaway allocation fails the test instead of the test run.
"""

import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from hostile_pickles import Build, Call, G, New, Pid, dumps, tensor, torch_legacy, torch_zip

from tf_diffusion.weights import ckpt as ckpt_module
from tf_diffusion.weights.ckpt import MAX_DEFLATE_RATIO, UnsafeCheckpointError, load_ckpt
from tf_diffusion.weights.lazy import LazyTensor

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOSTILE = pathlib.Path(__file__).parent / "fixtures" / "hostile"
MEMORY_LIMIT = 1 << 31  # bytes of address space for the subprocess loads (TensorFlow is not imported)


def run_isolated(code: str, limit: int = MEMORY_LIMIT, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter under an address-space limit; return the finished process."""
    # The reader needs numpy only: register tf_diffusion.weights without running its
    # __init__ (which imports Keras and TensorFlow, slow and too big for the limit).
    prelude = textwrap.dedent(
        f"""
        import resource, sys, types
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
        weights = types.ModuleType("tf_diffusion.weights")
        weights.__path__ = [{str(ROOT / "tf_diffusion" / "weights")!r}]
        sys.modules["tf_diffusion.weights"] = weights
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )


def assert_clean_exit(proc: subprocess.CompletedProcess, expect: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by signal)\n{proc.stderr[-2000:]}"
    assert expect in proc.stdout, proc.stdout + proc.stderr[-2000:]


def load_in_subprocess(paths) -> str:
    """Code that loads each path, reads every tensor, and prints one line: OK or the error's type and message."""
    return f"""
        from tf_diffusion.weights.ckpt import load_ckpt
        from tf_diffusion.weights.lazy import read_all
        for path in {[str(p) for p in paths]!r}:
            try:
                obj = load_ckpt(path)
                read_all(obj)
                try:
                    text = repr(obj)[:200].replace(chr(10), " ")
                except RecursionError:
                    text = "(too deep to print)"
                print("OK", type(obj).__name__, text)
            except ValueError as e:
                print("ERROR", type(e).__name__, str(e).replace(chr(10), " "))
    """


def isolated_loads(paths, limit: int = MEMORY_LIMIT) -> list[str]:
    """Load each path in one subprocess; its output lines, one per path (fails on a crash)."""
    proc = run_isolated(load_in_subprocess(paths), limit=limit)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by signal)\n{proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths), proc.stdout + proc.stderr[-2000:]
    return lines


# --- item 1: out-of-bounds read through numpy.dtype + BUILD + scalar ------------------------------


def subarray_scalar(n: int, protocol: int = 2) -> bytes:
    """The reported exploit: dtype('>f8') given a subarray state of n float64s, then scalar(dtype, 8 bytes)."""
    inner = Call(G("numpy", "dtype"), "f8", False, True)
    evil = Build(
        Call(G("numpy", "dtype"), "f8", False, True),
        (3, ">", (inner, (n,)), None, None, -1, -1, 0),
    )
    return dumps({"global_step": Call(G("numpy.core.multiarray", "scalar"), evil, b"\x00" * 8)}, protocol)


def test_dtype_subarray_state_is_refused_without_reading_memory(tmp_path):
    # CPython's unpickler read n*8 bytes behind an 8-byte buffer here (n = 2**31 - 1: SIGSEGV).
    paths = [
        torch_zip(tmp_path / f"leak{n}.ckpt", subarray_scalar(n, p)) for n in (64, 2**31 - 1) for p in (2, 4)
    ]
    for path, line in zip(paths, isolated_loads(paths), strict=True):
        assert line.startswith("ERROR UnsafeCheckpointError"), line
        assert "refusing numpy dtype state" in line and path.name in line


@pytest.mark.parametrize(
    "state",
    [
        (3, "<", None, ("a",), None, -1, -1, 0),  # names
        (3, "<", None, None, {"a": None}, -1, -1, 0),  # fields
        (3, "<", None, None, None, 16, -1, 0),  # elsize
        (3, "<", None, None, None, -1, 8, 0),  # alignment
        (3, "<", None, None, None, -1, -1, 63),  # flags (object-like)
        (3, "!", None, None, None, -1, -1, 0),  # byte order
        (3, "<", None, None, None, -1, -1, 0, {"meta": 1}),  # metadata
        "<",
    ],
)
def test_other_dtype_states_are_refused(tmp_path, state):
    data = dumps(
        Call(G("numpy.core.multiarray", "scalar"), Build(Call(G("numpy", "dtype"), "f8"), state), b"\0" * 8)
    )
    with pytest.raises(UnsafeCheckpointError, match="refusing numpy dtype state"):
        load_ckpt(torch_zip(tmp_path / "d.ckpt", data))


@pytest.mark.parametrize("spec", ["f8,i4", "(2,)f8", "V8", "S8", "U2", "M8[ns]", "O"])
def test_non_plain_dtype_strings_are_refused(tmp_path, spec):
    data = dumps(Call(G("numpy.core.multiarray", "scalar"), Call(G("numpy", "dtype"), spec), b"\0" * 8))
    with pytest.raises(UnsafeCheckpointError, match="dtype"):
        load_ckpt(torch_zip(tmp_path / "d.ckpt", data))


def test_big_endian_scalar_is_rebuilt_and_numpy_is_untouched(tmp_path):
    # A plain state may set the byte order: on our private copy, never on numpy's shared float64.
    be = Build(Call(G("numpy", "dtype"), "f8", False, True), (3, ">", None, None, None, -1, -1, 0))
    data = dumps([Call(G("numpy.core.multiarray", "scalar"), be, struct.pack(">d", 0.18215))])
    (value,) = load_ckpt(torch_zip(tmp_path / "be.ckpt", data))
    assert value == 0.18215 and value.dtype == np.float64
    assert np.dtype("f8").byteorder == "=" and np.dtype("<f8").isnative


def test_scalar_needs_exact_bytes_and_owns_them(tmp_path):
    data = dumps(Call(G("numpy.core.multiarray", "scalar"), Call(G("numpy", "dtype"), "f4"), b"\0" * 3))
    with pytest.raises(ValueError, match="needs 4 bytes, got 3"):
        load_ckpt(torch_zip(tmp_path / "s.ckpt", data))
    data = dumps(Call(G("numpy.core.multiarray", "scalar"), Call(G("numpy", "dtype"), "i4"), b"\x07\0\0\0"))
    value = load_ckpt(torch_zip(tmp_path / "s.ckpt", data))
    assert value == 7 and value.dtype == np.int32 and (value.base is None or value.base.flags.owndata)


def test_scalar_of_a_foreign_dtype_is_refused(tmp_path):
    # Only dtypes this file built may be used; a torch dtype marker is not a numpy dtype.
    data = dumps(Call(G("numpy.core.multiarray", "scalar"), G("torch", "float32"), b"\0" * 4))
    with pytest.raises(UnsafeCheckpointError, match="not a dtype from this file"):
        load_ckpt(torch_zip(tmp_path / "s.ckpt", data))


# --- BUILD only where state is needed ----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        tensor("0", 4, (4,), (1,)),  # a LazyTensor
        Call(G("builtins", "set"), ["a"]),
        [],
        {},
        G("torch", "FloatStorage"),
        G("torch._utils", "_rebuild_tensor_v2"),
        G("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),  # the class, not an instance
        Call(G("builtins", "complex"), 1.0, 2.0),
    ],
)
def test_build_on_anything_else_is_refused(tmp_path, target):
    data = dumps(Build(target, {"__class__": None, "x": 1}))
    path = torch_zip(tmp_path / "b.ckpt", data, {"0": b"\0" * 16})
    with pytest.raises(UnsafeCheckpointError, match="refusing to set pickled state"):
        load_ckpt(path)


def test_ordered_dict_metadata_attribute_is_kept(tmp_path):
    # torch state dicts pickle `_metadata` as an attribute of the OrderedDict.
    od = Build(Call(G("collections", "OrderedDict")), {"_metadata": {"": {"version": 1}}})
    got = load_ckpt(torch_zip(tmp_path / "m.ckpt", dumps(od)))
    assert got._metadata == {"": {"version": 1}}
    with pytest.raises(UnsafeCheckpointError, match="only attributes by name"):
        load_ckpt(torch_zip(tmp_path / "m.ckpt", dumps(Build(Call(G("collections", "OrderedDict")), {1: 2}))))


# --- item 2a: the memo bomb, and opcodes refused outright ------------------------------------------


def test_memo_index_bomb_allocates_nothing(tmp_path):
    # 9 bytes of data.pkl: PROTO 2, EMPTY_DICT, LONG_BINPUT index, STOP. CPython grows its memo
    # array to the index (0x7fffffff: ~32 GB); here the memo is a dict of one entry.
    paths = [
        torch_zip(tmp_path / f"memo{index}.ckpt", b"\x80\x02}r" + struct.pack("<I", index) + b".")
        for index in (150_000_000, 0x7FFFFFFF, 0xFFFFFFFF)
    ]
    assert all(path.stat().st_size < 500 for path in paths)
    assert isolated_loads(paths, limit=1 << 30) == ["OK dict {}"] * 3


@pytest.mark.parametrize(
    "data,match",
    [
        (b"\x80\x02h\x05.", "memo index 5 was never stored"),
        (b"\x80\x02j\xff\xff\xff\x7f.", "memo index 2147483647 was never stored"),
        (b"g99\n.", "memo index 99 was never stored"),
        (b"(I1\np-1\n.", r"memo index must be an int in \[0, 4294967295\]"),
        (b"(I1\np99999999999999999999\n.", "memo index must be"),
    ],
)
def test_bad_memo_use_is_a_clear_error(tmp_path, data, match):
    with pytest.raises(ValueError, match=match) as err:
        load_ckpt(torch_zip(tmp_path / "memo.ckpt", data))
    assert "memo.ckpt" in str(err.value)


def test_ext_opcodes_are_refused_even_when_registered(tmp_path):
    # A code some other import registered in copyreg resolved without the allow-list.
    import copyreg

    copyreg.add_extension("posix", "system", 0x1CE)
    try:
        marker = tmp_path / "pwned"
        for ext in (b"\x82\xce", b"\x83\xce\x01", b"\x84\xce\x01\x00\x00"):
            data = b"\x80\x02" + ext + dumps((f"touch {marker}",))[2:-1] + b"R."
            with pytest.raises(UnsafeCheckpointError, match="copyreg extension codes are refused"):
                load_ckpt(torch_zip(tmp_path / "ext.ckpt", data))
            assert not marker.exists()
    finally:
        copyreg.remove_extension("posix", "system", 0x1CE)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"\x80\x05\x97.", "out-of-band buffers"),
        (b"\x80\x05N\x98.", "out-of-band buffers"),
        (b"Pfoo\n.", "unsupported persistent id 'foo'"),
        (dumps(Pid(("module", "os"))), "only torch storages"),
        (b"\x80\x06N.", "unsupported pickle protocol 6"),
    ],
)
def test_refused_opcodes(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_ckpt(torch_zip(tmp_path / "o.ckpt", data))


@pytest.mark.parametrize(
    "data,match",
    [
        (b"\x80\x02NNa.", "APPEND needs a list"),
        (b"\x80\x02N(Ne.", "APPENDS needs a list"),
        (b"\x80\x02)NNs.", "SETITEM needs a dict"),
        (b"\x80\x04](N\x90.", "ADDITEMS needs a set"),
        (b"\x80\x02a.", "stack underflow"),
        (b"\x80\x02(a.", "stack underflow"),
        (b"\x80\x02e.", "no MARK"),
        (b"\x80\x02}(Nu.", "odd number of items"),
        (b"\x80\x02N.junk", None),  # trailing bytes after STOP are ignored, as by pickle
        (b"\x80\x02NN\x81.", "REDUCE|NEWOBJ arguments must be a tuple"),
        (b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.", "frame of 255 bytes runs past the end"),
        (b"\x80\x02X\xff\xff\xff\x7f" + b"a" * 10 + b".", "expected 2147483647 bytes"),
        (b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"a.", "bytes"),
        (b"\x80\x02\x8b\xff\xff\xff\x7f\x00.", "not enough data"),
    ],
)
def test_malformed_streams_are_clear_errors(tmp_path, data, match):
    path = torch_zip(tmp_path / "bad.ckpt", data)
    if match is None:
        assert load_ckpt(path) is None
        return
    with pytest.raises(ValueError, match=match) as err:
        load_ckpt(path)
    assert "bad.ckpt" in str(err.value)


# --- item 4: 5000-digit integers, deep nesting, hostile keys ---------------------------------------


@pytest.mark.parametrize("opcode", [b"I", b"L"])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_five_thousand_digit_integer(tmp_path, opcode, layout):
    data = opcode + b"9" * 5000 + b"\n."
    path = tmp_path / "digits.ckpt"
    torch_zip(path, data) if layout == "zip" else torch_legacy(path, data)
    with pytest.raises(ValueError, match="digits.ckpt.*(Exceeds the limit|digits)"):
        load_ckpt(path)


def test_large_binary_integers_load_and_messages_stay_short(tmp_path):
    big = 1 << 40000  # LONG4: no digit limit applies to binary integers
    assert load_ckpt(torch_zip(tmp_path / "i.ckpt", dumps({"n": big})))["n"] == big
    with pytest.raises(ValueError, match="an int of 40001 bits"):
        load_ckpt(torch_zip(tmp_path / "i.ckpt", dumps(tensor("0", 1, (big,), (1,))), {"0": b"\0" * 4}))


def test_deep_nesting_loads_without_recursion(tmp_path):
    depth = 100_000
    data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    got = load_ckpt(torch_zip(tmp_path / "deep.ckpt", data))
    for _ in range(depth - 1):
        (got,) = got
    assert got == []


def test_deeply_nested_tuple_keys_are_refused_before_hashing(tmp_path):
    # Hashing a 100k-deep tuple overflows the C stack (CPython's tuple hash has no recursion check).
    depth = 100_000
    key = b"N" + b"\x85" * depth  # ((((None,),),),...)
    builds = {
        "dict": b"}N" + b"\x85" * 4 * depth + b"Ns",  # deep enough to crash on an 8 MiB stack
        "set": b"\x8f(" + key + b"\x90",
        "frozenset": b"(" + key + b"\x91",
        "set()": b"cbuiltins\nset\n]" + key + b"a\x85R",
        "OrderedDict()": b"ccollections\nOrderedDict\n](" + key + b"N\x86e\x85R",
    }
    paths = [
        torch_zip(tmp_path / f"{name}.ckpt", b"\x80\x04" + build + b".") for name, build in builds.items()
    ]
    for line in isolated_loads(paths):
        assert line.startswith("ERROR UnsafeCheckpointError") and "as a dict key or set item" in line, line


def test_hash_colliding_integer_keys_are_refused_fast(tmp_path):
    # 20k integers that all hash to 0: CPython's dict takes ~10 s to insert them.
    modulus = 2**61 - 1
    body = b""
    for k in range(1, 20001):
        raw = (k * modulus).to_bytes(10, "little", signed=True)
        body += b"\x8a\x0a" + raw + b"N"  # LONG1 of 10 bytes, value None
    path = torch_zip(tmp_path / "hash.ckpt", b"\x80\x02}(" + body + b"u.")
    start = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match=r"integer dict key or set item of \d+ bits"):
        load_ckpt(path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "key,ok",
    [
        ("a", True),
        (b"a", True),
        (2**61 - 2, True),
        (-(2**61 - 2), True),
        (True, True),
        (None, True),
        (("a", (b"b", None)), True),
        (2**61 - 1, False),
        (1.5, False),
        ((1, 2), False),
        (tuple("a" * 17), False),
        (Call(G("builtins", "complex"), 1.0, 2.0), False),
        (Call(G("builtins", "frozenset"), ["a"]), False),
    ],
)
def test_dict_key_policy(tmp_path, key, ok):
    path = torch_zip(tmp_path / "k.ckpt", dumps({key: 1}))
    if ok:
        assert list(load_ckpt(path).values()) == [1]
    else:
        with pytest.raises(UnsafeCheckpointError, match="dict key or set item"):
            load_ckpt(path)


# --- item 4/6: shapes beyond their storage, never a negative count ----------------------------------


@pytest.mark.parametrize(
    "size,stride,match",
    [
        ((2**63,), (0,), "expanded views materialise"),
        ((2**32, 2**31), (0, 0), "expanded views materialise"),
        ((2**63,), (1,), "needs 9223372036854775808 elements"),
        ((3, 2**62), (1, 0), "expanded views materialise"),
    ],
)
def test_huge_shapes_are_refused(tmp_path, size, stride, match):
    data = dumps({"w": tensor("0", 4, size, stride)})
    path = torch_zip(tmp_path / "big.ckpt", data, {"0": b"\0" * 16})
    with pytest.raises(ValueError, match=match):
        load_ckpt(path)


def test_small_expanded_views_still_load(tmp_path):
    data = dumps({"w": tensor("0", 2, (3, 2), (0, 1))})
    got = np.asarray(
        load_ckpt(torch_zip(tmp_path / "e.ckpt", data, {"0": np.array([1, 2], "<f4").tobytes()}))["w"]
    )
    np.testing.assert_array_equal(got, [[1, 2], [1, 2], [1, 2]])


def test_parameter_counts_are_exact():
    assert LazyTensor((2**40, 2**40), np.float32, lambda: None).size == 2**80
    assert LazyTensor((2**63,), np.float16, lambda: None).nbytes == 2**64


# --- item 2b/2c and 4: zip structure ------------------------------------------------------------------


def test_deflate_bomb_is_refused_before_inflating(tmp_path):
    # 64 MiB of zeros deflate to ~64 KB: refused by ratio, before a byte is inflated.
    zeros = bytes(64 << 20)
    data = dumps({"w": tensor("0", len(zeros) // 4, (len(zeros) // 4,), (1,))})
    path = torch_zip(tmp_path / "bomb.ckpt", data, {"0": zeros}, deflate={"0"})
    del zeros
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match=f"more than {MAX_DEFLATE_RATIO}:1.*decompression bomb") as err:
        load_ckpt(path)
    assert "bomb.ckpt" in str(err.value) and "archive/data/0" in str(err.value)


def test_many_small_deflated_entries_are_bounded_in_all(tmp_path):
    # Each entry is within the slack for small entries; all together are not.
    n = 16
    zeros = bytes(1 << 20)
    data = dumps({str(i): tensor(str(i), len(zeros) // 4, (len(zeros) // 4,), (1,)) for i in range(n)})
    path = torch_zip(tmp_path / "many.ckpt", data, {str(i): zeros for i in range(n)}, deflate=True)
    with pytest.raises(ValueError, match="deflated zip entries declare .* in all"):
        load_ckpt(path)


def test_shared_deflated_storage_is_inflated_once(tmp_path, monkeypatch):
    # 300 tensors viewing one deflated storage (the report: 369 views of 64 MiB, inflated per tensor).
    values = np.arange(1 << 16, dtype="<f4")
    n, rows = 300, 256
    data = dumps(
        {
            f"t{i}": tensor("0", values.size, (rows, 4), (4, 1), offset=(i * 7) % (values.size - 1024))
            for i in range(n)
        }
    )
    path = torch_zip(tmp_path / "shared.ckpt", data, {"0": values.tobytes()}, deflate=True)
    loaded = load_ckpt(path)  # inflates data.pkl and byteorder, not the storage
    calls = []
    inflate = ckpt_module._ZipArchive._inflate
    monkeypatch.setattr(
        ckpt_module._ZipArchive, "_inflate", lambda self, *a: calls.append(1) or inflate(self, *a)
    )
    for i in range(n):
        start = (i * 7) % (values.size - 1024)
        np.testing.assert_array_equal(
            np.asarray(loaded[f"t{i}"]), values[start : start + rows * 4].reshape(rows, 4)
        )
    assert len(calls) == 1
    # Once every tensor has been read, the inflated bytes are dropped; a second read inflates again.
    np.asarray(loaded["t0"])
    assert len(calls) == 2


def rewrite_central(src: pathlib.Path, dst: pathlib.Path, field: int, fmt: str, value, name: str):
    """Patch one field of the central-directory entry of ``name`` (offset within the 46-byte header)."""
    blob = bytearray(src.read_bytes())
    pos = 0
    while True:
        pos = blob.index(b"PK\x01\x02", pos)
        name_len = struct.unpack_from("<H", blob, pos + 28)[0]
        if bytes(blob[pos + 46 : pos + 46 + name_len]) == name.encode():
            break
        pos += 4
    struct.pack_into(fmt, blob, pos + field, value)
    dst.write_bytes(bytes(blob))
    return dst


@pytest.fixture
def small_zip(tmp_path):
    data = dumps({"w": tensor("0", 4, (4,), (1,))})
    return torch_zip(tmp_path / "src.ckpt", data, {"0": np.arange(4, dtype="<f4").tobytes()})


@pytest.mark.parametrize(
    "field,fmt,value,match",
    [
        (10, "<H", 99, "compression method 99; only stored"),
        (10, "<H", 12, "compression method 12"),
        (6, "<H", 148, "zip file version 14.8"),
        (8, "<H", 1, "is encrypted"),
        (42, "<I", 0x7FFFFFF0, "past the end of the file"),
        (20, "<I", 3, "declares 16 bytes but holds 3"),
    ],
)
def test_zip_entry_fields(tmp_path, small_zip, field, fmt, value, match):
    path = rewrite_central(small_zip, tmp_path / "z.ckpt", field, fmt, value, "archive/data/0")
    with pytest.raises(ValueError, match=match) as err:
        load_ckpt(path)
    assert "z.ckpt" in str(err.value)


def test_bad_crc(tmp_path, small_zip):
    blob = bytearray(small_zip.read_bytes())
    pos = blob.index(b"archive/data.pkl") + len("archive/data.pkl")
    pos = blob.index(b"\x80\x02", pos)
    blob[pos + 3] ^= 0x01  # inside data.pkl, whose CRC no longer matches
    (tmp_path / "crc.ckpt").write_bytes(bytes(blob))
    with pytest.raises(
        ValueError, match="crc.ckpt: zip entry 'archive/data.pkl' is corrupt \\(bad CRC-32\\)"
    ):
        load_ckpt(tmp_path / "crc.ckpt")


def test_corrupt_deflate_stream(tmp_path):
    data = dumps({"w": tensor("0", 1024, (1024,), (1,))})
    path = torch_zip(tmp_path / "z.ckpt", data, {"0": np.arange(1024, dtype="<f4").tobytes()}, deflate=True)
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data.pkl")
    start = info.header_offset + 30 + len(info.filename)
    blob[start : start + 8] = b"\xff" * 8
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="z.ckpt: zip entry 'archive/data.pkl' is corrupt") as err:
        load_ckpt(path)
    assert "deflate" in str(err.value) or "bad CRC" in str(err.value) or "inflated" in str(err.value)


def test_truncated_deflate_stream_of_a_storage(tmp_path):
    values = np.arange(4096, dtype="<f4")
    data = dumps({"w": tensor("0", values.size, (values.size,), (1,))})
    path = torch_zip(tmp_path / "t.ckpt", data, {"0": values.tobytes()}, deflate={"0"})
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
    start = info.header_offset + 30 + len(info.filename)
    blob[start + 10 : start + info.compress_size] = bytes(info.compress_size - 10)  # zeroed tail
    path.write_bytes(bytes(blob))
    tensor_ = load_ckpt(path)["w"]
    with pytest.raises(ValueError, match="t.ckpt: zip entry 'archive/data/0' is corrupt"):
        np.asarray(tensor_)


def test_central_directory_size_beyond_the_file(tmp_path, small_zip):
    # The end record claims a directory of 4 GB: zipfile seeks before the file's start (Errno 22).
    blob = bytearray(small_zip.read_bytes())
    end = blob.rindex(b"PK\x05\x06")
    struct.pack_into("<I", blob, end + 12, 0xFFFFFFF0)
    (tmp_path / "cd.ckpt").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="cd.ckpt: not a valid zip archive"):
        load_ckpt(tmp_path / "cd.ckpt")


def test_directory_and_unreadable_paths_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: cannot"):
        load_ckpt(tmp_path)


def test_file_that_shrinks_while_loaded(tmp_path):
    # Reading a storage past a mapped file's new end raises SIGBUS; the size is checked first.
    values = np.arange(1 << 16, dtype="<f4")  # 256 KiB: past the first pages
    data = dumps({"w": tensor("0", values.size, (values.size,), (1,))})
    path = torch_zip(tmp_path / "shrink.ckpt", data, {"0": values.tobytes()})
    code = f"""
        import os
        from tf_diffusion.weights.ckpt import load_ckpt
        import numpy as np
        t = load_ckpt({str(path)!r})["w"]
        os.truncate({str(path)!r}, 1000)
        try:
            np.asarray(t)
            print("READ")
        except ValueError as e:
            print("ERROR", e)
    """
    proc = run_isolated(code)
    assert_clean_exit(proc, "ERROR")
    assert "shrank to 1000 bytes while loaded" in proc.stdout


def test_legacy_storage_larger_than_the_file(tmp_path):
    data = dumps({"w": tensor("0", 2**40, (4,), (1,))})
    with pytest.raises(ValueError, match="larger than the file"):
        load_ckpt(torch_legacy(tmp_path / "l.ckpt", data, {"0": b"\0" * 16}))


# --- hand-written equivalents of what torch writes still load -----------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_assembled_checkpoints_load_at_every_protocol(tmp_path, protocol, layout):
    values = np.arange(12, dtype="<f4")
    obj = {
        "state_dict": Build(Call(G("collections", "OrderedDict")), {"_metadata": {"": {"version": 1}}}),
        "w": tensor("0", 12, (3, 4), (4, 1)),
        "t": tensor("0", 12, (4, 3), (1, 4)),
        "step": 7,
        "lr": 0.5,
        "name": "é",
        "tags": Call(G("builtins", "set"), ["a", "b"]),
        "pair": Call(G("builtins", "frozenset"), [("x", None)]),
        "cb": New(G("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"), 1),
        "c": Call(G("builtins", "complex"), 1.0, -2.0),
        "s": Call(G("builtins", "slice"), 1, None, 2),
        "size": Call(G("torch", "Size"), (3, 4)),
        "raw": b"\x00\xff",
    }
    if protocol < 2:
        obj["cb"] = Call(G("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"), 1)
    data = dumps(obj, protocol)
    path = tmp_path / "a.ckpt"
    torch_zip(path, data, {"0": values.tobytes()}) if layout == "zip" else torch_legacy(
        path, data, {"0": values.tobytes()}
    )
    got = load_ckpt(path)
    np.testing.assert_array_equal(np.asarray(got["w"]), values.reshape(3, 4))
    np.testing.assert_array_equal(np.asarray(got["t"]), values.reshape(3, 4).T)
    assert got["state_dict"]._metadata == {"": {"version": 1}}
    assert (got["step"], got["lr"], got["name"]) == (7, 0.5, "é")
    assert got["tags"] == {"a", "b"} and got["pair"] == frozenset({("x", None)})
    assert got["cb"].args == (1,) and got["c"] == 1 - 2j and got["s"] == slice(1, None, 2)
    assert got["size"] == (3, 4) and got["raw"] == b"\x00\xff"


def test_protocol_zero_python2_strings_are_utf8(tmp_path):
    data = b"(S'caf\\xc3\\xa9'\np0\nS'x'\np1\nd."
    with pytest.raises(ValueError):  # ascii only in protocol-0 STRING (genops' rule)
        load_ckpt(torch_zip(tmp_path / "s.ckpt", data))
    data = b"\x80\x02}U\x05caf\xc3\xa9K\x01s."
    assert load_ckpt(torch_zip(tmp_path / "s.ckpt", data)) == {"café": 1}


# --- regression files found by the fuzzers -----------------------------------------------------------


def test_regression_files():
    # Each file is an escape a fuzzer found once; each must now load or give our own error.
    paths = sorted(HOSTILE.glob("*.ckpt"))
    expected = {p.name: p.with_suffix(".expected").read_text().strip() for p in paths}
    for path, line in zip(paths, isolated_loads(paths), strict=True):
        assert line.startswith(expected[path.name]), f"{path.name}: {line}"


def test_repeated_calls_on_a_memoized_list_are_bounded(tmp_path):
    # One 100k-item list in the memo, then builtins.set(list) 50k times (7 bytes each):
    # 5e9 item visits for a 550 KB file without a bound on work per byte.
    items = b"]q\x00(" + b"K\x01" * 100_000 + b"e"
    calls = b"cbuiltins\nset\nq\x01" + b"h\x01h\x00\x85R0" * 50_000
    path = torch_zip(tmp_path / "work.ckpt", b"\x80\x02" + items + calls + b"N.")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="work.ckpt: .*more work than its size allows"):
        load_ckpt(path)
    assert time.perf_counter() - start < 5.0


def test_deeply_nested_small_tuple_keys_are_cheap(tmp_path):
    # 16 items in all, however nested: ((("a",),),) is fine, 17 strings are not.
    assert load_ckpt(torch_zip(tmp_path / "k.ckpt", dumps({((("a",),),): 1}))) == {((("a",),),): 1}
    with pytest.raises(UnsafeCheckpointError, match="dict key or set item"):
        load_ckpt(torch_zip(tmp_path / "k.ckpt", dumps({(("a",) * 9, ("b",) * 8): 1})))
