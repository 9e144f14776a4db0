"""diffusers / transformers config.json dicts -> our config dataclasses (VAE, text encoder).

The scheduler's translator lives with the samplers: ``tf_diffusion.schedulers.config_from_diffusers``.
"""

from __future__ import annotations

from collections.abc import Mapping

from tf_diffusion.config import CLIPTextConfig, VAEConfig


def _get(data: Mapping, key: str, default):
    value = data.get(key, default)
    return default if value is None else value


def vae_config_from_diffusers(data: Mapping) -> VAEConfig:
    """A diffusers AutoencoderKL config.json -> VAEConfig.

    Raises:
        ValueError: for settings our AutoencoderKL does not implement.
    """
    blocks = list(_get(data, "block_out_channels", [64]))
    base = blocks[0]
    if any(b % base for b in blocks):
        raise ValueError(
            f"block_out_channels={blocks} are not multiples of the first; cannot express as channel_mult"
        )
    for key, allowed in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(_get(data, key, [allowed] * len(blocks)))
        if any(t != allowed for t in types):
            raise ValueError(f"VAE {key}={types} is not supported; only {allowed} blocks are")
    if _get(data, "use_quant_conv", True) is False or _get(data, "use_post_quant_conv", True) is False:
        raise ValueError("VAE configs without quant_conv / post_quant_conv are not supported")
    if _get(data, "mid_block_add_attention", True) is False:
        raise ValueError("VAE configs without the mid-block attention are not supported")
    return VAEConfig(
        in_channels=int(_get(data, "in_channels", 3)),
        out_channels=int(_get(data, "out_channels", 3)),
        latent_channels=int(_get(data, "latent_channels", 4)),
        base_channels=int(base),
        channel_mult=tuple(int(b // base) for b in blocks),
        num_res_blocks=int(_get(data, "layers_per_block", 1)),
        norm_groups=int(_get(data, "norm_num_groups", 32)),
        scaling_factor=float(_get(data, "scaling_factor", 0.18215)),
    )


def clip_config_from_transformers(data: Mapping) -> CLIPTextConfig:
    """A transformers CLIPTextModel config.json -> CLIPTextConfig.

    Raises:
        ValueError: for an activation our text encoder does not implement.
    """
    act = _get(data, "hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text encoder hidden_act={act!r} is not supported; expected quick_gelu or gelu")
    return CLIPTextConfig(
        vocab_size=int(_get(data, "vocab_size", 49408)),
        max_position_embeddings=int(_get(data, "max_position_embeddings", 77)),
        hidden_size=int(_get(data, "hidden_size", 512)),
        intermediate_size=int(_get(data, "intermediate_size", 2048)),
        num_hidden_layers=int(_get(data, "num_hidden_layers", 12)),
        num_attention_heads=int(_get(data, "num_attention_heads", 8)),
        hidden_act=act,
        layer_norm_eps=float(_get(data, "layer_norm_eps", 1e-5)),
    )
