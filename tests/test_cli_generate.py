"""``tf-diffusion generate`` and the examples, on the embedded tiny-shapes model, offline."""

import json
import os
import pathlib
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tf_diffusion import cli, resolve_model
from tf_diffusion.cli.generate import a1111_parameters, grid
from tf_diffusion.models import DEFAULT_MODEL
from tf_diffusion.pipeline import StableDiffusion
from tf_diffusion.weights.safetensors_io import load_safetensors

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--steps", "3", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def shipped_model():
    path = pathlib.Path(resolve_model(DEFAULT_MODEL))
    assert (path / "config.json").is_file(), f"the embedded model is missing: {path}"
    return path


_LOADED: dict = {}


@pytest.fixture(autouse=True)
def load_each_model_once(monkeypatch):
    """The in-process commands and examples of this file load each model (and compile its functions)
    once, as a long-running process would; loading itself is tested in test_loading*.py."""
    original = StableDiffusion.from_pretrained.__func__

    def cached(cls, source, **kwargs):
        key = (str(source), tuple(sorted(kwargs.items())))
        if key not in _LOADED:
            _LOADED[key] = original(cls, source, **kwargs)
        return _LOADED[key]

    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(cached))


def parameters_of(path: pathlib.Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def test_generate_writes_png_with_a1111_parameters(tmp_path, capsys):
    out = tmp_path / "red.png"
    assert cli.main(["generate", "a red circle", "-o", str(out), "--seed", "7", *FAST]) == 0
    with Image.open(out) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    text = parameters_of(out)
    assert text.splitlines()[0] == "a red circle"
    assert "Steps: 3" in text and "Seed: 7" in text and "Size: 64x64" in text and "Model: tiny-shapes" in text
    assert str(out) in capsys.readouterr().out


def test_vae_option_replaces_the_vae_and_is_recorded(tmp_path):
    from tests.conftest import FIXTURES

    vae = FIXTURES / "vae_file" / "sd1.vae.pt"
    out = tmp_path / "v.png"
    model = FIXTURES / "checkpoints" / "sd1-diffusers"
    args = [
        "generate",
        "a red circle",
        "-o",
        str(out),
        "--model",
        str(model),
        "--vae",
        str(vae),
        "--seed",
        "1",
    ]
    assert cli.main([*args, "--steps", "2", "--height", "32", "--width", "32", "--no-progress"]) == 0
    assert re.search(r"VAE hash: [0-9a-f]{10}, VAE: sd1\.vae\.pt", parameters_of(out))


def test_cli_images_are_generate_images_of_their_own_seeds(tmp_path):
    """One seed, one image: each file the CLI writes for --seed 7 --num-images 2 is what generate() gives
    for that file's own seed (7, then 8) alone, within 2/255."""
    from tf_diffusion import StableDiffusion

    out = tmp_path / "pair.png"
    argv = ["generate", "a blue star", "-o", str(out), "--seed", "7", "--num-images", "2", *FAST]
    assert cli.main(argv) == 0
    sd = StableDiffusion.from_pretrained(resolve_model(DEFAULT_MODEL))
    for i, seed in ((1, 7), (2, 8)):
        with Image.open(tmp_path / f"pair-{i}.png") as image:
            written = np.asarray(image.convert("RGB")).astype(int)
        # Graph mode, as the command runs on a CPU (an XLA compile here would only cost time).
        alone = sd.generate("a blue star", seed=seed, num_steps=3, progress=False, jit_compile=False)
        assert np.abs(written - alone[0].astype(int)).max() <= 2, seed
        assert f"Seed: {seed}," in parameters_of(tmp_path / f"pair-{i}.png")


def test_same_seed_same_file_contents(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    cli.main(["generate", "a blue star", "-o", str(a), "--seed", "3", *FAST])
    cli.main(["generate", "a blue star", "-o", str(b), "--seed", "3", *FAST])
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_never_overwrites_without_flag(tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep me")
    assert cli.main(["generate", "a red circle", "-o", str(out), *FAST]) != 0
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    assert cli.main(["generate", "a red circle", "-o", str(out), "--overwrite", *FAST]) == 0
    assert out.read_bytes() != b"keep me"


def test_output_gets_the_usual_file_mode(tmp_path):
    """Written through a private temporary file, the PNG still gets 0666 minus the umask, as open() gives."""
    umask = os.umask(0o022)
    try:
        out = tmp_path / "mode.png"
        assert cli.main(["generate", "a red circle", "-o", str(out), *FAST]) == 0
        assert out.stat().st_mode & 0o777 == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["mode.png"]  # no temporary file left
    finally:
        os.umask(umask)


def test_publish_never_replaces_a_file_that_appeared(tmp_path):
    from tf_diffusion.fileio import publish

    tmp, target = tmp_path / ".t.tmp", tmp_path / "t.png"
    tmp.write_bytes(b"new")
    target.write_bytes(b"old")  # appeared after the caller's first check
    with pytest.raises(FileExistsError, match="appeared while writing; pass --overwrite"):
        publish(tmp, target, False, "pass --overwrite to replace it")
    assert target.read_bytes() == b"old" and tmp.exists()
    publish(tmp, target, True)
    assert target.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"fresh")
    publish(tmp, tmp_path / "u.png", False)
    assert (tmp_path / "u.png").read_bytes() == b"fresh" and not tmp.exists()


def test_num_images_files_and_grid(tmp_path):
    out = tmp_path / "many.png"
    assert (
        cli.main(["generate", "a green square", "-o", str(out), "--num-images", "3", "--seed", "1", *FAST])
        == 0
    )
    for i in (1, 2, 3):
        text = parameters_of(tmp_path / f"many-{i}.png")
        assert f"Batch pos: {i - 1}" in text
        assert f"Seed: {i}," in text  # each image's own seed: --seed 1 gives 1, 2, 3
    with Image.open(tmp_path / "many-grid.png") as g:
        assert g.size == (128, 128)


def test_img2img_and_inpainting(tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 4), 200, np.uint8), "RGBA").save(init)  # RGBA is converted
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "i2i.png"
    assert (
        cli.main(
            ["generate", "a red circle", "-o", str(out), "--image", str(init), "--strength", "0.6", *FAST]
        )
        == 0
    )
    assert "Denoising strength: 0.6" in parameters_of(out)
    out = tmp_path / "inpaint.png"
    # A fixed seed: the unmasked latents end exactly at the init image's, but the decoded pixels are not
    # guaranteed to (the VAE decoder's GroupNorm statistics are image-wide, so a dark inpainted square can
    # shift the whole image's tone: seed 0 moves the unmasked area by ~49 levels with this model).
    args = ["generate", "a red circle", "-o", str(out), "--image", str(init), "--mask", str(mask)]
    assert cli.main([*args, "--seed", "2", *FAST]) == 0
    kept = np.asarray(Image.open(out))[:8, :8].astype(int)
    assert np.abs(kept - 200).max() < 40  # the unmasked corner stays close to the init image
    # By default the CLI pastes the original pixels back outside the blurred mask (A1111's mask blur 4):
    # the init image as the model sees it (RGBA composited on white).
    from tf_diffusion.images import to_rgb

    with Image.open(init) as picture:
        original = np.round(to_rgb(picture)[0] * 255).astype(int)
    assert np.abs(kept[:4, :4] - original[:4, :4]).max() <= 2
    diffusers_like = tmp_path / "inpaint-diffusers.png"
    plain = ["generate", "a red circle", "-o", str(diffusers_like), "--image", str(init), "--mask", str(mask)]
    assert cli.main([*plain, "--mask-blur", "-1", "--seed", "2", *FAST]) == 0
    assert np.abs(np.asarray(Image.open(diffusers_like))[:4, :4].astype(int) - original[:4, :4]).max() > 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask", "m.png"], "--mask needs --image"),
        (["--height", "62"], "--height 62: not a multiple of 4"),
        (["--steps", "0"], "--steps 0: must be an integer >= 1"),
        (["--scheduler", "nope"], "unknown sampler"),
        (["--model", "sd-v1-5"], "no shipped weights"),
        (["--image", "missing.png"], "--image missing.png: no such file"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, args, message):
    status = cli.main(["generate", "a red circle", "-o", str(tmp_path / "e.png"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert status != 0 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not re.search(r"\b[a-z_]+=", err)  # command-line names only (no num_steps=0)


@pytest.mark.slow  # a fresh interpreter imports TensorFlow and builds the model
def test_python_dash_m_runs_offline(tmp_path):
    out = tmp_path / "m.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "tf_diffusion", "generate", "a yellow heart", "-o", str(out), *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file()


@pytest.mark.parametrize(
    "script, args",
    [
        ("text2image.py", ["a red circle"]),
        ("img2img.py", ["{init}", "a blue star"]),
        ("inpainting.py", ["{init}", "{mask}", "a green triangle"]),
    ],
)
@pytest.mark.slow  # each example in its own interpreter
def test_examples_run_on_the_tiny_model(tmp_path, monkeypatch, script, args):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(init)
    m = np.zeros((64, 64), np.uint8)
    m[20:44, 20:44] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "out.png"
    argv = [a.format(init=init, mask=mask) for a in args] + ["-o", str(out)]
    # In this process (the model loaded once for the file), as ``python examples/<script> ...`` runs it,
    # but in graph mode as the CLI runs on a CPU, so the examples reuse the commands' traces: an XLA
    # compile of each task costs seconds here, and the default choice of XLA on a CPU and its one
    # program for every step are tested in test_generate.py.
    real_generate = StableDiffusion.generate
    monkeypatch.setattr(
        StableDiffusion,
        "generate",
        lambda self, *a, **k: real_generate(self, *a, **{"jit_compile": False, **k}),
    )
    path = ROOT / "examples" / script
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")
    with Image.open(out) as image:
        assert image.size == (64, 64)


@pytest.mark.slow  # about 3 minutes: several processes, each training and compiling
def test_training_example_runs_every_stage(tmp_path):
    """examples/tiny_shapes/train.py end to end at toy length: VAE, UNet + text encoder, export, eval."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "model"
    argv = [
        sys.executable,
        str(ROOT / "examples" / "tiny_shapes" / "train.py"),
        "--stage", "all",
        "--ckpt-dir", str(ckpt),
        "--out", str(out),
        "--vae-steps", "2",
        "--vae-batch", "4",
        "--unet-steps", "2",
        "--unet-batch", "4",
        "--mention", "color=0.8",
        "--final-eval-prompts", "2",
        "--eval-steps", "2",
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ckpt / "unet" / "ckpt-00000002.safetensors").is_file()
    evaluation = json.loads((ckpt / "final_eval.json").read_text())
    assert evaluation["prompts"] == 2 and evaluation["score"]["counts"]["shape"] == 2
    assert "## Measured quality" in (out / "MODEL_CARD.md").read_text()
    sd = StableDiffusion.from_pretrained(str(out))
    image = sd.generate("a red circle", num_steps=2, seed=0, progress=False)
    assert np.asarray(image).shape[-3:] == (64, 64, 3)
    # The decoder-only fine-tune with small shapes over-represented: the encoder (so the UNet's latent
    # space) stays as it was, the decoder moves.
    decoder = [
        *argv[:2], "--stage", "vae_decoder", "--ckpt-dir", str(ckpt),
        "--vae-steps", "2", "--vae-batch", "4", "--vae-small-share", "0.5",
    ]  # fmt: skip
    done = subprocess.run(decoder, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    first = load_safetensors(str(ckpt / "vae_stage1.safetensors"))
    tuned = load_safetensors(str(ckpt / "vae_final.safetensors"))
    assert first.keys() == tuned.keys()
    moved = {k for k in first if not np.array_equal(first[k], tuned[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved), sorted(moved)[:5]
    # A second export into the same folder refuses without --overwrite, before training anything.
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode != 0 and "pass --overwrite" in again.stderr
    bad = subprocess.run(argv[:2] + ["--mention", "colour=0.5"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "mention attribute='colour' is not allowed" in bad.stderr
    bad = subprocess.run(argv[:2] + ["--vae-small-share", "1.5"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "'1.5' must be a number in [0, 1]" in bad.stderr


def test_a1111_format_and_grid():
    from tf_diffusion.infotext import parse_parameters
    from tf_diffusion.pipeline import GenerationInfo

    info = GenerationInfo(
        model="m", mode="img2img", prompts=("a cat", "a cat"), negative_prompts=("blurry", "blurry"),
        seeds=(1, 2), seeded_latents=True, sampler="dpmpp_2m_karras", sampler_options={}, num_steps=20,
        num_evals=15, guidance_scale=7.0, strength=0.75, mask_blur=None, height=64, width=96,
        output_type="uint8",
    )  # fmt: skip
    text = a1111_parameters(info, 1, "m", "0123456789")
    assert text.startswith(
        "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7,"
    )
    read = parse_parameters(text)
    assert (read["seed"], read["width"], read["height"], read["cfg_scale"]) == (2, 96, 64, 7.0)
    assert read["extra"]["Batch pos"] == "1" and read["extra"]["Denoising strength"] == "0.75"
    assert read["model_hash"] == "0123456789" and read["model_name"] == "m"
    tiles = grid(np.ones((3, 2, 2, 3), np.uint8))
    assert tiles.shape == (4, 4, 3) and tiles[2:, 2:].sum() == 0
