"""The LDM spatial-transformer UNet (SD 1.x, SD 2.x, 9-channel inpainting) on NHWC tensors.

Reference: CompVis ``ldm/modules/diffusionmodules/openaimodel.py`` (UNetModel, ResBlock,
Downsample, Upsample) and ``ldm/modules/attention.py`` (SpatialTransformer,
BasicTransformerBlock, CrossAttention, FeedForward). Attribute paths equal the keys under
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
    conv3x3_filter,
    conv3x3_operand,
    conv3x3_result,
    dtype_policy_scope,
    filter_key,
    graph_matmul_tile,
    head_attention,
    island,
    islands_active,
    merge_heads,
    prepared_filter,
    prepared_filter_tile,
    run_sequential,
    split_blocks,
    split_heads,
    upsample_conv3x3,
    winograd_tile_of_filter,
)
from tf_diffusion.layout import Block, unet_layout


def timestep_embedding(timesteps, dim: int):
    """Sinusoidal embedding, cos half first: (B,) -> (B, dim) float32 (ldm timestep_embedding)."""
    half = dim // 2
    # Same float32 operation order as the reference, so the frequencies round identically.
    freqs = ops.exp(-math.log(10000.0) * ops.arange(half, dtype="float32") / half)
    args = ops.cast(timesteps, "float32")[:, None] * freqs[None, :]  # (B, half)
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


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

    def call(self, x, emb):  # x: (B, H, W, C_in), emb: (B, E) -> (B, H, W, C_out)
        conv1, conv2 = self.in_layers[2], self.out_layers[3]
        filters = prepared_filter(conv1), prepared_filter(conv2)
        m = self._prepared_tile(x, filters)
        if m is None:
            m, filters = self._graph_matmul_tile(x), None
        if m is None:
            return island(self, "call", self._forward)(x, emb)
        # Inside ``xla_islands``, where ``GRAPH_MATMUL_RULES`` hold for both convolutions or their
        # filters were prepared: three islands, the convolutions' matmuls between them in graph
        # mode (oneDNN).
        if filters is None:
            filters = conv3x3_filter(conv1.weight, m), conv3x3_filter(conv2.weight, m)
        size = tuple(x.shape[1:3])
        key = f"{m}_{size[0]}x{size[1]}"  # the islands close over m and the size
        a = island(self, "in_" + key, lambda x: conv3x3_operand(run_sequential(self.in_layers[:2], x), m))(x)
        h = ops.matmul(a, filters[0])
        a = island(self, "mid_" + key, lambda h, emb: self._middle(h, emb, m, size))(h, emb)
        h = ops.matmul(a, filters[1])
        return island(self, "out_" + key, lambda h, x: self._output(h, x, m, size))(h, x)

    def _prepared_tile(self, x, filters):
        """m of the prepared ``filters`` (UNetModel.prepare_filters) if they were prepared for
        ``x``'s size, else None."""
        if not islands_active() or filters[0] is None or filters[1] is None:
            return None
        m = winograd_tile_of_filter(filters[0])
        conv1 = self.in_layers[2]
        return m if prepared_filter_tile(x.shape, conv1.weight, conv1.compute_dtype) == m else None

    def _graph_matmul_tile(self, x):
        if not islands_active():
            return None
        conv1, conv2 = self.in_layers[2], self.out_layers[3]
        m = graph_matmul_tile(x.shape, conv1.weight, conv1.compute_dtype)
        out_shape = tuple(x.shape[:3]) + (conv2.weight.shape[2],)
        if m is None or graph_matmul_tile(out_shape, conv2.weight, conv2.compute_dtype) != m:
            return None
        return m

    def _middle(self, h, emb, m, size):
        h = conv3x3_result(h, m, size) + self.in_layers[2].bias
        h = h + run_sequential(self.emb_layers, emb)[:, None, None, :]
        return conv3x3_operand(run_sequential(self.out_layers[:3], h), m)

    def _output(self, h, x, m, size):
        h = conv3x3_result(h, m, size) + self.out_layers[3].bias
        return h + (x if self.skip_connection is None else self.skip_connection(x))

    def _forward(self, x, emb):
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
        # Complete at construction (its sublayers are); BasicTransformerBlock calls the
        # self-attention's projections directly and never this layer.
        self.built = True

    def key_value(self, context):
        """(B, T, D_ctx) -> the (k, v) projections, each (B, T, C); reusable across steps."""
        return self.to_k(context), self.to_v(context)

    def call(self, x, context=None, kv=None):  # x: (B, N, C) -> (B, N, C)
        k, v = kv if kv is not None else self.key_value(x if context is None else context)
        return run_sequential(self.to_out, attention(self.to_q(x), k, v, self.heads))


