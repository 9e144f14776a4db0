"""torch.save checkpoints read without torch: exact values, lazy reads, and refusal to run pickled code."""

import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from tf_diffusion.weights.ckpt import PickledObject, UnsafeCheckpointError, load_ckpt
from tf_diffusion.weights.lazy import BFLOAT16, LazyTensor

PWNED = "/tmp/pwned_tf_diffusion"  # what the committed malicious fixtures try to create


def expected(fixtures_dir, name):
    """Values torch held (floats as float32), keyed 'outer/inner', and torch dtype names."""
    data = np.load(fixtures_dir / "ckpt" / f"{name}.expected.npz")
    dtypes = json.loads(str(data["__dtypes__"]))
    return {key: data[key] for key in dtypes}, dtypes


def lookup(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.parametrize(
    "filename,name",
    [
        ("lightning.ckpt", "lightning"),
        ("dtypes.pt", "dtypes"),
        ("views.ckpt", "views"),
        ("views_legacy.ckpt", "views"),
        ("legacy.ckpt", "legacy"),
        ("metadata.ckpt", "metadata"),
    ],
)
def test_tensors_match_what_torch_saved(fixtures_dir, filename, name):
    ckpt = load_ckpt(fixtures_dir / "ckpt" / filename)
    values, dtypes = expected(fixtures_dir, name)
    for key, want in values.items():
        tensor = lookup(ckpt, key)
        assert isinstance(tensor, LazyTensor), key
        assert tensor.shape == want.shape, key
        assert str(tensor.dtype) == dtypes[key], key
        got = np.asarray(tensor)
        assert got.dtype == tensor.dtype and got.shape == want.shape, key
        assert got.flags.c_contiguous and got.flags.writeable, key
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=f"{filename}:{key}")


def test_lightning_structure(fixtures_dir):
    ckpt = load_ckpt(fixtures_dir / "ckpt" / "lightning.ckpt")
    assert ckpt["global_step"] == 123 and ckpt["epoch"] == 2
    assert ckpt["misc"] == [1.5, "text", (None, True)]
    assert isinstance(ckpt["state_dict"], collections.OrderedDict)
    assert list(ckpt["state_dict"]) == [
        "model.conv.weight",
        "model.conv.bias",  # an nn.Parameter: loads as its data
        "model.proj.weight",
        "model.ids",
        "model.mask",
        "model_ema.num_updates",
        "model.scale",
    ]
    assert ckpt["state_dict"]["model.scale"].shape == ()
    assert float(np.asarray(ckpt["state_dict"]["model.scale"])) == pytest.approx(0.18215)


def test_legacy_lightning_structure(fixtures_dir):
    ckpt = load_ckpt(fixtures_dir / "ckpt" / "legacy.ckpt")
    assert ckpt["global_step"] == 7
    assert ckpt["state_dict"]["b"].dtype == BFLOAT16


def test_views_are_independent_copies(fixtures_dir):
    ckpt = load_ckpt(fixtures_dir / "ckpt" / "views.ckpt")
    base, block = np.asarray(ckpt["base"]), np.asarray(ckpt["block"])
    block[...] = -1
    np.testing.assert_array_equal(base[1:3, 2:5], np.arange(24, dtype=np.float32).reshape(4, 6)[1:3, 2:5] / 8)
    np.testing.assert_array_equal(np.asarray(ckpt["transposed"]), base.T)


def test_harmless_metadata_loads_inertly(fixtures_dir):
    ckpt = load_ckpt(fixtures_dir / "ckpt" / "metadata.ckpt")
    (callback,) = ckpt["callbacks"]
    assert issubclass(callback, PickledObject)
    assert callback.global_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert ckpt["callbacks"][callback] == {"best_model_score": 0.25, "monitor": None}
    assert ckpt["lr"] == np.float32(1e-4) and ckpt["lr"].dtype == np.float32
    assert ckpt["step"] == 42 and ckpt["step"].dtype == np.int64
    assert ckpt["tags"] == {"a", "b"}
    assert ckpt["pytorch-lightning_version"] == "1.4.2"


