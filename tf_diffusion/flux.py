"""Flux.1's transformer: double-stream blocks, then single-stream blocks, over rotary positions.

Computes what diffusers' ``FluxTransformer2DModel`` computes (Black Forest Labs' ``flux.model.Flux``
the same). Attribute paths are the original single file's keys (``double_blocks.3.img_attn.qkv``,
``single_blocks.0.linear1``, ``final_layer.adaLN_modulation.1``), without the
``model.diffusion_model.`` prefix some files add; diffusers folders load through
``tf_diffusion.weights.flux``. The model reads packed latents: 2x2 patches of the 16-channel latent
as 64-wide tokens (``pack_latents``), with (0, row, column) position ids (``latent_image_ids``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from tf_diffusion.layers import PLAIN, Linear, SiLU, attention, dtype_policy_scope, run_sequential
from tf_diffusion.mmdit import layer_norm, modulate
from tf_diffusion.unet import timestep_embedding

# Both sinusoidal embeddings (timestep, guidance) are 256 wide in every released model.
TIME_EMBED_DIM = 256


@dataclass(frozen=True)
class FluxConfig:
    """Flux.1 transformer sizes, with Black Forest Labs' ``FluxParams`` field names. Defaults: Flux.1 [dev].

    ``axes_dim``: the rotary widths of the (text, row, column) position axes, summing to the head
    width; ``guidance_embed``: the guidance-distilled models ([dev]) embed the guidance scale.
    """

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        for name in (
            "in_channels",
            "out_channels",
            "vec_in_dim",
            "context_in_dim",
            "hidden_size",
            "num_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FluxConfig.{name} must be a positive integer, got {value!r}")
        for name in ("depth", "depth_single_blocks"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FluxConfig.{name} must be a non-negative integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig.hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        object.__setattr__(self, "axes_dim", tuple(int(d) for d in self.axes_dim))
        if sum(self.axes_dim) != self.head_dim or any(d <= 0 or d % 2 for d in self.axes_dim):
            raise ValueError(
                f"FluxConfig.axes_dim={self.axes_dim} must be positive even widths summing to the head width "
                f"hidden_size / num_heads = {self.head_dim}"
            )
        if (
            not self.mlp_ratio > 0
            or int(self.hidden_size * self.mlp_ratio) != self.hidden_size * self.mlp_ratio
        ):
            raise ValueError(
                f"FluxConfig.mlp_ratio={self.mlp_ratio} must be positive and make hidden_size * mlp_ratio "
                f"a whole number (hidden_size={self.hidden_size})"
            )
        if self.theta <= 0:
            raise ValueError(f"FluxConfig.theta must be positive, got {self.theta!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **changes) -> FluxConfig:
        return dataclasses.replace(self, **changes)


# The published transformers: the same architecture, [schnell] (timestep-distilled) without guidance_in.
FLUX_PRESETS: dict[str, FluxConfig] = {
    "flux1-dev": FluxConfig(guidance_embed=True),
    "flux1-schnell": FluxConfig(guidance_embed=False),
}


def flux_config_from_state_dict(
    tensors: Mapping[str, object], axes_dim: tuple[int, ...] | None = None
) -> FluxConfig:
    """The FluxConfig of original-key tensors (a ``model.diffusion_model.`` prefix is allowed), from shapes.

    The head width comes from the q/k norm scale; the rotary split of it is not in the weights:
    ``axes_dim`` gives it, and None takes the released models' (16, 56, 56) when the head is 128 wide.

    Raises:
        ValueError: if the tensors are not a Flux transformer's, or ``axes_dim`` is needed and missing.
    """
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    needed = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
              "final_layer.linear.weight")  # fmt: skip
    absent = [k for k in needed if k not in tensors]
    if absent:
        raise ValueError(f"not a Flux transformer state dict: no {absent}")

    def depth(group: str) -> int:
        blocks = {int(k.split(".")[1]) for k in tensors if k.startswith(group + ".")}
        if blocks and blocks != set(range(max(blocks) + 1)):
            raise ValueError(f"{group} must be numbered 0..N-1, got {sorted(blocks)}")
        return len(blocks)

    depth_double, depth_single = depth("double_blocks"), depth("single_blocks")
    hidden, in_channels = (int(d) for d in tensors["img_in.weight"].shape)
    norm = (
        "double_blocks.0.img_attn.norm.query_norm.scale"
        if depth_double
        else "single_blocks.0.norm.query_norm.scale"
    )
    if norm not in tensors:
        raise ValueError(f"not a Flux transformer state dict: no {norm} (its shape gives the head width)")
    head = int(tensors[norm].shape[0])
    if hidden % head:
        raise ValueError(f"hidden width {hidden} is not a multiple of the head width {head}")
    if axes_dim is None:
        if head != 128:
            raise ValueError(
                f"heads are {head} wide, not the released 128: pass axes_dim= (summing to {head})"
            )
        axes_dim = (16, 56, 56)
    if depth_double:
        mlp_hidden = int(tensors["double_blocks.0.img_mlp.0.weight"].shape[0])
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in tensors
    elif depth_single:
        mlp_hidden = int(tensors["single_blocks.0.linear1.weight"].shape[0]) - 3 * hidden
        qkv_bias = True  # the single blocks' linear1 always has a bias
    else:
        mlp_hidden, qkv_bias = 4 * hidden, True
    return FluxConfig(
        in_channels=in_channels,
        out_channels=int(tensors["final_layer.linear.weight"].shape[0]),
        vec_in_dim=int(tensors["vector_in.in_layer.weight"].shape[1]),
        context_in_dim=int(tensors["txt_in.weight"].shape[1]),
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head,
        depth=depth_double,
        depth_single_blocks=depth_single,
        axes_dim=tuple(axes_dim),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in tensors,
    )


# ---- packing: latents (B, H, W, C) <-> tokens (B, H/2 * W/2, 4C), as diffusers' FluxPipeline ----


def pack_latents(latents):
    """NHWC latents (B, H, W, C) -> (B, H/2 * W/2, C * 4) tokens of 2x2 patches, row-major.

    Each token's features are ordered (channel, patch row, patch column), as diffusers'
    ``FluxPipeline._pack_latents`` orders them from NCHW latents.

    Raises:
        ValueError: for a height or width that is not even.
    """
    _b, h, w, c = latents.shape
    for side, size in (("height", h), ("width", w)):
        if size is not None and size % 2:
            raise ValueError(
                f"latent {side}={size} is not allowed; Flux packs 2x2 patches, so it must be even"
            )
    b = ops.shape(latents)[0]
    x = ops.reshape(latents, (b, h // 2, 2, w // 2, 2, c))
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4))  # (B, h, w, C, 2, 2)
    return ops.reshape(x, (b, (h // 2) * (w // 2), c * 4))


def unpack_latents(tokens, height: int, width: int):
    """Inverse of ``pack_latents``: (B, height/2 * width/2, 4C) tokens -> (B, height, width, C) latents.

    ``height`` and ``width`` are the latent's (the image's divided by the VAE factor, then rounded
    down to even, as diffusers' ``_unpack_latents`` does with the image size).

    Raises:
        ValueError: for odd sizes, or tokens that do not fit them.
    """
    if height % 2 or width % 2:
        raise ValueError(f"latent size {height}x{width} is not allowed; both sides must be even")
    _b, n, features = tokens.shape
    if (n is not None and n != (height // 2) * (width // 2)) or features % 4:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not unpack to a {height}x{width} latent: expected "
            f"{(height // 2) * (width // 2)} tokens of a width divisible by 4"
        )
    b, c = ops.shape(tokens)[0], features // 4
    x = ops.reshape(tokens, (b, height // 2, width // 2, c, 2, 2))
    x = ops.transpose(x, (0, 1, 4, 2, 5, 3))  # (B, h, 2, w, 2, C)
    return ops.reshape(x, (b, height, width, c))


def latent_image_ids(grid_height: int, grid_width: int) -> np.ndarray:
    """Position ids (grid_height * grid_width, 3) float32 of packed tokens: (0, row, column), row-major.

    The grid is the packed one (half the latent's sides), as diffusers'
    ``FluxPipeline._prepare_latent_image_ids`` takes it.
    """
    rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1)
    return ids.reshape(-1, 3).astype(np.float32)


def text_ids(num_tokens: int) -> np.ndarray:
    """Position ids (num_tokens, 3) of text tokens: all zeros (every text token sits at the origin)."""
    return np.zeros((num_tokens, 3), np.float32)


# ---- rotary position embedding ----


def rope_angles(ids, axes_dim: tuple[int, ...], theta: float):
    """Rotation angles (B or 1, L, head_dim / 2) float32 of position ids (L, n_axes) or (B, L, n_axes).

    Axis ``i`` of the ids turns ``axes_dim[i] / 2`` feature pairs at frequencies
    ``theta ** (-2j / axes_dim[i])``; the axes' pairs follow each other (flux ``EmbedND``).
    """
    ids = ops.cast(ids, "float32")
    if len(ids.shape) == 2:
        ids = ids[None]
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(
            f"position ids have {ids.shape[-1]} axes; this model's axes_dim={axes_dim} needs {len(axes_dim)}"
        )
    parts = []
    for i, dim in enumerate(axes_dim):
        # The frequencies in float64 on the host, cast once (the reference computes them in float64).
        freqs = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
        parts.append(ids[..., i : i + 1] * ops.convert_to_tensor(freqs)[None, None])
    return ops.concatenate(parts, axis=-1)


@dataclass(frozen=True)
class Rotary:
    """cos and sin of the rotation angles, (B or 1, L, 1, head_dim / 2) float32.

    A plain object, not a tensor, so that a block's call (which casts floating tensor arguments to
    its compute dtype under mixed precision) hands them on in float32, as the reference keeps them.
    """

    cos: object
    sin: object

    def tokens(self, start: int | None = None, stop: int | None = None) -> Rotary:
        return Rotary(self.cos[:, start:stop], self.sin[:, start:stop])


def apply_rope(x, cos, sin):
    """Rotate each consecutive feature pair (2j, 2j+1) of (B, L, heads, D) by its angle, in float32."""
    shape = ops.shape(x)
    pairs = ops.reshape(ops.cast(x, "float32"), (shape[0], shape[1], shape[2], -1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]  # (B, L, heads, D/2)
    rotated = ops.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return ops.reshape(rotated, shape)


# ---- layers ----


class GELUTanh(keras.layers.Layer):
    """Parameter-free placeholder for nn.GELU(approximate="tanh"), keeping Sequential indices aligned."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights: nothing to build

    def call(self, x):
        return ops.gelu(x, approximate=True)