class FeedForward(keras.layers.Layer):
    """GEGLU feed-forward with 4x inner width."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        # net.1 is nn.Dropout in the reference.
        self.net = [GEGLU(dim, 4 * dim), Identity(), Linear(4 * dim, dim)]

    def call(self, x):
        return run_sequential(self.net, x)


# Inside ``xla_islands``, a transformer block's work after the self-attention core runs over blocks
# of at most this many tokens per image (benchmarks/README.md, "Quiet run 7").
POST_ATTENTION_TOKENS = 1024


class BasicTransformerBlock(keras.layers.Layer):
    """Pre-norm self-attention, cross-attention on the context, feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, cfg: UNetConfig, **kwargs):
        super().__init__(**kwargs)
        eps = cfg.layer_norm_eps
        self.norm1, self.attn1 = LayerNorm(dim, eps), CrossAttention(dim, dim, heads)
        self.norm2, self.attn2 = LayerNorm(dim, eps), CrossAttention(dim, cfg.context_dim, heads)
        self.norm3, self.ff = LayerNorm(dim, eps), FeedForward(dim)

    def call(self, x, context):  # x: (B, N, C), context: (B, T, D_ctx)
        if islands_active():
            # Inside ``xla_islands`` the work before and after the self-attention core is
            # compiled with XLA and the core runs in graph mode, head by head (layers.py).
            q, k_t, v = island(self, "pre", self._self_attention_heads)(x)
            o = head_attention(q, k_t, v)
            return island(self, "post", self._rest_heads)(x, o, context)
        q, k, v = self._self_attention_inputs(x)
        return self._rest(x, attention(q, k, v, self.attn1.heads), context)

    def _self_attention_inputs(self, x):
        h = self.norm1(x)
        return self.attn1.to_q(h), self.attn1.to_k(h), self.attn1.to_v(h)

    def _self_attention_heads(self, x):
        """Scaled queries (B*h, N, d), transposed keys (B*h, d, N) and values (B*h, N, d)."""
        q, k, v = self._self_attention_inputs(x)
        heads = self.attn1.heads
        q, k, v = (split_heads(z, heads) for z in (q, k, v))
        return q * (1.0 / math.sqrt(q.shape[-1])), ops.transpose(k, (0, 2, 1)), v

    def _rest_heads(self, x, o, context):
        heads = self.attn1.heads
        n = x.shape[1]
        if n is None or n <= POST_ATTENTION_TOKENS:
            return self._rest(x, merge_heads(o, heads), context)
        # Everything after the self-attention core is per token: in blocks of tokens the
        # feed-forward's hidden activations stay in the cache (SD 1.5 at 512, 64x64 level: 80 ms
        # against 98 per block; no gain at 32x32).
        kv = self.attn2.key_value(context)
        parts = [
            self._rest(x_part, merge_heads(o_part, heads), context, kv)
            for x_part, o_part in zip(
                split_blocks(x, POST_ATTENTION_TOKENS, 1),
                split_blocks(o, POST_ATTENTION_TOKENS, 1),
                strict=True,
            )
        ]
        return ops.concatenate(parts, axis=1)

    def _rest(self, x, o, context, kv=None):
        x = x + run_sequential(self.attn1.to_out, o)
        x = x + self.attn2(self.norm2(x), context, kv)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(keras.layers.Layer):
    """GroupNorm, projection in, transformer blocks over the H*W tokens, projection out, residual."""

    def __init__(self, channels: int, cfg: UNetConfig, **kwargs):
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
        self.transformer_blocks = [
            BasicTransformerBlock(channels, heads, cfg) for _ in range(cfg.transformer_depth)
        ]

    def call(self, x, context):  # x: (B, H, W, C) -> (B, H, W, C)
        y = island(self, "in", self._project_in)(x)
        for block in self.transformer_blocks:
            y = block(y, context)
        return island(self, "out", self._project_out)(x, y)

    def _project_in(self, x):  # (B, H, W, C) -> (B, H*W, C)
        b, h, w, c = ops.shape(x)
        return ops.reshape(self.proj_in(self.norm(x)), (b, h * w, c))  # NHWC flattens with no transpose

    def _project_out(self, x, y):  # x: (B, H, W, C), y: (B, H*W, C) -> (B, H, W, C)
        return x + self.proj_out(ops.reshape(y, ops.shape(x)))