def test_tensors_are_read_only_when_asked(fixtures_dir, tmp_path):
    values, _ = expected(fixtures_dir, "lightning")
    path = tmp_path / "l.ckpt"
    shutil.copy(fixtures_dir / "ckpt" / "lightning.ckpt", path)
    ckpt = load_ckpt(path)
    proj = ckpt["state_dict"]["model.proj.weight"]
    assert proj.shape == (5, 4) and proj.dtype == np.float32
    # Change the storage bytes on disk after loading: the tensor must see the new values.
    blob = path.read_bytes()
    start = blob.find(values["state_dict/model.proj.weight"].tobytes())
    assert start > 0
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.full((5, 4), 3.0, np.float32).tobytes())
    np.testing.assert_array_equal(np.asarray(proj), np.full((5, 4), 3.0, np.float32))
    np.testing.assert_array_equal(np.asarray(ckpt["state_dict"]["model.ids"]), values["state_dict/model.ids"])


def test_bfloat16_converts_to_float32(fixtures_dir):
    values, _ = expected(fixtures_dir, "dtypes")
    got = np.asarray(load_ckpt(fixtures_dir / "ckpt" / "dtypes.pt")["bf16"], dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values["bf16"])


# --- untrusted pickles ----------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["malicious.ckpt", "malicious_plain.pkl"])
def test_malicious_fixture_runs_nothing(fixtures_dir, filename):
    if os.path.exists(PWNED):
        os.remove(PWNED)
    with pytest.raises(UnsafeCheckpointError, match="'posix.system'") as err:
        load_ckpt(fixtures_dir / "ckpt" / filename)
    assert filename in str(err.value)
    assert isinstance(err.value, ValueError)
    assert not os.path.exists(PWNED)


class _Call:
    """Pickles as func(*args): what an attacker's object would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def torch_zip(path, obj, protocol=2, prefix="archive"):
    """A zip in torch.save's layout around an arbitrary pickle (no torch needed)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle.dumps(obj, protocol=protocol))
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")
    return path


