"""One entry point for every checkpoint format: detect, read lazily, check, report; and save.

Formats read: original single files (``.safetensors``, ``.ckpt``/``.pt``), diffusers folders,
our own folders (``save_pretrained``), keras-cv ``.h5`` weights, and Hugging Face Hub ids
(downloaded, or found in the local cache when offline). Every reader yields the same thing:
a ``PipelineConfig``, a tokenizer and, per component, a mapping from our checkpoint keys
to torch-layout tensors that stay in the file until ``np.asarray`` reads them. Keys and
shapes are checked against the config before any model is built, so a bad checkpoint
fails with one message and nothing half-loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tf_diffusion.config import PipelineConfig, from_dict
from tf_diffusion.families import (
    ALL_COMPONENTS,
    COMPONENTS,
    components_of,
    family_of_config,
    get_family,
    is_sd3_single_file,
)
from tf_diffusion.fileio import aside_path, clean_stale, publish, reading, sync_folder, sync_tree, temp_prefix
from tf_diffusion.presets import PRESETS
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.weights import hub
from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.diffusers_folder import (
    MODEL_INDEX,
    read_diffusers_config,
    read_diffusers_folder,
    write_diffusers_folder,
)
from tf_diffusion.weights.folder import is_tf_diffusion_folder, read_folder, write_folder
from tf_diffusion.weights.lazy import BFLOAT16, LazyTensor, derived, is_floating
from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors
from tf_diffusion.weights.single_file import (
    detect_family,
    infer_config,
    split_single_file,
    to_single_file,
    unwrap_checkpoint,
)
from tf_diffusion.weights.state_dict import StateDictError

logger = logging.getLogger("tf_diffusion")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
KERAS_CV_SUFFIXES = (".h5", ".hdf5")
SAVE_FORMATS = ("single-file", "diffusers", "tf_diffusion")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DTYPES = {"float32": np.dtype("float32"), "float16": np.dtype("float16"), "bfloat16": BFLOAT16}
# Safetensors metadata key under which our single-file writer stores the full config.
CONFIG_METADATA_KEY = "tf_diffusion_config"
# diffusers' rule for SD 2.x single files: v-prediction, unless the file is SD 2.0-base (step 875000).
_SD2_BASE_GLOBAL_STEP = 875000


@dataclass
class LoadReport:
    """What a checkpoint turned out to be; ``str(report)`` is a readable summary.

    Attributes:
        source: the path or hub id as given.
        path: the local file or folder read.
        format: "single-file (.safetensors)", "single-file (.ckpt)", "diffusers", "tf_diffusion" or "keras-cv".
        family: "sd1", "sd2", "sd1-inpainting" or "sd2-inpainting".
        config_name: the preset the weights match, or a description of the inferred config.
        config_source: where the architecture came from.
        prediction_type: "epsilon" / "v_prediction" / "sample".
        prediction_type_source: where that came from ("argument", a config file, or an assumption).
        dtypes: component -> stored dtypes (e.g. {"unet": "float16"}).
        parameters: component -> number of scalars.
        ema: "single" (one UNet weight set), "available" (EMA weights present, not used), "used",
            or "none" (no separate EMA weights, or not a single file).
        files: the files read.
        missing_components: components the checkpoint lacks.
        ignored_keys: buffers skipped on purpose.
        unexpected_keys: keys that fit nowhere (an error when loading).
        problems: key or shape mismatches against the config (an error when loading).
        notes: anything else worth knowing.
    """

    source: str
    path: str
    format: str
    family: str = "?"
    config_name: str = "?"
    config_source: str = "?"
    prediction_type: str = "epsilon"
    prediction_type_source: str = "?"
    dtypes: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    ema: str = "none"
    files: list[str] = field(default_factory=list)
    missing_components: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"source:          {self.source}" + (f" ({self.path})" if self.path != self.source else ""),
            f"format:          {self.format}",
            f"family:          {self.family}",
            f"config:          {self.config_name} (from {self.config_source})",
            f"prediction type: {self.prediction_type} ({self.prediction_type_source})",
            f"EMA weights:     {_EMA_TEXT.get(self.ema, self.ema)}",
        ]
        for name in ALL_COMPONENTS:
            if name in self.parameters:
                lines.append(
                    f"{name + ':':16} {self.parameters[name]:,} parameters, {self.dtypes.get(name, '?')}"
                )
        if self.parameters:
            lines.append(f"{'total:':16} {sum(self.parameters.values()):,} parameters")
        if self.missing_components:
            lines.append(f"missing:         {', '.join(self.missing_components)}")
        if self.ignored_keys:
            lines.append(
                f"ignored:         {len(self.ignored_keys)} buffer keys ({_preview(self.ignored_keys)})"
            )
        if self.unexpected_keys:
            lines.append(
                f"unexpected:      {len(self.unexpected_keys)} keys ({_preview(self.unexpected_keys)})"
            )
        lines += [f"problem:         {p}" for p in self.problems]
        lines += [f"note:            {n}" for n in self.notes]
        return "\n".join(lines)


_EMA_TEXT = {
    "none": "none stored separately",
    "single": "one UNet weight set (pruned files usually hold the EMA weights)",
    "available": "stored separately, not used (use_ema=True to load them)",
    "used": "loaded (model_ema.*)",
}


def _preview(keys: list[str], count: int = 3) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... {len(keys) - count} more" if len(keys) > count else "")


@dataclass
class LoadedWeights:
    """A checkpoint opened lazily: config, tokenizer, per-component tensors and a report.

    Use as a context manager (or call ``close``): memory-mapped files stay open until then.

    Attributes:
        config: the pipeline configuration.
        tokenizer: the tokenizer to use.
        components: "text_encoder" / "unet" / "vae" -> {our key: torch-layout tensor}.
        report: what was found.
        extras: original single-file tensors with no place in our model (OpenCLIP's unused
            tail), passed back when writing a single file.
        scheduler_json: a diffusers scheduler_config.json to write back, if read from one.
    """

    config: PipelineConfig
    tokenizer: CLIPTokenizer
    components: dict[str, Mapping]
    report: LoadReport
    extras: dict = field(default_factory=dict)
    scheduler_json: dict | None = None
    handles: list = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Close the files the tensors are read from."""
        for handle in self.handles:
            handle.close()
        self.handles = []

    def __enter__(self) -> LoadedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- detection


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of a local file or folder.

    Returns:
        "single-file (.safetensors)", "single-file (.ckpt)", "diffusers", "tf_diffusion", "keras-cv" or
        "keras-hub" (a keras-hub StableDiffusion3Backbone preset, which the SD3 loaders read).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is no format we read, with what was found there.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return "single-file (.safetensors)"
        if suffix in SINGLE_FILE_SUFFIXES:
            return "single-file (.ckpt)"
        if suffix in KERAS_CV_SUFFIXES:
            return "keras-cv"
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            return "single-file (.ckpt)"
        raise ValueError(
            f"{path}: unknown checkpoint format (expected {', '.join(SINGLE_FILE_SUFFIXES + KERAS_CV_SUFFIXES)})"
        )
    if (path / MODEL_INDEX).is_file():
        return "diffusers"
    if is_tf_diffusion_folder(path):
        return "tf_diffusion"
    from tf_diffusion.weights.keras_hub_sd3 import is_keras_hub_sd3_preset

    if is_keras_hub_sd3_preset(path):
        # Its model.weights.h5 would pass for keras-cv weights; config.json names the backbone.
        return "keras-hub"
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if any(name.lower().endswith(KERAS_CV_SUFFIXES) for name in files):
        return "keras-cv"
    checkpoints = [n for n in files if n.lower().endswith(SINGLE_FILE_SUFFIXES)]
    hint = f"; it holds checkpoint files {checkpoints[:5]}, pass one of them" if checkpoints else ""
    raise ValueError(
        f"{path}: not a diffusers folder (no {MODEL_INDEX}), not a tf_diffusion folder (no config.json "
        f"with _format tf_diffusion) and no keras-cv .h5 weights{hint}"
    )


