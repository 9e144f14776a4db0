"""diffusers AutoencoderKL keys -> original LDM keys (the names ``AutoencoderKL`` uses).

diffusers renames the VAE (``down_blocks.0.resnets.1`` for ``down.0.block.1``),
numbers decoder levels in run order (``up_blocks.0`` is the deepest level,
original ``up.{levels-1}``), and stores the mid-block attention projections as
Linear (out, in) weights where the original has 1x1 convs (out, in, 1, 1).
The map is generated from the config, so every key is known in advance and
anything else is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tf_diffusion.config import VAEConfig
from tf_diffusion.layout import vae_layout
from tf_diffusion.weights.state_dict import StateDictError

# Mid-block attention: current diffusers names, then the legacy (diffusers < 0.14) ones.
_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_ATTENTION_PROJECTIONS = {"q", "k", "v", "proj_out"}


def _pairs(diffusers_prefix: str, original_prefix: str, names: Mapping[str, str]):
    for new, old in names.items():
        for param in ("weight", "bias"):
            yield f"{diffusers_prefix}.{new}.{param}", f"{original_prefix}.{old}.{param}"


def _resnet(diffusers_prefix: str, original_prefix: str, shortcut: bool):
    names = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
    if shortcut:
        names["conv_shortcut"] = "nin_shortcut"
    return _pairs(diffusers_prefix, original_prefix, names)


def diffusers_vae_key_map(config: VAEConfig) -> dict[str, str]:
    """Every diffusers AutoencoderKL key of ``config`` -> its original LDM key (``layout.vae_layout``).

    Legacy attention names (``query``/``key``/``value``/``proj_attn``) are
    included alongside the current ones and map to the same original keys.

    Raises:
        ValueError: if ``config.channel_mult[0] != 1``, which diffusers cannot
            express (its ``conv_in`` is as wide as the first level).
    """
    if config.channel_mult[0] != 1:
        raise ValueError(
            f"channel_mult[0]={config.channel_mult[0]} has no diffusers equivalent; "
            "diffusers AutoencoderKL needs channel_mult[0] == 1"
        )
    pairs = []
    for block in vae_layout(config):
        if block.kind == "res":
            pairs += _resnet(block.diffusers, block.path, block.in_channels != block.out_channels)
        elif block.kind == "attn":
            pairs += _pairs(block.diffusers, block.path, _ATTENTION_NAMES)
        elif block.kind in ("down", "up"):
            # diffusers' Downsample2D / Upsample2D hold the conv as `.conv`, as the original does.
            pairs += _pairs(block.diffusers, block.path, {"conv": "conv"})
        else:
            pairs += [(f"{block.diffusers}.{p}", f"{block.path}.{p}") for p in ("weight", "bias")]
    return dict(pairs)


def convert_diffusers_vae(tensors: Mapping[str, object], config: VAEConfig) -> dict[str, object]:
    """Rename a diffusers AutoencoderKL state dict to original keys, reshaping where needed.

    Arrays are passed through untouched (lazily, if they are lazy) except the
    mid-block attention projections, which become (out, in, 1, 1) conv weights.

    Args:
        tensors: diffusers key -> torch-layout array (``vae/diffusion_pytorch_model.*``).
        config: the VAE's config, which fixes the expected keys.

    Returns:
        original key -> torch-layout array, ready for ``load_state_dict``.

    Raises:
        StateDictError: for keys the config does not have (unexpected), or two
            keys (current and legacy name) for the same weight.
    """
    key_map = diffusers_vae_key_map(config)
    unexpected = [k for k in tensors if k not in key_map]
    if unexpected:
        raise StateDictError(unexpected=unexpected, model_name="diffusers AutoencoderKL")
    converted: dict[str, object] = {}
    duplicated = []
    for key, value in tensors.items():
        original = key_map[key]
        if original in converted:
            duplicated.append(f"{key} (a second name for {original})")
            continue
        name = original.rsplit(".", 2)
        if ".mid.attn_1." in original and name[-2] in _ATTENTION_PROJECTIONS and name[-1] == "weight":
            value = np.asarray(value)
            if value.ndim == 2:  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
                value = value[:, :, None, None]
        converted[original] = value
    if duplicated:
        raise StateDictError(unexpected=duplicated, model_name="diffusers AutoencoderKL")
    return converted
