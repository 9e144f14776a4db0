"""safetensors reader/writer: exact values against files written by safetensors.torch, strict validation."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from tf_diffusion.weights import safetensors_io
from tf_diffusion.weights.lazy import BFLOAT16, LazyTensor
from tf_diffusion.weights.safetensors_io import load_safetensors, open_safetensors, save_safetensors

TORCH_TO_NUMPY = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": BFLOAT16,
    "float64": np.dtype("float64"),
    "int64": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "int16": np.dtype("int16"),
    "int8": np.dtype("int8"),
    "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
}


def expected(fixtures_dir, name):
    """Values torch held (floats as float32) and torch dtype names, from the fixture script."""
    data = np.load(fixtures_dir / "ckpt" / f"{name}.expected.npz")
    dtypes = json.loads(str(data["__dtypes__"]))
    return {key: data[key] for key in dtypes}, dtypes


def as_saved(values, dtypes):
    """The expected values cast back to the dtype torch saved (exact: fp16/bf16 are exact in float32)."""
    return {key: values[key].astype(TORCH_TO_NUMPY[dtypes[key]]) for key in values}


def write_raw(path, header, data=b"", header_len=None):
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("name", ["mixed", "half"])
def test_reads_reference_files_exactly(fixtures_dir, name):
    values, dtypes = expected(fixtures_dir, name)
    with open_safetensors(fixtures_dir / "ckpt" / f"{name}.safetensors") as f:
        assert sorted(f) == sorted(values)
        for key, want in values.items():
            tensor = f[key]
            assert isinstance(tensor, LazyTensor)
            assert tensor.shape == want.shape
            assert tensor.dtype == TORCH_TO_NUMPY[dtypes[key]], key
            got = np.asarray(tensor)
            assert got.dtype == tensor.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=key)
        if name == "mixed":
            assert f.metadata == {"format": "pt", "note": "fixture"}
        else:
            assert f.metadata == {}


def test_bfloat16_values_are_exact_in_float32(fixtures_dir):
    values, _ = expected(fixtures_dir, "half")
    with open_safetensors(fixtures_dir / "ckpt" / "half.safetensors") as f:
        got = np.asarray(f["unet.b"], dtype=np.float32)
        assert f["unet.b"].dtype == np.dtype(ml_dtypes.bfloat16)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, values["unet.b"])


@pytest.mark.parametrize("name,metadata", [("mixed", {"format": "pt", "note": "fixture"}), ("half", None)])
def test_writer_reproduces_reference_bytes(fixtures_dir, tmp_path, name, metadata):
    # Same tensor order, header JSON and padding as safetensors.torch.save_file.
    values, dtypes = expected(fixtures_dir, name)
    out = tmp_path / "ours.safetensors"
    save_safetensors(as_saved(values, dtypes), out, metadata)
    assert out.read_bytes() == (fixtures_dir / "ckpt" / f"{name}.safetensors").read_bytes()


def test_tensors_are_read_only_when_asked(fixtures_dir, tmp_path):
    values, _ = expected(fixtures_dir, "mixed")
    path = tmp_path / "m.safetensors"
    shutil.copy(fixtures_dir / "ckpt" / "mixed.safetensors", path)
    with open_safetensors(path) as f:
        assert f["f32"].shape == (3, 4) and f["f32"].nbytes == 48
        # Change the bytes on disk after opening: the tensor must see the new values.
        blob = path.read_bytes()
        start = blob.find(values["f32"].tobytes())
        assert start > 0
        with open(path, "r+b") as g:
            g.seek(start)
            g.write(np.full((3, 4), 7.0, np.float32).tobytes())
        np.testing.assert_array_equal(np.asarray(f["f32"]), np.full((3, 4), 7.0, np.float32))
        np.testing.assert_array_equal(np.asarray(f["i64"]), values["i64"])


def test_arrays_are_fresh_writable_copies(fixtures_dir):
    with open_safetensors(fixtures_dir / "ckpt" / "mixed.safetensors") as f:
        a, b = np.asarray(f["f32"]), f["f32"].numpy()
    assert a.flags.writeable and a.flags.c_contiguous
    a[...] = 0
    assert np.abs(b).sum() > 0  # still readable after close: a copy, not a view of the map


def test_read_after_close_is_an_error(fixtures_dir):
    f = open_safetensors(fixtures_dir / "ckpt" / "mixed.safetensors")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        np.asarray(f["f32"])


def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal((4,)).astype(np.float32),
        "f16": rng.standard_normal((3, 1, 2)).astype(np.float16),
        "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "c64": (rng.standard_normal(2) + 1j).astype(np.complex64),
        "i64": np.array([-(2**62), 5]),
        "i32": np.array([1, -2], np.int32),
        "i16": np.array([3], np.int16),
        "i8": np.array([-4], np.int8),
        "u64": np.array([2**63], np.uint64),
        "u32": np.array([2**31], np.uint32),
        "u16": np.array([65535], np.uint16),
        "u8": np.array([255], np.uint8),
        "bool": np.array([[True, False]]),
        "scalar": np.float32(1.25),
        "empty": np.zeros((0, 4), np.float16),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # non-contiguous input
        "big_endian": np.array([1.5, -2.0], dtype=">f4"),
        "ünïcode.weight": np.ones(1, np.float32),
    }
    path = tmp_path / "all.safetensors"
    save_safetensors(tensors, path, {"format": "np", "ключ": "значение"})
    with open_safetensors(path) as f:
        assert f.metadata == {"format": "np", "ключ": "значение"}
        assert set(f) == set(tensors)
        for key, want in tensors.items():
            want = np.asarray(want)
            got = np.asarray(f[key])
            assert got.shape == want.shape, key
            assert got.dtype == want.dtype.newbyteorder("="), key
            np.testing.assert_array_equal(got, want, err_msg=key)
    assert load_safetensors(path)["bf16"].dtype == BFLOAT16


def test_writer_refuses_to_overwrite(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": np.zeros(2, np.float32)}, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_safetensors({"a": np.ones(2, np.float32)}, path)
    np.testing.assert_array_equal(load_safetensors(path)["a"], np.zeros(2))
    save_safetensors({"a": np.ones(2, np.float32)}, path, overwrite=True)
    np.testing.assert_array_equal(load_safetensors(path)["a"], np.ones(2))
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary files left
    assert os.stat(path).st_mode & 0o777 != 0o600  # not left with mkstemp's private mode


def test_writer_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": np.zeros(2, np.float32)}, path)
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(safetensors_io.os, "replace", fail)  # the move with overwrite=True
    monkeypatch.setattr(safetensors_io.os, "link", fail)  # the no-clobber move
    with pytest.raises(OSError, match="disk on fire"):
        save_safetensors({"a": np.ones(2, np.float32)}, path, overwrite=True)
    with pytest.raises(OSError, match="disk on fire"):
        save_safetensors({"a": np.ones(2, np.float32)}, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "tensors,metadata,match",
    [
        ({"__metadata__": np.zeros(1)}, None, "__metadata__"),
        ({"": np.zeros(1)}, None, "not allowed"),
        ({"x": np.array(["a"])}, None, "cannot store"),
        ({"x": np.array([object()])}, None, "cannot store"),
        ({"x": np.zeros(1)}, {"k": 1}, "metadata"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, tensors, metadata, match):
    with pytest.raises(ValueError, match=match):
        save_safetensors(tensors, tmp_path / "bad.safetensors", metadata)
    assert os.listdir(tmp_path) == []


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        open_safetensors(path)


def test_truncated_copies_are_rejected(fixtures_dir, tmp_path):
    blob = (fixtures_dir / "ckpt" / "mixed.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    for size in (0, 5, 8, 100, len(blob) - 200, len(blob) - 1):
        path.write_bytes(blob[:size])
        with pytest.raises(ValueError, match="cut.safetensors") as err:
            open_safetensors(path)
        assert any(word in str(err.value) for word in ("shorter", "runs past", "truncated")), str(err.value)
    data = len(blob) - 8 - int.from_bytes(blob[:8], "little")
    path.write_bytes(blob[:-1])
    with pytest.raises(
        ValueError, match=f"truncated: the header needs {data} bytes of tensor data, the file has {data - 1}"
    ):
        open_safetensors(path)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"a": F32}, b"\0" * 12, "4 bytes after the last tensor"),
        ({"a": F32, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "unused bytes"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, b"\0" * 8, "needs 8"),
        ({"a": {"dtype": "F32", "shape": [200], "data_offsets": [0, 800]}}, b"\0" * 8, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"", "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype 'X9'"),
        (
            {"a": {"dtype": "F6_E2M3", "shape": [2], "data_offsets": [0, 2]}},
            b"\0" * 2,
            "F6_E2M3 is not supported",
        ),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "data_offsets"),
        ({"a": [1, 2]}, b"", "must be an object"),
        ({"__metadata__": {"k": 3}}, b"", "__metadata__"),
        ([1, 2], b"", "must be a JSON object"),
    ],
)
def test_corrupt_headers_are_rejected(tmp_path, header, data, match):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=match) as err:
        open_safetensors(path)
    assert "bad.safetensors" in str(err.value)


def test_header_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((5).to_bytes(8, "little") + b"{oops")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        open_safetensors(path)
    path.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        open_safetensors(path)


def test_header_length_beyond_file(tmp_path):
    path = write_raw(tmp_path / "bad.safetensors", {}, header_len=10**6)
    with pytest.raises(ValueError, match="header length 1000000 runs past the end of the file"):
        open_safetensors(path)


def test_empty_data_region(tmp_path):
    path = write_raw(
        tmp_path / "e.safetensors", {"e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]}}
    )
    with open_safetensors(path) as f:
        got = np.asarray(f["e"])
    assert got.shape == (0, 3) and got.dtype == BFLOAT16