def family_of(config: PipelineConfig) -> str:
    """The family name of a config ("sd1", "sd2-inpainting", ...; ``families.family_of_config``)."""
    return family_of_config(config).name


# --------------------------------------------------------------------------- loading


def load_pipeline_weights(
    source: str | os.PathLike,
    *,
    config: PipelineConfig | str | os.PathLike | None = None,
    tokenizer: CLIPTokenizer | str | os.PathLike | None = None,
    prediction_type: str | None = None,
    use_ema: bool | None = None,
    variant: str | None = None,
    revision: str | None = None,
    strict: bool = True,
    supplied: tuple[str, ...] = (),
) -> LoadedWeights:
    """Open a checkpoint of any supported format, lazily, and check it against its config.

    Args:
        source: a file, a folder, or a Hugging Face Hub id ("runwayml/stable-diffusion-v1-5").
        config: the architecture, overriding detection: a ``PipelineConfig``, a preset name,
            or a diffusers / tf_diffusion folder (or hub id) whose configs and tokenizer to use,
            as diffusers' ``from_single_file(config=...)``. Needed for single files whose
            architecture differs from the released models in ways weights cannot show (heads).
        tokenizer: a ``CLIPTokenizer`` or tokenizer folder to use instead of the detected one.
        prediction_type: "epsilon", "v_prediction" or "sample"; overrides the config. Single
            files cannot show it; without this argument SD 2.x files are taken as v-prediction
            (as diffusers does), others as epsilon.
        use_ema: for single files holding both weight sets, take the EMA UNet (``model_ema.*``).
        variant: diffusers weight variant, e.g. "fp16".
        revision: hub branch, tag or commit.
        strict: raise on missing components, unexpected keys or shape mismatches. With False
            (``tf-diffusion info``) they are only listed in the report.
        supplied: components the caller brings from elsewhere ("vae": ``from_pretrained(vae=...)``), which a
            single file may lack (fp16 community SDXL files often ship without a VAE).

    Returns:
        ``LoadedWeights``; close it (or use ``with``) when done.

    Raises:
        FileNotFoundError: ``source`` is neither an existing path nor a hub id.
        ValueError: unreadable or unsafe files, unsupported formats, mismatching keys or shapes
            (``StateDictError``), or a config of another model family; the message names the
            file. Any other exception a malformed file causes (``MemoryError``, ``KeyError``, an
            ``OSError`` without the path, ...) is raised as ``fileio.CheckpointError``, a ValueError.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not allowed; expected one of {PREDICTION_TYPES}"
        )
    if use_ema not in (None, True, False):
        raise ValueError(f"use_ema must be True, False or None, got {use_ema!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a path or hub id, got {type(source).__name__}")
    # One rule for every reader: whatever a malformed file makes it raise reaches the caller as a
    # ValueError naming the file (CheckpointError for anything that was not one already).
    with reading(source):
        return _load_pipeline_weights(
            source, config, tokenizer, prediction_type, use_ema, variant, revision, strict, tuple(supplied)
        )


def _load_pipeline_weights(
    source, config, tokenizer, prediction_type, use_ema, variant, revision, strict, supplied
) -> LoadedWeights:
    path = resolve_source(source, revision=revision, variant=variant)
    fmt = detect_format(path)
    if fmt == "keras-hub":
        raise ValueError(
            f"{path} is a keras-hub StableDiffusion3Backbone preset (MMDiT); StableDiffusion and its presets "
            f"build UNet models: load it with tf_diffusion.sd3.StableDiffusion3.from_pretrained"
        )
    report = LoadReport(source=str(source), path=str(path), format=fmt)
    if use_ema and not fmt.startswith("single-file"):
        raise ValueError(f"use_ema=True applies to single-file checkpoints; {path} is a {fmt} checkpoint")
    if variant is not None and fmt != "diffusers":
        raise ValueError(f"variant={variant!r} applies to diffusers folders; {path} is a {fmt} checkpoint")

    override = _config_argument(config, revision)
    if fmt.startswith("single-file"):
        weights = _read_single_file(path, report, override, prediction_type, use_ema, strict, supplied)
    elif fmt == "diffusers":
        folder = read_diffusers_folder(path, variant=variant)
        report.files = [f for files in folder.files.values() for f in files]
        report.ignored_keys = folder.ignored
        if folder.ignored_components:
            report.notes.append(
                f"not loaded: {', '.join(folder.ignored_components)} (not part of tf_diffusion)"
            )
        weights = _finish(
            folder.config, folder.tokenizer, folder.components, report, "model_index.json + config.json files"
        )
        weights.scheduler_json = folder.scheduler
        weights.handles = folder.handles
        report.prediction_type_source = "scheduler/scheduler_config.json"
        _note_sampler(report, folder.config)
    elif fmt == "tf_diffusion":
        folder = read_folder(path)
        weights = _finish(folder.config, folder.tokenizer, folder.components, report, "config.json")
        weights.handles = folder.handles
        report.prediction_type_source = "config.json"
    else:
        from tf_diffusion.weights.keras_cv import read_keras_cv

        loaded = read_keras_cv(path)
        report.files = loaded.files
        report.notes += loaded.notes
        weights = _finish(
            loaded.config,
            CLIPTokenizer(config=loaded.config.tokenizer),
            loaded.components,
            report,
            "keras-cv's fixed SD architecture",
        )
        weights.handles = loaded.handles
        report.prediction_type_source = "keras-cv models are SD 1.x / 2.1 as released"
    if fmt == "diffusers" and not pathlib.Path(source).expanduser().exists():
        # A hub snapshot folder is named by its commit; the repository id names the model better.
        weights.config = weights.config.replace(name=str(source))
        report.config_name = str(source)
    try:
        _apply_overrides(weights, override, tokenizer, prediction_type, fmt, strict)
        _check(weights, strict)
    except BaseException:
        weights.close()
        raise
    return weights


def resolve_source(source, *, revision: str | None = None, variant: str | None = None) -> pathlib.Path:
    """A local path for ``source``: the path itself, or a hub id's downloaded / cached snapshot.

    Raises:
        FileNotFoundError: a path that does not exist and is not a hub id.
        hub.HubError: a hub id that cannot be downloaded or found in the cache.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"expected a path or hub id, got {type(source).__name__}")
    path = pathlib.Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    if isinstance(source, str) and hub.looks_like_repo_id(text):
        return hub.resolve(text, revision=revision, variant=variant)
    raise FileNotFoundError(
        f"{text}: no such file or folder (and not a Hugging Face Hub id of the form org/name)"
    )


