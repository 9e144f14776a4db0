"""IP-Adapter's image-projection models: image features to extra tokens for cross-attention.

Two kinds, named as the published files name them (``image_proj.*`` in ``ip-adapter_sd15.bin`` /
``.safetensors``), so their weights load by the attribute walk alone:

- ``ImageProjModel`` (the base adapters): the CLIP ``image_embeds`` through ``proj`` (one linear
  layer to ``num_tokens`` x cross-attention width) and ``norm``;
- ``Resampler`` (the "plus" adapters): learned ``latents`` queries that attend, through
  ``depth`` perceiver blocks, to the projected penultimate CLIP hidden states and to themselves;
  ``proj_out`` and ``norm_out`` give the tokens. Block ``i`` is ``layers.i.0`` (attention:
  ``norm1`` on the image features, ``norm2`` on the latents, ``to_q``, a fused ``to_kv``, ``to_out``)
  and ``layers.i.1`` (feed-forward: LayerNorm, Linear, GELU, Linear at indices 0, 1, 3).

Both compute what diffusers' ``ImageProjection`` and ``IPAdapterPlusImageProjection`` compute after
diffusers renames the published keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras
from keras import ops

from tf_diffusion.layers import PLAIN, LayerNorm, Linear, attention

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which both models use


@dataclasses.dataclass(frozen=True)
class ImageProjConfig:
    """The base adapters' projection: ``image_embed_dim`` -> ``num_tokens`` x ``cross_attention_dim``."""

    image_embed_dim: int = 1024
    cross_attention_dim: int = 768
    num_tokens: int = 4


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """The "plus" adapters' perceiver. Defaults: ``ip-adapter-plus_sd15`` (ViT-H features)."""

    embed_dim: int = 1280  # width of the CLIP hidden states it reads
    hidden_dim: int = 768
    output_dim: int = 768  # the UNet's cross-attention width
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    ff_mult: int = 4


class ImageProjModel(keras.layers.Layer):
    """``image_proj`` of the base adapters: (B, image_embed_dim) -> (B, num_tokens, cross_attention_dim)."""

    def __init__(self, config: ImageProjConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.proj = Linear(config.image_embed_dim, config.num_tokens * config.cross_attention_dim)
        self.norm = LayerNorm(config.cross_attention_dim, LAYER_NORM_EPS)
        self.built = True

    def call(self, image_embeds):
        x = self.proj(image_embeds)
        x = ops.reshape(x, (ops.shape(x)[0], self.config.num_tokens, self.config.cross_attention_dim))
        return self.norm(x)


class PerceiverAttention(keras.layers.Layer):
    """Latent queries attend to the image features and the latents together."""

    def __init__(self, dim: int, dim_head: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = LayerNorm(dim, LAYER_NORM_EPS)
        self.norm2 = LayerNorm(dim, LAYER_NORM_EPS)
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim, 2 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)
        self.built = True

    def call(self, x, latents):  # x (B, N, D) features, latents (B, Q, D)
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = ops.split(self.to_kv(ops.concatenate([x, latents], axis=1)), 2, axis=-1)
        return self.to_out(attention(q, k, v, self.heads))


class Resampler(keras.layers.Layer):
    """``image_proj`` of the "plus" adapters: (B, N, embed_dim) -> (B, num_queries, output_dim)."""

    LAYOUT = {"latents": PLAIN}

    def __init__(self, config: ResamplerConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        d = config.hidden_dim
        self.latents = self.add_weight(
            shape=(1, config.num_queries, d),
            initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(d)),
            name="latents",
        )
        self.proj_in = Linear(config.embed_dim, d)
        self.proj_out = Linear(d, config.output_dim)
        self.norm_out = LayerNorm(config.output_dim, LAYER_NORM_EPS)
        inner = d * config.ff_mult
        # Block i: [attention, nn.Sequential(LayerNorm, Linear, GELU, Linear)]; GELU holds no weights.
        self.layers = [
            [
                PerceiverAttention(d, config.dim_head, config.heads),
                [
                    LayerNorm(d, LAYER_NORM_EPS),
                    Linear(d, inner, bias=False),
                    None,
                    Linear(inner, d, bias=False),
                ],
            ]
            for _ in range(config.depth)
        ]
        self.built = True

    def call(self, features):
        x = self.proj_in(features)
        latents = ops.broadcast_to(
            ops.cast(self.latents, x.dtype), (ops.shape(x)[0], *self.latents.shape[1:])
        )
        for attn, (norm, fc1, _, fc2) in self.layers:
            latents = attn(x, latents) + latents
            latents = fc2(ops.gelu(fc1(norm(latents)), approximate=False)) + latents
        return self.norm_out(self.proj_out(latents))


def infer_image_proj(tensors: Mapping) -> ImageProjModel | Resampler:
    """Build the projection model an adapter's ``image_proj`` tensors (keys without the prefix) fit.

    Raises:
        ValueError: for tensors of neither kind (FaceID and "full" adapters are not supported).
    """
    config = image_proj_config(tensors)
    return ImageProjModel(config) if isinstance(config, ImageProjConfig) else Resampler(config)


def image_proj_config(tensors: Mapping) -> ImageProjConfig | ResamplerConfig:
    """The config an adapter's ``image_proj`` tensors fit, from their shapes alone (see ``infer_image_proj``)."""
    if "proj.weight" in tensors and "norm.weight" in tensors:
        out_width, embed = tensors["proj.weight"].shape
        width = tensors["norm.weight"].shape[0]
        if out_width % width:
            raise ValueError(
                f"image_proj: proj.weight {tuple(tensors['proj.weight'].shape)} is not a multiple of norm width {width}"
            )
        return ImageProjConfig(int(embed), int(width), int(out_width // width))
    if "latents" in tensors and "proj_in.weight" in tensors:
        _, queries, hidden = tensors["latents"].shape
        depth = len({k.split(".")[1] for k in tensors if k.startswith("layers.")})
        inner = tensors["layers.0.0.to_q.weight"].shape[0]
        ff_inner = tensors["layers.0.1.1.weight"].shape[0]
        dim_head = 64  # not stored; every published "plus" adapter uses 64 (diffusers assumes it too)
        if inner % dim_head:
            raise ValueError(f"image_proj: to_q width {inner} is not a multiple of the 64-wide heads")
        return ResamplerConfig(
            embed_dim=int(tensors["proj_in.weight"].shape[1]),
            hidden_dim=int(hidden),
            output_dim=int(tensors["proj_out.weight"].shape[0]),
            depth=depth,
            dim_head=dim_head,
            heads=int(inner // dim_head),
            num_queries=int(queries),
            ff_mult=int(ff_inner // hidden),
        )
    raise ValueError(
        "image_proj holds neither an ImageProjModel (proj, norm) nor a Resampler (latents, proj_in, ...); "
        f"keys: {sorted(tensors)[:6]}"
    )


__all__ = [
    "ImageProjConfig",
    "ImageProjModel",
    "Resampler",
    "ResamplerConfig",
    "image_proj_config",
    "infer_image_proj",
]
