"""`tf-diffusion convert` for SD3 / SD3.5: original single file <-> diffusers folder, bit for bit.

The diffusers folder is tools/make_fixtures_sd3.py's (written by diffusers' StableDiffusion3Pipeline); the
single files are its tensors in the original layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``text_encoders.clip_l/clip_g/t5xxl.transformer.*``). A converted folder must hold diffusers' own key
names, shapes and values, and reload to the same outputs. (By hand, with torch: diffusers'
StableDiffusion3Pipeline.from_pretrained loads the converted folder and gives the fixture's images exactly.)
"""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from tf_diffusion.cli import main
from tf_diffusion.config import MMDiTConfig
from tf_diffusion.families import FAMILIES
from tf_diffusion.weights.diffusers_configs import vae_config_from_diffusers
from tf_diffusion.weights.diffusers_folder import clip_from_transformers
from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae
from tf_diffusion.weights.lazy import BFLOAT16
from tf_diffusion.weights.safetensors_io import load_safetensors
from tf_diffusion.weights.state_dict import StateDictError

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")


@pytest.fixture
def folder(fixtures_dir):
    return fixtures_dir / "sd3" / "sd3-diffusers"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def weights_file(root, name):
    stem = "diffusion_pytorch_model" if name in ("transformer", "vae") else "model"
    return root / name / f"{stem}.safetensors"


def folder_tensors(root, names=COMPONENTS):
    return {name: dict(load_safetensors(weights_file(root, name))) for name in names}


def write_single_file(folder, path, names=COMPONENTS):
    """The fixture folder's tensors in the original SD3 layout (the transformer through the rename that
    test_sd3 checks against diffusers' outputs; CLIP-L without its identity projection, as SD3 files)."""
    read = lambda name: json.loads((folder / name / "config.json").read_text())  # noqa: E731
    tensors = folder_tensors(folder, names)
    parts = {}
    for name in names:
        if name == "transformer":
            parts[name] = convert_diffusers_mmdit(tensors[name], mmdit_config_from_diffusers(read(name)))
        elif name == "vae":
            parts[name] = convert_diffusers_vae(tensors[name], vae_config_from_diffusers(read(name)))
        elif name == "text_encoder_3":
            parts[name] = tensors[name]
        else:
            parts[name] = clip_from_transformers(tensors[name])
    parts.get("text_encoder", {}).pop("text_projection.weight", None)
    prefixes = FAMILIES["sd3"].prefixes
    flat = {prefixes[n] + k: np.ascontiguousarray(v) for n in names for k, v in parts[n].items()}
    save_file(flat, str(path))
    return path


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        np.testing.assert_array_equal(x, y, err_msg=key)


def test_single_file_to_diffusers_is_diffusers_own_folder(capsys, folder, tmp_path):
    single = write_single_file(folder, tmp_path / "sd3.safetensors")
    out = tmp_path / "out"
    code, printed, err = run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder)
    assert code == 0, err
    assert "StableDiffusion3Pipeline" in printed
    # Keys, shapes, dtypes and values equal what diffusers wrote, component by component.
    expected, got = folder_tensors(folder), folder_tensors(out)
    for name in COMPONENTS:
        assert_same_tensors(got[name], expected[name])
    index = json.loads((out / "model_index.json").read_text())
    reference = json.loads((folder / "model_index.json").read_text())
    assert {k: v[0] for k, v in index.items() if not k.startswith("_")} == {
        k: v[0] for k, v in reference.items() if not k.startswith("_")
    }
    for name in ("transformer", "vae", "scheduler"):
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        mine, theirs = (json.loads((root / name / file).read_text()) for root in (out, folder))
        assert {k: v for k, v in theirs.items() if not k.startswith("_") and k in mine} == {
            k: mine[k] for k, v in theirs.items() if not k.startswith("_") and k in mine
        }, name
    # Back to a single file: the very tensors it came from.
    back = tmp_path / "back.safetensors"
    code, _, err = run(capsys, "convert", out, back, "--to", "single-file")
    assert code == 0, err
    assert_same_tensors(load_safetensors(back), load_safetensors(single))


def test_converted_folder_reloads_to_the_same_outputs(capsys, folder, tmp_path, fixtures_dir):
    from tf_diffusion.sd3 import StableDiffusion3

    single = write_single_file(folder, tmp_path / "sd3.safetensors")
    out = tmp_path / "out"
    assert run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder)[0] == 0
    ref = dict(np.load(fixtures_dir / "sd3" / "reference.npz"))
    outputs = []
    for root in (folder, out):
        sd = StableDiffusion3.from_pretrained(root)
        context, pooled = sd.encode_prompts(["a cat", "a dog"], max_sequence_length=12)
        args = [ref[f"sd35_{k}"] for k in ("latents", "timesteps", "context", "pooled")]
        outputs.append(
            [
                context,
                pooled,
                np.asarray(sd.transformer(*args)),
                np.asarray(sd.vae.decode(ref["vae_latents"])),
            ]
        )
    for mine, theirs in zip(*outputs, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_file_without_text_encoders_takes_them_from_config(capsys, folder, tmp_path):
    single = write_single_file(folder, tmp_path / "sd3.safetensors", names=("transformer", "vae"))
    code, _, err = run(capsys, "convert", single, tmp_path / "no", "--to", "diffusers")
    assert (
        code == 1
        and "has no text_encoder, text_encoder_2, text_encoder_3 weights" in err
        and "--config" in err
    )
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder)
    assert code == 0, err
    expected, got = folder_tensors(folder), folder_tensors(out)
    for name in COMPONENTS:
        assert_same_tensors(got[name], expected[name])


