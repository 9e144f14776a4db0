"""The command line answers mistakes at once and quietly: checks run before TensorFlow is imported.

- option, path and output-file errors come back as one line with TensorFlow never imported (measured
  in a fresh process that prints ``"tensorflow" in sys.modules`` after each error);
- ``--help`` imports nothing heavy and prints no TensorFlow log lines; a real command is quiet too
  unless ``--verbose``;
- image bombs (12004x12004 and 30000x30000 PNGs of ~100 KB, as --image and as --mask) are refused from
  their header: one line, exit status 2, low peak memory (the process's own ru_maxrss);
- the names the command line knows without TensorFlow match the library's.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
NATIVE_LOG_LINE = r"^([IWEF]\d{4} |WARNING: All log messages before absl)"

# Runs each argv through tf_diffusion.cli.main in this one fresh process and reports, per case, the
# exit status, stderr and whether TensorFlow had been imported by then.
CASES_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys, time
    from tf_diffusion.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        results.append({
            "argv": argv, "code": code, "err": err.getvalue(), "seconds": time.perf_counter() - start,
            "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
        })
    # VmHWM, this process's own peak: ru_maxrss would also count the (large) pytest process it was
    # forked from, since Linux keeps that high-water mark across exec.
    with open("/proc/self/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"results": results, "max_rss_mib": rss_kib / 1024}))
    """
)


