"""Finding models by name: the shipped (embedded) weights, and what a model folder says about itself.

Nothing here imports TensorFlow: the command line resolves and checks its model argument with these
functions before it builds anything.

Example:
    >>> from tf_diffusion import StableDiffusion, resolve_model
    >>> sd = StableDiffusion.from_pretrained(resolve_model("tiny-shapes"))
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sysconfig

from tf_diffusion.config import PipelineConfig, from_dict

__all__ = [
    "DEFAULT_MODEL",
    "check_source",
    "folder_config",
    "looks_like_hub_id",
    "resolve_model",
    "shipped_weights_dirs",
]

# The model the command line uses when none is named: small, trained for this project, offline.
DEFAULT_MODEL = "tiny-shapes"
WEIGHTS_ENV = "TF_DIFFUSION_WEIGHTS"
# A Hugging Face Hub model id, "org/name" (the rule weights.hub applies; a test keeps them equal).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def shipped_weights_dirs() -> list[pathlib.Path]:
    """Where shipped models may live, in the order they are searched.

    ``$TF_DIFFUSION_WEIGHTS`` alone when set; otherwise the repository's ``weights/`` (a source checkout
    or an editable install), then ``share/tf_diffusion/weights`` under the installation's data directory,
    where a wheel puts them (setup.cfg's ``data_files``), then the same under the user base (``--user``).

    Returns:
        The folders to search, first match wins.
    """
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return [pathlib.Path(env)]
    dirs = [pathlib.Path(__file__).resolve().parents[1] / "weights"]
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        dirs.append(pathlib.Path(sysconfig.get_path("data", scheme)) / "share" / "tf_diffusion" / "weights")
    return dirs


def resolve_model(name: str | os.PathLike) -> str:
    """A model argument as a path or hub id: names of shipped models map to their folder.

    Args:
        name: a shipped model's name ("tiny-shapes"), a checkpoint file or folder, or a hub id.

    Returns:
        The folder of the shipped model of that name, else ``name`` unchanged (as a string).

    Raises:
        ValueError: ``name`` is a preset without shipped weights (say "sd-v1-5"): it names an
            architecture, not weights.
    """
    name = os.fspath(name)
    dirs = shipped_weights_dirs()
    for base in dirs:
        if name and (base / name).is_dir():
            return str(base / name)
    from tf_diffusion.presets import PRESETS

    if name in PRESETS and not os.path.exists(name):
        looked = ", ".join(str(d / name) for d in dirs)
        raise ValueError(
            f"preset {name!r} has no shipped weights (looked in {looked}); pass a checkpoint file, a folder "
            f"or a hub id"
        )
    return name


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the ``org/name`` form of a Hugging Face Hub model id."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def check_source(name: str | os.PathLike) -> str:
    """``resolve_model``, then make sure the result is an existing path or has the form of a hub id.

    Args:
        name: a shipped model's name, a checkpoint file or folder, or a hub id.

    Returns:
        The resolved model argument.

    Raises:
        ValueError: a preset without shipped weights.
        FileNotFoundError: neither an existing path nor of the form of a hub id.
    """
    source = resolve_model(name)
    if not os.path.exists(os.path.expanduser(source)) and not looks_like_hub_id(source):
        raise FileNotFoundError(
            f"{source}: no such file or folder (and not a Hugging Face Hub id of the form org/name)"
        )
    return source


def folder_config(path: str | os.PathLike) -> PipelineConfig | None:
    """The configuration a tf_diffusion folder declares in its config.json, read without loading weights.

    Args:
        path: any model argument (file, folder, hub id).

    Returns:
        The folder's ``PipelineConfig``, or None when ``path`` is not a readable tf_diffusion folder
        (the loader then reports what is wrong with it).
    """
    config_file = pathlib.Path(path) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("_format") != "tf_diffusion":
            return None
        return from_dict(PipelineConfig, data.get("config") or {})
    except (OSError, ValueError, TypeError):
        return None
