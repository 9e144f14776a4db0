"""Hostile and malformed files: every reader refuses them with one ValueError naming the file.

Safetensors headers are checked against the format's own reader (the ``safetensors`` package, a
dev tool here: the comparison is skipped without it): what it refuses, we refuse. The header
parser is fuzzed with Hypothesis (about 20 s; ``TF_DIFFUSION_FUZZ=long`` or a number of examples
per fuzzer runs longer); an
input that escapes with anything but our ValueError becomes a file in
``tests/fixtures/hostile_safetensors/``, which ``test_regression_files`` replays.
"""

import json
import os
import pathlib
import struct
import tempfile

import numpy as np
import pytest

from tf_diffusion.weights.safetensors_io import MAX_HEADER_BYTES, open_safetensors

REGRESSIONS = pathlib.Path(__file__).parent / "fixtures" / "hostile_safetensors"
# TF_DIFFUSION_FUZZ=long: 20,000 examples per fuzzer; a number: that many.
_FUZZ = os.environ.get("TF_DIFFUSION_FUZZ", "")
FUZZ_EXAMPLES = 20_000 if _FUZZ == "long" else int(_FUZZ) if _FUZZ.isdigit() else 250

F32 = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def blob(header, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file: 8-byte length, header (str, written with lone surrogates kept), data."""
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def entry(dtype='"F32"', shape="[2]", offsets="[0,8]") -> str:
    return f'{{"a":{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}}}}}'


# name -> file bytes. The format's reader (safetensors 0.8) refuses every one of these.
BOTH_REFUSE = {
    "dtype as list": blob(entry(dtype='["F32"]'), b"\0" * 8),
    "dtype as dict": blob(entry(dtype='{"F32":1}'), b"\0" * 8),
    "dtype as empty dict": blob(entry(dtype="{}"), b"\0" * 8),
    "dtype as number": blob(entry(dtype="3"), b"\0" * 8),
    "dtype as null": blob(entry(dtype="null"), b"\0" * 8),
    "100k-deep list": blob("[" * 100_000 + "]" * 100_000),
    "100k-deep object": blob('{"a":' * 100_000 + "1" + "}" * 100_000),
    "deep list in a tensor entry": blob(entry(shape="[" * 5000 + "]" * 5000)),
    "deep list in __metadata__": blob('{"__metadata__":' + "[" * 1000 + "]" * 1000 + "}"),
    "__metadata__ []": blob(f'{{"__metadata__":[],"a":{F32}}}', b"\0" * 8),
    "__metadata__ 0": blob(f'{{"__metadata__":0,"a":{F32}}}', b"\0" * 8),
    "__metadata__ false": blob(f'{{"__metadata__":false,"a":{F32}}}', b"\0" * 8),
    "__metadata__ string": blob(f'{{"__metadata__":"x","a":{F32}}}', b"\0" * 8),
    "__metadata__ value int": blob(f'{{"__metadata__":{{"k":1}},"a":{F32}}}', b"\0" * 8),
    "__metadata__ value list": blob(f'{{"__metadata__":{{"k":["v"]}},"a":{F32}}}', b"\0" * 8),
    "__metadata__ twice": blob(f'{{"__metadata__":{{}},"__metadata__":{{}},"a":{F32}}}', b"\0" * 8),
    "__metadata__ as a tensor": blob(f'{{"__metadata__":{F32}}}', b"\0" * 8),
    "lone surrogate name": blob('{"\\ud800":' + F32 + "}", b"\0" * 8),
    "lone low surrogate name": blob('{"x\\udfff":' + F32 + "}", b"\0" * 8),
    "lone surrogate metadata key": blob('{"__metadata__":{"\\ud800":"x"},"a":' + F32 + "}", b"\0" * 8),
    "lone surrogate metadata value": blob('{"__metadata__":{"k":"\\udc00"},"a":' + F32 + "}", b"\0" * 8),
    "offset float": blob(entry(offsets="[0.0,8]"), b"\0" * 8),
    "offset bool": blob(entry(offsets="[false,8]"), b"\0" * 8),
    "offset string": blob(entry(offsets='["0",8]'), b"\0" * 8),
    "offset negative": blob(entry(offsets="[-8,0]"), b"\0" * 8),
    "three offsets": blob(entry(offsets="[0,8,9]"), b"\0" * 8),
    "offsets reversed": blob(entry(offsets="[8,0]"), b"\0" * 8),
    "offsets past the data": blob(entry(offsets="[0,800]"), b"\0" * 8),
    "offset beyond u64": blob(entry(offsets="[0,18446744073709551617]"), b"\0" * 8),
    "shape bool": blob(entry(shape="[true,2]"), b"\0" * 8),
    "shape negative": blob(entry(shape="[-2]"), b"\0" * 8),
    "shape float": blob(entry(shape="[2.0]"), b"\0" * 8),
    "shape string": blob(entry(shape='["2"]'), b"\0" * 8),
    "shape null entry": blob(entry(shape="[null]"), b"\0" * 8),
    "shape not a list": blob(entry(shape="2"), b"\0" * 8),
    "shape 2**32 x 2**32": blob(entry(shape="[4294967296,4294967296]"), b"\0" * 8),
    "shape 2**63 bytes": blob(entry(dtype='"U8"', shape="[9223372036854775808]"), b"\0" * 8),
    "shape 2**63 x 2**63": blob(entry(shape="[9223372036854775807,9223372036854775807]"), b"\0" * 8),
    "shape beyond u64": blob(entry(dtype='"U8"', shape="[18446744073709551616]"), b"\0" * 8),
    "empty, but more bytes than numpy allows": blob(
        '{"a":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}'
    ),
    "5000-digit shape": blob(entry(dtype='"U8"', shape="[" + "9" * 5000 + "]"), b"\0" * 8),
    "5000-digit offset": blob(entry(offsets="[0," + "9" * 5000 + "]"), b"\0" * 8),
    "shape mismatching offsets": blob(entry(shape="[3]"), b"\0" * 8),
    "unknown dtype": blob(entry(dtype='"X9"'), b"\0" * 8),
    "entry is a list": blob('{"a":[1,2]}'),
    "entry lacks offsets": blob('{"a":{"dtype":"F32","shape":[2]}}', b"\0" * 8),
    "NaN in the header": blob(f'{{"a":{F32},"b":NaN}}', b"\0" * 8),
    "Infinity in the header": blob(f'{{"a":{F32},"b":Infinity}}', b"\0" * 8),
    "header is a list": blob("[]"),
    "header is a string": blob('"x"'),
    "header is null": blob("null"),
    "empty header": blob(""),
    "byte-order mark": blob("\ufeff{}"),
    "NUL padding": blob(f'{{"a":{F32}}}\0\0', b"\0" * 8),
    "trailing garbage": blob(f'{{"a":{F32}}}x', b"\0" * 8),
    "not UTF-8": blob(b'{"\xff":1}'),
    "overlong UTF-8": blob(b'{"\xc0\xaf":' + F32.encode() + b"}", b"\0" * 8),
    "UTF-8 surrogate bytes": blob(b'{"\xed\xa0\x80":' + F32.encode() + b"}", b"\0" * 8),
    "overlapping tensors": blob(
        f'{{"a":{F32},"b":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}', b"\0" * 8
    ),
    "gap before a tensor": blob(entry(shape="[1]", offsets="[4,8]"), b"\0" * 8),
    "bytes after the last tensor": blob(entry(), b"\0" * 12),
    "truncated data": blob(entry(), b"\0" * 7),
    "header length past the file": blob("{}", header_len=10**6),
    "header length 2**64 - 1": blob("{}", header_len=2**64 - 1),
    "header length over the cap": blob("{}", header_len=MAX_HEADER_BYTES + 1),
    "seven bytes": b"\x02\0\0\0\0\0\0",
    "no bytes": b"",
}
# Refused here though the format's reader accepts them (stricter on purpose).
ONLY_WE_REFUSE = {
    # The reference keeps the last of two same-named tensors; a file meaning two things is refused.
    "duplicate tensor name": blob(f'{{"a":{F32},"a":{F32}}}', b"\0" * 8),
    "duplicate metadata key": blob(f'{{"__metadata__":{{"k":"a","k":"b"}},"a":{F32}}}', b"\0" * 8),
}
# Accepted by both: what the format allows must keep loading.
BOTH_ACCEPT = {
    "plain": blob(entry(), b"\0" * 8),
    "__metadata__ null": blob(f'{{"__metadata__":null,"a":{F32}}}', b"\0" * 8),
    "space padding": blob(f'{{"a":{F32}}}      ', b"\0" * 8),
    "leading space": blob(f'  {{"a":{F32}}}', b"\0" * 8),
    "unknown field in an entry": blob(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}}', b"\0" * 8
    ),
    "empty tensor name": blob(f'{{"":{F32}}}', b"\0" * 8),
    "escaped valid surrogate pair": blob('{"\\ud83d\\ude00":' + F32 + "}", b"\0" * 8),
    "no tensors": blob("{}"),
    "zero-size tensor": blob('{"a":{"dtype":"F32","shape":[0,1000000],"data_offsets":[0,0]}}'),
}


def write(tmp: pathlib.Path, data: bytes, name: str = "hostile.safetensors") -> pathlib.Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def read_all(path) -> int:
    """Open and read every tensor; the number of scalars read."""
    total = 0
    with open_safetensors(path) as f:
        for name in f:
            total += np.asarray(f[name]).size
    return total


def reference_refuses(data: bytes) -> bool:
    from safetensors.numpy import load

    try:
        load(data)
    except Exception:  # SafetensorError, or numpy's ValueError for arrays it cannot make
        return True
    return False


def assert_refused(path: pathlib.Path) -> ValueError:
    with pytest.raises(ValueError) as err:
        read_all(path)
    assert str(path) in str(err.value), str(err.value)
    return err.value


@pytest.mark.parametrize("name", sorted(BOTH_REFUSE))
def test_malformed_headers_are_refused(tmp_path, name):
    message = str(assert_refused(write(tmp_path, BOTH_REFUSE[name])))
    assert len(message) < 700, message


@pytest.mark.parametrize("name", sorted(ONLY_WE_REFUSE))
def test_duplicate_names_are_refused(tmp_path, name):
    assert "appears twice" in str(assert_refused(write(tmp_path, ONLY_WE_REFUSE[name])))


@pytest.mark.parametrize("name", sorted(BOTH_ACCEPT))
def test_what_the_format_allows_still_loads(tmp_path, name):
    assert read_all(write(tmp_path, BOTH_ACCEPT[name])) in (0, 2)


def test_reference_reader_agrees():
    pytest.importorskip("safetensors")
    assert [n for n, data in BOTH_REFUSE.items() if not reference_refuses(data)] == []
    assert [n for n, data in BOTH_ACCEPT.items() if reference_refuses(data)] == []
    assert [n for n, data in ONLY_WE_REFUSE.items() if reference_refuses(data)] == []


@pytest.mark.parametrize(
    "name,words",
    [
        ("dtype as list", "dtype must be a string"),
        ("100k-deep list", "nests 100000 levels"),
        ("lone surrogate name", "lone surrogate"),
        ("__metadata__ []", "__metadata__ must be an object"),
        ("__metadata__ false", "__metadata__ must be an object"),
        ("5000-digit shape", "5000-digit number"),
        ("shape 2**63 x 2**63", "larger than any array can be (more than 2**64 bytes)"),
        ("shape 2**63 bytes", "larger than any array can be (9223372036854775808 bytes)"),
        ("NaN in the header", "'NaN' is not allowed"),
        ("header length over the cap", "runs past the end"),
    ],
)
def test_messages_say_what_is_wrong(tmp_path, name, words):
    assert words in str(assert_refused(write(tmp_path, BOTH_REFUSE[name])))


def test_header_cap_is_checked_before_reading(tmp_path):
    # A header length above the cap in a file that is long enough: refused without parsing it.
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 100)  # sparse: costs no disk
    assert f"exceeds {MAX_HEADER_BYTES} bytes" in str(assert_refused(path))


def test_fifo_is_refused_without_hanging(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    assert "not a regular file" in str(assert_refused(path))


def test_regression_files():
    files = sorted(REGRESSIONS.glob("*.safetensors"))
    assert files, REGRESSIONS
    for path in files:
        assert_refused(path)


# --------------------------------------------------------------------------- state dicts


def torch_zip(path, obj):
    """A zip in torch.save's layout around an arbitrary pickle (no torch needed)."""
    import pickle
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


W = "model.diffusion_model.out.2.weight"
BAD_STATE_DICTS = {
    "int keys": {"state_dict": {1: 2, 3: 4}},
    "tuple and None keys": {"state_dict": {(1, 2): 3, None: 4}},
    "float key": {"state_dict": {1.5: "x", W: "nope"}},
    "str weight": {"state_dict": {W: "nope"}},
    "list weight": {"state_dict": {W: [1.0, 2.0]}},
    "dict weight": {"state_dict": {"first_stage_model.decoder.conv_in.weight": {"data": 1}}},
    "None weight": {"state_dict": {"cond_stage_model.transformer.text_model.x": None}},
    "int weight in a flat file": {"global_step": 5, W: 7},
    "flat, int keys": {7: 8, "global_step": 5},
    "state_dict a list": {"state_dict": [1, 2]},
    "a list": [1, 2, 3],
    "a string": "state_dict",
}


@pytest.mark.parametrize("name", sorted(BAD_STATE_DICTS))
def test_state_dicts_that_are_not_tensors_are_one_error(tmp_path, capsys, name):
    from tf_diffusion.cli import main
    from tf_diffusion.weights.loading import load_pipeline_weights

    path = torch_zip(tmp_path / "odd.ckpt", BAD_STATE_DICTS[name])
    with pytest.raises(ValueError) as err:
        load_pipeline_weights(path, strict=False)
    assert str(path) in str(err.value), str(err.value)
    # The pickle reader itself refuses some keys (floats) before any state dict is walked.
    assert type(err.value).__name__ in ("ValueError", "CheckpointError", "UnsafeCheckpointError"), repr(
        err.value
    )
    assert main(["info", str(path)]) == 1
    out, errors = capsys.readouterr()
    assert out == "" and errors.count("\n") == 1 and str(path) in errors, errors


def test_bad_keys_are_named():
    from tf_diffusion.weights.single_file import split_single_file, unwrap_checkpoint

    with pytest.raises(
        ValueError, match=r"f.ckpt: not a state dict of tensors: 2 keys that are not strings \(1, \(2, 3\)\)"
    ):
        unwrap_checkpoint({"state_dict": {1: np.zeros(1), (2, 3): 0}}, "f.ckpt")
    with pytest.raises(ValueError, match=rf"1 weights that are not tensors \('{W}' \(str\)\)"):
        split_single_file({W: "x"})
    keys = {i: 0 for i in range(40)}
    with pytest.raises(ValueError, match=r"40 keys that are not strings \(0, 1, 2, 3, 4, \.\.\.\)"):
        split_single_file(keys)


def test_metadata_values_are_kept_aside():
    from tf_diffusion.weights.single_file import split_single_file, unwrap_checkpoint

    weight = np.zeros((4, 3), np.float32)
    flat = {W: weight, "global_step": 875000, "epoch": 3, "model_ema.decay": 0.999}
    tensors, top = unwrap_checkpoint(flat, "f.ckpt")
    assert list(tensors) == [W] and top == {"global_step": 875000, "epoch": 3, "model_ema.decay": 0.999}
    tensors, top = unwrap_checkpoint({"state_dict": flat, "global_step": 1}, "f.ckpt")
    assert list(tensors) == [W] and top["global_step"] == 1 and top["epoch"] == 3
    parts = split_single_file(flat)
    assert parts.components["unet"] == {"out.2.weight": weight}
    assert sorted(parts.ignored) == ["epoch", "global_step", "model_ema.decay"]


def test_load_state_dict_refuses_non_tensors_before_assigning():
    from tf_diffusion.layers import Linear
    from tf_diffusion.weights.state_dict import StateDictError, load_state_dict, state_dict

    model = Linear(3, 2)
    before = state_dict(model)
    good = {k: np.ones(v.shape, np.float32) for k, v in before.items()}
    for bad in ({**good, 5: np.ones(1)}, {**good, "weight": "x"}, {**good, "bias": None}):
        with pytest.raises(StateDictError, match=r"entries that are not \(string key, tensor\) pairs"):
            load_state_dict(model, bad)
        after = state_dict(model)
        assert all(np.array_equal(after[k], before[k]) for k in before)
    load_state_dict(model, good)
    assert all(np.all(v == 1) for v in state_dict(model).values())


def test_parameter_counts_never_go_negative():
    from tf_diffusion.weights.lazy import LazyTensor
    from tf_diffusion.weights.loading import LoadedWeights, LoadReport, _describe

    huge = LazyTensor((2**40, 2**40), np.float32, lambda: None)
    over = LazyTensor((2**62, 4), np.float32, lambda: None)
    report = LoadReport(source="x", path="x", format="test")
    _describe(LoadedWeights(None, None, {"unet": {"a": huge, "b": over}}, report))
    assert report.parameters["unet"] == 2**80 + 2**64


# --------------------------------------------------------------------------- the guard


@pytest.mark.parametrize(
    "error",
    [
        KeyError("model"),
        IndexError("list index out of range"),
        TypeError("unhashable type: 'list'"),
        AttributeError("'int' object has no attribute 'shape'"),
        RecursionError("maximum recursion depth exceeded"),
        MemoryError(),
        OverflowError("cannot fit 'int' into an index-sized integer"),
        OSError(22, "Invalid argument"),
        NotImplementedError("compression method 99"),
        RuntimeError("File is encrypted"),
        EOFError(),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("reader", ["open_safetensors", "load_ckpt"])
def test_stray_exceptions_become_one_error_naming_the_file(fixtures_dir, monkeypatch, error, reader):
    from tf_diffusion.fileio import CheckpointError
    from tf_diffusion.weights import loading

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(loading, reader, fail)
    name = "sd1.safetensors" if reader == "open_safetensors" else "sd1-full.ckpt"
    path = fixtures_dir / "checkpoints" / name
    with pytest.raises(CheckpointError) as err:
        loading.load_pipeline_weights(path)
    assert str(err.value).startswith(f"{path}: cannot read the checkpoint: {type(error).__name__}")
    assert err.value.__cause__ is error and err.value.path == str(path)


def test_value_errors_keep_their_type_and_gain_the_path(fixtures_dir, monkeypatch):
    from tf_diffusion.weights import loading
    from tf_diffusion.weights.ckpt import UnsafeCheckpointError

    def fail(*args, **kwargs):
        raise UnsafeCheckpointError("refusing posix.system")

    monkeypatch.setattr(loading, "load_ckpt", fail)
    path = fixtures_dir / "checkpoints" / "sd1-full.ckpt"
    with pytest.raises(UnsafeCheckpointError, match=f"^{path}: refusing posix.system$"):
        loading.load_pipeline_weights(path)


def test_unicode_errors_are_wrapped_not_mangled(fixtures_dir, monkeypatch):
    from tf_diffusion.fileio import CheckpointError
    from tf_diffusion.weights import loading

    def fail(*args, **kwargs):
        b"\xff".decode("utf-8")

    monkeypatch.setattr(loading, "open_safetensors", fail)
    path = fixtures_dir / "checkpoints" / "sd1.safetensors"
    with pytest.raises(
        CheckpointError, match=f"^{path}: cannot read the checkpoint: UnicodeDecodeError: 'utf-8' codec"
    ):
        loading.load_pipeline_weights(path)


def test_interrupts_are_not_translated(fixtures_dir, monkeypatch):
    from tf_diffusion.weights import loading

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "open_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        loading.load_pipeline_weights(fixtures_dir / "checkpoints" / "sd1.safetensors")


def test_a_read_failing_while_loading_returns_no_model(fixtures_dir, monkeypatch):
    import zlib

    from tf_diffusion.fileio import CheckpointError
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights import loading

    real = loading.open_safetensors
    built = []

    def opened(path):
        handle = real(path)
        tensor = handle["model.diffusion_model.out.2.weight"]

        def broken():
            raise zlib.error("Error -3 while decompressing data: invalid distance too far back")

        handle._tensors["model.diffusion_model.out.2.weight"] = type(tensor)(
            tensor.shape, tensor.dtype, broken
        )
        return handle

    class Recorded(StableDiffusion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(loading, "open_safetensors", opened)
    path = fixtures_dir / "checkpoints" / "sd1.safetensors"
    with pytest.raises(CheckpointError, match=f"^{path}: cannot read the checkpoint: error: Error -3"):
        loading.from_pretrained(Recorded, path, config=str(fixtures_dir / "checkpoints" / "sd1-diffusers"))
    assert len(built) == 1  # built, then dropped: nothing half-loaded reaches the caller


def test_a_read_failing_while_converting_leaves_nothing(fixtures_dir, tmp_path):
    import zlib

    from tf_diffusion.fileio import CheckpointError
    from tf_diffusion.weights.loading import load_pipeline_weights, save

    source = fixtures_dir / "checkpoints" / "sd1.safetensors"
    out = tmp_path / "out"
    with load_pipeline_weights(source, config=str(fixtures_dir / "checkpoints" / "sd1-diffusers")) as weights:
        unet = weights.components["unet"]
        key = sorted(unet)[len(unet) // 2]

        def broken():
            raise zlib.error("Error -3 while decompressing data")

        unet[key] = type(unet[key])(unet[key].shape, unet[key].dtype, broken)
        with pytest.raises(CheckpointError, match=f"^{source}: cannot convert it to {out}: error: Error -3"):
            save(weights, out, format="tf_diffusion")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- folders and h5


@pytest.fixture(scope="module")
def our_folder(tmp_path_factory, fixtures_dir_module):
    from tf_diffusion.weights.loading import load_pipeline_weights, save

    out = tmp_path_factory.mktemp("ours") / "model"
    with load_pipeline_weights(fixtures_dir_module / "checkpoints" / "sd1-diffusers") as weights:
        save(weights, out, format="tf_diffusion")
    return out


@pytest.fixture(scope="module")
def fixtures_dir_module():
    return pathlib.Path(__file__).parent / "fixtures"


HOSTILE_JSON = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "a list": b"[1, 2]",
    "a number": b"7",
    "not UTF-8": b'{"\xff": 1}',
    "5000 digits": b'{"format_version": ' + b"9" * 5000 + b"}",
    "truncated": b'{"_format": "tf_diffusion", "config": {',
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON) + ["fifo", "folder", "too big"])
@pytest.mark.parametrize("layout", ["tf_diffusion", "diffusers"])
def test_hostile_json_in_folders(fixtures_dir, our_folder, tmp_path, name, layout):
    import shutil

    from tf_diffusion.weights.loading import load_pipeline_weights

    if layout == "tf_diffusion":
        folder = tmp_path / "model"
        shutil.copytree(our_folder, folder)
        target = folder / "config.json"
        # Keep the folder recognisable as ours where the hostile part can sit elsewhere.
    else:
        folder = tmp_path / "model"
        shutil.copytree(fixtures_dir / "checkpoints" / "sd1-diffusers", folder)
        target = folder / "unet" / "config.json"
    target.unlink()
    if name == "fifo":
        os.mkfifo(target)
    elif name == "folder":
        target.mkdir()
    elif name == "too big":
        with open(target, "wb") as f:
            f.write(b'{"_format": "tf_diffusion"}')
            f.truncate(65 * 1024 * 1024)  # sparse
    else:
        target.write_bytes(HOSTILE_JSON[name])
    with pytest.raises(ValueError) as err:
        with load_pipeline_weights(folder):
            pass
    assert str(folder) in str(err.value), str(err.value)
    assert len(str(err.value)) < 700


def test_keras_cv_h5_garbage(tmp_path):
    h5py = pytest.importorskip("h5py")
    from tf_diffusion.weights.loading import load_pipeline_weights

    cases = {"random.h5": os.urandom(4096), "empty.h5": b"", "text.h5": b"not an hdf5 file\n" * 100}
    valid = tmp_path / "valid.h5"
    with h5py.File(valid, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros((4, 4), np.float32))
        f.create_dataset("weird", data=np.array([b"text"]))
    data = valid.read_bytes()
    cases["truncated.h5"] = data[: len(data) // 2]
    cases["unrelated.h5"] = data
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as err:
            with load_pipeline_weights(path):
                pass
        assert str(path) in str(err.value) or name in str(err.value), (name, str(err.value))


# --------------------------------------------------------------------------- writes


def dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_clean_stale_removes_only_dead_writers_litter(tmp_path):
    from tf_diffusion.fileio import clean_stale

    dead, live = dead_pid(), os.getpid()
    dest = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead}-abc.tmp").mkdir()
    (tmp_path / f".out.tmp-{dead}-abc.tmp" / "unet.safetensors").write_bytes(b"half")
    (tmp_path / f".out.tmp-{dead}-x.tmp").write_bytes(b"half a file")
    (tmp_path / f".out.tmp-{live}-mine.tmp").mkdir()  # a live writer's work: left alone
    (tmp_path / ".other.tmp-1-x.tmp").mkdir()  # another destination's: left alone
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (tmp_path / f".out.tmp-{dead}-link.tmp").symlink_to(outside)  # unlinked, never followed
    done = clean_stale(dest)
    assert len(done) == 3 and all(line.startswith("removed") for line in done), done
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.tmp-1-x.tmp",
        f".out.tmp-{live}-mine.tmp",
        "outside",
    ]
    assert (outside / "keep").read_text() == "keep"


def test_clean_stale_puts_an_old_destination_back(tmp_path):
    from tf_diffusion.fileio import clean_stale

    dead = dead_pid()
    aside = tmp_path / f".out.old-{dead}"
    aside.mkdir()
    (aside / "config.json").write_text("old")
    # Killed between the two renames of an overwrite: the old result comes back, nothing is lost.
    assert clean_stale(tmp_path / "out") == [f"restored {tmp_path / 'out'} from {aside}"]
    assert (tmp_path / "out" / "config.json").read_text() == "old" and not aside.exists()
    # Killed after the new result landed: the old one is removed.
    aside.mkdir()
    assert clean_stale(tmp_path / "out") == [f"removed {aside}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_safetensors_never_follows_a_symlink(tmp_path):
    from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors

    target = tmp_path / "target.bin"
    target.write_bytes(b"precious")
    link = tmp_path / "w.safetensors"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="already exists"):
        save_safetensors({"a": np.zeros(2, np.float32)}, link)
    dangling = tmp_path / "d.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="already exists"):
        save_safetensors({"a": np.zeros(2, np.float32)}, dangling)
    assert not (tmp_path / "nowhere").exists()
    save_safetensors({"a": np.ones(2, np.float32)}, link, overwrite=True)
    assert not link.is_symlink() and target.read_bytes() == b"precious"
    np.testing.assert_array_equal(load_safetensors(link)["a"], np.ones(2))


def test_save_safetensors_cleans_a_killed_writers_file(tmp_path):
    from tf_diffusion.weights.safetensors_io import save_safetensors

    (tmp_path / f".w.safetensors.tmp-{dead_pid()}-abc.tmp").write_bytes(b"half")
    save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("to", ["tf_diffusion", "single-file"])
def test_convert_never_follows_a_symlink(fixtures_dir, tmp_path, capsys, to):
    from tf_diffusion.cli import main

    source = fixtures_dir / "checkpoints" / "sd1-diffusers"
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("mine")
    for name in ("link", "dangling"):
        link = tmp_path / (name + (".safetensors" if to == "single-file" else ""))
        link.symlink_to(target if name == "link" else tmp_path / "nowhere")
        assert main(["convert", str(source), str(link), "--to", to]) == 1
        assert "already exists" in capsys.readouterr().err
        assert main(["convert", str(source), str(link), "--to", to, "--overwrite"]) == 0, capsys.readouterr()
        assert not link.is_symlink() and link.exists()
    assert [p.name for p in target.iterdir()] == ["precious"] and not (tmp_path / "nowhere").exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.startswith(".")], names


def _complete(path: pathlib.Path, source: pathlib.Path, reference: dict) -> bool:
    from tf_diffusion.weights.loading import load_pipeline_weights

    # The source's folder gives the (tiny) tokenizer a single file cannot hold.
    with load_pipeline_weights(path, config=str(source)) as weights:
        got = {n: {k: np.asarray(v) for k, v in weights.components[n].items()} for n in weights.components}
    assert got.keys() == reference.keys()
    for name in got:
        assert got[name].keys() == reference[name].keys()
        for key in got[name]:
            np.testing.assert_array_equal(got[name][key], reference[name][key])
    return True


KILL_DELAYS = [0.0, 0.002, 0.01, 0.03, 0.1, 0.3] if os.environ.get("TF_DIFFUSION_SLOW_TESTS") else [0.0, 0.01]


def test_a_killed_convert_leaves_nothing_or_everything(fixtures_dir, tmp_path, capsys):
    """SIGKILL `python -m tf_diffusion convert` at several moments after it starts writing."""
    import signal
    import subprocess
    import sys
    import time

    from tf_diffusion.cli import main
    from tf_diffusion.weights.loading import load_pipeline_weights

    source = fixtures_dir / "checkpoints" / "sd1-diffusers"
    with load_pipeline_weights(source) as weights:
        reference = {
            n: {k: np.asarray(v) for k, v in weights.components[n].items()} for n in weights.components
        }
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    # One process per delay, started together (each spends seconds importing TensorFlow first).
    runs = []
    for i, delay in enumerate(KILL_DELAYS):
        to = ["tf_diffusion", "single-file", "diffusers"][i % 3]
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        dest = folder / ("out.safetensors" if to == "single-file" else "out")
        command = [sys.executable, "-m", "tf_diffusion", "convert", str(source), str(dest), "--to", to]
        runs.append(
            (
                delay,
                to,
                folder,
                dest,
                subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            )
        )
    killed = 0
    pending = list(runs)
    deadline = time.monotonic() + 600
    while pending and time.monotonic() < deadline:
        for run in list(pending):
            delay, to, folder, dest, process = run
            started = any(p.name.startswith(f".{dest.name}.tmp-") for p in folder.iterdir())
            if process.poll() is not None:
                pending.remove(run)
            elif started:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed += process.returncode == -signal.SIGKILL
                pending.remove(run)
        time.sleep(0.0005)
    assert not pending, "convert never started writing"
    assert killed >= 1, "every run finished before it could be killed"
    for delay, to, folder, dest, _ in runs:
        # Either no destination at all, or a complete one.
        print(
            f"killed {delay:.3f} s after writing began ({to}): destination {'complete' if dest.exists() else 'absent'}"
        )
        if dest.exists():
            assert _complete(dest, source, reference), (delay, to)
        # The next run succeeds and leaves exactly the destination, no litter.
        args = ["convert", str(source), str(dest), "--to", to] + (["--overwrite"] if dest.exists() else [])
        assert main(args) == 0, capsys.readouterr().err
        assert [p.name for p in folder.iterdir()] == [dest.name], (delay, to, list(folder.iterdir()))
        assert _complete(dest, source, reference)


# --------------------------------------------------------------------------- fuzzing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_KEYS = st.sampled_from(["a", "b", "dtype", "shape", "data_offsets", "__metadata__", "\ud800", ""])
_ATOMS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.sampled_from(["F32", "F16", "BF16", "U8", "BOOL", "F8_E4M3", "X9"])
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _ATOMS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=30,
)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "U8", "I64", "BOOL"]) | _JSON,
        "shape": st.lists(st.integers(min_value=-2, max_value=2**64), max_size=3) | _JSON,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**64), min_size=2, max_size=2) | _JSON,
    }
)
_HEADER = st.dictionaries(st.text(max_size=6) | _KEYS, _ENTRY | _JSON, max_size=5)