@dataclass
class _ConfigOverride:
    config: PipelineConfig
    tokenizer: CLIPTokenizer | None
    scheduler_json: dict | None
    source: str


def _config_argument(config, revision) -> _ConfigOverride | None:
    if config is None:
        return None
    if isinstance(config, PipelineConfig):
        return _ConfigOverride(config, None, None, "the config argument")
    if isinstance(config, str) and config in PRESETS:
        return _ConfigOverride(PRESETS[config], None, None, f"preset {config!r}")
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        if not os.path.exists(text) and not (isinstance(config, str) and hub.looks_like_repo_id(text)):
            raise ValueError(
                f"config={text!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing folder"
            )
        path = resolve_source(config, revision=revision)
        fmt = detect_format(path)
        if fmt == "diffusers":
            cfg, tok, scheduler, _ = read_diffusers_config(path)
            return _ConfigOverride(cfg, tok, scheduler, f"the configs of {config}")
        if fmt == "tf_diffusion":
            folder = read_folder(path)
            for handle in folder.handles:
                handle.close()
            return _ConfigOverride(folder.config, folder.tokenizer, None, f"the config of {config}")
        raise ValueError(
            f"config={os.fspath(config)!r} is a {fmt} checkpoint; give a preset, a PipelineConfig or a folder"
        )
    raise ValueError(
        f"config must be a PipelineConfig, a preset name ({', '.join(sorted(PRESETS))}) or a folder, got {config!r}"
    )


