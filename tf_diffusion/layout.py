"""Block layouts of the UNet and the VAE: the one place their block numbering is derived.

The original checkpoints number the UNet's blocks in running order (``input_blocks.4.1``: the
fifth input block, its second layer), diffusers groups them by level
(``down_blocks.1.attentions.0``), keras-cv counts each block type in data-flow order. All of
these, the model constructors and config inference read the lists built here, so the numbering
is written once.

Example:
    >>> [b.path for b in unet_layout(UNetConfig()) if b.kind == "down"]
    ['input_blocks.3.0', 'input_blocks.6.0', 'input_blocks.9.0']
"""

from __future__ import annotations

from dataclasses import dataclass

from tf_diffusion.config import UNetConfig, VAEConfig

# UNet block kinds: the input conv, ResBlock, SpatialTransformer, Downsample, Upsample.
UNET_KINDS = ("conv", "res", "attn", "down", "up")
# UNet modules outside the three block lists: single-file path -> diffusers name.
UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# LCM-distilled UNets (UNetConfig.time_cond_proj_dim): diffusers' guidance projection. No original
# single-file key exists for it (these UNets are published as diffusers folders); ours is its own name.
UNET_COND = {"time_cond_proj": "time_embedding.cond_proj"}
# SDXL's added conditioning (UNetConfig.adm_in_channels): single-file path -> diffusers name.
UNET_ADDED = {
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}


@dataclass(frozen=True)
class Block:
    """One layer of a UNet block list (or one VAE module).

    Attributes:
        section: "input", "middle" or "output" (UNet); "encoder", "decoder" or "" (VAE).
        index: the block's number in its list (``input_blocks.N``); None for the middle block
            and the VAE.
        position: the layer's index inside the block (``input_blocks.N.position``); None for the VAE.
        kind: "conv", "res", "attn", "down" or "up" (VAE also "norm", "quant").
        level: resolution level: 0 at the input size, one more after each downsample.
        in_channels: channels the layer takes (an output ResBlock's include the skip).
        out_channels: channels it gives.
        path: its module path in single files (``input_blocks.4.1``, ``decoder.up.3.block.0``).
        diffusers: its diffusers module name (``down_blocks.1.attentions.0``).
    """

    section: str
    index: int | None
    position: int | None
    kind: str
    level: int
    in_channels: int
    out_channels: int
    path: str
    diffusers: str


_UNET_SECTIONS = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}


def _unet_block(section, index, position, kind, level, cin, cout, diffusers) -> Block:
    name = _UNET_SECTIONS[section] + ("" if index is None else f".{index}")
    return Block(section, index, position, kind, level, cin, cout, f"{name}.{position}", diffusers)


def unet_layout(cfg: UNetConfig) -> list[Block]:
    """Every layer of the UNet's input, middle and output blocks, in the order a call runs them.

    Args:
        cfg: the architecture.

    Returns:
        The blocks; ``path`` and ``diffusers`` name the same module in the two layouts.
    """
    mc, levels = cfg.model_channels, len(cfg.channel_mult)
    out = [_unet_block("input", 0, 0, "conv", 0, cfg.in_channels, mc, "conv_in")]
    skips = [mc]  # width of every input block's output, consumed in reverse by the output blocks
    ch, n = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(cfg.num_res_blocks):
            width = mult * mc
            out.append(
                _unet_block("input", n, 0, "res", level, ch, width, f"down_blocks.{level}.resnets.{j}")
            )
            ch = width
            if cfg.attention_levels[level]:
                out.append(
                    _unet_block("input", n, 1, "attn", level, ch, ch, f"down_blocks.{level}.attentions.{j}")
                )
            skips.append(ch)
            n += 1
        if level != levels - 1:
            out.append(
                _unet_block("input", n, 0, "down", level, ch, ch, f"down_blocks.{level}.downsamplers.0")
            )
            skips.append(ch)
            n += 1
    deepest = levels - 1
    out += [
        _unet_block("middle", None, 0, "res", deepest, ch, ch, "mid_block.resnets.0"),
        _unet_block("middle", None, 1, "attn", deepest, ch, ch, "mid_block.attentions.0"),
        _unet_block("middle", None, 2, "res", deepest, ch, ch, "mid_block.resnets.1"),
    ]
    n = 0
    for i, level in enumerate(reversed(range(levels))):  # diffusers' up block 0 is the deepest level
        width = cfg.channel_mult[level] * mc
        for j in range(cfg.num_res_blocks + 1):
            cin = ch + skips.pop()
            out.append(_unet_block("output", n, 0, "res", level, cin, width, f"up_blocks.{i}.resnets.{j}"))
            ch, position = width, 1
            if cfg.attention_levels[level]:
                out.append(
                    _unet_block("output", n, 1, "attn", level, ch, ch, f"up_blocks.{i}.attentions.{j}")
                )
                position = 2
            if level and j == cfg.num_res_blocks:
                # After the level's last ResBlock and its transformer, if any.
                out.append(
                    _unet_block("output", n, position, "up", level, ch, ch, f"up_blocks.{i}.upsamplers.0")
                )
            n += 1
    return out


