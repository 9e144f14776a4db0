"""SD3 / SD3.5 original single files (``sd3.5_medium.safetensors``, ``sd3_medium_incl_clips_t5xxlfp16``)
-> ``sd3.StableDiffusion3``.

Layout (as diffusers' single-file loader reads it): the MMDiT under ``model.diffusion_model.`` with the
original names, which are our attribute paths; the VAE under ``first_stage_model.`` (LDM names, no quant
convs); the text encoders, when the file has them, under ``text_encoders.clip_l.transformer.``,
``text_encoders.clip_g.transformer.`` (both transformers' CLIP layout) and
``text_encoders.t5xxl.transformer.`` (transformers' T5EncoderModel keys). CLIP-L's ``text_projection``
is the identity, as diffusers sets it (the files hold none). Files without text encoders take them from a
diffusers folder (``text_encoders_from=``); T5 may be left out (its tokens are then zeros). ComfyUI's
"scaled fp8" files (a ``scale_weight`` beside each float8 weight) are dequantized as they are read
(``weights.scaled_fp8``).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from tf_diffusion.config import SD3Config
from tf_diffusion.families import FAMILIES, is_sd3_single_file
from tf_diffusion.weights.ckpt import load_ckpt
from tf_diffusion.weights.diffusers_mmdit import mmdit_config_from_checkpoint
from tf_diffusion.weights.safetensors_io import open_safetensors
from tf_diffusion.weights.scaled_fp8 import dequantize_scaled_fp8, is_scaled_fp8
from tf_diffusion.weights.single_file import unwrap_checkpoint
from tf_diffusion.weights.state_dict import load_state_dict

logger = logging.getLogger(__name__)


def split_sd3_file(tensors) -> tuple[dict[str, dict], list[str]]:
    """Component -> {key without prefix: tensor}, and the keys no component takes."""
    prefixes = FAMILIES["sd3"].prefixes
    parts: dict[str, dict] = {}
    other = []
    for key in tensors:
        for component, prefix in prefixes.items():
            if key.startswith(prefix):
                parts.setdefault(component, {})[key[len(prefix) :]] = tensors[key]
                break
        else:
            other.append(key)
    return parts, other


def _config_for(transformer: dict, config: SD3Config | None) -> SD3Config:
    """The given config (its transformer must fit the file), else the preset whose transformer the file's is."""
    from tf_diffusion.presets import SD3_PRESETS

    if config is not None:
        return config
    head = 64
    for preset in SD3_PRESETS.values():
        inferred = mmdit_config_from_checkpoint(transformer, head_dim=head)
        if dataclasses.replace(inferred, sample_size=preset.transformer.sample_size) == preset.transformer:
            return preset
    return SD3_PRESETS["sd3-medium"].replace(
        name="sd3 (inferred)", transformer=mmdit_config_from_checkpoint(transformer)
    )