def _read_single_file(path, report, override, prediction_type, use_ema, strict, supplied=()) -> LoadedWeights:
    handles, metadata, top = [], {}, {}
    if path.suffix.lower() == ".safetensors":
        handle = open_safetensors(path)
        handles.append(handle)
        tensors, metadata = handle, handle.metadata
    else:
        tensors, top = unwrap_checkpoint(load_ckpt(path), str(path))
    report.files = [str(path)]
    try:
        if is_sd3_single_file(tensors):
            wanted = (
                ""
                if override is None
                else f" ({override.source} describes a {family_of(override.config)} model)"
            )
            raise ValueError(
                f"{path} holds SD3 / SD3.5 (MMDiT) weights{wanted}; StableDiffusion and its presets build UNet "
                f"models: load it with tf_diffusion.sd3.StableDiffusion3"
            )
        parts = split_single_file(tensors, use_ema=use_ema)
        family = detect_family(parts)
        report.family, report.ema = family, parts.ema
        report.ignored_keys = parts.ignored
        report.unexpected_keys = parts.unexpected
        report.missing_components = [
            c for c in get_family(family).components if c not in parts.components and c not in supplied
        ]
        if parts.openclip_layers:
            report.notes.append(
                f"OpenCLIP text encoder: {parts.openclip_layers} layers in the file; the last is unused by "
                f"SD 2.x (penultimate-layer conditioning) and was dropped"
            )
        if parts.ema == "available":
            report.notes.append(
                "the file holds EMA and non-EMA UNet weights; the non-EMA ones were taken (use_ema=True for EMA)"
            )
        stored = _stored_config(metadata)
        if prediction_type is not None:
            pred, pred_source = prediction_type, "argument"
        elif override is not None:
            pred, pred_source = override.config.scheduler.prediction_type, override.source
        elif stored is not None:
            pred, pred_source = stored.scheduler.prediction_type, "the file's tf_diffusion metadata"
        else:
            pred, pred_source = _guess_prediction_type(path, family, top)
        report.prediction_type, report.prediction_type_source = pred, pred_source

        if override is not None:
            config, config_source = override.config, override.source
        elif stored is not None:
            config, config_source = stored, "the file's tf_diffusion metadata"
        elif report.missing_components:
            if strict:
                raise ValueError(
                    f"{path}: the checkpoint has no {', '.join(report.missing_components)} weights "
                    f"(a {family} file needs all of text encoder, UNet and VAE)"
                )
            config, config_source = None, "nothing (components missing)"
        else:
            try:
                config = infer_config(parts, family, pred, supplied)
            except (KeyError, ValueError, IndexError) as e:
                problem = (
                    f"cannot read the architecture from the weights ({type(e).__name__}: {e}); pass config="
                )
                if strict:
                    raise ValueError(f"{path}: {problem}") from None
                report.problems.append(problem)
                config = None
            config_source = (
                "the weights' shapes"
                if config is None or config.name not in PRESETS
                else ("preset matching the shapes")
            )
            if config is not None and config.name not in PRESETS:
                report.notes.append(
                    "not a released architecture: attention heads and norm groups are not stored in weights "
                    "and were assumed; pass config= (e.g. the model's diffusers folder) if outputs look wrong"
                )
        if config is not None and override is None:
            config = _with_prediction_type(config, pred)
        report.config_source = config_source
        # The tokenizer is chosen in _apply_overrides (an argument or config folder may supply one).
        weights = LoadedWeights(config, None, parts.components, report, extras=parts.extras, handles=handles)
        if config is not None:
            report.config_name = config.name
        if get_family(family).single_file_prediction_type != "epsilon" and pred_source.startswith("assumed"):
            report.notes.append(
                "single files cannot show the prediction type; pass prediction_type='epsilon' for 512px "
                "SD 2.x base models"
            )
        _describe(weights)
        return weights
    except BaseException:
        for handle in handles:
            handle.close()
        raise


