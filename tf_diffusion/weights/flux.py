"""Flux.1 transformer weights: diffusers ``FluxTransformer2DModel`` keys -> the original keys, and the loader.

The rename is the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: diffusers
splits every fused projection (a double block's ``qkv`` per stream into ``to_q`` / ``to_k`` / ``to_v``
and ``add_q_proj`` / ..., a single block's ``linear1`` into q, k, v and ``proj_mlp``), renames the
embedders, and stores the final adaLN as (scale, shift) where the original has (shift, scale). The map
comes from the config, so every key is known in advance and anything else is an error.

``load_flux_transformer`` reads an original single file (safetensors, with or without the
``model.diffusion_model.`` prefix), a diffusers ``transformer/`` folder, or a pipeline folder holding
one. Half-precision and float8-stored tensors (float16, bfloat16, float8_e4m3fn / e5m2 "fp8" files) are
upcast to the model's variables as they are assigned. ``quantize="int8"`` builds the model with
int8 Linear weights (``execution.quantize.build_model``) and quantizes each tensor as it is assigned.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from tf_diffusion.flux import FluxConfig, FluxTransformer, flux_config_from_state_dict
from tf_diffusion.weights.lazy import LazyTensor
from tf_diffusion.weights.state_dict import StateDictError, load_state_dict

_WB = ("weight", "bias")
PREFIX = "model.diffusion_model."


def _plain_pairs(cfg: FluxConfig) -> list[tuple[str, str]]:
    """(diffusers, original) pairs that are pure renames."""
    renames = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "proj_out": "final_layer.linear",
    }
    if cfg.guidance_embed:
        renames["time_text_embed.guidance_embedder.linear_1"] = "guidance_in.in_layer"
        renames["time_text_embed.guidance_embedder.linear_2"] = "guidance_in.out_layer"
    pairs = [(f"{d}.{p}", f"{o}.{p}") for d, o in renames.items() for p in _WB]
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        names = {
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
        }
        pairs += [(f"{d}.{k}.{p}", f"{o}.{v}.{p}") for k, v in names.items() for p in _WB]
        norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm",
                 "attn.norm_added_k": "txt_attn.norm.key_norm"}  # fmt: skip
        pairs += [(f"{d}.{k}.weight", f"{o}.{v}.scale") for k, v in norms.items()]
    for i in range(cfg.depth_single_blocks):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        pairs += [(f"{d}.norm.linear.{p}", f"{o}.modulation.lin.{p}") for p in _WB]
        pairs += [(f"{d}.proj_out.{p}", f"{o}.linear2.{p}") for p in _WB]
        pairs += [(f"{d}.attn.norm_q.weight", f"{o}.norm.query_norm.scale"),
                  (f"{d}.attn.norm_k.weight", f"{o}.norm.key_norm.scale")]  # fmt: skip
    return pairs


def _fused(cfg: FluxConfig) -> dict[str, tuple[str, ...]]:
    """original fused key -> the diffusers keys concatenated (along the output axis) to make it."""
    params = _WB if cfg.qkv_bias else ("weight",)
    fused = {}
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        streams = (("img_attn", ("attn.to_q", "attn.to_k", "attn.to_v")),
                   ("txt_attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")))  # fmt: skip
        for ours, theirs in streams:
            for p in params:
                fused[f"{o}.{ours}.qkv.{p}"] = tuple(f"{d}.{t}.{p}" for t in theirs)
    for i in range(cfg.depth_single_blocks):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for p in _WB:
            fused[f"{o}.linear1.{p}"] = tuple(
                f"{d}.{t}.{p}" for t in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            )
    return fused


# diffusers' AdaLayerNormContinuous stores (scale, shift); the original (shift, scale).
_SWAPPED = {f"norm_out.linear.{p}": f"final_layer.adaLN_modulation.1.{p}" for p in _WB}


def _swap_halves(value) -> np.ndarray:
    value = np.asarray(value)
    half = value.shape[0] // 2
    return np.concatenate([value[half:], value[:half]], axis=0)


def convert_diffusers_flux(
    tensors: Mapping[str, object], config: FluxConfig, *, lazy: bool = False
) -> dict[str, object]:
    """Rename a diffusers FluxTransformer2DModel state dict to the original (Black Forest Labs) keys.

    Args:
        tensors: diffusers key -> torch-layout array (``transformer/diffusion_pytorch_model*``).
        config: the transformer's config, which fixes the expected keys.
        lazy: the fused and reordered tensors as ``LazyTensor`` objects, concatenated only when read, so
            that a loader holds one of them at a time (the fused projections are about a third of
            the weights); False: NumPy arrays.

    Returns:
        original key -> torch-layout array, ready for ``load_state_dict`` on ``flux.FluxTransformer``.

    Raises:
        StateDictError: listing diffusers keys the config does not have and keys it lacks.
    """
    plain = dict(_plain_pairs(config))
    fused = _fused(config)
    known = set(plain) | set(_SWAPPED) | {k for parts in fused.values() for k in parts}
    unexpected = sorted(k for k in tensors if k not in known)
    missing = sorted(k for k in known if k not in tensors)
    if unexpected or missing:
        raise StateDictError(
            missing=missing, unexpected=unexpected, model_name="diffusers FluxTransformer2DModel"
        )

    def made(parts: tuple[str, ...], read, shape) -> object:
        if not lazy:
            return read()
        dtype = np.result_type(*(np.dtype(tensors[k].dtype) for k in parts))
        return LazyTensor(shape, dtype, read, source=f"diffusers {' + '.join(parts)}")

    out: dict[str, object] = {plain[k]: tensors[k] for k in plain}
    for k, original in _SWAPPED.items():
        out[original] = made((k,), lambda k=k: _swap_halves(tensors[k]), tuple(tensors[k].shape))
    for original, parts in fused.items():
        shapes = [tuple(tensors[k].shape) for k in parts]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        out[original] = made(
            parts, lambda parts=parts: np.concatenate([np.asarray(tensors[k]) for k in parts], axis=0), shape
        )
    return out


def flux_config_from_diffusers(data: Mapping) -> FluxConfig:
    """A diffusers FluxTransformer2DModel config.json -> FluxConfig.

    Raises:
        ValueError: for another model's config (``_class_name``), a ``patch_size`` other than 1 (the released models pack 2x2 patches outside
            the transformer), or invalid sizes.
    """
    kind = data.get("_class_name", "FluxTransformer2DModel")
    if kind != "FluxTransformer2DModel":
        raise ValueError(f"config of a {kind!r}; expected a FluxTransformer2DModel config")
    patch = int(data.get("patch_size", 1))
    if patch != 1:
        raise ValueError(f"patch_size={patch} is not supported; Flux transformers have patch_size=1")
    in_channels = int(data.get("in_channels", 64))
    heads, head = int(data.get("num_attention_heads", 24)), int(data.get("attention_head_dim", 128))
    return FluxConfig(
        in_channels=in_channels,
        out_channels=int(data.get("out_channels") or in_channels),
        vec_in_dim=int(data.get("pooled_projection_dim", 768)),
        context_in_dim=int(data.get("joint_attention_dim", 4096)),
        hidden_size=heads * head,
        num_heads=heads,
        depth=int(data.get("num_layers", 19)),
        depth_single_blocks=int(data.get("num_single_layers", 38)),
        axes_dim=tuple(int(d) for d in data.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(data.get("guidance_embeds", False)),
    )


def strip_prefix(tensors: Mapping[str, object]) -> dict[str, object]:
    """Original keys without the ``model.diffusion_model.`` prefix of ComfyUI-style files (others as they are)."""
    if not any(k.startswith(PREFIX) for k in tensors):
        return dict(tensors)
    return {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}


def load_flux_transformer(
    path,
    *,
    config: FluxConfig | None = None,
    axes_dim: tuple[int, ...] | None = None,
    dtype=None,
    quantize: str | None = None,
) -> FluxTransformer:
    """A ``FluxTransformer`` with the weights of an original single file or a diffusers folder.

    Args:
        path: an original ``.safetensors`` file (``flux1-dev.safetensors``), a diffusers ``transformer/``
            folder (``config.json`` and ``diffusion_pytorch_model*.safetensors``, sharded or not), or a
            diffusers pipeline folder with a ``transformer/`` folder.
        config: the architecture; None infers it (from the folder's config.json, or from the file's
            shapes).
        axes_dim: the rotary split for a single file whose heads are not 128 wide (see
            ``flux_config_from_state_dict``).
        dtype: a Keras dtype policy for the model.
        quantize: "int8" stores every Linear weight as int8 per output channel with a float32 scale
            (``tf_diffusion.execution.quantize``): the model is built with int8 variables and each
            tensor is quantized as it is assigned, so the float weights are never all resident.
            None (default): float weights.

    Raises:
        ValueError: for a path that is neither, a ``quantize`` mode that does not exist, or a state
            dict that does not fit (``StateDictError`` lists every bad key).

    Example:
        >>> model = load_flux_transformer("flux1-schnell.safetensors", quantize="int8")
    """
    from tf_diffusion.execution import quantize as quantizing
    from tf_diffusion.weights.diffusers_folder import _open_weights, read_json, weight_file_candidates
    from tf_diffusion.weights.safetensors_io import open_safetensors

    quantizing.check_mode(quantize)  # before any file is opened
    path = pathlib.Path(path)
    handles: list = []
    try:
        if path.is_dir():
            folder = path if (path / "config.json").is_file() else path / "transformer"
            if not (folder / "config.json").is_file():
                raise ValueError(
                    f"{path}: not a diffusers Flux transformer or pipeline folder (no config.json)"
                )
            cfg = config or flux_config_from_diffusers(read_json(folder / "config.json"))
            candidates = weight_file_candidates("transformer", None)
            found = [name for name in candidates if (folder / name).is_file()]
            if not found:
                raise ValueError(f"{folder}: no transformer weights (looked for {candidates[:2]})")
            tensors, _ = _open_weights(folder, found[0], handles)
            tensors = convert_diffusers_flux(tensors, cfg, lazy=True)
        elif path.suffix.lower() == ".safetensors":
            handle = open_safetensors(path)
            handles.append(handle)
            tensors = strip_prefix(handle)
            cfg = config or flux_config_from_state_dict(tensors, axes_dim)
        else:
            raise ValueError(f"{path}: expected a .safetensors file or a diffusers folder")
        model = quantizing.build_model(lambda: FluxTransformer(cfg, dtype=dtype), quantize)
        load_state_dict(model, tensors)
    finally:
        for handle in handles:
            handle.close()
    return model
