"""diffusers SD3Transformer2DModel keys -> the original MMDiT keys (the names ``mmdit.MMDiT`` uses).

The inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: diffusers splits each
fused ``qkv`` into ``to_q`` / ``to_k`` / ``to_v`` (image stream) and ``add_q_proj`` / ... (context
stream), renames the embedders, and stores the adaLN of the last context block and of the final layer
as (scale, shift) where the original has (shift, scale). The map comes from the config, so every key
is known in advance and anything else is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tf_diffusion.config import MMDiTConfig
from tf_diffusion.weights.state_dict import StateDictError

_WB = ("weight", "bias")


def _plain_pairs(cfg: MMDiTConfig) -> list[tuple[str, str]]:
    """(diffusers, original) pairs that are pure renames."""
    pairs = [("pos_embed.pos_embed", "pos_embed")]
    pairs += [(f"pos_embed.proj.{p}", f"x_embedder.proj.{p}") for p in _WB]
    for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        for i, j in ((0, 1), (2, 2)):
            pairs += [(f"time_text_embed.{theirs}.linear_{j}.{p}", f"{ours}.mlp.{i}.{p}") for p in _WB]
    pairs += [(f"context_embedder.{p}", f"context_embedder.{p}") for p in _WB]
    pairs += [(f"proj_out.{p}", f"final_layer.linear.{p}") for p in _WB]
    for i in range(cfg.num_layers):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == cfg.num_layers - 1
        names = {
            "attn.to_out.0": "x_block.attn.proj",
            "norm1.linear": "x_block.adaLN_modulation.1",
            "ff.net.0.proj": "x_block.mlp.fc1",
            "ff.net.2": "x_block.mlp.fc2",
        }
        if not last:
            names.update({
                "attn.to_add_out": "context_block.attn.proj",
                "norm1_context.linear": "context_block.adaLN_modulation.1",
                "ff_context.net.0.proj": "context_block.mlp.fc1",
                "ff_context.net.2": "context_block.mlp.fc2",
            })  # fmt: skip
        if i in cfg.dual_attention_layers:
            names["attn2.to_out.0"] = "x_block.attn2.proj"
        pairs += [(f"{d}.{k}.{p}", f"{o}.{v}.{p}") for k, v in names.items() for p in _WB]
        if cfg.qk_norm:
            norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                     "attn.norm_added_q": "context_block.attn.ln_q",
                     "attn.norm_added_k": "context_block.attn.ln_k"}  # fmt: skip
            if i in cfg.dual_attention_layers:
                norms.update({"attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"})
            pairs += [(f"{d}.{k}.weight", f"{o}.{v}.weight") for k, v in norms.items()]
    return pairs


def _fused(cfg: MMDiTConfig) -> dict[str, tuple[str, str, str]]:
    """original fused qkv key -> its three diffusers keys (q, k, v order)."""
    fused = {}
    for i in range(cfg.num_layers):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        streams = [("x_block.attn", ("attn.to_q", "attn.to_k", "attn.to_v")),
                   ("context_block.attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))]  # fmt: skip
        if i in cfg.dual_attention_layers:
            streams.append(("x_block.attn2", ("attn2.to_q", "attn2.to_k", "attn2.to_v")))
        for ours, theirs in streams:
            for p in _WB:
                fused[f"{o}.{ours}.qkv.{p}"] = tuple(f"{d}.{t}.{p}" for t in theirs)
    return fused


def _swapped(cfg: MMDiTConfig) -> dict[str, str]:
    """diffusers keys stored as (scale, shift) -> original (shift, scale) keys."""
    last = cfg.num_layers - 1
    out = {}
    for p in _WB:
        out[f"norm_out.linear.{p}"] = f"final_layer.adaLN_modulation.1.{p}"
        out[f"transformer_blocks.{last}.norm1_context.linear.{p}"] = (
            f"joint_blocks.{last}.context_block.adaLN_modulation.1.{p}"
        )
    return out


def _swap_halves(value) -> np.ndarray:
    value = np.asarray(value)
    half = value.shape[0] // 2
    return np.concatenate([value[half:], value[:half]], axis=0)


def convert_diffusers_mmdit(tensors: Mapping[str, object], config: MMDiTConfig) -> dict[str, object]:
    """Rename a diffusers SD3Transformer2DModel state dict to original MMDiT keys.

    Args:
        tensors: diffusers key -> torch-layout array (``transformer/diffusion_pytorch_model.*``).
        config: the transformer's config, which fixes the expected keys.

    Returns:
        original key -> torch-layout array, ready for ``load_state_dict`` on ``mmdit.MMDiT``.

    Raises:
        StateDictError: listing diffusers keys the config does not have and keys it lacks.
    """
    plain = dict(_plain_pairs(config))
    fused, swapped = _fused(config), _swapped(config)
    known = set(plain) | set(swapped) | {k for parts in fused.values() for k in parts}
    unexpected = sorted(k for k in tensors if k not in known)
    missing = sorted(k for k in known if k not in tensors)
    if unexpected or missing:
        raise StateDictError(
            missing=missing, unexpected=unexpected, model_name="diffusers SD3Transformer2DModel"
        )
    out: dict[str, object] = {plain[k]: tensors[k] for k in plain}
    out.update({original: _swap_halves(tensors[k]) for k, original in swapped.items()})
    for original, parts in fused.items():
        out[original] = np.concatenate([np.asarray(tensors[k]) for k in parts], axis=0)
    return out


def mmdit_config_from_diffusers(data: Mapping) -> MMDiTConfig:
    """A diffusers SD3Transformer2DModel config.json -> MMDiTConfig.

    Raises:
        ValueError: for a ``qk_norm`` other than "rms_norm" or None, or invalid sizes.
    """
    defaults = MMDiTConfig()
    kwargs = {}
    for field in (
        "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
        "pos_embed_max_size",
    ):  # fmt: skip
        value = data.get(field)
        kwargs[field] = int(getattr(defaults, field) if value is None else value)
    if data.get("out_channels") is None:
        kwargs["out_channels"] = kwargs["in_channels"]  # diffusers: out_channels defaults to in_channels
    kwargs["dual_attention_layers"] = tuple(int(i) for i in data.get("dual_attention_layers") or ())
    kwargs["qk_norm"] = data.get("qk_norm")
    return MMDiTConfig(**kwargs)


def mmdit_config_from_checkpoint(tensors: Mapping[str, object], head_dim: int = 64) -> MMDiTConfig:
    """The MMDiTConfig of original-key tensors (``model.diffusion_model.`` removed), as diffusers derives it.

    Sizes come from shapes; the head width from the q/k norm when there is one (SD3.5), else
    ``head_dim`` (64 in every released SD3 model, whose head count equals the depth).

    Raises:
        ValueError: if the tensors are not an MMDiT's.
    """
    needed = ("pos_embed", "x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
              "final_layer.linear.weight")  # fmt: skip
    absent = [k for k in needed if k not in tensors]
    if absent:
        raise ValueError(f"not an SD3 MMDiT state dict: no {absent}")
    blocks = {int(k.split(".")[1]) for k in tensors if k.startswith("joint_blocks.")}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise ValueError(f"joint_blocks must be numbered 0..N-1, got {sorted(blocks)}")
    dim, in_channels, patch = (int(v) for v in tensors["x_embedder.proj.weight"].shape[:3])
    ln_q = tensors.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head = int(ln_q.shape[0]) if ln_q is not None else head_dim
    if dim % head:
        raise ValueError(f"hidden width {dim} is not a multiple of the head width {head}")
    table = int(tensors["pos_embed"].shape[1])
    side = int(round(table**0.5))
    if side * side != table:
        raise ValueError(f"pos_embed has {table} positions, not a square number")
    dual = sorted({int(k.split(".")[1]) for k in tensors if ".x_block.attn2." in k})
    return MMDiTConfig(
        sample_size=128,
        patch_size=patch,
        in_channels=in_channels,
        num_layers=max(blocks) + 1,
        attention_head_dim=head,
        num_attention_heads=dim // head,
        joint_attention_dim=int(tensors["context_embedder.weight"].shape[1]),
        caption_projection_dim=int(tensors["context_embedder.weight"].shape[0]),
        pooled_projection_dim=int(tensors["y_embedder.mlp.0.weight"].shape[1]),
        out_channels=int(tensors["final_layer.linear.weight"].shape[0]) // (patch * patch),
        pos_embed_max_size=side,
        dual_attention_layers=tuple(dual),
        qk_norm="rms_norm" if ln_q is not None else None,
    )


def mmdit_to_diffusers(tensors: Mapping[str, object], config: MMDiTConfig) -> dict[str, object]:
    """Original MMDiT keys -> diffusers SD3Transformer2DModel keys: ``convert_diffusers_mmdit`` run backwards
    from the same tables (fused qkv split in three, the two (shift, scale) tensors swapped back).

    Raises:
        StateDictError: listing original keys the config does not have and keys it lacks.
    """
    plain = {original: theirs for theirs, original in _plain_pairs(config)}
    swapped = {original: theirs for theirs, original in _swapped(config).items()}
    fused = _fused(config)
    known = set(plain) | set(swapped) | set(fused)
    unexpected = sorted(k for k in tensors if k not in known)
    missing = sorted(k for k in known if k not in tensors)
    if unexpected or missing:
        raise StateDictError(missing=missing, unexpected=unexpected, model_name="original SD3 MMDiT")
    out: dict[str, object] = {plain[k]: tensors[k] for k in plain}
    out.update({theirs: _swap_halves(tensors[k]) for k, theirs in swapped.items()})
    for original, parts in fused.items():
        # q, k and v are stacked along the output axis in equal thirds (torch.cat in the reference).
        thirds = np.split(np.asarray(tensors[original]), 3, axis=0)
        out.update(zip(parts, (np.ascontiguousarray(t) for t in thirds), strict=True))
    return out


def mmdit_config_to_diffusers(config: MMDiTConfig) -> dict:
    """An MMDiTConfig as diffusers' SD3Transformer2DModel config.json."""
    data = {name: getattr(config, name) for name in (
        "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
        "pos_embed_max_size", "qk_norm",
    )}  # fmt: skip
    data["dual_attention_layers"] = list(config.dual_attention_layers)
    # 0.31 is the first diffusers release with dual attention layers and q/k norm.
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0", **data}