def _note_sampler(report: LoadReport, config: PipelineConfig) -> None:
    """Say which sampler the folder's scheduler gave, and if generate() cannot run it by default."""
    from tf_diffusion.weights.diffusers_configs import sampler_is_implemented

    name = config.default_sampler
    if sampler_is_implemented(name):
        report.notes.append(f"default sampler: {name} (the folder's scheduler, as diffusers samples it)")
    else:
        report.notes.append(
            f"the folder's scheduler {name} is not implemented by tf_diffusion; pass scheduler= "
            f"(e.g. 'dpmpp_2m', 'euler_a', 'ddim') to generate()"
        )


def _stored_config(metadata: Mapping) -> PipelineConfig | None:
    import json

    text = metadata.get(CONFIG_METADATA_KEY) if metadata else None
    if not text:
        return None
    try:
        return from_dict(PipelineConfig, json.loads(text))
    except (ValueError, TypeError) as e:
        raise ValueError(f"the file's {CONFIG_METADATA_KEY} metadata is not a valid config: {e}") from None


def _guess_prediction_type(path: pathlib.Path, family: str, top: Mapping) -> tuple[str, str]:
    """A sidecar LDM yaml (``parameterization: "v"``), else diffusers' rule for single files."""
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8", errors="replace")
            match = re.search(r"^\s*parameterization:\s*['\"]?(\w+)", text, re.MULTILINE)
            value = match.group(1) if match else "eps"
            return (
                "v_prediction" if value == "v" else "epsilon"
            ), f"{sidecar.name} (parameterization: {value})"
    assumed = get_family(family).single_file_prediction_type
    if assumed == "v_prediction":
        if top.get("global_step") == _SD2_BASE_GLOBAL_STEP:
            return "epsilon", "assumed: global_step 875000 marks SD 2.0-base, as diffusers reads it"
        return "v_prediction", f"assumed: {family} single files are v-prediction unless told, as in diffusers"
    return assumed, f"assumed: the default for {family} models"


def _with_prediction_type(config: PipelineConfig, prediction_type: str) -> PipelineConfig:
    if config.scheduler.prediction_type == prediction_type:
        return config
    return config.replace(scheduler=dataclasses.replace(config.scheduler, prediction_type=prediction_type))


def _finish(config, tokenizer, components, report, config_source) -> LoadedWeights:
    report.config_source = config_source
    report.config_name = config.name
    report.family = family_of(config)
    report.prediction_type = config.scheduler.prediction_type
    report.missing_components = [c for c in components_of(config) if c not in components]
    weights = LoadedWeights(config, tokenizer, components, report)
    _describe(weights)
    return weights


def _describe(weights: LoadedWeights) -> None:
    report = weights.report
    for name, tensors in weights.components.items():
        counts = Counter(
            str(np.dtype(t.dtype).name if hasattr(t, "dtype") else "?") for t in tensors.values()
        )
        report.dtypes[name] = ", ".join(
            f"{d} ({n})" if len(counts) > 1 else d for d, n in counts.most_common()
        )
        # Exact Python ints: a hostile shape cannot wrap around to a negative count.
        report.parameters[name] = sum(math.prod(int(d) for d in t.shape) for t in tensors.values())


def _apply_overrides(weights: LoadedWeights, override, tokenizer, prediction_type, fmt, strict) -> None:
    report = weights.report
    if override is not None and not fmt.startswith("single-file"):
        file_family, wanted = family_of(weights.config), family_of(override.config)
        if file_family != wanted:
            raise ValueError(_family_message(weights.report.path, file_family, override.source, wanted))
        weights.config, report.config_source = override.config, override.source
        report.config_name = override.config.name
    if override is not None and override.tokenizer is not None:
        weights.tokenizer = override.tokenizer
    if override is not None and override.scheduler_json is not None:
        weights.scheduler_json = override.scheduler_json
    if prediction_type is not None:
        weights.config = _with_prediction_type(weights.config, prediction_type)
        report.prediction_type_source = "argument"
    if weights.config is not None:
        report.prediction_type = weights.config.scheduler.prediction_type
        if (
            override is not None
            and fmt.startswith("single-file")
            and family_of(override.config) != report.family
        ):
            raise ValueError(
                _family_message(report.path, report.family, override.source, family_of(override.config))
            )
    if tokenizer is not None:
        if isinstance(tokenizer, CLIPTokenizer):
            weights.tokenizer = tokenizer
        else:
            weights.tokenizer = CLIPTokenizer.from_pretrained_folder(tokenizer)
    if weights.tokenizer is None and weights.config is not None:
        try:
            weights.tokenizer = CLIPTokenizer(config=weights.config.tokenizer)
        except ValueError as e:
            raise ValueError(
                f"the config's tokenizer settings do not fit the packaged CLIP vocabulary ({e}); "
                f"pass tokenizer= (a tokenizer folder) or a config folder that has one"
            ) from None
    if weights.config is not None and weights.tokenizer is not None:
        if weights.tokenizer.config != weights.config.tokenizer:
            weights.config = weights.config.replace(tokenizer=weights.tokenizer.config)
        vocab = weights.tokenizer.vocab_size
        encoder = weights.config.text_encoder or weights.config.text_encoder_2
        if vocab > encoder.vocab_size:
            problem = (
                f"the tokenizer has {vocab} tokens but the text encoder embeds only "
                f"{encoder.vocab_size}; pass the tokenizer that belongs to these weights"
            )
            if strict:
                raise ValueError(problem)
            report.problems.append(problem)