def _check(data: bytes) -> None:
    """The property: reading returns, or raises a ValueError naming the file. Anything else escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write(pathlib.Path(tmp), data)
        try:
            read_all(path)
        except ValueError as e:
            if str(path) not in str(e):
                _save_escape(data)
                raise AssertionError(f"error without the path: {e}") from e
        except BaseException:
            _save_escape(data)
            raise


_saved = []


def _save_escape(data: bytes) -> None:
    # Hypothesis retries a failure many times while shrinking it: keep the first few, for a regression file.
    import hashlib

    if len(_saved) >= 3:
        return
    _saved.append(data)
    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    (REGRESSIONS / f"escape-{hashlib.sha256(data).hexdigest()[:16]}.safetensors").write_bytes(data)


def _valid_file() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]},
    }
    raw = json.dumps(header).encode()
    return blob(raw, bytes(range(19)))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _check(data)


@FUZZ
@given(_HEADER, st.integers(min_value=0, max_value=64))
def test_fuzz_structured_headers(header, data_len):
    raw = json.dumps(header, ensure_ascii=True).encode()
    _check(blob(raw, bytes(data_len)))


@FUZZ
@given(_HEADER, st.integers(min_value=0, max_value=64))
def test_fuzz_we_refuse_what_the_reference_refuses(header, data_len):
    pytest.importorskip("safetensors")
    data = blob(json.dumps(header, ensure_ascii=True).encode(), bytes(data_len))
    if reference_refuses(data):
        with tempfile.TemporaryDirectory() as tmp:
            path = write(pathlib.Path(tmp), data)
            with pytest.raises(ValueError):
                read_all(path)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_mutated_files(edits):
    data = bytearray(_valid_file())
    for kind, where, byte in edits:
        where %= len(data) + 1
        if kind == "insert":
            data.insert(where, byte)
        elif where < len(data):
            if kind == "flip":
                data[where] ^= byte or 1
            else:
                del data[where]
    _check(bytes(data))