def load_sd3_single_file(
    cls,
    path: pathlib.Path,
    *,
    config: SD3Config | None = None,
    text_encoders_from: pathlib.Path | None = None,
    tokenizer_3=None,
    load_t5: bool = True,
    dtype=None,
):
    """Build ``cls`` (``StableDiffusion3``) from an original SD3 / SD3.5 file.

    Raises:
        ValueError: for a file that is not SD3's, CLIP encoders neither in the file nor in
            ``text_encoders_from``, or T5 weights without a T5 tokenizer (``tokenizer_3=`` the
            ``spiece.model``, or ``load_t5=False``).
    """
    from tf_diffusion.t5 import T5Tokenizer
    from tf_diffusion.weights.sd3_folder import read_sd3_config

    handles = []
    if path.suffix.lower() == ".safetensors":
        handle = open_safetensors(path)
        handles.append(handle)
        tensors = handle
    else:
        tensors, _ = unwrap_checkpoint(load_ckpt(path), str(path))
    try:
        if not is_sd3_single_file(tensors):
            raise ValueError(
                f"{path} is not an SD3 / SD3.5 file: it has no model.diffusion_model.joint_blocks"
            )
        parts, _ = split_sd3_file(tensors)
        if is_scaled_fp8(tensors):  # ComfyUI's scaled fp8: each weight times its scale_weight, as read
            parts = {name: dequantize_scaled_fp8(part, str(path)) for name, part in parts.items()}
        for name in ("transformer", "vae"):
            if name not in parts:
                raise ValueError(f"{path} has no {name} weights ({FAMILIES['sd3'].prefixes[name]}*)")
        cfg = _config_for(parts["transformer"], config)
        folder = folder_cfg = None
        tokenizers = (None, None)
        if text_encoders_from is not None:
            folder = pathlib.Path(text_encoders_from)
            folder_cfg, tokenizers, folder_t5_tokenizer = read_sd3_config(folder, load_t5)
            tokenizer_3 = folder_t5_tokenizer if tokenizer_3 is None else tokenizer_3
        missing = [c for c in ("text_encoder", "text_encoder_2") if c not in parts]
        if missing and folder is None:
            raise ValueError(
                f"{path} has no {' and '.join(missing)} (CLIP) weights; pass text_encoders_from= a diffusers "
                f"SD3 folder to take them from"
            )
        changes = {}
        if folder_cfg is not None:
            for c in missing:
                changes[c] = getattr(folder_cfg, c)
                changes["tokenizer" + c[len("text_encoder") :]] = getattr(
                    folder_cfg, "tokenizer" + c[len("text_encoder") :]
                )
        has_t5 = "text_encoder_3" in parts or (folder is not None and folder_cfg.text_encoder_3 is not None)
        if not load_t5 or not has_t5:
            changes["text_encoder_3"] = None
            if load_t5:
                logger.warning("%s has no T5 weights (and no folder gave them): running without T5", path)
        elif "text_encoder_3" not in parts:
            changes["text_encoder_3"] = folder_cfg.text_encoder_3
        if changes.get("text_encoder_3", cfg.text_encoder_3) is not None:
            if tokenizer_3 is None:
                raise ValueError(
                    f"{path} has T5 weights but single files carry no T5 tokenizer: pass tokenizer_3= the "
                    f"spiece.model of a diffusers SD3 folder (tokenizer_3/spiece.model), or load_t5=False"
                )
            if not isinstance(tokenizer_3, T5Tokenizer):
                tokenizer_3 = T5Tokenizer(tokenizer_3)
        cfg = cfg.replace(**changes)
        sd = cls(
            cfg, dtype=dtype, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], tokenizer_3=tokenizer_3
        )
        load_state_dict(sd.transformer, parts["transformer"])
        load_state_dict(sd.vae, parts["vae"])
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                weights = dict(parts[name])
                width = getattr(cfg, name).hidden_size
                if name == "text_encoder":
                    # As diffusers: SD3's CLIP-L projection is the identity (the files hold none).
                    weights["text_projection.weight"] = np.eye(width, dtype=np.float32)
                load_state_dict(
                    getattr(sd, name), {k: v for k, v in weights.items() if "position_ids" not in k}
                )
        if sd.text_encoder_3 is not None and "text_encoder_3" in parts:
            load_state_dict(sd.text_encoder_3, parts["text_encoder_3"])
        if folder is not None:
            from tf_diffusion.weights.diffusers_folder import (
                _open_weights,
                select_weight_files,
                text_encoder_from_transformers,
            )

            available = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
            wanted = list(missing) + (
                ["text_encoder_3"] if sd.text_encoder_3 is not None and "text_encoder_3" not in parts else []
            )
            for name in wanted:
                weights, _ = _open_weights(folder, select_weight_files(available, name, None), handles)
                if name != "text_encoder_3":
                    weights, _ = text_encoder_from_transformers(weights)
                load_state_dict(getattr(sd, name), weights)
    finally:
        for handle in handles:
            handle.close()
    return sd