@pytest.mark.parametrize("container", ["zip", "plain"])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    "make,refused",
    [
        (lambda marker: _Call(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        (lambda marker: _Call(exec, f"open({str(marker)!r}, 'w')"), "builtins.exec"),
        (lambda marker: _Call(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        (lambda marker: _Call(os.system, f"touch {marker}"), "posix.system"),
        (lambda marker: _Call(shutil.copy, __file__, str(marker)), "shutil.copy"),
        (lambda marker: {"state_dict": [1, _Call(open, str(marker), "w")]}, "io.open"),
    ],
)
def test_any_other_global_is_refused(tmp_path, container, protocol, make, refused):
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.ckpt"
    if container == "zip":
        torch_zip(path, make(marker), protocol)
    else:
        path.write_bytes(pickle.dumps(make(marker), protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load global '{refused}'"):
        load_ckpt(path)
    assert not marker.exists()


def test_placeholders_make_named_globals_inert(tmp_path):
    marker = tmp_path / "side_effect"
    path = torch_zip(tmp_path / "p.ckpt", {"hook": _Call(os.system, f"touch {marker}")})
    ckpt = load_ckpt(path, placeholder_globals=["posix.system"])
    hook = ckpt["hook"]
    assert isinstance(hook, PickledObject) and hook.global_name == "posix.system"
    assert hook.args == (f"touch {marker}",)
    assert not marker.exists()


class Config:
    """A plain class, pickled by NEWOBJ + BUILD (as Lightning hyper-parameter objects are)."""

    def __init__(self):
        self.lr = 0.1


def test_placeholder_keeps_state(tmp_path):
    name = f"{Config.__module__}.Config"
    path = torch_zip(tmp_path / "c.ckpt", {"cfg": Config()})
    with pytest.raises(UnsafeCheckpointError, match=name):
        load_ckpt(path)
    cfg = load_ckpt(path, placeholder_globals=[name])["cfg"]
    assert isinstance(cfg, PickledObject) and cfg.state == {"lr": 0.1}


# --- damaged and foreign files -----------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_ckpt(tmp_path / "absent.ckpt")


@pytest.mark.parametrize("filename", ["lightning.ckpt", "views_legacy.ckpt", "legacy.ckpt"])
def test_truncated_copies_are_rejected(fixtures_dir, tmp_path, filename):
    blob = (fixtures_dir / "ckpt" / filename).read_bytes()
    path = tmp_path / "cut.ckpt"
    for size in (1, 10, 64, len(blob) // 2, len(blob) - 30, len(blob) - 1):
        path.write_bytes(blob[:size])
        with pytest.raises(ValueError, match="cut.ckpt") as err:
            load_ckpt(path)
        assert not isinstance(err.value, UnsafeCheckpointError)


def test_truncated_zip_message(fixtures_dir, tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes((fixtures_dir / "ckpt" / "lightning.ckpt").read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a valid zip archive"):
        load_ckpt(path)


def test_truncated_legacy_storage_message(fixtures_dir, tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes((fixtures_dir / "ckpt" / "legacy.ckpt").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated: storage .* runs past the end of the file"):
        load_ckpt(path)


def rewrite_zip(src, dst, drop=(), replace=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = (replace or {}).get(info.filename, zin.read(info.filename))
            zout.writestr(info.filename, data)
    return dst


def test_missing_data_pkl(fixtures_dir, tmp_path):
    path = rewrite_zip(
        fixtures_dir / "ckpt" / "lightning.ckpt", tmp_path / "x.ckpt", drop={"lightning/data.pkl"}
    )
    with pytest.raises(ValueError, match="data.pkl"):
        load_ckpt(path)


def test_missing_storage_record(fixtures_dir, tmp_path):
    path = rewrite_zip(
        fixtures_dir / "ckpt" / "lightning.ckpt", tmp_path / "x.ckpt", drop={"lightning/data/2"}
    )
    with pytest.raises(ValueError, match="storage record 'lightning/data/2' is missing"):
        load_ckpt(path)


def test_wrong_storage_size(fixtures_dir, tmp_path):
    path = rewrite_zip(
        fixtures_dir / "ckpt" / "lightning.ckpt",
        tmp_path / "x.ckpt",
        replace={"lightning/data/2": b"\0" * 12},
    )
    with pytest.raises(ValueError, match="holds 12 bytes, expected 80"):
        load_ckpt(path)


def test_corrupt_pickle(fixtures_dir, tmp_path):
    data = zipfile.ZipFile(fixtures_dir / "ckpt" / "lightning.ckpt").read("lightning/data.pkl")
    for bad in (data[: len(data) // 2], b"\x80\x02garbage", b""):
        path = rewrite_zip(
            fixtures_dir / "ckpt" / "lightning.ckpt", tmp_path / "x.ckpt", replace={"lightning/data.pkl": bad}
        )
        with pytest.raises(ValueError, match="cannot read lightning/data.pkl"):
            load_ckpt(path)


def test_compressed_zip_entries_are_read(fixtures_dir, tmp_path):
    # Some tools re-zip checkpoints with deflate: storages are then decompressed on read.
    src = fixtures_dir / "ckpt" / "views.ckpt"
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    values, _ = expected(fixtures_dir, "views")
    ckpt = load_ckpt(path)
    np.testing.assert_array_equal(np.asarray(ckpt["block"]), values["block"])


def test_storage_bounds_are_checked(fixtures_dir, tmp_path):
    # A data.pkl whose tensor claims more elements than its storage holds.
    data = zipfile.ZipFile(fixtures_dir / "ckpt" / "views.ckpt").read("views/data.pkl")
    # 'base' is (4, 6) = 24 floats; make its size (5, 6) by patching the pickled tuple.
    patched = data.replace(b"K\x04K\x06\x86", b"K\x05K\x06\x86", 1)
    assert patched != data
    path = rewrite_zip(
        fixtures_dir / "ckpt" / "views.ckpt", tmp_path / "x.ckpt", replace={"views/data.pkl": patched}
    )
    with pytest.raises(ValueError, match="needs 30 elements"):
        load_ckpt(path)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty file"),
        (b"hello, world", "not a torch checkpoint"),
        (pickle.dumps({"a": 1}, protocol=2), "not a torch checkpoint"),
        (b"\0" * 257 + b"ustar" + b"\0" * 300, "tar-format"),
    ],
)
def test_foreign_files(tmp_path, content, match):
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_ckpt(path)


def test_torchscript_archive(tmp_path):
    path = tmp_path / "ts.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ts/data.pkl", pickle.dumps({}))
        zf.writestr("ts/constants.pkl", pickle.dumps(()))
    with pytest.raises(ValueError, match="TorchScript"):
        load_ckpt(path)


def test_numpy_object_arrays_are_refused(tmp_path):
    # numpy.dtype is allowed for Lightning's scalars, but never an object dtype.
    buf = io.BytesIO()
    pickle.dump(np.dtype("O"), buf, protocol=2)
    path = torch_zip(tmp_path / "o.ckpt", None)
    rewrite_zip(path, tmp_path / "o2.ckpt", replace={"archive/data.pkl": buf.getvalue()})
    with pytest.raises(UnsafeCheckpointError, match="object dtype"):
        load_ckpt(tmp_path / "o2.ckpt")
