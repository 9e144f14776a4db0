"""A regular (non-editable) install carries the embedded model and generates with it offline.

The README's first command uses an editable install, which finds ``weights/`` in the checkout. A wheel has
no checkout beside it: setup.cfg's ``data_files`` put the model under the installation's ``share/`` folder,
where ``resolve_model`` looks next. This builds the wheel from a copy of the project, checks that it
holds every shipped file byte for byte, installs it into a fresh virtual environment (with no index) and
runs the CLI there from an unrelated directory.

The fresh environment reuses the packages of the interpreter running the tests (TensorFlow is too large
to install again): a ``.pth`` file in its site-packages lists the running interpreter's own import paths.
``--system-site-packages`` would not do: inside a virtual environment it exposes the *base* interpreter's
packages, not the environment's, so the installed wheel could not import keras there.
"""

from __future__ import annotations

import importlib.util
import json
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


def _import_paths(python, cwd) -> list[str]:
    """The import paths an interpreter starts with (no PYTHONPATH, run from an unrelated folder)."""
    code = "import json, sys; print(json.dumps(sys.path))"
    return json.loads(_run([str(python), "-c", code], cwd=cwd).stdout)


def _is_checkout(path: pathlib.Path) -> bool:
    # A source tree on the path (an old-style editable install, or this checkout) would shadow the wheel.
    in_root = path == ROOT or ROOT in path.parents
    return in_root or ((path / "tf_diffusion").is_dir() and (path / "setup.cfg").is_file())


def make_venv(venv: pathlib.Path, cwd: pathlib.Path) -> pathlib.Path:
    """A fresh virtual environment that also sees this interpreter's packages; returns its python.

    Works whether the tests run in the system Python or in a virtual environment: the paths come from
    asking ``sys.executable`` itself, so a venv's own site-packages are included and its base's are not
    (unless the running venv sees them too). The new environment's own site-packages stay first.
    """
    # --without-pip: this interpreter's pip is reachable through the listed paths.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    own = _import_paths(python, cwd)
    site_packages = next(p for p in own if p.startswith(str(venv)) and p.endswith("site-packages"))
    outer = [
        p
        for p in _import_paths(sys.executable, cwd)
        if p and p not in own and os.path.isdir(p) and not _is_checkout(pathlib.Path(p))
    ]
    assert outer, f"{sys.executable} reports no import paths beyond the standard library"
    (pathlib.Path(site_packages) / "_outer_environment.pth").write_text("\n".join(outer) + "\n")
    return python


def test_fresh_venv_sees_this_interpreters_packages(tmp_path):
    python = make_venv(tmp_path / "venv", tmp_path)
    # Found where this interpreter finds them (specs only: importing TensorFlow takes many seconds).
    names = ("keras", "tensorflow", "numpy", "pip")
    code = f"import importlib.util as u; print(*[u.find_spec(n).origin for n in {names!r}])"
    found = _run([str(python), "-c", code], cwd=tmp_path).stdout.split()
    assert found == [importlib.util.find_spec(n).origin for n in names]
    # The checkout does not leak in: tf_diffusion comes only from what gets installed there.
    code = "import importlib.util as u; s = u.find_spec('tf_diffusion'); print(s and s.origin)"
    origin = _run([str(python), "-c", code], cwd=tmp_path).stdout.strip()
    assert origin == "None" or ROOT not in pathlib.Path(origin).parents, origin


@pytest.mark.slow
def test_installed_wheel_generates_offline(wheel, tmp_path):
    venv = tmp_path / "venv"
    python = make_venv(venv, tmp_path)
    bindir = python.parent
    # --ignore-installed: an editable install of this checkout in the running environment is visible to
    # pip through the listed paths; install the wheel anyway (and never touch that one).
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)])

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