class Downsample(keras.layers.Layer):
    """3x3 stride-2 conv, zero padding 1 on every side (torch padding=1)."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def call(self, x):  # (B, H, W, C) -> (B, H/2, W/2, C)
        return island(self, "call", self.op)(x)


class Upsample(keras.layers.Layer):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def call(self, x, size=None):  # (B, H, W, C) -> (B, 2H, 2W, C), or (B, *size, C)
        return island(self, "call", self._forward)(x, size)

    def _forward(self, x, size):
        h, w = x.shape[1], x.shape[2]
        if size is None or (h is not None and w is not None and tuple(size) == (2 * h, 2 * w)):
            return upsample_conv3x3(x, self.conv)
        # Sizes that were odd on the way down: nearest to the skip's size, as diffusers'
        # interpolate(size=...) picks source index floor(dst * in / out).
        for axis, out in ((1, size[0]), (2, size[1])):
            src = ops.shape(x)[axis]
            index = (ops.arange(out, dtype="int32") * src) // out
            x = ops.take(x, index, axis=axis)
        return self.conv(x)


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
        return SpatialTransformer(block.in_channels, cfg)
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

            self.input_blocks, self.middle_block, self.output_blocks = [], [], []
            lists = {"input": self.input_blocks, "output": self.output_blocks}
            for block in unet_layout(cfg):
                layer = _make_layer(block, cfg, emb_dim)
                if block.section == "middle":
                    self.middle_block.append(layer)
                elif block.position == 0:
                    lists[block.section].append([layer])
                else:
                    lists[block.section][-1].append(layer)
            ch = cfg.channel_mult[0] * mc

            # out.1 is nn.SiLU in the reference.
            self.out = [
                GroupNorm(cfg.norm_groups, ch, cfg.resnet_eps),
                SiLU(),
                Conv2d(ch, cfg.out_channels, 3, padding=1),
            ]
            self.built = True

    def __call__(self, latents, timesteps, context, **kwargs):
        # Checked here, before Keras wraps errors from call() with a dump of every argument.
        self._check_inputs(latents, timesteps, context)
        return super().__call__(latents, timesteps, context, **kwargs)

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

    def resblock_input_sizes(self, height: int, width: int) -> list:
        """(ResBlock, (h, w)) for every ResBlock of a call on height x width latents, in call order."""
        sizes, skips = [], []
        h, w = height, width
        for block in self.input_blocks:
            for layer in block:
                if isinstance(layer, ResBlock):
                    sizes.append((layer, (h, w)))
                elif isinstance(layer, Downsample):
                    h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, padding 1
            skips.append((h, w))
        sizes += [(layer, (h, w)) for layer in self.middle_block if isinstance(layer, ResBlock)]
        for block in self.output_blocks:
            skips.pop()
            for layer in block:
                if isinstance(layer, ResBlock):
                    sizes.append((layer, (h, w)))
                elif isinstance(layer, Upsample):
                    h, w = skips[-1] if skips else (2 * h, 2 * w)
        return sizes

    def prepare_filters(self, latent_shape) -> dict:
        """Winograd-transformed 3x3 filters for a call on ``latent_shape`` (B, H, W, C) latents
        inside ``xla_islands``, for ``layers.prepared_filters``: computed once, they save each call
        their transforms (float32 on TensorFlow's CPU; ``layers.PREPARED_FILTER_RULES``)."""
        b, height, width = latent_shape[:3]
        filters = {}
        for block, (h, w) in self.resblock_input_sizes(height, width):
            conv1, conv2 = block.in_layers[2], block.out_layers[3]
            m = prepared_filter_tile((b, h, w, conv1.weight.shape[2]), conv1.weight, conv1.compute_dtype)
            if m is not None and m == prepared_filter_tile(
                (b, h, w, conv2.weight.shape[2]), conv2.weight, conv2.compute_dtype
            ):
                for conv in (conv1, conv2):
                    filters[filter_key(conv)] = conv3x3_filter(conv.weight, m)
        return filters

    def call(self, latents, timesteps, context):
        """Predict the noise (or v) for ``latents`` at ``timesteps`` given text ``context``.

        Args:
            latents: (B, H, W, in_channels) NHWC; any H and W (sizes that are not multiples of
                2 ** (levels - 1) are upsampled back to the skip sizes, as diffusers does).
            timesteps: a scalar or (B,) tensor, integer or float.
            context: (B, T, context_dim) text-encoder hidden states.

        Returns:
            (B, H, W, out_channels) in the dtype policy's compute dtype.

        Raises:
            ValueError: on a wrong rank, channel count, context width or latent size.
        """
        latents = ops.convert_to_tensor(latents)
        timesteps = ops.convert_to_tensor(timesteps)
        context = ops.convert_to_tensor(context)

        batch = ops.shape(latents)[0]
        t = ops.broadcast_to(ops.cast(timesteps, "float32"), (batch,))
        emb = run_sequential(self.time_embed, timestep_embedding(t, self.config.model_channels))  # (B, E)

        h, skips = latents, []
        for block in self.input_blocks:
            h = _run_block(block, h, emb, context)
            skips.append(h)
        h = _run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = ops.concatenate([h, skips.pop()], axis=-1)
            # An upsample must land on the next skip's size (odd sizes round up on the way down).
            size = tuple(ops.shape(skips[-1])[1:3]) if skips else None
            h = _run_block(block, h, emb, context, upsample_size=size)
        return run_sequential(self.out, h)
