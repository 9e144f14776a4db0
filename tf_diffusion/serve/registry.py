"""The models a server offers: the models folder, the model it started with, the LoRA and embedding folders.

Names that clients send (``sd_model_checkpoint``, ``<lora:NAME:W>``) are looked up among the files found
by listing these folders, never joined onto a path: a name with a path separator, ``..`` or an absolute
path is refused before any lookup. Checkpoints load through the library's readers (safetensors, our own
allow-list unpickler for ``.ckpt``), so no pickle runs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class NotFound(LookupError):
    """No model (LoRA, ...) of that name; answered 404."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model a client can choose, as ``/sdapi/v1/sd-models`` lists it."""

    title: str  # "name.safetensors", or a folder's or shipped model's name
    model_name: str  # without the suffix
    filename: str  # the file or folder
    is_file: bool

    def names(self) -> tuple[str, ...]:
        return (self.title, self.model_name)


def check_name(name, what: str) -> str:
    """Refuse anything but a plain name: no path separators, no ``..``, not absolute, not empty."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} {name!r}: must be a non-empty name")
    bare = name.split(" [")[0]  # "model.safetensors [abcdef0123]", as the web UI titles models
    if (
        "/" in bare
        or "\\" in bare
        or ".." in bare
        or os.path.isabs(bare)
        or bare.startswith("~")
        or "\x00" in bare
    ):
        raise ValueError(
            f"{what} {name!r}: must be a name as the server lists it, not a path (no '/', '\\', '..', "
            f"absolute paths or '~')"
        )
    return name


def _is_model_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


class ModelRegistry:
    """Lists the models folder and loads one model at a time (loads run on the job worker).

    Args:
        initial: the model to start with: a name in ``models_dir``, a shipped model's name ("tiny-shapes"),
            a checkpoint file or folder given on the command line (trusted: the operator named it), or a
            TF Serving backend, ``tf-serving://HOST:PORT/MODEL`` (generation is sent there).
        models_dir: the folder of checkpoints and model folders clients may switch between (None: only
            ``initial``).
        lora_dir: the folder ``<lora:NAME:W>`` tags name (None: tags are refused).
        embedding_dir: every embedding in it is loaded with each model (None: none).
        dtype: the Keras dtype policy for the models (None: float32).
        keep_loaded: models kept in memory (the web UI's ``sd_checkpoints_limit``): switching back to one
            of them costs no load and no new traces; the least recently used beyond it is dropped.
        controlnet_dir: the folder of ControlNet models that ControlNet units name (None: units refused).
    """

    def __init__(
        self,
        initial: str,
        models_dir=None,
        lora_dir=None,
        embedding_dir=None,
        dtype=None,
        keep_loaded: int = 1,
        controlnet_dir=None,
    ):
        if isinstance(keep_loaded, bool) or not isinstance(keep_loaded, int) or keep_loaded < 1:
            raise ValueError(f"keep_loaded={keep_loaded!r} must be an integer >= 1")
        self.keep_loaded = keep_loaded
        self._loaded: dict[str, object] = {}  # filename -> StableDiffusion, least recently used first
        self.models_dir = None if models_dir is None else pathlib.Path(models_dir)
        self.lora_dir = None if lora_dir is None else pathlib.Path(lora_dir)
        self.embedding_dir = None if embedding_dir is None else pathlib.Path(embedding_dir)
        self.controlnet_dir = None if controlnet_dir is None else pathlib.Path(controlnet_dir)
        self._controlnets: dict[tuple, object] = {}  # (path, size, mtime) -> ControlNet
        self.dtype = dtype
        for what, folder in (
            ("ControlNet folder", self.controlnet_dir),
            ("models folder", self.models_dir),
            ("LoRA folder", self.lora_dir),
            ("embedding folder", self.embedding_dir),
        ):
            if folder is not None and not folder.is_dir():
                raise FileNotFoundError(f"{what} {folder}: no such folder")
        self._lock = threading.Lock()
        self._hashes: dict[tuple, str] = {}
        self.sd = None
        self.current: ModelEntry | None = None
        self._initial = self._initial_entry(initial)
        self.refresh()

    def _initial_entry(self, initial: str) -> ModelEntry:
        from tf_diffusion.models import check_source
        from tf_diffusion.serve import tf_serving

        if tf_serving.is_backend(initial):  # a model served by TF Serving: generation is sent there
            backend = tf_serving.parse_backend(initial)
            return ModelEntry(backend.model, backend.model, backend.url, False)
        if self.models_dir is not None and "/" not in initial and "\\" not in initial:
            for entry in self._scan():
                if initial in entry.names():
                    return entry
        source = check_source(initial)
        path = pathlib.Path(source)
        title = path.name if path.is_file() else (path.name or initial)
        if not path.exists():  # a hub id
            title = initial
        return ModelEntry(title, path.stem if path.is_file() else title, source, path.is_file())

    def _scan(self) -> list[ModelEntry]:
        if self.models_dir is None:
            return []
        found = []
        for path in sorted(self.models_dir.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
                found.append(ModelEntry(path.name, path.stem, str(path), True))
            elif _is_model_folder(path):
                found.append(ModelEntry(path.name, path.name, str(path), False))
        return found

    def refresh(self) -> list[ModelEntry]:
        """List the models folder again (``/sdapi/v1/refresh-checkpoints``)."""
        entries = self._scan()
        if all(e.filename != self._initial.filename for e in entries):
            entries.insert(0, self._initial)
        with self._lock:
            self._entries = entries
        return entries

    @property
    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries)

    def lookup(self, name) -> ModelEntry:
        """The entry a client's name means: a title, a title without its ``[hash]``, or a model name."""
        check_name(name, "model")
        bare = name.split(" [")[0].strip()
        for entries in (self.entries, self.refresh()):
            for entry in entries:
                if name in entry.names() or bare in entry.names():
                    return entry
        titles = [e.title for e in self.entries]
        raise NotFound(f"model {name!r} not found; available: {titles} (GET /sdapi/v1/sd-models)")

    def short_hash(self, entry: ModelEntry) -> str | None:
        """The web UI's 10-digit hash of a checkpoint file (cached); None for folders."""
        if not entry.is_file:
            return None
        from tf_diffusion.infotext import model_hash

        stat = os.stat(entry.filename)
        key = (entry.filename, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = model_hash(entry.filename)
        return self._hashes[key]

    def load(self, entry: ModelEntry | None = None):
        """Make ``entry`` (default: the initial model) the current model, loading it with its embeddings.

        Models over ``keep_loaded`` are dropped before the load; if the load fails, no model may be
        current, and the next job loads the initial one again.
        """
        from tf_diffusion.adapters.textual_inversion import EMBEDDING_SUFFIXES
        from tf_diffusion.pipeline import StableDiffusion
        from tf_diffusion.serve import tf_serving

        entry = self._initial if entry is None else entry
        if self.current is not None and entry.filename == self.current.filename:
            return self.sd
        sd = self._loaded.pop(entry.filename, None)
        if sd is None:
            # drop what is over the limit first, so that two full models never need to fit at once
            while len(self._loaded) >= self.keep_loaded:
                self._loaded.pop(next(iter(self._loaded)))
                if self.current is not None and self.current.filename not in self._loaded:
                    self.sd = self.current = None
            if tf_serving.is_backend(entry.filename):
                sd = tf_serving.TFServingModel(entry.filename)
            else:
                sd = StableDiffusion.from_pretrained(entry.filename, dtype=self.dtype)
                sd.lora_dir = None if self.lora_dir is None else str(self.lora_dir)
                for path in self.embedding_files(EMBEDDING_SUFFIXES):
                    sd.load_textual_inversion(str(path))
        self._loaded[entry.filename] = sd
        self.sd, self.current = sd, entry
        return sd

    def embedding_files(self, suffixes) -> list[pathlib.Path]:
        if self.embedding_dir is None:
            return []
        return [
            p for p in sorted(self.embedding_dir.iterdir()) if p.is_file() and p.suffix.lower() in suffixes
        ]

    def loras(self) -> list[dict]:
        """``/sdapi/v1/loras``: the LoRA files of the LoRA folder."""
        from tf_diffusion.adapters.extra_networks import LORA_SUFFIXES

        if self.lora_dir is None:
            return []
        return [
            {"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
            for p in sorted(self.lora_dir.iterdir())
            if p.is_file() and p.suffix.lower() in LORA_SUFFIXES
        ]

    def controlnet_files(self) -> list[pathlib.Path]:
        """The ControlNet models of the ControlNet folder: single files and diffusers folders."""
        from tf_diffusion.weights.controlnet import SINGLE_FILE_SUFFIXES

        if self.controlnet_dir is None:
            return []
        return [
            p
            for p in sorted(self.controlnet_dir.iterdir())
            if not p.name.startswith(".")
            and (
                (p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES)
                or (p.is_dir() and (p / "config.json").is_file())
            )
        ]

    def controlnet_titles(self) -> list[str]:
        """``/controlnet/model_list``: names as the ControlNet extension lists them (stem, or folder name)."""
        return [p.stem if p.is_file() else p.name for p in self.controlnet_files()]

    def controlnet_path(self, name) -> pathlib.Path:
        """The file or folder a unit's ``model`` names (``stem``, ``stem [hash]`` or the file name)."""
        if self.controlnet_dir is None:
            raise ValueError(
                f"ControlNet model {name!r}: this server was started without --controlnet-dir, so it has none"
            )
        check_name(name, "ControlNet model")
        bare = name.split(" [")[0].strip()
        for p in self.controlnet_files():
            if bare in (p.name, p.stem):
                return p
        raise NotFound(
            f"ControlNet model {name!r} not found; available: {self.controlnet_titles()} "
            f"(GET /controlnet/model_list)"
        )

    def controlnet(self, name):
        """The loaded ``ControlNet`` a unit names (cached while its file is unchanged; run on the worker)."""
        from tf_diffusion.controlnet import ControlNet

        path = self.controlnet_path(name)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._controlnets:
            while len(self._controlnets) >= 4:  # a few nets in memory, the oldest read first dropped
                self._controlnets.pop(next(iter(self._controlnets)))
            self._controlnets[key] = ControlNet.from_pretrained(str(path), dtype=self.dtype)
        return self._controlnets[key]
