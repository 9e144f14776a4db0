"""diffusers StableDiffusion3Pipeline folders -> ``sd3.StableDiffusion3``.

Reads ``model_index.json``, each component's config, and its weights (safetensors or ``.bin``, sharded
or not, lazily) through the same readers as the UNet families: the transformer through
``diffusers_mmdit``'s rename, the VAE through ``diffusers_vae``'s, the CLIP encoders as transformers
stores them, T5 as is (transformers' T5EncoderModel keys are our attribute paths). Every component is
assigned all-or-nothing.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tf_diffusion.config import SD3Config
from tf_diffusion.weights.diffusers_configs import (
    clip_config_from_transformers,
    flow_scheduler_from_folder,
    vae_config_from_diffusers,
)
from tf_diffusion.weights.diffusers_folder import (
    _open_weights,
    clip_from_transformers,
    load_folder_components,
    read_json,
    select_weight_files,
)
from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae


def _present(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None


def read_sd3_config(folder: pathlib.Path, load_t5: bool = True):
    """(SD3Config, CLIP tokenizers, T5 tokenizer or None) of a folder, without weights.

    Raises:
        ValueError: for a folder that is not an SD3 pipeline, or T5 without its ``spiece.model``.
    """
    from tf_diffusion.sd3 import clip_tokenizer_config, read_model_index
    from tf_diffusion.t5 import T5Tokenizer, t5_config_from_transformers
    from tf_diffusion.tokenizer import CLIPTokenizer

    index = read_model_index(folder)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not _present(index, name):
            raise ValueError(f"{folder}: model_index.json has no {name}; SD3 folders need it")
    tokenizer = CLIPTokenizer.from_pretrained_folder(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained_folder(folder / "tokenizer_2")
    t5 = t5_tokenizer = None
    if load_t5 and _present(index, "text_encoder_3"):
        t5 = t5_config_from_transformers(read_json(folder / "text_encoder_3" / "config.json"))
        spiece = folder / "tokenizer_3" / "spiece.model"
        if not spiece.is_file():
            raise ValueError(
                f"{folder}: text_encoder_3 (T5) needs tokenizer_3/spiece.model, which is missing; "
                "load with load_t5=False to run without T5"
            )
        t5_tokenizer = T5Tokenizer(spiece)
    scheduler, sampler = flow_scheduler_from_folder(folder)
    config = SD3Config(
        name=folder.name,
        text_encoder=clip_config_from_transformers(read_json(folder / "text_encoder" / "config.json")),
        tokenizer=clip_tokenizer_config(tokenizer),
        text_encoder_2=clip_config_from_transformers(read_json(folder / "text_encoder_2" / "config.json")),
        tokenizer_2=clip_tokenizer_config(tokenizer_2),
        text_encoder_3=t5,
        transformer=mmdit_config_from_diffusers(read_json(folder / "transformer" / "config.json")),
        vae=vae_config_from_diffusers(read_json(folder / "vae" / "config.json")),
        scheduler=scheduler,
        default_sampler=sampler,
    )
    return config, (tokenizer, tokenizer_2), t5_tokenizer


def load_sd3_folder(cls, folder: pathlib.Path, *, dtype=None, load_t5: bool = True):
    """Build ``cls`` (``StableDiffusion3``) from a diffusers folder and load every component's weights."""
    config, (tok, tok_2), tok_3 = read_sd3_config(folder, load_t5)
    sd = cls(config, dtype=dtype, tokenizer=tok, tokenizer_2=tok_2, tokenizer_3=tok_3)
    converters = {
        "text_encoder": clip_from_transformers,
        "text_encoder_2": clip_from_transformers,
        "transformer": lambda tensors: convert_diffusers_mmdit(tensors, config.transformer),
        "vae": lambda tensors: convert_diffusers_vae(tensors, config.vae),
    }
    if sd.text_encoder_3 is not None:
        converters["text_encoder_3"] = None  # transformers' T5EncoderModel keys are our attribute paths
    load_folder_components(sd, folder, converters)
    return sd


def describe_sd3(path: pathlib.Path) -> dict:
    """What ``tf-diffusion info`` says of an SD3 / SD3.5 folder or original single file, without building it.

    Returns:
        format, family, config (the preset the transformer matches, or the folder's name), each
        component's parameter count and stored dtypes (under its name), the components a single file
        lacks ("missing") and notes.
    """
    from tf_diffusion.sd3 import read_model_index
    from tf_diffusion.weights.safetensors_io import open_safetensors
    from tf_diffusion.weights.scaled_fp8 import count_scaled, is_scaled_fp8, without_scales
    from tf_diffusion.weights.sd3_single_file import _config_for, split_sd3_file

    path = pathlib.Path(path)
    handles: list = []
    info: dict = {"family": "sd3"}
    try:
        if path.is_dir():
            index = read_model_index(path)
            info["format"] = f"diffusers ({index.get('_class_name')})"
            available = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
            parts = {}
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"):
                if _present(index, name):
                    parts[name], _ = _open_weights(path, select_weight_files(available, name, None), handles)
            config_name = path.name
            notes = []
            if "text_encoder_3" in parts and not (path / "tokenizer_3" / "spiece.model").is_file():
                notes.append("T5 without tokenizer_3/spiece.model: load with load_t5=False")
        else:
            handle = open_safetensors(path)
            handles.append(handle)
            info["format"] = "single-file (.safetensors)"
            parts, other = split_sd3_file(handle)
            notes = []
            if is_scaled_fp8(handle):
                scaled = sum(count_scaled(part) for part in parts.values())
                notes.append(
                    f"scaled fp8 (ComfyUI): {scaled} float8 weights with a per-tensor scale_weight, "
                    "dequantized to float32 on load"
                )
                parts = {name: without_scales(part) for name, part in parts.items()}
                other = [key for key in other if key.rsplit(".", 1)[-1] != "scaled_fp8"]
            config_name = "?"
            if "transformer" in parts:
                try:
                    config_name = _config_for(parts["transformer"], None).name
                except ValueError:  # a transformer no preset's text encoders fit (a test-sized one)
                    config_name = "sd3 (inferred; no preset fits)"
            notes += [f"{len(other)} keys outside the SD3 components"] if other else []
            lacking = [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c not in parts]
            if lacking:
                info["missing"] = lacking
                notes.append(
                    "text encoders the file lacks come from a diffusers SD3 folder (text_encoders_from=)"
                )
        info["config"] = config_name
        for name, tensors in parts.items():
            dtypes = ", ".join(sorted({str(t.dtype) for t in tensors.values()}))
            info[name] = f"{sum(int(np.prod(t.shape)) for t in tensors.values()):,} parameters, {dtypes}"
        info["notes"] = notes
    finally:
        for handle in handles:
            handle.close()
    return info
