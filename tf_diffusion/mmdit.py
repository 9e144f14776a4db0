"""SD3's MMDiT: the joint text-image transformer that denoises SD3 / SD3.5 latents.

Computes what diffusers' ``SD3Transformer2DModel`` computes (Stability's ``sd3_impls.py`` MMDiT and
SD3.5's MMDiTX the same). Attribute paths are the original single file's keys after
``model.diffusion_model.`` (``joint_blocks.3.x_block.attn.qkv``, ``final_layer.adaLN_modulation.1``);
diffusers folders load through ``tf_diffusion.weights.diffusers_mmdit``. Latents are NHWC.
"""

from __future__ import annotations

import keras
from keras import ops

from tf_diffusion.config import MMDiTConfig
from tf_diffusion.layers import PLAIN, Conv2d, Linear, RMSNorm, SiLU, attention, dtype_policy_scope
from tf_diffusion.unet import timestep_embedding


def layer_norm(x, eps: float = 1e-6):
    """nn.LayerNorm(elementwise_affine=False) over the last axis, in float32."""
    x = ops.cast(x, "float32")
    mean = ops.mean(x, axis=-1, keepdims=True)
    var = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * ops.rsqrt(var + eps)


def modulate(x, shift, scale):
    """x * (1 + scale) + shift, with per-sample (B, D) shift and scale over (B, N, D) tokens."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


class Mlp(keras.layers.Layer):
    """fc1 -> tanh-approximated GELU -> fc2 (timm's Mlp; diffusers' FeedForward "gelu-approximate")."""

    def __init__(self, dim: int, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.built = True

    def call(self, x):
        return self.fc2(ops.gelu(self.fc1(x), approximate=True))


class EmbedMLP(keras.layers.Layer):
    """``mlp``: Linear -> SiLU -> Linear (the timestep and pooled-text embedders)."""

    def __init__(self, dim_in: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.mlp = [Linear(dim_in, dim), SiLU(), Linear(dim, dim)]
        self.built = True

    def call(self, x):
        for layer in self.mlp:
            x = layer(x)
        return x


class PatchEmbed(keras.layers.Layer):
    """``x_embedder``: a patch_size-strided conv from latents (B, H, W, C) to tokens (B, h*w, D)."""

    def __init__(self, config: MMDiTConfig, **kwargs):
        super().__init__(**kwargs)
        p = config.patch_size
        self.proj = Conv2d(config.in_channels, config.inner_dim, p, stride=p)
        self.built = True

    def call(self, x):
        x = self.proj(x)  # (B, h, w, D)
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], -1, x.shape[-1]))  # row-major patches, as torch's flatten(2)


class SelfAttention(keras.layers.Layer):
    """One stream's part of the joint attention: fused ``qkv``, optional RMS ``ln_q`` / ``ln_k``, ``proj``.

    ``pre_only`` (the last block's context stream) has no output projection: its tokens are dropped.
    """

    def __init__(self, dim: int, heads: int, qk_norm: str | None, pre_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim)
        # SD3.5: RMSNorm over each head's features of q and k (eps 1e-6, as diffusers).
        self.ln_q = RMSNorm(self.head_dim, 1e-6) if qk_norm else None
        self.ln_k = RMSNorm(self.head_dim, 1e-6) if qk_norm else None
        self.proj = None if pre_only else Linear(dim, dim)
        self.built = True

    def pre_attention(self, x):  # (B, N, D) -> q, k, v each (B, N, D)
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)
        if self.ln_q is not None:
            q, k = self._per_head(self.ln_q, q), self._per_head(self.ln_k, k)
        return q, k, v

    def _per_head(self, norm, x):
        shape = ops.shape(x)
        heads = ops.reshape(x, (shape[0], shape[1], self.heads, self.head_dim))
        return ops.reshape(ops.cast(norm(heads), x.dtype), shape)

    def call(self, x):
        """Self-attention of one stream alone (SD3.5's ``attn2``)."""
        q, k, v = self.pre_attention(x)
        return self.proj(attention(q, k, v, self.heads))


class DismantledBlock(keras.layers.Layer):
    """One stream of a joint block: adaLN modulation, attention inputs, and the MLP after attention.

    Modulation chunks, in the original order: shift, scale, gate for the attention, shift, scale,
    gate for the MLP, then (``attn2``) shift, scale, gate of the second attention; a ``pre_only``
    stream has only shift and scale.
    """

    def __init__(self, dim: int, heads: int, qk_norm, pre_only: bool = False, dual: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.pre_only, self.dual = pre_only, dual
        chunks = 2 if pre_only else (9 if dual else 6)
        # adaLN_modulation.0 is nn.SiLU in the original.
        self.adaLN_modulation = [SiLU(), Linear(dim, chunks * dim)]
        self.attn = SelfAttention(dim, heads, qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(dim, heads, qk_norm) if dual else None
        self.mlp = None if pre_only else Mlp(dim, 4 * dim)
        self.built = True

    def modulation(self, c):  # (B, D) -> list of (B, D)
        chunks = 2 if self.pre_only else (9 if self.dual else 6)
        return ops.split(self.adaLN_modulation[1](self.adaLN_modulation[0](c)), chunks, axis=-1)

    def post_attention(self, x, attn_out, mod, attn2_out=None):
        """The residual updates after the joint attention: gated attention, (attn2,) gated MLP."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        del shift_msa, scale_msa
        x = x + gate_msa[:, None] * self.attn.proj(attn_out)
        if attn2_out is not None:
            x = x + mod[8][:, None] * attn2_out
        h = modulate(ops.cast(layer_norm(x), x.dtype), shift_mlp, scale_mlp)
        return x + gate_mlp[:, None] * self.mlp(h)


class JointBlock(keras.layers.Layer):
    """``joint_blocks.N``: context and image streams attending over their concatenated tokens."""

    def __init__(self, config: MMDiTConfig, index: int, **kwargs):
        super().__init__(**kwargs)
        dim, heads = config.inner_dim, config.num_attention_heads
        self.heads = heads
        last = index == config.num_layers - 1
        self.context_block = DismantledBlock(dim, heads, config.qk_norm, pre_only=last)
        self.x_block = DismantledBlock(dim, heads, config.qk_norm, dual=index in config.dual_attention_layers)
        self.built = True

    def call(self, context, x, c):  # context: (B, T, D), x: (B, N, D), c: (B, D)
        cb, xb = self.context_block, self.x_block
        c_mod, x_mod = cb.modulation(c), xb.modulation(c)
        x_norm = ops.cast(layer_norm(x), x.dtype)
        cq, ck, cv = cb.attn.pre_attention(modulate(ops.cast(layer_norm(context), context.dtype), *c_mod[:2]))
        xq, xk, xv = xb.attn.pre_attention(modulate(x_norm, *x_mod[:2]))
        n = ops.shape(x)[1]
        # Image tokens first, as diffusers' JointAttnProcessor2_0 (the order does not change the result).
        joint = attention(
            ops.concatenate([xq, cq], axis=1),
            ops.concatenate([xk, ck], axis=1),
            ops.concatenate([xv, cv], axis=1),
            self.heads,
        )
        x_attn, c_attn = joint[:, :n], joint[:, n:]
        attn2 = xb.attn2(modulate(x_norm, x_mod[6], x_mod[7])) if xb.dual else None
        x = xb.post_attention(x, x_attn, x_mod, attn2)
        context = None if cb.pre_only else cb.post_attention(context, c_attn, c_mod)
        return context, x


class FinalLayer(keras.layers.Layer):
    """``final_layer``: adaLN (shift, scale) on the image tokens, then a linear to patch pixels."""

    def __init__(self, config: MMDiTConfig, **kwargs):
        super().__init__(**kwargs)
        dim, p = config.inner_dim, config.patch_size
        self.adaLN_modulation = [SiLU(), Linear(dim, 2 * dim)]
        self.linear = Linear(dim, p * p * config.out_channels)
        self.built = True

    def call(self, x, c):
        shift, scale = ops.split(self.adaLN_modulation[1](self.adaLN_modulation[0](c)), 2, axis=-1)
        return self.linear(modulate(ops.cast(layer_norm(x), x.dtype), shift, scale))


class MMDiT(keras.Model):
    """The SD3 / SD3.5 transformer (diffusers' ``SD3Transformer2DModel``), NHWC latents.

    Args:
        config: sizes, blocks with a second attention, q/k norm.
        **kwargs: passed to ``keras.Model``; ``dtype`` (a policy name such as "mixed_bfloat16")
            also applies to every sublayer. Norms and the attention softmax stay float32.

    Example:
        >>> model = MMDiT(MMDiTConfig())
        >>> v = model(latents, timesteps, context, pooled)  # (B, H, W, 16) velocity
    """

    # The position table is a variable of the model itself (the original's top-level ``pos_embed``).
    LAYOUT = {"pos_embed": PLAIN}

    def __init__(self, config: MMDiTConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = cfg = config if config is not None else MMDiTConfig()
        dim = cfg.inner_dim
        with dtype_policy_scope(kwargs.get("dtype")):
            self.pos_embed = self.add_weight(
                shape=(1, cfg.pos_embed_max_size**2, dim), initializer="zeros", name="pos_embed"
            )
            self.x_embedder = PatchEmbed(cfg)
            self.t_embedder = EmbedMLP(256, dim)
            self.y_embedder = EmbedMLP(cfg.pooled_projection_dim, dim)
            self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
            self.joint_blocks = [JointBlock(cfg, i) for i in range(cfg.num_layers)]
            self.final_layer = FinalLayer(cfg)
        self.built = True

    def cropped_pos_embed(self, h: int, w: int):
        """The centre (h, w) patches of the position table, (1, h*w, D)."""
        m = self.config.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        table = ops.reshape(self.pos_embed, (1, m, m, -1))[:, top : top + h, left : left + w]
        return ops.reshape(table, (1, h * w, -1))

    def _check(self, latents, timesteps, context, pooled) -> None:
        cfg = self.config
        shape = tuple(latents.shape)
        if len(shape) != 4 or shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents have shape {shape}; this MMDiT expects (batch, height, width, {cfg.in_channels})"
            )
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        for side, size in zip(("height", "width"), shape[1:3], strict=True):
            if size is None:
                continue
            if size % p:
                raise ValueError(
                    f"latent {side}={size} is not allowed; it must be a multiple of patch_size={p}"
                )
            if size // p > m:
                raise ValueError(
                    f"latent {side}={size} is {size // p} patches; the position table allows at most "
                    f"pos_embed_max_size={m} ({m * p} latent pixels)"
                )
        if context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"context has width {context.shape[-1]}; this MMDiT expects joint_attention_dim="
                f"{cfg.joint_attention_dim}"
            )
        if pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(
                f"pooled embedding has width {pooled.shape[-1]}; this MMDiT expects "
                f"pooled_projection_dim={cfg.pooled_projection_dim}"
            )
        del timesteps

    def call(self, latents, timesteps, context, pooled, skip_layers=()):
        """Velocity for ``latents`` at ``timesteps`` (0..1000 scale).

        Args:
            latents: (B, H, W, in_channels).
            timesteps: (B,) float timesteps, sigma * 1000 for the flow-matching samplers.
            context: (B, T, joint_attention_dim) text tokens.
            pooled: (B, pooled_projection_dim) pooled text embedding.
            skip_layers: joint block indices to skip (diffusers' ``skip_layers``, skip-layer guidance).

        Returns:
            (B, H, W, out_channels) prediction.

        Raises:
            ValueError: for a size that is not a multiple of the patch size or exceeds the position
                table, or a context / pooled width the config does not have.
        """
        self._check(latents, timesteps, context, pooled)
        cfg = self.config
        p = cfg.patch_size
        b, hh, ww = ops.shape(latents)[0], latents.shape[1], latents.shape[2]
        h, w = hh // p, ww // p
        x = self.x_embedder(latents) + ops.cast(self.cropped_pos_embed(h, w), self.compute_dtype)
        t_emb = self.t_embedder(ops.cast(timestep_embedding(timesteps, 256), self.compute_dtype))
        c = t_emb + self.y_embedder(pooled)  # (B, D)
        context = self.context_embedder(context)
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = block(context, x, c)
        x = self.final_layer(x, c)  # (B, h*w, p*p*C)
        out = cfg.out_channels
        x = ops.reshape(x, (b, h, w, p, p, out))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, h, p, w, p, C)
        return ops.reshape(x, (b, h * p, w * p, out))
