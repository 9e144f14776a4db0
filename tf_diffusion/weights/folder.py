"""tf_diffusion's own folder format, written by ``save_pretrained``.

::

    config.json              {"_format": "tf_diffusion", "format_version": 1, "config": to_dict(PipelineConfig)}
    text_encoder.safetensors our (original-layout) keys, torch-layout tensors
    unet.safetensors
    vae.safetensors
    tokenizer/               vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json

Tensors keep the PyTorch layout and the original key names, so the files are also plain
safetensors state dicts that other tools can read.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from tf_diffusion.config import PipelineConfig, from_dict, to_dict
from tf_diffusion.families import components_of
from tf_diffusion.fileio import read_json_object
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors

FORMAT = "tf_diffusion"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"


@dataclass
class TFDiffusionFolder:
    """A folder in our format, read lazily; ``handles`` must be closed when done."""

    config: PipelineConfig
    tokenizer: CLIPTokenizer
    components: dict[str, dict]
    handles: list = field(default_factory=list)


def is_tf_diffusion_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json says it is in our format."""
    config = pathlib.Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return read_json_object(config).get("_format") == FORMAT
    except (OSError, ValueError):
        return False


def read_folder(path: str | os.PathLike) -> TFDiffusionFolder:
    """Read a folder written by ``write_folder`` (tensors stay in the files until used).

    Raises:
        ValueError: for a newer format version, a bad config or missing files.
    """
    folder = pathlib.Path(path)
    try:
        data = read_json_object(folder / CONFIG_FILE)
    except OSError as e:
        raise ValueError(f"{folder / CONFIG_FILE}: cannot read: {e}") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: format_version {version!r} is not supported; this version reads {FORMAT_VERSION}"
        )
    if not isinstance(data.get("config"), dict):
        raise ValueError(
            f"{folder / CONFIG_FILE}: 'config' must be an object, got {type(data.get('config')).__name__}"
        )
    config = from_dict(PipelineConfig, data["config"])
    tokenizer = CLIPTokenizer.from_pretrained_folder(folder / "tokenizer")
    if tokenizer.config != config.tokenizer:
        raise ValueError(
            f"{folder}: tokenizer/ files give {tokenizer.config}, but config.json says {config.tokenizer}"
        )
    handles, components = [], {}
    try:
        for name in components_of(config):
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise ValueError(f"{folder}: missing {name}.safetensors")
            handle = open_safetensors(path)
            handles.append(handle)
            components[name] = dict(handle)
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    return TFDiffusionFolder(config, tokenizer, components, handles)


def write_folder(
    folder: pathlib.Path, components: Mapping[str, Mapping], config: PipelineConfig, tokenizer: CLIPTokenizer
) -> None:
    """Write our format into the (new, empty) ``folder``."""
    data = {"_format": FORMAT, "format_version": FORMAT_VERSION, "config": to_dict(config)}
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for name in components_of(config):  # SDXL: text_encoder_2 too; its refiner: no text_encoder
        save_safetensors(components[name], folder / f"{name}.safetensors", {"format": "pt"})
    tokenizer.save(folder / "tokenizer")
