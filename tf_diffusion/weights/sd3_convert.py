"""SD3 / SD3.5 checkpoints converted without building a model: original single file <-> diffusers folder.

The tensors go through the renames the loaders use (``diffusers_mmdit`` for the transformer, both ways;
``diffusers_folder``'s VAE rename; CLIP and T5 keep transformers' names in both layouts), so a round
trip gives back every tensor bit for bit. The one difference between the layouts beyond names: SD3
files hold no CLIP-L ``text_projection`` (diffusers sets the identity), so it is added going to a folder
and, being the identity, left out going back. A single file carries no tokenizers and no scheduler: they
come from a diffusers SD3 folder given as ``config`` (which also gives text encoders a file lacks), or,
for a file without T5, from the SD3 preset its transformer matches.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from tf_diffusion.families import FAMILIES, is_sd3_single_file
from tf_diffusion.weights.diffusers_folder import (
    _open_weights,
    clip_from_transformers,
    read_json,
    scheduler_config_to_diffusers,
    select_weight_files,
    text_config_to_transformers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from tf_diffusion.weights.diffusers_mmdit import (
    convert_diffusers_mmdit,
    mmdit_config_from_checkpoint,
    mmdit_config_to_diffusers,
    mmdit_to_diffusers,
)
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae
from tf_diffusion.weights.safetensors_io import open_safetensors, save_safetensors

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENTS = (*TEXT_ENCODERS, "transformer", "vae")
# diffusers folder names of each component's weights file.
_STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def _cast(tensors: dict, dtype: str | None) -> dict:
    from tf_diffusion.weights.loading import _cast as cast

    return cast(tensors, dtype)


def _sd3_config_of_folder(folder: pathlib.Path, load_t5: bool = True):
    from tf_diffusion.weights.sd3_folder import read_sd3_config

    return read_sd3_config(folder, load_t5)


def _folder_parts(folder: pathlib.Path, names, handles: list) -> dict[str, dict]:
    """component -> {our key: tensor} of a diffusers SD3 folder (CLIP and T5 under transformers' names)."""
    available = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    parts = {}
    for name in names:
        tensors, _ = _open_weights(folder, select_weight_files(available, name, None), handles)
        parts[name] = (
            clip_from_transformers(tensors) if name in ("text_encoder", "text_encoder_2") else tensors
        )
    return parts


def convert_sd3(
    source: pathlib.Path,
    destination: pathlib.Path,
    *,
    format: str,
    config: str | pathlib.Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
) -> str:
    """Write an SD3 single file as a diffusers folder, or a diffusers SD3 folder as a single file, atomically.

    Args:
        source: an original SD3 / SD3.5 ``.safetensors`` file or a diffusers ``StableDiffusion3Pipeline`` folder.
        destination: the folder ("diffusers") or ``.safetensors`` file ("single-file") to write.
        format: "diffusers" or "single-file" (the other layout than the source's).
        config: a diffusers SD3 folder giving a single file's configs, tokenizers, scheduler and the text
            encoders it lacks; needed for T5 (single files carry no T5 tokenizer) and for text encoders
            the file has not. None: the SD3 preset the transformer matches.
        overwrite: replace an existing destination.
        dtype: cast floating weights ("float32", "float16", "bfloat16"); None keeps the stored dtypes.

    Returns:
        A one-line description of what was written.

    Raises:
        ValueError: a format this source cannot go to, a config that is not an SD3 folder or does not fit
            the file, or missing text encoders / T5 tokenizer.
        FileExistsError: the destination exists and ``overwrite`` is False.
    """
    from tf_diffusion.weights.loading import write_atomically

    source, destination = pathlib.Path(source), pathlib.Path(destination)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise ValueError(
                f"{source}: not a diffusers SD3 folder (no model_index.json); keras-hub presets are read by "
                "StableDiffusion3.from_pretrained but not converted"
            )
        if format != "single-file":
            raise ValueError(
                f"{source} is a diffusers SD3 folder; SD3 converts to single-file only (--to single-file), "
                f"not to {format!r}"
            )
        if config is not None:
            raise ValueError("config= (--config) applies to SD3 single files; a diffusers folder has its own")
        if destination.suffix.lower() != ".safetensors":
            raise ValueError(
                f"{destination}: single-file output is written as safetensors; name it *.safetensors"
            )
        return _folder_to_single_file(source, destination, overwrite, dtype, write_atomically)
    if format != "diffusers":
        raise ValueError(
            f"{source} is an SD3 single file; SD3 converts to a diffusers folder only (--to diffusers), "
            f"not to {format!r}"
        )
    return _single_file_to_folder(source, destination, config, overwrite, dtype, write_atomically)


def _folder_to_single_file(source, destination, overwrite, dtype, write_atomically) -> str:
    cfg, _, _ = _sd3_config_of_folder(source, load_t5=False)
    index = read_json(source / "model_index.json")
    names = [n for n in COMPONENTS if isinstance(index.get(n), list) and index[n][0] is not None]
    handles: list = []
    try:
        parts = _folder_parts(source, names, handles)
        parts["transformer"] = convert_diffusers_mmdit(parts["transformer"], cfg.transformer)
        parts["vae"] = convert_diffusers_vae(parts["vae"], cfg.vae)
        clip_l = dict(parts["text_encoder"])
        projection = clip_l.pop("text_projection.weight", None)
        width = cfg.text_encoder.hidden_size
        if projection is not None and not np.array_equal(np.asarray(projection), np.eye(width)):
            raise ValueError(
                f"{source}: text_encoder's text_projection is not the identity; SD3 single files hold none, so "
                "it cannot be written there"
            )
        parts["text_encoder"] = clip_l
        prefixes = FAMILIES["sd3"].prefixes
        tensors = {
            prefixes[name] + key: value for name in names for key, value in _cast(parts[name], dtype).items()
        }

        def write(temporary: pathlib.Path) -> pathlib.Path:
            written = temporary / destination.name
            save_safetensors(tensors, written, {"format": "pt"})
            return written

        write_atomically(destination, write, overwrite=overwrite, source=str(source))
    finally:
        for handle in handles:
            handle.close()
    return f"{', '.join(names)} in the original SD3 layout"


def _single_file_to_folder(source, destination, config, overwrite, dtype, write_atomically) -> str:
    from tf_diffusion.tokenizer import CLIPTokenizer
    from tf_diffusion.weights.scaled_fp8 import dequantize_scaled_fp8, is_scaled_fp8
    from tf_diffusion.weights.sd3_single_file import _config_for, split_sd3_file

    handles: list = []
    try:
        handle = open_safetensors(source)
        handles.append(handle)
        if not is_sd3_single_file(handle):
            raise ValueError(
                f"{source} is not an SD3 / SD3.5 file: it has no model.diffusion_model.joint_blocks"
            )
        parts, _ = split_sd3_file(handle)
        if is_scaled_fp8(handle):  # ComfyUI's scaled fp8: written dequantized (float32, or dtype=)
            parts = {name: dequantize_scaled_fp8(part, str(source)) for name, part in parts.items()}
        for name in ("transformer", "vae"):
            if name not in parts:
                raise ValueError(f"{source} has no {name} weights ({FAMILIES['sd3'].prefixes[name]}*)")
        folder = None if config is None else pathlib.Path(config)
        lacking = [n for n in TEXT_ENCODERS if n not in parts]
        if lacking and folder is None:
            raise ValueError(
                f"{source} has no {', '.join(lacking)} weights; pass config= (--config) a diffusers SD3 "
                "folder to take them from"
            )
        if folder is not None:
            if not (folder / "model_index.json").is_file():
                raise ValueError(f"config {config}: not a diffusers SD3 folder (no model_index.json)")
            cfg, (tok, tok_2), _ = _sd3_config_of_folder(folder)
            head = cfg.transformer.attention_head_dim
            inferred = mmdit_config_from_checkpoint(parts["transformer"], head_dim=head)
            inferred = dataclasses.replace(inferred, sample_size=cfg.transformer.sample_size)
            if inferred != cfg.transformer:
                raise ValueError(
                    f"{source}: its transformer ({inferred}) is not the one config {config} describes "
                    f"({cfg.transformer})"
                )
        else:
            cfg = _config_for(parts["transformer"], None)
            tok, tok_2 = CLIPTokenizer(config=cfg.tokenizer), CLIPTokenizer(config=cfg.tokenizer_2)
        lacking = [n for n in TEXT_ENCODERS if n not in parts]
        if lacking:
            index = read_json(folder / "model_index.json")
            taken = [n for n in lacking if isinstance(index.get(n), list) and index[n][0] is not None]
            for name in ("text_encoder", "text_encoder_2"):
                if name not in parts and name not in taken:
                    raise ValueError(
                        f"{source} has no {name} (CLIP) weights, and config {config} has none either"
                    )
            parts.update(_folder_parts(folder, taken, handles))
        has_t5 = "text_encoder_3" in parts
        if has_t5 and (folder is None or not (folder / "tokenizer_3" / "spiece.model").is_file()):
            raise ValueError(
                f"{source} has T5 weights but single files carry no T5 tokenizer: pass config= (--config) a "
                "diffusers SD3 folder with tokenizer_3/spiece.model"
            )
        clip_l = {k: v for k, v in parts["text_encoder"].items() if "position_ids" not in k}
        # As diffusers: SD3's CLIP-L projection is the identity (the files hold none).
        clip_l.setdefault("text_projection.weight", np.eye(cfg.text_encoder.hidden_size, dtype=np.float32))
        parts["text_encoder"] = clip_l
        parts["text_encoder_2"] = {
            k: v for k, v in parts["text_encoder_2"].items() if "position_ids" not in k
        }
        tensors = {
            "transformer": mmdit_to_diffusers(parts["transformer"], cfg.transformer),
            "vae": vae_to_diffusers(parts["vae"], cfg.vae),
            **{n: parts[n] for n in TEXT_ENCODERS if n in parts},
        }
        # diffusers' VAE sample_size is the image side it was trained at: the config folder's, else the preset's.
        vae_size = (
            cfg.default_size
            if folder is None
            else read_json(folder / "vae" / "config.json").get("sample_size", cfg.default_size)
        )
        configs = {
            "transformer": mmdit_config_to_diffusers(cfg.transformer),
            "vae": {
                **vae_config_to_diffusers(cfg.vae, vae_size),
                "shift_factor": cfg.vae.shift_factor,
                "use_quant_conv": cfg.vae.use_quant_conv,
                "use_post_quant_conv": cfg.vae.use_quant_conv,
            },
            "text_encoder": text_config_to_transformers(cfg.text_encoder, tok),
            "text_encoder_2": text_config_to_transformers(cfg.text_encoder_2, tok_2),
        }
        if has_t5:
            t5 = read_json(folder / "text_encoder_3" / "config.json") if folder is not None else None
            configs["text_encoder_3"] = t5
        scheduler_json = None if folder is None else read_json(folder / "scheduler" / "scheduler_config.json")
        scheduler_json = scheduler_config_to_diffusers(cfg.scheduler, scheduler_json, cfg.default_sampler)
        index = {
            "_class_name": "StableDiffusion3Pipeline",
            "_diffusers_version": "0.31.0",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "scheduler": ["diffusers", scheduler_json["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"] if has_t5 else [None, None],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"] if has_t5 else [None, None],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }

        def write(temporary: pathlib.Path) -> pathlib.Path:
            written = temporary / "out"
            written.mkdir()
            for name, weights in tensors.items():
                (written / name).mkdir()
                _write_json(written / name / "config.json", configs[name])
                stem = _STEMS.get(name, "model")
                save_safetensors(
                    _cast(weights, dtype), written / name / f"{stem}.safetensors", {"format": "pt"}
                )
            (written / "scheduler").mkdir()
            _write_json(written / "scheduler" / "scheduler_config.json", scheduler_json)
            tok.save(written / "tokenizer")
            tok_2.save(written / "tokenizer_2")
            if has_t5:
                shutil.copytree(folder / "tokenizer_3", written / "tokenizer_3")
            _write_json(written / "model_index.json", index)
            return written

        write_atomically(destination, write, overwrite=overwrite, source=str(source))
    finally:
        for handle in handles:
            handle.close()
    return f"a diffusers StableDiffusion3Pipeline folder ({', '.join(tensors)})"


def _write_json(path: pathlib.Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
