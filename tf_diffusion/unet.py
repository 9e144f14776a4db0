"""The LDM spatial-transformer UNet (SD 1.x, SD 2.x, SDXL, 9-channel inpainting) on NHWC tensors.

Reference: CompVis ``ldm/modules/diffusionmodules/openaimodel.py`` (UNetModel, ResBlock,
Downsample, Upsample) and ``ldm/modules/attention.py`` (SpatialTransformer,
BasicTransformerBlock, CrossAttention, FeedForward); for SDXL, Stability's
``sgm/modules/diffusionmodules/openaimodel.py`` (per-level transformer depth, ``label_emb``). Attribute paths equal the keys under
``model.diffusion_model.`` in an original checkpoint; lists stand in for nn.Sequential and
TimestepEmbedSequential, with parameter-free placeholders keeping their indices aligned.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from tf_diffusion.config import UNetConfig
from tf_diffusion.layers import (
    GEGLU,
    Conv2d,
    GroupNorm,
    Identity,
    LayerNorm,
    Linear,
    SiLU,
    attention,
    dtype_policy_scope,
    run_sequential,
    upsample_nearest,
)
from tf_diffusion.layout import Block, unet_layout


def timestep_embedding(timesteps, dim: int):
    """Sinusoidal embedding, cos half first: (B,) -> (B, dim) float32 (ldm timestep_embedding)."""
    half = dim // 2
    # Same float32 operation order as the reference, so the frequencies round identically.
    freqs = ops.exp(-math.log(10000.0) * ops.arange(half, dtype="float32") / half)
    args = ops.cast(timesteps, "float32")[:, None] * freqs[None, :]  # (B, half)
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


def guidance_embedding(guidance_scale, dim: int):
    """An LCM-distilled UNet's ``timestep_cond``: the sinusoid of ``1000 * w``, sin half first, (B,) -> (B, dim).

    ``w`` is what diffusers passes, the guidance scale minus one; an odd ``dim`` gets a zero column, as
    diffusers' ``get_guidance_scale_embedding``.
    """
    half = dim // 2
    # The step in float32 as diffusers rounds it: 1000 * w makes the sinusoid sensitive to the last bit.
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    freqs = ops.exp(ops.arange(half, dtype="float32") * ops.convert_to_tensor(-step, "float32"))
    args = (ops.cast(guidance_scale, "float32") * 1000.0)[:, None] * freqs[None, :]
    emb = ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)
    if dim % 2:
        emb = ops.pad(emb, [[0, 0], [0, 1]])
    return emb


class ResBlock(keras.layers.Layer):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, cfg: UNetConfig, **kwargs):
        super().__init__(**kwargs)
        groups, eps = cfg.norm_groups, cfg.resnet_eps
        self.in_layers = [
            GroupNorm(groups, in_channels, eps),
            SiLU(),
            Conv2d(in_channels, out_channels, 3, padding=1),
        ]
        self.emb_layers = [SiLU(), Linear(emb_dim, out_channels)]
        # out_layers.2 is nn.Dropout in the reference: a placeholder keeps the conv at index 3.
        self.out_layers = [
            GroupNorm(groups, out_channels, eps),
            SiLU(),
            Identity(),
            Conv2d(out_channels, out_channels, 3, padding=1),
        ]
        # The reference uses nn.Identity (no weights) when the width is unchanged.
        self.skip_connection = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.built = True  # complete at construction: its sublayers are

    def call(self, x, emb):  # x: (B, H, W, C_in), emb: (B, E) -> (B, H, W, C_out)
        h = run_sequential(self.in_layers, x)
        h = h + run_sequential(self.emb_layers, emb)[:, None, None, :]
        h = run_sequential(self.out_layers, h)
        return h + (x if self.skip_connection is None else self.skip_connection(x))


class CrossAttention(keras.layers.Layer):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads
        self.to_q = Linear(query_dim, query_dim, bias=False)
        self.to_k = Linear(context_dim, query_dim, bias=False)
        self.to_v = Linear(context_dim, query_dim, bias=False)
        # to_out.1 is nn.Dropout in the reference.
        self.to_out = [Linear(query_dim, query_dim), Identity()]
        self.built = True  # complete at construction: its sublayers are

    def call(self, x, context=None):  # x: (B, N, C), context: (B, T, D_ctx) -> (B, N, C)
        source = x if context is None else context
        return run_sequential(
            self.to_out, attention(self.to_q(x), self.to_k(source), self.to_v(source), self.heads)
        )


class FeedForward(keras.layers.Layer):
    """GEGLU feed-forward with 4x inner width."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        # net.1 is nn.Dropout in the reference.
        self.net = [GEGLU(dim, 4 * dim), Identity(), Linear(4 * dim, dim)]
        self.built = True  # complete at construction: its sublayers are

    def call(self, x):
        return run_sequential(self.net, x)


