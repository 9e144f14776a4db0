"""`tf-diffusion info` and `convert`: round trips give identical tensors; writes are atomic and never clobber."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tf_diffusion.cli import main
from tf_diffusion.weights import loading
from tf_diffusion.weights.lazy import BFLOAT16
from tf_diffusion.weights.loading import load_pipeline_weights
from tf_diffusion.weights.safetensors_io import load_safetensors


@pytest.fixture
def root(fixtures_dir):
    return fixtures_dir / "checkpoints"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tensors_of(source, **kwargs):
    with load_pipeline_weights(source, **kwargs) as weights:
        return weights.config, {
            name: {k: np.asarray(v) for k, v in weights.components[name].items()}
            for name in weights.components
        }


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype, (name, key)
            assert np.array_equal(a[name][key], b[name][key]), (name, key)


def test_info(capsys, root):
    code, out, err = run(capsys, "info", root / "sd1-full.ckpt", "--config", root / "sd1-diffusers")
    assert code == 0, err
    assert "format:          single-file (.ckpt)" in out
    assert "family:          sd1" in out
    assert "stored separately, not used" in out
    assert "unet:            52,004 parameters, float16" in out
    code, out, _ = run(capsys, "info", root / "sd2.safetensors", "--json")
    report = json.loads(out)
    assert report["family"] == "sd2" and report["dtypes"]["unet"] == "bfloat16"
    # Without its tokenizer the tiny SD 2.x file is still described, with the problem listed.
    assert any("tokenizer has 49408 tokens" in p for p in report["problems"])
    assert report["prediction_type"] == "v_prediction" and report["prediction_type_source"].startswith(
        "assumed"
    )


def test_info_lists_unusual_content(capsys, root, tmp_path):
    state = load_safetensors(root / "sd1.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    state["something.else"] = np.zeros(2, np.float16)
    from tf_diffusion.weights.safetensors_io import save_safetensors

    save_safetensors(state, tmp_path / "odd.safetensors")
    code, out, err = run(capsys, "info", tmp_path / "odd.safetensors")
    assert code == 0, err
    assert "missing:         vae" in out
    assert "unexpected:      1 keys (something.else)" in out


def test_errors_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "info", tmp_path / "missing.ckpt")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("tf-diffusion: error: ") and "no such file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "source,options,via",
    [
        ("sd1-diffusers", [], "single-file"),
        ("sd1-diffusers", ["--variant", "fp16"], "tf_diffusion"),
        ("sd2-diffusers", [], "single-file"),
        ("sd1.safetensors", ["--config", "sd1-diffusers"], "diffusers"),
        ("sd1-full.ckpt", ["--config", "sd1-diffusers", "--use-ema"], "tf_diffusion"),
        ("sd2.safetensors", ["--config", "sd2-diffusers"], "diffusers"),
    ],
)
def test_round_trip_gives_identical_tensors(capsys, root, tmp_path, source, options, via):
    options = [str(root / o) if o.startswith("sd") else o for o in options]
    kwargs = {"variant": "fp16"} if "--variant" in options else {}
    if "--config" in options:
        kwargs["config"] = options[options.index("--config") + 1]
    if "--use-ema" in options:
        kwargs["use_ema"] = True
    config, want = tensors_of(root / source, **kwargs)
    # diffusers folders hold float32 files (what from_pretrained runs) and half precision as a variant.
    half = {np.dtype("float16"): "fp16", BFLOAT16: "bf16"}.get(next(iter(want["unet"].values())).dtype)
    variant = ["--variant", half] if half and via == "diffusers" else []

    middle = tmp_path / ("mid.safetensors" if via == "single-file" else "mid")
    code, _, err = run(capsys, "convert", root / source, middle, "--to", via, *options)
    assert code == 0, err
    # Back to the source's format (single files: a .safetensors file).
    back_format = "diffusers" if source.endswith("diffusers") else "single-file"
    back = tmp_path / ("back" if back_format == "diffusers" else "back.safetensors")
    tokenizer_options = []
    if via == "single-file":
        # Single files hold no tokenizer; the tiny models use a small vocabulary.
        folder = "sd2-diffusers" if "sd2" in source else "sd1-diffusers"
        tokenizer_options = ["--tokenizer", root / folder / "tokenizer"]
    code, _, err = run(capsys, "convert", middle, back, "--to", back_format, *tokenizer_options, *variant)
    assert code == 0, err
    back_kwargs = {"variant": half} if half and back_format == "diffusers" else {}
    if back_format == "single-file":
        back_kwargs["tokenizer"] = str(
            root / ("sd2-diffusers" if "sd2" in source else "sd1-diffusers") / "tokenizer"
        )
    back_config, got = tensors_of(back, **back_kwargs)
    assert_identical(want, got)
    assert back_config.replace(name="x", tokenizer=config.tokenizer) == config.replace(name="x")


def test_single_file_to_single_file_keeps_openclip_tail(capsys, root, tmp_path):
    out = tmp_path / "copy.safetensors"
    code, _, err = run(
        capsys,
        "convert",
        root / "sd2.safetensors",
        out,
        "--to",
        "single-file",
        "--config",
        root / "sd2-diffusers",
    )
    assert code == 0, err
    original, copy = load_safetensors(root / "sd2.safetensors"), load_safetensors(out)
    assert original.keys() == copy.keys()
    for key in original:
        assert original[key].dtype == copy[key].dtype and np.array_equal(original[key], copy[key]), key


def test_dtype_cast(capsys, root, tmp_path):
    out = tmp_path / "half"
    code, _, err = run(
        capsys, "convert", root / "sd1-diffusers", out, "--to", "tf_diffusion", "--dtype", "bfloat16"
    )
    assert code == 0, err
    _, want = tensors_of(root / "sd1-diffusers")
    _, got = tensors_of(out)
    for name in want:
        for key, value in want[name].items():
            assert got[name][key].dtype.name == "bfloat16"
            # The fixture's values are exact in bfloat16.
            np.testing.assert_array_equal(got[name][key].astype(np.float32), value)


def test_never_overwrites_unless_asked(capsys, root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", root / "sd1-diffusers", out, "--to", "tf_diffusion")
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "convert", root / "sd1-diffusers", out, "--to", "tf_diffusion", "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside


def test_interrupted_conversion_leaves_nothing(capsys, root, tmp_path, monkeypatch):
    from tf_diffusion.weights import folder

    written = []
    real = folder.save_safetensors

    def failing(tensors, path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the second file was written
        written.append(path)
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(folder, "save_safetensors", failing)
    code, _, err = run(capsys, "convert", root / "sd1-diffusers", tmp_path / "out", "--to", "tf_diffusion")
    assert code == 130 and "interrupted" in err
    assert written  # the first file had been written, in the temporary folder
    assert list(tmp_path.iterdir()) == []


def test_single_file_destination_must_be_safetensors(capsys, root, tmp_path):
    code, _, err = run(capsys, "convert", root / "sd1-diffusers", tmp_path / "x.ckpt", "--to", "single-file")
    assert code == 2 and ".safetensors" in err and len(err.splitlines()) == 1  # a bad option: usage error


def test_save_pretrained_round_trip(root, tmp_path):
    from tf_diffusion.pipeline import StableDiffusion

    sd = loading.from_pretrained(StableDiffusion, root / "sd1-diffusers")
    loading.save_pretrained(sd, tmp_path / "saved")
    with pytest.raises(FileExistsError):
        loading.save_pretrained(sd, tmp_path / "saved")
    _, want = tensors_of(root / "sd1-diffusers")
    config, got = tensors_of(tmp_path / "saved")
    assert_identical(want, got)
    assert config == sd.config
    again = loading.from_pretrained(StableDiffusion, tmp_path / "saved")
    assert again.load_report.format == "tf_diffusion"


def test_python_dash_m(root):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "tf_diffusion", "info", str(root / "sd1-diffusers")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "format:          diffusers" in result.stdout
