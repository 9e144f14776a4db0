"""Flux.1 original single files (``flux1-dev.safetensors`` layout) through ``StableDiffusion.from_pretrained``.

Black Forest Labs publish the transformer alone, with the original keys (``double_blocks.N``,
``single_blocks.N``, ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``final_layer``), sometimes under ComfyUI's ``model.diffusion_model.`` prefix. Our ``FluxTransformer``
uses those keys as its attribute paths, so the file loads as it is; its sizes (depths, widths, whether
``guidance_in`` is there, i.e. [dev] or [schnell]) come from the shapes. The other components (CLIP-L,
T5, the VAE, tokenizers, scheduler) are not in such a file: they come from a diffusers Flux folder named
with ``config=``, as diffusers' ``from_single_file(..., config=folder)``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterable

DETECTION_KEYS = (
    "double_blocks.0.img_attn.qkv.weight",
    "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
)


def is_flux_single_file(keys: Iterable[str]) -> bool:
    """Whether a single file's keys are an original Flux transformer's (bare or under model.diffusion_model.)."""
    return any(k in DETECTION_KEYS for k in keys)


def load_flux_single_file(build, path: pathlib.Path, *, config=None, dtype=None):
    """Build a model with ``build`` from an original Flux transformer file and a diffusers Flux folder.

    Args:
        path: the ``.safetensors`` file with the original transformer keys.
        config: a diffusers Flux pipeline folder (``FluxPipeline``'s layout) giving the text encoders,
            the VAE, the tokenizers and the scheduler; its transformer is replaced by the file's.

    Raises:
        ValueError: without ``config``, or with a ``config`` that is not a Flux folder.
    """
    from tf_diffusion.flux import flux_config_from_state_dict
    from tf_diffusion.flux_pipeline import read_flux_config, variant_defaults
    from tf_diffusion.weights.diffusers_folder import clip_from_transformers, load_folder_components
    from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae
    from tf_diffusion.weights.flux import strip_prefix
    from tf_diffusion.weights.safetensors_io import open_safetensors
    from tf_diffusion.weights.state_dict import load_state_dict

    if config is None:
        raise ValueError(
            f"{path} holds only a Flux transformer; name a diffusers Flux folder for the text encoders, VAE, "
            "tokenizers and scheduler: from_pretrained(file, config='path/to/FLUX.1-dev')"
        )
    folder = pathlib.Path(config)
    if not folder.is_dir():
        raise ValueError(f"config={str(config)!r} is not a folder; expected a diffusers Flux pipeline folder")
    pipe, tokenizer, tokenizer_2 = read_flux_config(folder)
    with open_safetensors(path) as handle:
        tensors = strip_prefix(handle)
        # The rotary split is not in the weights: the folder's, when its head width is the file's.
        try:
            transformer = flux_config_from_state_dict(tensors, pipe.transformer.axes_dim)
        except ValueError:
            transformer = flux_config_from_state_dict(tensors)
        pipe = dataclasses.replace(
            pipe, name=path.stem, transformer=transformer, **variant_defaults(transformer)
        )
        if tokenizer_2.max_length != pipe.max_sequence_length:
            from tf_diffusion.t5 import T5Tokenizer

            tokenizer_2 = T5Tokenizer(
                folder / "tokenizer_2" / "spiece.model", max_length=pipe.max_sequence_length
            )
        sd = build(pipe, dtype=dtype, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        load_state_dict(sd.transformer, tensors)
    converters = {
        "text_encoder": clip_from_transformers,
        "text_encoder_2": None,  # transformers' T5EncoderModel keys are our attribute paths
        "vae": lambda tensors: convert_diffusers_vae(tensors, pipe.vae),
    }
    load_folder_components(sd, folder, converters)
    return sd


def _summary(tensors) -> str:
    import numpy as np

    dtypes = ", ".join(sorted({str(t.dtype) for t in tensors.values()}))
    return f"{sum(int(np.prod(t.shape)) for t in tensors.values()):,} parameters, {dtypes}"


def describe_flux(path: pathlib.Path) -> dict:
    """What ``tf-diffusion info`` says of a diffusers Flux folder or an original Flux single file, unbuilt.

    Returns:
        format, family, variant ("dev": a guidance input, "schnell": none), each component's parameter
        count and stored dtypes (under its name), the components a single file lacks ("missing"), notes.
    """
    from tf_diffusion.weights.diffusers_folder import _open_weights, read_json, select_weight_files
    from tf_diffusion.weights.flux import strip_prefix
    from tf_diffusion.weights.safetensors_io import open_safetensors

    path = pathlib.Path(path)
    handles: list = []
    info: dict = {"family": "flux"}
    try:
        if path.is_dir():
            index = read_json(path / "model_index.json")
            info["format"] = f"diffusers ({index.get('_class_name')})"
            guided = bool(read_json(path / "transformer" / "config.json").get("guidance_embeds", False))
            info["variant"] = "dev" if guided else "schnell"
            available = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
            for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
                if (path / name).is_dir():
                    tensors, _ = _open_weights(path, select_weight_files(available, name, None), handles)
                    info[name] = _summary(tensors)
            info["notes"] = []
        else:
            handle = open_safetensors(path)
            handles.append(handle)
            tensors = strip_prefix(handle)
            info["format"] = "single-file (.safetensors, original Flux transformer keys)"
            info["variant"] = "dev" if any(k.startswith("guidance_in.") for k in tensors) else "schnell"
            info["transformer"] = _summary(tensors)
            info["missing"] = ["text_encoder", "text_encoder_2", "vae"]
            info["notes"] = [
                "the other components come from a diffusers Flux folder: from_pretrained(file, config=folder)"
            ]
    finally:
        for handle in handles:
            handle.close()
    return info