class BasicTransformerBlock(keras.layers.Layer):
    """Pre-norm self-attention, cross-attention on the context, feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, cfg: UNetConfig, **kwargs):
        super().__init__(**kwargs)
        eps = cfg.layer_norm_eps
        self.norm1, self.attn1 = LayerNorm(dim, eps), CrossAttention(dim, dim, heads)
        self.norm2, self.attn2 = LayerNorm(dim, eps), CrossAttention(dim, cfg.context_dim, heads)
        self.norm3, self.ff = LayerNorm(dim, eps), FeedForward(dim)
        self.built = True  # complete at construction: its sublayers are

    def call(self, x, context):  # x: (B, N, C), context: (B, T, D_ctx)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(keras.layers.Layer):
    """GroupNorm, projection in, transformer blocks over the H*W tokens, projection out, residual."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int = 1, **kwargs):
        super().__init__(**kwargs)
        heads = cfg.heads_at(channels)
        if channels % heads:
            raise ValueError(f"SpatialTransformer width {channels} is not divisible by {heads} heads")
        self.norm = GroupNorm(cfg.norm_groups, channels, cfg.transformer_norm_eps)
        # SD 1.x projects with 1x1 convs, SD 2.x with Linear; on NHWC both are a matmul over
        # channels, so only the checkpoint layout differs.
        if cfg.use_linear_projection:
            self.proj_in, self.proj_out = Linear(channels, channels), Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = Conv2d(channels, channels, 1), Conv2d(channels, channels, 1)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, cfg) for _ in range(depth)]
        self.built = True  # complete at construction: its sublayers are

    def call(self, x, context):  # x: (B, H, W, C) -> (B, H, W, C)
        b, h, w, c = ops.shape(x)
        y = ops.reshape(self.proj_in(self.norm(x)), (b, h * w, c))  # NHWC flattens with no transpose
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(ops.reshape(y, (b, h, w, c)))


class Downsample(keras.layers.Layer):
    """3x3 stride-2 conv, zero padding 1 on every side (torch padding=1)."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)
        self.built = True  # complete at construction: its sublayers are

    def call(self, x):  # (B, H, W, C) -> (B, H/2, W/2, C)
        return self.op(x)


class Upsample(keras.layers.Layer):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = Conv2d(channels, channels, 3, padding=1)
        self.built = True  # complete at construction: its sublayers are

    def call(self, x, size=None):  # (B, H, W, C) -> (B, 2H, 2W, C), or (B, *size, C)
        # ``size``: the skip's size where sizes were odd on the way down (diffusers'
        # interpolate(size=...)).
        return self.conv(upsample_nearest(x, size))


def _shape(x) -> tuple:
    """Static shape of a tensor, array, list or scalar (None for unknown sizes)."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _run_block(block, x, emb, context, upsample_size=None):
    """One TimestepEmbedSequential: each layer gets the inputs its type takes."""
    for layer in block:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context)
        elif isinstance(layer, Upsample):
            x = layer(x, size=upsample_size)
        else:
            x = layer(x)
    return x


def _make_layer(block: Block, cfg: UNetConfig, emb_dim: int):
    """The layer of one ``layout.unet_layout`` entry."""
    if block.kind == "conv":
        return Conv2d(block.in_channels, block.out_channels, 3, padding=1)
    if block.kind == "res":
        return ResBlock(block.in_channels, block.out_channels, emb_dim, cfg)
    if block.kind == "attn":
        return SpatialTransformer(block.in_channels, cfg, cfg.depth_at(block.level))
    return (Downsample if block.kind == "down" else Upsample)(block.in_channels)