def level_sizes(levels: int, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) at each resolution level: a 3x3 stride-2 conv with padding 1 rounds odd sizes up."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def resblock_input_sizes(cfg: UNetConfig, height: int, width: int) -> list[tuple[Block, tuple[int, int]]]:
    """(ResBlock, (h, w) of its input) for every ResBlock of a call on height x width latents, in call order.

    An output block's upsample lands on the skip's size, so every ResBlock sees its level's size.
    """
    sizes = level_sizes(len(cfg.channel_mult), height, width)
    return [(b, sizes[b.level]) for b in unet_layout(cfg) if b.kind == "res"]


def vae_layout(cfg: VAEConfig) -> list[Block]:
    """Every module of the AutoencoderKL with weights, encoder then decoder, each in call order.

    Paths are the original ``first_stage_model.`` keys without the prefix (``encoder.down.0.block.1``),
    diffusers names those of ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.1``). Downsample
    and upsample entries name the module that holds the conv (``encoder.down.0.downsample``).
    """
    base, mult, levels = cfg.base_channels, cfg.channel_mult, len(cfg.channel_mult)
    out = []

    def add(section, kind, level, cin, cout, path, diffusers):
        out.append(Block(section, None, None, kind, level, cin, cout, path, diffusers))

    def mid(part, ch, level):
        add(part, "res", level, ch, ch, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        add(part, "attn", level, ch, ch, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        add(part, "res", level, ch, ch, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")

    add("encoder", "conv", 0, cfg.in_channels, base, "encoder.conv_in", "encoder.conv_in")
    ch = base
    for i in range(levels):
        width = base * mult[i]
        for j in range(cfg.num_res_blocks):
            add(
                "encoder",
                "res",
                i,
                ch,
                width,
                f"encoder.down.{i}.block.{j}",
                f"encoder.down_blocks.{i}.resnets.{j}",
            )
            ch = width
        if i != levels - 1:
            add(
                "encoder",
                "down",
                i,
                ch,
                ch,
                f"encoder.down.{i}.downsample",
                f"encoder.down_blocks.{i}.downsamplers.0",
            )
    mid("encoder", ch, levels - 1)
    add("encoder", "norm", levels - 1, ch, ch, "encoder.norm_out", "encoder.conv_norm_out")
    moments = 2 * cfg.latent_channels  # mean and log-variance
    add("encoder", "conv", levels - 1, ch, moments, "encoder.conv_out", "encoder.conv_out")
    if cfg.use_quant_conv:  # SD3's VAE has no quant convs
        add("", "quant", levels - 1, moments, moments, "quant_conv", "quant_conv")

    latent = cfg.latent_channels
    if cfg.use_quant_conv:
        add("", "quant", levels - 1, latent, latent, "post_quant_conv", "post_quant_conv")
    ch = base * mult[-1]
    add("decoder", "conv", levels - 1, latent, ch, "decoder.conv_in", "decoder.conv_in")
    mid("decoder", ch, levels - 1)
    for i, level in enumerate(reversed(range(levels))):  # diffusers counts decoder levels deepest first
        width = base * mult[level]
        for j in range(cfg.num_res_blocks + 1):
            add(
                "decoder",
                "res",
                level,
                ch,
                width,
                f"decoder.up.{level}.block.{j}",
                f"decoder.up_blocks.{i}.resnets.{j}",
            )
            ch = width
        if level != 0:
            add(
                "decoder",
                "up",
                level,
                ch,
                ch,
                f"decoder.up.{level}.upsample",
                f"decoder.up_blocks.{i}.upsamplers.0",
            )
    add("decoder", "norm", 0, ch, ch, "decoder.norm_out", "decoder.conv_norm_out")
    add("decoder", "conv", 0, ch, cfg.out_channels, "decoder.conv_out", "decoder.conv_out")
    return out


def module_at(model, path: str):
    """The layer of a built model at a layout path (``input_blocks.4.1``: attributes and list indices).

    Raises:
        ValueError: if the model has nothing at ``path``.
    """
    obj = model
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(
                f"{type(model).__name__} has no module at {path!r} (stopped at {part!r})"
            ) from None
    return obj
