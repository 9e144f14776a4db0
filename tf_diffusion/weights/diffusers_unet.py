"""Diffusers ``UNet2DConditionModel`` -> original LDM names, and its config.json -> ``UNetConfig``.

Diffusers groups the UNet by level (``down_blocks.i.resnets.j``); the original checkpoint
numbers blocks in running order (``input_blocks.N.0``). The rename is a table of module
prefixes generated from the config; parameter names inside a block are shared, except the
ResBlock's (``norm1`` -> ``in_layers.0`` ...). Tensors keep their torch layout and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tf_diffusion.config import UNetConfig
from tf_diffusion.layout import UNET_ADDED, UNET_COND, UNET_TOP, unet_layout
from tf_diffusion.weights.state_dict import StateDictError

# Diffusers ResnetBlock2D name -> ResBlock name (the nn.Sequential index of the reference).
RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# A diffusers key = module prefix + parameter path; the prefix is what the table maps.
_PREFIX = re.compile(
    r"^((?:down|up)_blocks\.\d+\.(?:resnets|attentions|upsamplers)\.\d+\."
    r"|down_blocks\.\d+\.downsamplers\.0\.conv\."
    r"|mid_block\.(?:resnets|attentions)\.\d+\."
    r"|time_embedding\.(?:linear_[12]|cond_proj)\.|add_embedding\.linear_[12]\.|conv_in\.|conv_norm_out\.|conv_out\.)(.+)$"
)


def diffusers_prefix_map(config: UNetConfig) -> dict[str, str]:
    """Module prefixes of a diffusers UNet -> the original ones, for this architecture (``layout.unet_layout``).

    Args:
        config: the UNet architecture.

    Returns:
        e.g. ``{"down_blocks.0.resnets.1.": "input_blocks.2.0.", ...}``.
    """
    table = {f"{theirs}.": f"{ours}." for ours, theirs in UNET_TOP.items()}
    if config.adm_in_channels is not None:
        table.update({f"{theirs}.": f"{ours}." for ours, theirs in UNET_ADDED.items()})
    if config.time_cond_proj_dim is not None:
        table.update({f"{theirs}.": f"{ours}." for ours, theirs in UNET_COND.items()})
    for block in unet_layout(config):
        if block.kind == "down":
            # Diffusers wraps the conv as `.conv`; the reference Downsample holds it as `.op`.
            table[f"{block.diffusers}.conv."] = f"{block.path}.op."
        else:
            table[f"{block.diffusers}."] = f"{block.path}."
    return table


def diffusers_key_to_original(key: str, prefix_map: Mapping[str, str]) -> str | None:
    """One diffusers key -> its original key (no ``model.diffusion_model.``), or None if unknown."""
    match = _PREFIX.match(key)
    if match is None or match.group(1) not in prefix_map:
        return None
    prefix, rest = match.groups()
    if ".resnets." in prefix:
        head, _, tail = rest.partition(".")
        if head not in RESNET_RENAMES:
            return None
        rest = f"{RESNET_RENAMES[head]}.{tail}"
    return prefix_map[prefix] + rest


def convert_diffusers_unet_state_dict(tensors: Mapping, config: UNetConfig) -> dict:
    """Rename a whole diffusers UNet state dict to original keys; values pass through untouched.

    Args:
        tensors: diffusers key -> tensor (torch layout), e.g. a ``diffusion_pytorch_model.safetensors``.
        config: the architecture, e.g. from ``unet_config_from_diffusers``.

    Returns:
        original key (as ``UNetModel`` names it) -> the same tensor.

    Raises:
        StateDictError: if any key has no counterpart in this architecture.
    """
    prefix_map = diffusers_prefix_map(config)
    renamed, unknown = {}, []
    for key, value in tensors.items():
        new = diffusers_key_to_original(key, prefix_map)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    if unknown:
        raise StateDictError(unexpected=unknown, model_name="a diffusers UNet2DConditionModel of this config")
    return renamed


# Fields that must hold the value a plain SD UNet has (missing means the default, which is that value).
_REQUIRED = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Fields that do not change the weights or inference numerics we compute.
_IGNORED = {
    "sample_size",  # default resolution only
    "dropout",  # training only
    "upcast_attention",  # our softmax is float32 already
    "addition_embed_type_num_heads",  # unused without addition embeddings
}
_USED = {
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "transformer_layers_per_block", "cross_attention_dim", "attention_head_dim",
    "use_linear_projection", "norm_num_groups", "norm_eps", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "time_cond_proj_dim",
}  # fmt: skip
_UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def _uniform(name: str, value, levels: int, where=None) -> int:
    """An int, or a per-level list whose entries (at the levels in ``where``) all agree."""
    if isinstance(value, int):
        return value
    values = list(value)
    if len(values) != levels:
        raise ValueError(f"{name}={values!r} must have one entry per level ({levels})")
    picked = [values[i] for i in range(levels) if where is None or i in where]
    if not all(isinstance(v, int) for v in picked) or len(set(picked)) != 1:
        raise ValueError(f"{name}={values!r} varies between levels; UNetConfig needs one value")
    return picked[0]


def unet_config_from_diffusers(data: Mapping) -> UNetConfig:
    """Translate a diffusers UNet ``config.json`` dict into a ``UNetConfig``.

    Diffusers' ``attention_head_dim`` is, for historical reasons, the number of heads (an int in
    SD 1.x configs, a per-level list such as ``[5, 10, 20, 20]`` in SD 2.x ones). A constant count
    becomes ``num_heads``; counts that give one width per head become ``head_dim``.

    Args:
        data: the parsed ``unet/config.json``.

    Returns:
        The equivalent ``UNetConfig``.

    Raises:
        ValueError: for a UNet this package cannot represent (class or addition embeddings,
            other time embeddings, per-level block counts, asymmetric up path, unknown fields).
    """
    class_name = data.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"_class_name={class_name!r} is not supported; expected 'UNet2DConditionModel'")
    unknown = sorted(k for k in data if not k.startswith("_") and k not in {*_REQUIRED, *_IGNORED, *_USED})
    if unknown:
        raise ValueError(f"unsupported diffusers UNet config fields {unknown}")
    for name, allowed in _REQUIRED.items():
        value = data.get(name, allowed[0])
        if name == "only_cross_attention" and isinstance(value, (list, tuple)) and not any(value):
            continue
        if value not in allowed:
            raise ValueError(
                f"diffusers UNet config {name}={value!r} is not supported; expected {allowed[0]!r}"
            )

    channels = list(data.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(data.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(data.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    if len(down) != levels or any(t not in _UP_FOR_DOWN for t in down):
        raise ValueError(
            f"down_block_types={down!r} must give one of {sorted(_UP_FOR_DOWN)} for each of {levels} levels"
        )
    if up != [_UP_FOR_DOWN[t] for t in reversed(down)]:
        raise ValueError(f"up_block_types={up!r} must mirror down_block_types={down!r}")
    attention_levels = tuple(t == "CrossAttnDownBlock2D" for t in down)
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise ValueError(f"block_out_channels={channels!r} must all be multiples of the first")
    # Levels with a transformer; the middle block uses the last level's settings.
    attended = {i for i in range(levels) if attention_levels[i]} | {levels - 1}

    heads = data.get("attention_head_dim", 8)
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    if len(heads) != levels or not all(isinstance(h, int) and h > 0 for h in heads):
        raise ValueError(f"attention_head_dim={heads!r} must be a head count or one per level ({levels})")
    if len({heads[i] for i in attended}) == 1:
        num_heads, head_dim = heads[levels - 1], None
    elif (
        all(channels[i] % heads[i] == 0 for i in attended)
        and len({channels[i] // heads[i] for i in attended}) == 1
    ):
        num_heads, head_dim = None, channels[levels - 1] // heads[levels - 1]
    else:
        raise ValueError(
            f"attention_head_dim={heads!r} (heads per level) with block_out_channels={channels!r} gives "
            "neither a constant head count nor a constant head width"
        )
    if data.get("norm_num_groups", 32) is None:
        raise ValueError("norm_num_groups=None (no output norm) is not supported")
    adm = None
    if data.get("addition_embed_type") == "text_time":
        # SDXL: the pooled text embedding and the time ids' sinusoids through add_embedding.
        adm = data.get("projection_class_embeddings_input_dim")
        if not isinstance(adm, int) or not isinstance(data.get("addition_time_embed_dim"), int):
            raise ValueError(
                "addition_embed_type='text_time' needs integer projection_class_embeddings_input_dim and "
                f"addition_time_embed_dim, got {adm!r} and {data.get('addition_time_embed_dim')!r}"
            )
    elif data.get("projection_class_embeddings_input_dim") is not None:
        raise ValueError(
            "projection_class_embeddings_input_dim is only supported with addition_embed_type='text_time'"
        )

    depth = data.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        depth = list(depth)
        if len(depth) != levels or not all(isinstance(d, int) and d > 0 for d in depth):
            raise ValueError(
                f"transformer_layers_per_block={depth!r} must be an int or one positive int per level ({levels})"
            )
        depth = normalized_depth(depth, attention_levels)

    return UNetConfig(
        in_channels=data.get("in_channels", 4),
        out_channels=data.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=tuple(c // model_channels for c in channels),
        num_res_blocks=_uniform("layers_per_block", data.get("layers_per_block", 2), levels),
        attention_levels=attention_levels,
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth,
        context_dim=_uniform("cross_attention_dim", data.get("cross_attention_dim", 1280), levels),
        use_linear_projection=bool(data.get("use_linear_projection", False)),
        norm_groups=data.get("norm_num_groups", 32),
        resnet_eps=float(data.get("norm_eps", 1e-5)),
        adm_in_channels=adm,
        addition_time_embed_dim=int(data.get("addition_time_embed_dim") or 256),
        time_cond_proj_dim=data.get("time_cond_proj_dim"),
    )


def normalized_depth(depths, attention_levels) -> int | tuple[int, ...]:
    """Per-level transformer depths as ``UNetConfig`` holds them: 0 where a level (not the last) has
    no transformer, one int when every transformer has the same depth (SD 1.x, the SDXL refiner)."""
    last = len(attention_levels) - 1
    kept = tuple(d if attention_levels[i] or i == last else 0 for i, d in enumerate(depths))
    used = {d for d in kept if d}
    return used.pop() if len(used) == 1 else kept