def test_diffusers_to_single_file_and_back(capsys, folder, tmp_path):
    single = tmp_path / "sd3.safetensors"
    code, _, err = run(capsys, "convert", folder, single, "--to", "single-file")
    assert code == 0, err
    assert_same_tensors(
        load_safetensors(single), load_safetensors(write_single_file(folder, tmp_path / "x.safetensors"))
    )
    out = tmp_path / "out"
    assert run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder)[0] == 0
    expected, got = folder_tensors(folder), folder_tensors(out)
    for name in COMPONENTS:
        assert_same_tensors(got[name], expected[name])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_cast(capsys, folder, tmp_path, dtype):
    single = tmp_path / "sd3.safetensors"
    code, _, err = run(capsys, "convert", folder, single, "--to", "single-file", "--dtype", dtype)
    assert code == 0, err
    target = {"float16": np.dtype("float16"), "bfloat16": BFLOAT16}[dtype]
    reference = load_safetensors(write_single_file(folder, tmp_path / "x.safetensors"))
    got = load_safetensors(single)
    assert sorted(got) == sorted(reference)
    for key, value in reference.items():
        assert got[key].dtype == target, key
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value).astype(target), err_msg=key)
    # Half-precision weights go on to a folder unchanged (no second rounding).
    out = tmp_path / "out"
    assert run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder)[0] == 0
    back = tmp_path / "back.safetensors"
    assert run(capsys, "convert", out, back, "--to", "single-file")[0] == 0
    assert_same_tensors(load_safetensors(back), got)


def test_never_overwrites_unless_asked_and_leaves_nothing_when_interrupted(
    capsys, folder, tmp_path, monkeypatch
):
    from tf_diffusion.weights import sd3_convert

    single = write_single_file(folder, tmp_path / "sd3.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder)
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    written = []
    real = sd3_convert.save_safetensors

    def failing(tensors, path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt  # Ctrl-C while the second weights file is written
        written.append(path)
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(sd3_convert, "save_safetensors", failing)
    code, _, err = run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder, "--overwrite")
    assert code == 130 and written
    assert (out / "keep.txt").read_text() == "mine"  # the old folder stays until a new one is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sd3.safetensors"]
    monkeypatch.setattr(sd3_convert, "save_safetensors", real)
    code, _, err = run(capsys, "convert", single, out, "--to", "diffusers", "--config", folder, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()


def test_bad_input(capsys, folder, tmp_path):
    single = write_single_file(folder, tmp_path / "sd3.safetensors")
    no_clips = write_single_file(
        folder, tmp_path / "bare.safetensors", names=("transformer", "vae", "text_encoder_3")
    )
    cases = [
        ((single, tmp_path / "a", "--to", "tf_diffusion"), "converts to a diffusers folder only"),
        ((single, tmp_path / "b.safetensors", "--to", "single-file"), "converts to a diffusers folder only"),
        ((folder, tmp_path / "c", "--to", "diffusers"), "converts to single-file only"),
        (
            (single, tmp_path / "d", "--to", "diffusers", "--config", folder, "--use-ema"),
            "--use-ema: not options",
        ),
        ((single, tmp_path / "e", "--to", "diffusers", "--config", tmp_path), "not a diffusers SD3 folder"),
        ((no_clips, tmp_path / "f", "--to", "diffusers"), "pass config= (--config)"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, "convert", *argv)
        assert code != 0 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    # A config folder whose transformer is not the file's.
    other = tmp_path / "other"
    import shutil

    shutil.copytree(folder, other)
    data = json.loads((other / "transformer" / "config.json").read_text())
    data["dual_attention_layers"] = [0]
    (other / "transformer" / "config.json").write_text(json.dumps(data))
    code, _, err = run(capsys, "convert", single, tmp_path / "g", "--to", "diffusers", "--config", other)
    assert code == 1 and "is not the one config" in err
    assert not any(p.name in "abcdefg" for p in tmp_path.iterdir())


def test_rename_refuses_keys_the_config_lacks(folder):
    from tf_diffusion.weights.diffusers_mmdit import mmdit_to_diffusers

    tensors = folder_tensors(folder, ("transformer",))["transformer"]
    cfg = mmdit_config_from_diffusers(json.loads((folder / "transformer" / "config.json").read_text()))
    original = convert_diffusers_mmdit(tensors, cfg)
    assert_same_tensors(mmdit_to_diffusers(original, cfg), tensors)
    smaller = MMDiTConfig(**{**cfg.__dict__, "dual_attention_layers": (0,)})
    with pytest.raises(StateDictError, match="joint_blocks.1.x_block.attn2"):
        mmdit_to_diffusers(original, smaller)
