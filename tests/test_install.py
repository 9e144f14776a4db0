"""A regular (non-editable) install carries the embedded model and generates with it offline.

The README's first command uses an editable install, which finds ``weights/`` in the checkout. A wheel has
no checkout beside it: setup.cfg's ``data_files`` put the model under the installation's ``share/`` folder,
where ``resolve_model`` looks next. This builds the wheel from a copy of the project, checks that it
holds every shipped file byte for byte, installs it into a fresh virtual environment (reusing this
environment's TensorFlow through ``--system-site-packages``, with no index) and runs the CLI there from an
unrelated directory.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "tiny-shapes"


def _run(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("TF_DIFFUSION_WEIGHTS", None)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tf_diffusion", "weights"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # Build with this environment's setuptools when it has one (no download); otherwise pip fetches it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(src)])
    (path,) = (tmp / "dist").glob("tf_diffusion-*.whl")
    return path


def test_wheel_holds_every_shipped_file(wheel):
    shipped = sorted(p for p in MODEL.rglob("*") if p.is_file())
    assert shipped, f"no files under {MODEL}"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for path in shipped:
            rel = path.relative_to(ROOT / "weights").as_posix()
            matches = [n for n in names if n.endswith(f".data/data/share/tf_diffusion/weights/{rel}")]
            assert matches, (
                f"{rel} is missing from {wheel.name}; list it under [options.data_files] in setup.cfg"
            )
            assert zf.read(matches[0]) == path.read_bytes(), f"{rel} differs in {wheel.name}"


def test_installed_wheel_generates_offline(wheel, tmp_path):
    venv = tmp_path / "venv"
    # --without-pip: this interpreter's pip is reachable through the system site-packages.
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(
        [
            str(python),
            "-c",
            "import tf_diffusion, tf_diffusion.models as g; print(tf_diffusion.__file__); "
            "print(g.resolve_model('tiny-shapes'))",
        ],
        cwd=work,
    ).stdout.split("\n")
    package, weights = pathlib.Path(where[0]), pathlib.Path(where[1])
    assert venv in package.parents, f"imported {package}, not the installed wheel"
    assert venv in weights.parents, f"weights resolved to {weights}, not the installed copy"
    assert ROOT not in weights.parents

    out = work / "circle.png"
    cli = bindir / "tf-diffusion"
    _run(
        [
            str(cli),
            "generate",
            "a red circle",
            "--seed",
            "0",
            "--steps",
            "4",
            "--no-progress",
            "-o",
            str(out),
        ],
        cwd=work,
    )
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (64, 64)
        assert "Model: tiny-shapes" in image.info["parameters"]


def test_shipped_model_lookup(tmp_path, monkeypatch):
    from tf_diffusion.models import resolve_model, shipped_weights_dirs

    monkeypatch.delenv("TF_DIFFUSION_WEIGHTS", raising=False)
    dirs = shipped_weights_dirs()
    assert dirs[0] == ROOT / "weights" and len(dirs) == 3
    assert all(d.parts[-3:] == ("share", "tf_diffusion", "weights") for d in dirs[1:])
    assert resolve_model("tiny-shapes") == str(MODEL)

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TF_DIFFUSION_WEIGHTS", str(empty))
    assert shipped_weights_dirs() == [empty]
    with pytest.raises(ValueError, match=r"preset 'tiny-shapes' has no shipped weights \(looked in .*empty"):
        resolve_model("tiny-shapes")
    assert resolve_model("someone/some-model") == "someone/some-model"  # not a preset: a hub id or path
    (empty / "tiny-shapes").mkdir()
    assert resolve_model("tiny-shapes") == str(empty / "tiny-shapes")