class ScaleRMSNorm(keras.layers.Layer):
    """flux's RMSNorm: learned ``scale`` over the last axis, eps 1e-6, in float32."""

    LAYOUT = {"scale": PLAIN}

    def __init__(self, dim: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.scale = self.add_weight(shape=(dim,), initializer="ones", name="scale")
        self.built = True

    def call(self, x):
        x = ops.cast(x, "float32")
        return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-6) * self.scale


class QKNorm(keras.layers.Layer):
    """``norm``: per-head RMS norms of the queries and the keys."""

    def __init__(self, head_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.query_norm = ScaleRMSNorm(head_dim)
        self.key_norm = ScaleRMSNorm(head_dim)
        self.built = True


class MLPEmbedder(keras.layers.Layer):
    """``in_layer`` -> SiLU -> ``out_layer`` (the timestep, guidance and pooled-text embedders)."""

    def __init__(self, dim_in: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.in_layer = Linear(dim_in, dim)
        self.out_layer = Linear(dim, dim)
        self.built = True

    def call(self, x):
        return self.out_layer(ops.silu(self.in_layer(x)))


class Modulation(keras.layers.Layer):
    """``lin`` of SiLU(vec): (shift, scale, gate) once (single blocks) or twice (double blocks)."""

    def __init__(self, dim: int, double: bool, **kwargs):
        super().__init__(**kwargs)
        self.chunks = 6 if double else 3
        self.lin = Linear(dim, self.chunks * dim)
        self.built = True

    def call(self, vec):  # (B, D) -> chunks x (B, D)
        return ops.split(self.lin(ops.silu(vec)), self.chunks, axis=-1)


class SelfAttention(keras.layers.Layer):
    """One stream's attention weights in a double block: fused ``qkv``, ``norm`` (q/k RMS), ``proj``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = Linear(dim, dim)
        self.built = True


def _split_heads(x, heads: int):  # (B, L, D) -> (B, L, heads, D / heads)
    shape = ops.shape(x)
    return ops.reshape(x, (shape[0], shape[1], heads, x.shape[-1] // heads))


def _normed_rotated(q, k, norm: QKNorm, heads: int, rope: Rotary):
    """(B, L, D) queries and keys after the per-head q/k norms and the rotation, in their dtype again."""
    dtype = q.dtype
    shape = ops.shape(q)
    merge = (shape[0], shape[1], q.shape[-1])
    q = apply_rope(norm.query_norm(_split_heads(q, heads)), rope.cos, rope.sin)
    k = apply_rope(norm.key_norm(_split_heads(k, heads)), rope.cos, rope.sin)
    return ops.reshape(ops.cast(q, dtype), merge), ops.reshape(ops.cast(k, dtype), merge)


class DoubleStreamBlock(keras.layers.Layer):
    """``double_blocks.N``: image and text streams, each with its own weights, in one joint attention."""

    def __init__(self, config: FluxConfig, **kwargs):
        super().__init__(**kwargs)
        dim, heads = config.hidden_size, config.num_heads
        self.heads = heads
        mlp = config.mlp_hidden_dim
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, heads, config.qkv_bias)
        # img_mlp.1 / txt_mlp.1 are nn.GELU(approximate="tanh") in the original.
        self.img_mlp = [Linear(dim, mlp), GELUTanh(), Linear(mlp, dim)]
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, heads, config.qkv_bias)
        self.txt_mlp = [Linear(dim, mlp), GELUTanh(), Linear(mlp, dim)]
        self.built = True

    def call(self, img, txt, vec, rope: Rotary):  # img (B, N, D), txt (B, T, D), vec (B, D)
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = ops.split(
            self.img_attn.qkv(_modulated(img, img_mod[0], img_mod[1])), 3, axis=-1
        )
        txt_q, txt_k, txt_v = ops.split(
            self.txt_attn.qkv(_modulated(txt, txt_mod[0], txt_mod[1])), 3, axis=-1
        )
        t = ops.shape(txt)[1]
        # Each stream has its own q/k norms, so they (and the rotation) run before the tokens are
        # joined; text first, as the position ids are (txt, img).
        txt_q, txt_k = _normed_rotated(txt_q, txt_k, self.txt_attn.norm, self.heads, rope.tokens(stop=t))
        img_q, img_k = _normed_rotated(img_q, img_k, self.img_attn.norm, self.heads, rope.tokens(start=t))
        joint = attention(
            ops.concatenate([txt_q, img_q], axis=1),
            ops.concatenate([txt_k, img_k], axis=1),
            ops.concatenate([txt_v, img_v], axis=1),
            self.heads,
        )
        txt_attn, img_attn = joint[:, :t], joint[:, t:]
        img = img + img_mod[2][:, None] * self.img_attn.proj(img_attn)
        img = img + img_mod[5][:, None] * run_sequential(
            self.img_mlp, _modulated(img, img_mod[3], img_mod[4])
        )
        txt = txt + txt_mod[2][:, None] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod[5][:, None] * run_sequential(
            self.txt_mlp, _modulated(txt, txt_mod[3], txt_mod[4])
        )
        return img, txt


def _modulated(x, shift, scale):
    """(1 + scale) * LayerNorm(x) + shift (no affine, eps 1e-6; the norm in float32)."""
    return modulate(ops.cast(layer_norm(x), x.dtype), shift, scale)


class SingleStreamBlock(keras.layers.Layer):
    """``single_blocks.N``: attention and MLP side by side over the joint tokens, one fused input linear.

    ``linear1`` makes q, k, v and the MLP's hidden features at once; ``linear2`` maps the attention
    output and the activated MLP features, concatenated, back to the width.
    """

    def __init__(self, config: FluxConfig, **kwargs):
        super().__init__(**kwargs)
        dim = config.hidden_size
        self.heads, self.dim, self.mlp_hidden = config.num_heads, dim, config.mlp_hidden_dim
        self.linear1 = Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(config.head_dim)
        self.modulation = Modulation(dim, double=False)
        self.built = True

    def call(self, x, vec, rope: Rotary):  # x (B, T + N, D)
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(_modulated(x, shift, scale))
        d = self.dim
        q, k, v, mlp = h[..., :d], h[..., d : 2 * d], h[..., 2 * d : 3 * d], h[..., 3 * d :]
        q, k = _normed_rotated(q, k, self.norm, self.heads, rope)
        attn = attention(q, k, v, self.heads)
        out = self.linear2(ops.concatenate([attn, ops.gelu(mlp, approximate=True)], axis=-1))
        return x + gate[:, None] * out


class LastLayer(keras.layers.Layer):
    """``final_layer``: adaLN (shift, scale) of the image tokens, then a linear to the output channels."""

    def __init__(self, config: FluxConfig, **kwargs):
        super().__init__(**kwargs)
        dim = config.hidden_size
        # adaLN_modulation.0 is nn.SiLU in the original.
        self.adaLN_modulation = [SiLU(), Linear(dim, 2 * dim)]
        self.linear = Linear(dim, config.out_channels)
        self.built = True

    def call(self, x, vec):
        shift, scale = ops.split(self.adaLN_modulation[1](self.adaLN_modulation[0](vec)), 2, axis=-1)
        return self.linear(_modulated(x, shift, scale))


class FluxTransformer(keras.Model):
    """The Flux.1 transformer (diffusers' ``FluxTransformer2DModel``) on packed latent tokens.

    Args:
        config: sizes; ``FLUX_PRESETS["flux1-dev"]`` or ``["flux1-schnell"]`` for the released models.
        **kwargs: passed to ``keras.Model``; ``dtype`` (a policy name such as "mixed_bfloat16")
            also applies to every sublayer. Norms, the rotary embedding and the softmax stay float32.

    Example:
        >>> model = FluxTransformer(FLUX_PRESETS["flux1-schnell"])
        >>> tokens = pack_latents(latents)  # (B, H/2 * W/2, 64)
        >>> v = model(tokens, latent_image_ids(H // 2, W // 2), t5, text_ids(t5.shape[1]), sigmas, pooled)
    """

    def __init__(self, config: FluxConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = cfg = config if config is not None else FluxConfig()
        dim = cfg.hidden_size
        with dtype_policy_scope(kwargs.get("dtype")):
            self.img_in = Linear(cfg.in_channels, dim)
            self.time_in = MLPEmbedder(TIME_EMBED_DIM, dim)
            self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, dim) if cfg.guidance_embed else None
            self.txt_in = Linear(cfg.context_in_dim, dim)
            self.double_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.depth)]
            self.single_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks)]
            self.final_layer = LastLayer(cfg)
        self.built = True

    def _check(self, img, img_ids, txt, txt_ids, y, guidance) -> None:
        cfg = self.config
        widths = (("image tokens", img, cfg.in_channels, "in_channels"),
                  ("text tokens", txt, cfg.context_in_dim, "context_in_dim"),
                  ("pooled embedding", y, cfg.vec_in_dim, "vec_in_dim"))  # fmt: skip
        for what, x, width, field in widths:
            if x.shape[-1] != width:
                raise ValueError(f"{what} have width {x.shape[-1]}; this model expects {field}={width}")
        if len(img.shape) != 3 or len(txt.shape) != 3:
            raise ValueError(
                f"image and text tokens must be (batch, tokens, width), got shapes {tuple(img.shape)} and "
                f"{tuple(txt.shape)}"
            )
        for what, ids, x in (("img_ids", img_ids, img), ("txt_ids", txt_ids, txt)):
            n, count = ids.shape[-2], x.shape[1]
            if len(ids.shape) not in (2, 3) or (n is not None and count is not None and n != count):
                raise ValueError(
                    f"{what} of shape {tuple(ids.shape)} do not fit {count} tokens; expected ({count}, "
                    f"{len(cfg.axes_dim)}) or (batch, {count}, {len(cfg.axes_dim)})"
                )
        if len(txt_ids.shape) != len(img_ids.shape):
            raise ValueError(
                f"txt_ids and img_ids need the same rank, got shapes {tuple(txt_ids.shape)} and "
                f"{tuple(img_ids.shape)}"
            )
        if cfg.guidance_embed and guidance is None:
            raise ValueError(
                "this model is guidance-distilled (guidance_embed=True): pass guidance= (B,) scales"
            )
        if not cfg.guidance_embed and guidance is not None:
            raise ValueError("this model has no guidance embedder (guidance_embed=False): pass guidance=None")

    def call(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """Velocity of the packed latent tokens ``img`` at ``timesteps``.

        Args:
            img: (B, N, in_channels) packed latent tokens.
            img_ids: (N, 3) or (B, N, 3) their position ids (``latent_image_ids``).
            txt: (B, T, context_in_dim) T5 tokens.
            txt_ids: (T, 3) or (B, T, 3) their position ids (``text_ids``: zeros).
            timesteps: (B,) sigmas in [0, 1]; embedded at 1000 times their value, as diffusers.
            y: (B, vec_in_dim) pooled CLIP embedding.
            guidance: (B,) guidance scales for a guidance-distilled model ([dev]), else None; also
                embedded at 1000 times their value.

        Returns:
            (B, N, out_channels) prediction.

        Raises:
            ValueError: for widths the config does not have, ids that do not fit the tokens, or
                guidance given to a model without a guidance embedder (or missing for one with it).
        """
        self._check(img, img_ids, txt, txt_ids, y, guidance)
        cfg = self.config
        dtype = self.compute_dtype
        img = self.img_in(img)

        def embedded(values):  # (B,) -> (B, 256) sinusoids of values * 1000
            # Scaled in the compute dtype, as diffusers scales them in the hidden states' dtype.
            return ops.cast(timestep_embedding(ops.cast(values, dtype) * 1000.0, TIME_EMBED_DIM), dtype)

        vec = self.time_in(embedded(timesteps))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(embedded(guidance))
        vec = vec + self.vector_in(y)  # (B, D)
        txt = self.txt_in(txt)
        ids = ops.concatenate([ops.cast(txt_ids, "float32"), ops.cast(img_ids, "float32")], axis=-2)
        angles = rope_angles(ids, cfg.axes_dim, cfg.theta)[:, :, None]  # (B or 1, T + N, 1, head_dim / 2)
        rope = Rotary(ops.cos(angles), ops.sin(angles))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope=rope)
        t = ops.shape(txt)[1]
        x = ops.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = block(x, vec, rope=rope)
        return self.final_layer(x[:, t:], vec)
