"""Hugging Face Hub ids (``runwayml/stable-diffusion-v1-5``): download, or find in the local cache.

Online, only the files a Stable Diffusion pipeline needs are fetched with ``huggingface_hub``
(the optional ``hub`` extra): model_index.json, the component configs, tokenizer and
scheduler files, and one weight file per component (safetensors when the repository has
them, of the requested variant). Repositories such as SD 1.5's also hold multi-GB
single-file checkpoints, which are never downloaded.

Offline (``HF_HUB_OFFLINE=1``) or without ``huggingface_hub``, the id is looked up in the
local cache, which has this layout (no library needed to read it)::

    $HF_HUB_CACHE  (default $HF_HOME/hub, default ~/.cache/huggingface/hub)
      models--{org}--{name}/
        refs/main                 the commit hash "main" points at
        snapshots/{commit}/...    the files, usually symlinks into blobs/
"""

from __future__ import annotations

import os
import pathlib
import re

from tf_diffusion.families import ALL_COMPONENTS
from tf_diffusion.weights.diffusers_folder import MODEL_INDEX, select_weight_files

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


class HubError(ValueError):
    """A hub id could not be resolved to a local folder."""


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the ``org/name`` form of a hub model id."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> pathlib.Path:
    """The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older name, still honoured by huggingface_hub
        return pathlib.Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return pathlib.Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None) -> pathlib.Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default "main"), or None."""
    repo = cache_dir() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    if _COMMIT.match(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def wanted_files(repo_files: list[str], variant: str | None) -> list[str]:
    """The files of a diffusers repository that loading reads.

    A pipeline repository (``model_index.json``): the index, the config of each network it has (SD's text
    encoder, UNet and VAE; SDXL's second encoder; a refiner has only that one), the tokenizer and scheduler
    files, and one weight file per network. A single-model repository (a VAE or ControlNet: ``config.json``
    with ``diffusion_pytorch_model.*`` next to it): the config and one weight file.

    Raises:
        HubError: if the repository is neither.
    """
    files = set(repo_files)
    if MODEL_INDEX not in files:
        if "config.json" in files:
            return ["config.json", _chosen_weights(files, "", variant)]
        raise HubError(
            "the repository has no model_index.json, so it is not a diffusers pipeline (nor a single model "
            "with a config.json); download its checkpoint file and pass the file's path"
        )
    networks = [c for c in ALL_COMPONENTS if f"{c}/config.json" in files]
    if not {"unet", "vae"} <= set(networks):
        raise HubError(
            f"the repository's pipeline has no {' or '.join(c for c in ('unet', 'vae') if c not in networks)} "
            "folder with a config.json, so it is not a Stable Diffusion pipeline"
        )
    wanted = {MODEL_INDEX}
    for name in files:
        top = name.split("/", 1)[0]
        if top in networks and name.endswith("/config.json"):
            wanted.add(name)
        elif top in ("tokenizer", "tokenizer_2", "scheduler") and "/" in name:
            wanted.add(name)
    for component in networks:
        chosen = _chosen_weights(files, component, variant)
        wanted.add(chosen)
        if chosen.endswith(".json"):
            # A sharded checkpoint: its shards sit next to the index.
            stem = chosen.split("/")[-1].split(".")[0]
            wanted.update(n for n in files if n.startswith(f"{component}/{stem}") and not n.endswith(".json"))
    return sorted(wanted)


def _chosen_weights(files: set[str], component: str, variant: str | None) -> str:
    """The weight file of ``component``'s folder ("" for the repository's root, read as a VAE's names)."""
    try:
        if component:
            return select_weight_files(files, component, variant)
        root = [f"vae/{name}" for name in files if "/" not in name]
        return select_weight_files(root, "vae", variant).removeprefix("vae/")
    except ValueError as e:
        raise HubError(str(e)) from None


def resolve(repo_id: str, *, revision: str | None = None, variant: str | None = None) -> pathlib.Path:
    """A local folder holding ``repo_id``: downloaded when online, from the cache when offline.

    Args:
        repo_id: "org/name".
        revision: branch, tag or commit; default "main".
        variant: weight variant to fetch ("fp16").

    Raises:
        HubError: offline (or without huggingface_hub) and not cached; or the download failed.
    """
    offline = is_offline()
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub = None
    if offline or huggingface_hub is None:
        snapshot = cached_snapshot(repo_id, revision)
        if snapshot is not None:
            return snapshot
        why = (
            "HF_HUB_OFFLINE is set"
            if offline
            else "huggingface_hub is not installed (pip install tf_diffusion[hub])"
        )
        raise HubError(
            f"{repo_id!r} is not a local path and not in the Hugging Face cache at {cache_dir()} "
            f"(revision {revision or 'main'!r}), and {why}"
        )
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        patterns = wanted_files(files, variant)
        return pathlib.Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        )
    except HubError as e:
        raise HubError(f"{repo_id}: {e}") from None
    except Exception as e:  # network, authentication, missing repository: all reported in one line
        snapshot = cached_snapshot(repo_id, revision)
        if snapshot is not None:
            return snapshot
        raise HubError(f"{repo_id}: download failed and nothing is cached: {type(e).__name__}: {e}") from None