def _family_message(path, found: str, source: str, wanted: str) -> str:
    found_text = get_family(found).description
    presets = sorted(n for n, c in PRESETS.items() if family_of(c) == found)
    return (
        f"{path} holds {found_text} weights, but {source} describes a {wanted} model; "
        f"use a {found} config ({', '.join(presets) or 'none of the presets'}) or leave config unset to detect it"
    )


@functools.lru_cache(maxsize=8)
def expected_shapes(config: PipelineConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Component -> {key: torch shape} of ``config``, from models built without allocating weights."""

    from tf_diffusion.clip import CLIPTextEncoder
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.vae import AutoencoderKL
    from tf_diffusion.weights.state_dict import build_abstract, manifest

    def build():
        models = {"unet": UNetModel(config.unet), "vae": AutoencoderKL(config.vae)}
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(config, name) is not None:
                models[name] = CLIPTextEncoder(getattr(config, name))
        return models

    models = build_abstract(build)
    return {name: manifest(model) for name, model in models.items()}


def _check(weights: LoadedWeights, strict: bool) -> None:
    """Compare every component's keys and shapes with the config; raise (strict) or report."""
    report = weights.report
    if weights.config is None:
        return
    try:
        expected = expected_shapes(weights.config)
    except ValueError as e:
        problem = f"config {weights.config.name!r} cannot be built: {e}"
        if strict:
            raise ValueError(problem) from None
        report.problems.append(problem)
        return
    missing, unexpected, mismatched = [], [], []
    for name in components_of(weights.config):
        tensors = weights.components.get(name)
        if tensors is None:
            continue
        want = expected[name]
        missing += [f"{name}: {k}" for k in want if k not in tensors]
        unexpected += [f"{name}: {k}" for k in tensors if k not in want]
        mismatched += [
            (f"{name}: {k}", tuple(t.shape), want[k])
            for k, t in tensors.items()
            if k in want and tuple(t.shape) != want[k]
        ]
    report.problems += (
        [f"missing key {k}" for k in missing]
        + [f"unexpected key {k}" for k in unexpected]
        + [f"{k}: shape {got} in the file, {want} in the model" for k, got, want in mismatched]
    )
    if not strict:
        return
    if report.missing_components:
        raise ValueError(
            f"{report.path}: the checkpoint has no {', '.join(report.missing_components)} weights"
        )
    single_unexpected = [f"(file) {k}" for k in report.unexpected_keys]
    if missing or unexpected or mismatched or single_unexpected:
        raise StateDictError(
            missing, single_unexpected + unexpected, mismatched, model_name=f"config {weights.config.name!r}"
        )


# --------------------------------------------------------------------------- the model


def from_pretrained(
    cls,
    source: str | os.PathLike,
    *,
    dtype: str | None = None,
    config: PipelineConfig | str | os.PathLike | None = None,
    tokenizer: CLIPTokenizer | str | os.PathLike | None = None,
    prediction_type: str | None = None,
    use_ema: bool | None = None,
    variant: str | None = None,
    revision: str | None = None,
    vae: str | os.PathLike | None = None,
):
    """Build a ``StableDiffusion`` from a checkpoint of any supported format.

    Detects the format (single .safetensors / .ckpt file, diffusers folder, tf_diffusion folder,
    keras-cv .h5 weights, or a Hugging Face Hub id) and the model family (SD 1.x, SD 2.x,
    inpainting) from keys and shapes, checks every key and shape before building, then
    assigns the weights one tensor at a time, so memory stays near the model's own size.
    What was found is logged and kept as ``model.load_report``.

    Args:
        cls: the StableDiffusion class (this is the body of ``StableDiffusion.from_pretrained``).
        source: a file, a folder or a hub id such as "runwayml/stable-diffusion-v1-5".
        dtype: Keras dtype policy for all components ("float32", "mixed_float16", "float16", ...).
        config, tokenizer, prediction_type, use_ema, variant, revision: see ``load_pipeline_weights``.
        vae: a VAE file or folder to use instead of the checkpoint's (``StableDiffusion.load_vae``); a single
            file without a VAE then loads too.

    Returns:
        The model, with ``load_report`` (a ``LoadReport``).

    Raises:
        FileNotFoundError, ValueError: see ``load_pipeline_weights``; no model is returned.

    Example:
        >>> sd = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")
        >>> print(sd.load_report)
    """
    from tf_diffusion.layers import weights_to_be_loaded
    from tf_diffusion.weights.state_dict import allocate_unassigned, load_state_dict, unallocated_variables

    with load_pipeline_weights(
        source,
        config=config,
        tokenizer=tokenizer,
        prediction_type=prediction_type,
        use_ema=use_ema,
        variant=variant,
        revision=revision,
        supplied=() if vae is None else ("vae",),
    ) as weights:
        # The strict check above refused a file missing any key or component, so every variable is
        # assigned below (no random start values to draw), except a VAE supplied through vae=.
        created = []
        if vae is None and isinstance(cls, type):
            # Every variable is left unallocated and created from its checkpoint tensor by
            # load_state_dict: assigning into variables built first (zeros) left about 15% of the
            # weights' size resident on top of them (benchmarks/README.md, Flux section). A quantizing
            # builder (execution.quantize.build, not a class) leaves its int8 weights unallocated itself.
            with weights_to_be_loaded(), unallocated_variables() as created:
                model = cls(weights.config, dtype=dtype, tokenizer=weights.tokenizer)
        else:
            with weights_to_be_loaded() if vae is None else contextlib.nullcontext():
                model = cls(weights.config, dtype=dtype, tokenizer=weights.tokenizer)
        try:
            # Tensors are read from the file here; a read that fails drops the half-loaded model.
            with reading(weights.report.path):
                for name in components_of(weights.config):
                    if name in weights.components:  # not there: a component supplied (vae=)
                        load_state_dict(getattr(model, name), weights.components[name])
        finally:
            allocate_unassigned(created)  # variables outside the checkpoint's components (none today)
    if vae is not None:
        model.load_vae(vae)
        weights.report.notes.append(f"VAE from {model.vae_source}")
    model.load_report = weights.report
    logger.info("loaded %s\n%s", source, weights.report)
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the heap that loading freed (conversion buffers, file reads) back to the OS.

    glibc keeps freed blocks for reuse, so without this a process stays at its loading peak and
    the first generate() adds its activations on top of it (benchmarks/README.md, memory).
    A no-op where glibc's malloc_trim is unavailable.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def model_weights(model) -> dict[str, dict[str, LazyTensor]]:
    """A StableDiffusion's weights as lazy torch-layout tensors (read from the variables when written)."""
    import keras

    from tf_diffusion.weights.state_dict import named_parameters, to_torch_layout, torch_shape

    out = {}
    for name in components_of(model.config):
        tensors = {}
        for key, (layer, attr) in named_parameters(getattr(model, name)).items():
            variable = getattr(layer, attr)
            kind = type(layer).LAYOUT[attr]

            def read(variable=variable, kind=kind):
                return np.ascontiguousarray(to_torch_layout(kind, keras.ops.convert_to_numpy(variable)))

            dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
            tensors[key] = LazyTensor(torch_shape(layer, attr), dtype, read, f"{name}:{key}")
        out[name] = tensors
    return out


def save_pretrained(
    model,
    destination: str | os.PathLike,
    *,
    format: str = "tf_diffusion",
    overwrite: bool = False,
    dtype: str | None = None,
) -> pathlib.Path:
    """Write a StableDiffusion to disk (the body of ``StableDiffusion.save_pretrained``).

    Args:
        model: the StableDiffusion.
        destination: folder (tf_diffusion, diffusers) or ``.safetensors`` file (single-file).
        format: "tf_diffusion" (default), "diffusers" or "single-file".
        overwrite: replace an existing destination.
        dtype: "float32", "float16" or "bfloat16" to cast floating weights; None keeps the variables' dtype.

    Returns:
        The destination path.

    Raises:
        FileExistsError: the destination exists and ``overwrite`` is False.
        ValueError: an unknown format or dtype, or a model loaded with ``quantize=``.
    """
    quantized = getattr(model, "quantization", None)  # execution.quantize: int8 weights are no checkpoint
    if quantized:
        raise ValueError(
            f"save_pretrained needs float weights, but {list(quantized[1])} were quantized to {quantized[0]} "
            "(quantize=); save the model loaded without quantize="
        )
    report = LoadReport(source="model", path="model", format="in memory")
    weights = LoadedWeights(model.config, model.tokenizer, model_weights(model), report)
    return save(weights, destination, format=format, overwrite=overwrite, dtype=dtype)


# --------------------------------------------------------------------------- saving


def save(
    weights: LoadedWeights,
    destination: str | os.PathLike,
    *,
    format: str,
    overwrite: bool = False,
    dtype: str | None = None,
) -> pathlib.Path:
    """Write opened weights in another format, atomically.

    Everything is written under a temporary name next to ``destination`` and moved into
    place at the end, so an interrupted run leaves no half-written destination (and, with
    ``overwrite``, the old one is replaced only once the new one is complete).

    Args:
        weights: from ``load_pipeline_weights`` (or ``model_weights``).
        destination: a folder for "diffusers" / "tf_diffusion", a ``.safetensors`` file for "single-file".
        format: one of "single-file", "diffusers", "tf_diffusion".
        overwrite: replace an existing destination.
        dtype: cast floating tensors to "float32", "float16" or "bfloat16"; None keeps them.

    Returns:
        The destination path.

    Raises:
        FileExistsError: ``destination`` exists and ``overwrite`` is False.
        ValueError: unknown format or dtype, a single-file destination not ending in .safetensors,
            or incomplete weights.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r} is not allowed; expected one of {SAVE_FORMATS}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; expected one of {sorted(DTYPES)} or None")
    destination = pathlib.Path(destination).expanduser()
    if format == "single-file" and destination.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{destination}: single-file output is written as safetensors; use a .safetensors name "
            f"(writing pickled .ckpt files is not supported)"
        )
    names = COMPONENTS if weights.config is None else components_of(weights.config)
    missing = [c for c in names if c not in weights.components]
    if missing or weights.config is None:
        raise ValueError(f"cannot write {format}: the weights lack {', '.join(missing) or 'a config'}")
    components = {name: _cast(weights.components[name], dtype) for name in names}

    def write(temporary: pathlib.Path) -> pathlib.Path:
        if format == "single-file":
            import json

            from tf_diffusion.config import to_dict

            written = temporary / destination.name
            tensors = to_single_file(components, weights.config, _cast(weights.extras, dtype))
            metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(to_dict(weights.config))}
            save_safetensors(tensors, written, metadata)
            return written
        written = temporary / "out"
        written.mkdir()
        if format == "diffusers":
            write_diffusers_folder(
                written, components, weights.config, weights.tokenizer, weights.scheduler_json
            )
        else:
            write_folder(written, components, weights.config, weights.tokenizer)
        return written

    # A model in memory (save_pretrained) has no file to blame for a read error.
    source = None if weights.report.format == "in memory" else weights.report.path
    return write_atomically(destination, write, overwrite=overwrite, source=source)


def write_atomically(
    destination: pathlib.Path, write, *, overwrite: bool = False, source: str | None = None
) -> pathlib.Path:
    """Run ``write(temporary_folder) -> written path`` next to ``destination``, then move the result into place.

    An interrupted run leaves no half-written destination; with ``overwrite`` the old one is replaced only
    once the new one is complete. Errors reading ``source`` while writing name it.

    Raises:
        FileExistsError: ``destination`` exists and ``overwrite`` is False.
    """
    destination = pathlib.Path(destination).expanduser()
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    for line in clean_stale(destination):
        logger.warning("a killed earlier write of %s left litter: %s", destination, line)
    if (destination.exists() or destination.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"{destination}: already exists; pass overwrite=True (--overwrite) to replace it"
        )
    temporary = pathlib.Path(tempfile.mkdtemp(prefix=temp_prefix(destination), suffix=".tmp", dir=parent))
    try:
        # Reading the source happens here, tensor by tensor, as the output is written.
        guard = (
            contextlib.nullcontext()
            if source is None
            else reading(source, f"cannot convert it to {destination}")
        )
        with guard:
            written = write(temporary)
        # Everything is on disk before the rename makes it visible: a crash shows all or nothing.
        sync_tree(written)
        _move_into_place(written, destination, overwrite)
        sync_folder(parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return destination


def _cast(tensors: Mapping, dtype: str | None) -> dict:
    if dtype is None:
        return dict(tensors)
    target = DTYPES[dtype]
    out = {}
    for key, value in tensors.items():
        source = np.dtype(value.dtype)
        if is_floating(source):
            if source != target:
                value = derived(value, lambda a: a.astype(target), tuple(value.shape), target)
        out[key] = value
    return out


def _move_into_place(written: pathlib.Path, destination: pathlib.Path, overwrite: bool) -> None:
    """Rename the finished output onto ``destination``; an old destination goes only after that.

    A symlink at ``destination`` is replaced (with ``overwrite``), never followed. Without
    ``overwrite`` nothing that appeared at ``destination`` meanwhile is replaced: a file is linked
    into place (which fails if the name exists), a folder renamed onto a name that must not exist.
    """
    if not overwrite:
        if written.is_file():
            publish(written, destination, overwrite=False, hint="pass overwrite=True to replace it")
            return
        if destination.exists() or destination.is_symlink():
            raise FileExistsError(f"{destination}: appeared while writing; pass overwrite=True to replace it")
        os.rename(written, destination)
        return
    if not (destination.exists() or destination.is_symlink()):
        os.rename(written, destination)
        return
    if written.is_file() and (destination.is_symlink() or destination.is_file()):
        os.replace(written, destination)
        return
    # rename() cannot replace a folder that is not empty: set the old one aside first. A kill
    # between the two renames leaves it there; the next write of destination puts it back.
    aside = pathlib.Path(aside_path(destination))
    os.rename(destination, aside)
    try:
        os.rename(written, destination)
    except BaseException:
        os.rename(aside, destination)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()