class UNetModel(keras.Model):
    """The Stable Diffusion noise-prediction UNet, built from a ``UNetConfig``.

    Attribute paths are the original checkpoint keys without ``model.diffusion_model.``
    (``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``), so
    ``tf_diffusion.weights.state_dict.load_state_dict`` loads an original checkpoint directly.

    Args:
        config: the architecture; the default is SD 1.5.
        **kwargs: passed to ``keras.Model`` (e.g. ``name``).

    Example:
        >>> unet = UNetModel(UNetConfig())
        >>> eps = unet(latents, 999, context)  # (B, 64, 64, 4), scalar, (B, 77, 768)
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        cfg = self.config = config if config is not None else UNetConfig()
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        # The timestep must reach the sinusoid unrounded: Keras would cast float inputs to a
        # mixed policy's compute dtype (bfloat16 turns 999 into 1000); sublayers cast their own.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

        with dtype_policy_scope(kwargs.get("dtype")):
            # time_embed.1 is nn.SiLU in the reference.
            self.time_embed = [Linear(mc, emb_dim), SiLU(), Linear(emb_dim, emb_dim)]
            if cfg.adm_in_channels is not None:
                # sgm's num_classes="sequential": nn.Sequential(nn.Sequential(Linear, SiLU, Linear)).
                self.label_emb = [[Linear(cfg.adm_in_channels, emb_dim), SiLU(), Linear(emb_dim, emb_dim)]]
            if cfg.time_cond_proj_dim is not None:
                self.time_cond_proj = Linear(cfg.time_cond_proj_dim, mc, bias=False)

            # Built whole, then assigned: Keras tracks the variables of lists as they are assigned
            # (layers appended later to an inner list of an assigned list are not tracked).
            lists: dict[str, list] = {"input": [], "middle": [], "output": []}
            for block in unet_layout(cfg):
                layer = _make_layer(block, cfg, emb_dim)
                if block.section == "middle":
                    lists["middle"].append(layer)
                elif block.position == 0:
                    lists[block.section].append([layer])
                else:
                    lists[block.section][-1].append(layer)
            self.input_blocks, self.middle_block, self.output_blocks = (
                lists["input"],
                lists["middle"],
                lists["output"],
            )
            ch = cfg.channel_mult[0] * mc

            # out.1 is nn.SiLU in the reference.
            self.out = [
                GroupNorm(cfg.norm_groups, ch, cfg.resnet_eps),
                SiLU(),
                Conv2d(ch, cfg.out_channels, 3, padding=1),
            ]
            self.built = True

    def __call__(self, latents, timesteps, context, text_embeds=None, time_ids=None, **kwargs):
        # Checked here, before Keras wraps errors from call() with a dump of every argument.
        self._check_inputs(latents, timesteps, context)
        self._check_added(latents, text_embeds, time_ids)
        if self.config.adm_in_channels is None:
            return super().__call__(latents, timesteps, context, **kwargs)
        return super().__call__(latents, timesteps, context, text_embeds, time_ids, **kwargs)

    def _check_added(self, latents, text_embeds, time_ids) -> None:
        cfg = self.config
        if cfg.adm_in_channels is None:
            if text_embeds is not None or time_ids is not None:
                raise ValueError(
                    "this UNet has no added conditioning (adm_in_channels=None); do not pass "
                    "text_embeds or time_ids"
                )
            return
        if text_embeds is None or time_ids is None:
            raise ValueError(
                f"this UNet (adm_in_channels={cfg.adm_in_channels}) needs text_embeds (B, P) and "
                f"time_ids (B, K) with P + K * {cfg.addition_time_embed_dim} = {cfg.adm_in_channels}"
            )
        pooled, ids = _shape(text_embeds), _shape(time_ids)
        if len(pooled) != 2 or len(ids) != 2:
            raise ValueError(f"text_embeds and time_ids must be (batch, n), got shapes {pooled} and {ids}")
        width = pooled[1] + ids[1] * cfg.addition_time_embed_dim
        if width != cfg.adm_in_channels:
            raise ValueError(
                f"text_embeds {pooled} and time_ids {ids} give {width} added-conditioning channels "
                f"({pooled[1]} + {ids[1]} * {cfg.addition_time_embed_dim}); this UNet takes "
                f"adm_in_channels={cfg.adm_in_channels}"
            )

    def _check_inputs(self, latents, timesteps, context) -> None:
        cfg = self.config
        shape = _shape(latents)
        if len(shape) != 4 or shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents must be NHWC (batch, height, width, {cfg.in_channels}), got shape {shape}"
            )
        for name, size in (("height", shape[1]), ("width", shape[2])):
            if size is not None and size < 1:
                raise ValueError(f"latent {name} must be at least 1, got {size}")
        t_shape = _shape(timesteps)
        if len(t_shape) > 1 or (
            t_shape and None not in (t_shape[0], shape[0]) and t_shape[0] not in (1, shape[0])
        ):
            raise ValueError(f"timesteps must be a scalar or shape ({shape[0]},), got shape {t_shape}")
        ctx = _shape(context)
        if len(ctx) != 3 or ctx[-1] != cfg.context_dim:
            raise ValueError(f"context must have shape (batch, tokens, {cfg.context_dim}), got shape {ctx}")

    def call(
        self,
        latents,
        timesteps,
        context,
        text_embeds=None,
        time_ids=None,
        down_residuals=None,
        mid_residual=None,
        timestep_cond=None,
    ):
        """Predict the noise (or v) for ``latents`` at ``timesteps`` given text ``context``.

        Args:
            latents: (B, H, W, in_channels) NHWC; any H and W (sizes that are not multiples of
                2 ** (levels - 1) are upsampled back to the skip sizes, as diffusers does).
            timesteps: a scalar or (B,) tensor, integer or float.
            context: (B, T, context_dim) text-encoder hidden states.
            text_embeds: SDXL only (``adm_in_channels`` set): (B, P) pooled text embedding.
            time_ids: SDXL only: (B, K) micro-conditioning values (original size, crop top-left,
                target size or aesthetic score), each embedded sinusoidally.
            down_residuals: ControlNet residuals, one per input block, each added to that block's
                skip (diffusers' ``down_block_additional_residuals``); None: none.
            mid_residual: ControlNet residual added to the middle block's output.
            timestep_cond: LCM-distilled UNets only (``time_cond_proj_dim`` set): (B, time_cond_proj_dim),
                the guidance scale's embedding (``guidance_embedding``), diffusers' ``timestep_cond``.

        Returns:
            (B, H, W, out_channels) in the dtype policy's compute dtype.

        Raises:
            ValueError: on a wrong rank, channel count, context width or latent size, or added
                conditioning that is missing, unexpected or of the wrong width.
        """
        latents = ops.convert_to_tensor(latents)
        timesteps = ops.convert_to_tensor(timesteps)
        context = ops.convert_to_tensor(context)

        batch = ops.shape(latents)[0]
        t = ops.broadcast_to(ops.cast(timesteps, "float32"), (batch,))
        sinusoid = timestep_embedding(t, self.config.model_channels)  # (B, model_channels)
        if self.config.time_cond_proj_dim is not None:
            if timestep_cond is None:
                raise ValueError(
                    f"this UNet is LCM-distilled (time_cond_proj_dim={self.config.time_cond_proj_dim}): pass "
                    "timestep_cond, the guidance scale's embedding (tf_diffusion.unet.guidance_embedding)"
                )
            sinusoid = sinusoid + ops.cast(self.time_cond_proj(timestep_cond), sinusoid.dtype)
        elif timestep_cond is not None:
            raise ValueError("timestep_cond is only for LCM-distilled UNets (time_cond_proj_dim set)")
        emb = run_sequential(self.time_embed, sinusoid)  # (B, E)
        if self.config.adm_in_channels is not None:
            emb = emb + run_sequential(self.label_emb[0], self._added_input(text_embeds, time_ids))

        h, skips = latents, []
        for block in self.input_blocks:
            h = _run_block(block, h, emb, context)
            skips.append(h)
        h = _run_block(self.middle_block, h, emb, context)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(
                    f"down_residuals has {len(down_residuals)} entries; this UNet has {len(skips)} input blocks"
                )
            skips = [s + ops.cast(r, s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            h = h + ops.cast(mid_residual, h.dtype)
        for block in self.output_blocks:
            h = ops.concatenate([h, skips.pop()], axis=-1)
            # An upsample must land on the next skip's size (odd sizes round up on the way down).
            size = tuple(ops.shape(skips[-1])[1:3]) if skips else None
            if size is not None and not all(isinstance(d, int) for d in size):
                # A retrace with a relaxed (None) size gives a tensor beside an int, which Keras
                # refuses in one argument: hand both as tensors.
                size = tuple(ops.convert_to_tensor(d, "int32") for d in size)
            h = _run_block(block, h, emb, context, upsample_size=size)
        return run_sequential(self.out, h)

    def _added_input(self, text_embeds, time_ids):
        """label_emb's input: pooled embedding, then each time id's sinusoid -> (B, adm_in_channels)."""
        time_ids = ops.cast(ops.convert_to_tensor(time_ids), "float32")
        batch, count = ops.shape(time_ids)[0], ops.shape(time_ids)[1]
        dim = self.config.addition_time_embed_dim
        # diffusers embeds time_ids.flatten() and reshapes to (B, K * dim): row-major per image.
        sinusoids = timestep_embedding(ops.reshape(time_ids, (-1,)), dim)  # (B*K, dim)
        sinusoids = ops.reshape(sinusoids, (batch, count * dim))
        pooled = ops.cast(ops.convert_to_tensor(text_embeds), "float32")
        return ops.concatenate([pooled, sinusoids], axis=-1)  # (B, adm_in_channels)