def run_cases(cases, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    done = subprocess.run(
        [sys.executable, "-c", CASES_SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def write_bomb_png(path: pathlib.Path, width: int, height: int) -> None:
    """A valid 1-bit grayscale PNG of width x height, all black: tiny on disk, huge when decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    compressor = zlib.compressobj(9)
    block = row * 1000
    parts = []
    for start in range(0, height, 1000):
        parts.append(compressor.compress(block if start + 1000 <= height else row * (height - start)))
    parts.append(compressor.flush())
    data = b"".join(parts)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    for side in (12004, 30000):
        paths[side] = folder / f"bomb-{side}.png"
        write_bomb_png(paths[side], side, side)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "small.png")
    paths["small"] = folder / "small.png"
    return paths


def test_bomb_pngs_are_what_they_claim(bombs):
    assert bombs[30000].stat().st_size < 400_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bombs[12004]) as image:
        assert image.size == (12004, 12004) and image.mode == "1"


def test_mistakes_answer_before_tensorflow_is_imported(tmp_path):
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep")
    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    cases = {
        "mistyped option": (
            ["generate", "a red circle", "--stpes", "3"],
            2,
            "unrecognized arguments: --stpes",
        ),
        "height": (["generate", "a red circle", "--height", "50"], 2, "--height 50: not a multiple of 4"),
        "steps": (["generate", "a red circle", "--steps", "0"], 2, "--steps 0: must be an integer >= 1"),
        "strength": (
            ["generate", "x", "--image", "i.png", "--strength", "1.5"],
            2,
            "--strength 1.5: must be in [0, 1]",
        ),
        "missing model": (
            ["generate", "x", "--model", "nowhere.ckpt"],
            1,
            "--model nowhere.ckpt: no such file",
        ),
        "existing output": (["generate", "x", "-o", str(existing)], 1, "already exists; pass --overwrite"),
        "missing image": (["generate", "x", "--image", "gone.png"], 1, "--image gone.png: no such file"),
        "sampler": (["generate", "x", "--scheduler", "eulr"], 2, "--scheduler eulr: unknown sampler"),
        "lora tag without folder": (
            ["generate", "x <lora:ink:0.8>"],
            2,
            "no LoRA folder is set (pass --lora-dir)",
        ),
        "lora name not in folder": (
            ["generate", "x <lora:ink:0.8>", "--lora-dir", str(tmp_path / "data")],
            2,
            f"no LoRA named 'ink' in folder '{tmp_path / 'data'}'",
        ),
        "missing vae": (
            ["generate", "x", "--vae", "gone.vae.pt"],
            1,
            "--vae gone.vae.pt: no such file or folder",
        ),
        "missing lora": (
            ["generate", "x", "--lora", "gone.safetensors:0.5"],
            1,
            "--lora gone.safetensors:0.5: no such file",
        ),
        "missing embedding": (
            ["generate", "x", "--embedding", "gone.pt"],
            1,
            "--embedding gone.pt: no such file",
        ),
        "control without image": (
            ["generate", "x", "--control", "net.safetensors"],
            2,
            "--control net.safetensors: expected MODEL:IMAGE[:SCALE]",
        ),
        "missing control": (
            ["generate", "x", "--control", "gone.safetensors:h.png:0.5"],
            1,
            "--control gone.safetensors:h.png:0.5: gone.safetensors: no such file",
        ),
        "guess mode alone": (["generate", "x", "--guess-mode"], 2, "--guess-mode applies to ControlNets"),
        "preprocess threshold": (
            ["preprocess", "canny", "a.png", "b.png", "--high", "999"],
            2,
            "--high 999 is outside [0, 255]",
        ),
        "info missing": (["info", str(tmp_path / "missing.ckpt")], 1, "no such file or folder"),
        "convert onto files": (
            ["convert", "tiny-shapes", str(tmp_path / "out"), "--to", "diffusers"],
            1,
            "already exists; pass --overwrite to replace it",
        ),
        "export steps": (["export", "tiny-shapes", str(tmp_path / "e"), "--steps", "0"], 2, "--steps 0"),
        "export controlnet": (
            ["export", "tiny-shapes", str(tmp_path / "e"), "--controlnet", "gone"],
            1,
            "--controlnet gone: no such file or folder",
        ),
        "export controlnet tflite": (
            ["export", "tiny-shapes", str(tmp_path / "e"), "--format", "tflite", "--controlnet", "x"],
            2,
            "--controlnet applies to --format saved_model only",
        ),
        "export max-sequence-length": (
            ["export", "tiny-shapes", str(tmp_path / "e"), "--max-sequence-length", "600"],
            2,
            "--max-sequence-length 600 must be in 1..512",
        ),
        "export max-sequence-length tflite": (
            [
                "export",
                "tiny-shapes",
                str(tmp_path / "e"),
                "--format",
                "tflite",
                "--max-sequence-length",
                "8",
            ],
            2,
            "--max-sequence-length applies to --format saved_model only",
        ),
        "export non-empty": (
            ["export", "tiny-shapes", str(tmp_path / "out")],
            1,
            "not empty; pass --overwrite",
        ),
        "train lr": (
            [
                "train",
                "--preset",
                "tiny-shapes",
                "--data",
                "data",
                "--steps",
                "2",
                "--checkpoint-dir",
                "c",
                "--lr",
                "0",
            ],
            2,
            "--lr 0: must be > 0",
        ),  # fmt: skip
        "train data": (
            ["train", "--preset", "tiny-shapes", "--data", "nodata", "--steps", "2", "--checkpoint-dir", "c"],
            1,
            "--data nodata: no such folder",
        ),
    }
    report = run_cases([argv for argv, _, _ in cases.values()], cwd=tmp_path)
    for (name, (_, code, message)), result in zip(cases.items(), report["results"], strict=True):
        err = result["err"].strip()
        assert result["code"] == code, (name, err)
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not result["tensorflow"] and not result["keras"], name
        assert result["seconds"] < 5, (name, result["seconds"])  # about a second when the machine is quiet
    assert not re.search(r"\b[a-z_]+=", report["results"][2]["err"])  # no API names such as num_steps=0
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and existing.read_bytes() == b"keep"


@pytest.mark.parametrize("side", [12004, 30000])
@pytest.mark.parametrize("option", ["--image", "--mask"])
def test_image_bombs_are_refused_from_the_header(bombs, tmp_path, side, option):
    bomb = str(bombs[side])
    extra = ["--image", bomb] if option == "--image" else ["--image", str(bombs["small"]), "--mask", bomb]
    report = run_cases([["generate", "a red circle", "-o", str(tmp_path / "o.png"), *extra]], cwd=tmp_path)
    (result,) = report["results"]
    err = result["err"].strip()
    assert result["code"] == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "DecompressionBomb" not in err
    assert f"{option} {bomb}: {side}x{side} pixels" in err and "--max-image-pixels" in err
    assert not result["tensorflow"] and result["seconds"] < 5
    assert report["max_rss_mib"] < 1536, report["max_rss_mib"]
    assert not (tmp_path / "o.png").exists()


def test_raised_limit_still_refuses_what_pillow_calls_a_bomb(bombs, tmp_path):
    report = run_cases(
        [["generate", "x", "--image", str(bombs[30000]), "--max-image-pixels", str(10**10)]], cwd=tmp_path
    )
    (result,) = report["results"]
    err = result["err"].strip()
    assert result["code"] == 2 and len(err.splitlines()) == 1 and "decompression bomb" in err
    assert str(bombs[30000]) in err and report["max_rss_mib"] < 1536


def test_open_image_checks_size_names_files_and_reads_the_limit(bombs, tmp_path, monkeypatch):
    from tf_diffusion import images

    with pytest.raises(ValueError, match=r"bomb-12004.png: 12004x12004 pixels \(144.1 MP\) is more than the image limit of 16.8 MP \(4096x4096\)"):  # fmt: skip
        images.open_image(bombs[12004])
    # A lazily opened file is refused by the conversions too, before its pixels are decoded.
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bombs[12004]) as lazy:
        with pytest.raises(ValueError, match="more than the image limit"):
            images.to_rgb(lazy)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "1000")
    with pytest.raises(
        ValueError, match=r"small.png: 64x64 pixels is more than the image limit of 1,000 pixels"
    ):
        images.open_image(bombs["small"])
    assert images.open_image(bombs["small"], max_pixels=4096).size == (64, 64)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="TF_DIFFUSION_MAX_IMAGE_PIXELS='lots' must be a positive integer"):
        images.open_image(bombs["small"])
    monkeypatch.delenv(images.MAX_PIXELS_ENV)

    truncated = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut.png: cannot read the image: .*truncated"):
        images.open_image(truncated)
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(ValueError, match="text.png: not an image file"):
        images.open_image(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match="gone.png: no such file"):
        images.open_image(tmp_path / "gone.png")


def test_help_is_quiet_plain_and_light():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    env["PYTHONPATH"] = str(ROOT)
    for argv in (["--help"], ["generate", "--help"], ["train", "--help"], ["export", "--help"],
                 ["serve", "--help"], ["preprocess", "--help"]):  # fmt: skip
        code = (
            "import sys, runpy; sys.argv = ['tf-diffusion', *sys.argv[1:]]\n"
            "from tf_diffusion.cli import main\n"
            "status = main()\n"
            "print('TF' if 'tensorflow' in sys.modules else 'no TF', status)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0 and done.stderr == "", (argv, done.stderr[-2000:])
        assert done.stdout.rstrip().endswith("no TF 0"), argv
        assert "usage: tf-diffusion" in done.stdout
        assert "``" not in done.stdout and "\\\\" not in done.stdout, argv  # no raw reST markup


def test_a_real_command_prints_no_tensorflow_log_lines(tmp_path):
    """info loads TensorFlow: its start-up lines (oneDNN, cuda drivers, cuInit) stay hidden."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "tf_diffusion", "info", "tiny-shapes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "format:          tf_diffusion" in done.stdout
    assert not [line for line in done.stderr.splitlines() if re.match(NATIVE_LOG_LINE, line)], done.stderr
    assert done.stderr == ""


def test_info_and_convert_take_the_shipped_model_name(tmp_path, capsys):
    from tf_diffusion.cli import main

    assert main(["info", "tiny-shapes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config_name"] == "tiny-shapes"
    out = tmp_path / "copy"
    assert main(["convert", "tiny-shapes", str(out), "--to", "tf_diffusion"]) == 0
    assert (out / "unet.safetensors").is_file()
    assert main(["info", "sd-v1-5"]) == 2
    assert "preset 'sd-v1-5' has no shipped weights" in capsys.readouterr().err


def test_library_messages_use_command_line_names():
    from tf_diffusion.cli._common import to_cli_names
    from tf_diffusion.cli.generate import OPTION_NAMES

    assert (
        to_cli_names("num_steps=0 must be an integer >= 1", OPTION_NAMES)
        == "--steps 0 must be an integer >= 1"
    )
    assert (
        to_cli_names("'m' is not empty; pass overwrite=True (--overwrite) to add a version", {})
        == "'m' is not empty; pass --overwrite to add a version"
    )
    assert (
        to_cli_names("scheduler='x' unknown; config=y stays", OPTION_NAMES)
        == "--scheduler x unknown; config=y stays"
    )
    assert to_cli_names("pass image=... as well", OPTION_NAMES) == "pass --image as well"


def test_names_known_without_tensorflow_match_the_library():
    from tf_diffusion import export as library_export
    from tf_diffusion import models, schedulers
    from tf_diffusion.cli import _common
    from tf_diffusion.cli import export as export_command
    from tf_diffusion.weights import hub

    assert _common.SAMPLER_NAMES == tuple(schedulers.SAMPLERS)
    assert export_command.EXPORT_DTYPES == library_export.EXPORT_DTYPES
    assert export_command.TFLITE_COMPONENTS == library_export.TFLITE_COMPONENTS
    for text in ("org/name", "a/b.c-d_e", "org/..", "/abs/path", "a/b/c", "x.ckpt", "-a/b", "org/na me"):
        assert models.looks_like_hub_id(text) == hub.looks_like_repo_id(text), text


def test_package_names_are_lazy_and_all_importable():
    code = (
        "import sys, tf_diffusion\n"
        "from tf_diffusion import PRESETS, PipelineConfig, get_preset, resolve_model\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "from tf_diffusion.training import TRAIN_TARGETS, TrainingConfig\n"
        "assert 'tensorflow' not in sys.modules\n"
        "from tf_diffusion import StableDiffusion\n"
        "assert 'tensorflow' in sys.modules and all(hasattr(tf_diffusion, n) for n in tf_diffusion.__all__)\n"
        "import tf_diffusion.training as t\n"
        "assert all(hasattr(t, n) for n in t.__all__)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
