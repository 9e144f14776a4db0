"""AutoencoderKL: the VAE that maps images to Stable Diffusion latents and back.

A port of CompVis ``ldm/modules/diffusionmodules/model.py`` (Encoder, Decoder,
ResnetBlock, AttnBlock) and ``ldm/models/autoencoder.py`` (AutoencoderKL,
DiagonalGaussianDistribution). Attribute paths equal the original
single-file keys (``encoder.down.0.block.1.norm1.weight``); diffusers-format
weights go through ``tf_diffusion.weights.diffusers_vae`` first.

``decode`` takes UNscaled latents, like diffusers' ``vae.decode``: the
pipeline multiplies encoder samples by ``VAEConfig.scaling_factor`` and
divides by it before decoding.
"""

from __future__ import annotations

import keras
from keras import ops

from tf_diffusion.config import VAEConfig
from tf_diffusion.layers import Conv2d, GroupNorm, attention, dtype_policy_scope, upsample_nearest
from tf_diffusion.layout import vae_layout


class ResnetBlock(keras.layers.Layer):
    """norm -> silu -> conv, twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        groups, eps = config.norm_groups, config.norm_eps
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        # The original only creates the shortcut conv when the width changes.
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.built = True

    def call(self, x):  # (B, H, W, C_in) -> (B, H, W, C_out)
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(keras.layers.Layer):
    """Single-head self-attention over all pixels, with 1x1 conv projections."""

    def __init__(self, channels: int, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        self.norm = GroupNorm(config.norm_groups, channels, config.norm_eps)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)
        self.built = True

    def call(self, x):  # (B, H, W, C)
        shape = ops.shape(x)
        h = self.norm(x)

        def tokens(t):  # (B, H, W, C) -> (B, H*W, C)
            return ops.reshape(t, (shape[0], -1, shape[3]))

        h = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)), num_heads=1)
        return x + self.proj_out(ops.reshape(h, shape))


class Downsample(keras.layers.Layer):
    """Stride-2 3x3 conv after padding right and bottom only, as the original does."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=(0, 1, 0, 1))
        self.built = True

    def call(self, x):  # (B, H, W, C) -> (B, H/2, W/2, C)
        return self.conv(x)


class Upsample(keras.layers.Layer):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = Conv2d(channels, channels, 3, padding=1)
        self.built = True

    def call(self, x):  # (B, H, W, C) -> (B, 2H, 2W, C)
        return self.conv(upsample_nearest(x))


class MidBlock(keras.layers.Layer):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, channels: int, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)
        self.built = True

    def call(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(keras.layers.Layer):
    """One resolution level: ``block`` list plus an optional ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list, downsample=None, upsample=None, **kwargs):
        super().__init__(**kwargs)
        self.block = blocks
        # The original has no resampler attribute on the last encoder / first decoder level;
        # None keeps the key out of the state dict.
        self.downsample = downsample
        self.upsample = upsample
        self.built = True

    def call(self, x):
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _levels(config: VAEConfig, section: str) -> list:
    """The encoder's ``down`` or the decoder's ``up`` levels, indexed by level, from the block layout."""
    blocks: dict[int, list] = {}
    resample: dict[int, object] = {}
    levels = f"{section}.{'down' if section == 'encoder' else 'up'}."
    for b in vae_layout(config):
        if not b.path.startswith(levels):  # the mid block and the convs are not in a level
            continue
        if b.kind == "res":
            blocks.setdefault(b.level, []).append(ResnetBlock(b.in_channels, b.out_channels, config))
        elif b.kind == "down":
            resample[b.level] = Downsample(b.out_channels)
        elif b.kind == "up":
            resample[b.level] = Upsample(b.out_channels)
    if section == "encoder":
        return [Level(blocks[i], downsample=resample.get(i)) for i in sorted(blocks)]
    return [Level(blocks[i], upsample=resample.get(i)) for i in sorted(blocks)]


class Encoder(keras.layers.Layer):
    """Images (B, H, W, in_channels) -> Gaussian moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        ch, mult = config.base_channels, config.channel_mult
        self.conv_in = Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = _levels(config, "encoder")
        block_in = ch * mult[-1]
        self.mid = MidBlock(block_in, config)
        self.norm_out = GroupNorm(config.norm_groups, block_in, config.norm_eps)
        self.conv_out = Conv2d(block_in, 2 * config.latent_channels, 3, padding=1)
        self.built = True

    def call(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(ops.silu(self.norm_out(x)))


class Decoder(keras.layers.Layer):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    def __init__(self, config: VAEConfig, **kwargs):
        super().__init__(**kwargs)
        ch, mult = config.base_channels, config.channel_mult
        block_in = ch * mult[-1]
        self.conv_in = Conv2d(config.latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, config)
        # up[i] is level i (as in the original, which builds them deepest first and inserts
        # each at the front); call() runs them from the last level down to 0.
        self.up = _levels(config, "decoder")
        block_in = ch * mult[0]
        self.norm_out = GroupNorm(config.norm_groups, block_in, config.norm_eps)
        self.conv_out = Conv2d(block_in, config.out_channels, 3, padding=1)
        self.built = True

    def call(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(ops.silu(self.norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), computed in float32.

    Attributes:
        mean: (B, h, w, latent_channels) posterior mean.
        logvar: log-variance, clamped to [-30, 20] as the reference does.
        std: exp(logvar / 2).
        var: exp(logvar).
    """

    def __init__(self, moments):
        # Split and exponentiate in float32 so mixed precision does not round the variance.
        moments = ops.cast(moments, "float32")
        self.mean, logvar = ops.split(moments, 2, axis=-1)
        self.logvar = ops.clip(logvar, -30.0, 20.0)
        self.std = ops.exp(0.5 * self.logvar)
        self.var = ops.exp(self.logvar)

    def sample(self, seed=None, noise=None):
        """Draw mean + std * noise.

        Args:
            seed: an int or ``keras.random.SeedGenerator`` for drawing the noise.
            noise: standard normal noise shaped like ``mean``; overrides ``seed``.

        Returns:
            (B, h, w, latent_channels) float32 latents (unscaled).

        Raises:
            ValueError: if ``noise`` has the wrong shape.
        """
        if noise is None:
            noise = keras.random.normal(ops.shape(self.mean), seed=seed)
        else:
            noise = ops.convert_to_tensor(noise)
            if tuple(noise.shape) != tuple(self.mean.shape):
                raise ValueError(
                    f"noise has shape {tuple(noise.shape)}; it must match the latents' "
                    f"shape {tuple(self.mean.shape)}"
                )
        return self.mean + self.std * ops.cast(noise, "float32")

    def mode(self):
        """The posterior mean, (B, h, w, latent_channels)."""
        return self.mean


class AutoencoderKL(keras.Model):
    """The Stable Diffusion VAE (KL-regularised autoencoder), NHWC.

    Loads with ``tf_diffusion.weights.load_state_dict`` from original LDM keys
    (``encoder.…``, ``decoder.…``, ``quant_conv``, ``post_quant_conv``, with
    any ``first_stage_model.`` prefix removed by the caller). Mixed precision
    follows ``dtype`` or else the global Keras dtype policy; group norms, the
    attention softmax and the posterior stay float32.

    Args:
        config: channel widths, levels and norm settings.
        **kwargs: passed to ``keras.Model``; ``dtype`` (a policy name such as
            "mixed_bfloat16") also applies to every sublayer.

    Example:
        >>> vae = AutoencoderKL(VAEConfig())
        >>> latents = vae.encode(images).sample(seed=0) * vae.config.scaling_factor
        >>> images = vae.decode(latents / vae.config.scaling_factor)
    """

    def __init__(self, config: VAEConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config if config is not None else VAEConfig()
        latent = self.config.latent_channels
        with dtype_policy_scope(kwargs.get("dtype")):
            self.encoder = Encoder(self.config)
            self.decoder = Decoder(self.config)
            # SD3's VAE has neither (VAEConfig.use_quant_conv); None keeps the keys out of the state dict.
            quant = self.config.use_quant_conv
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1) if quant else None
            self.post_quant_conv = Conv2d(latent, latent, 1) if quant else None
        self.built = True

    def _check(self, x, name: str, channels: int, multiple: int):
        x = ops.convert_to_tensor(x)
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise ValueError(f"{name} must have shape (batch, height, width, channels), got shape {shape}")
        if shape[3] != channels:
            raise ValueError(f"{name} has {shape[3]} channels; this VAE expects {channels} (NHWC layout)")
        for side, size in zip(("height", "width"), shape[1:3], strict=True):
            if size is not None and (size < multiple or size % multiple):
                raise ValueError(
                    f"{name} {side}={size} is not allowed; it must be a positive multiple of {multiple}"
                )
        if not keras.backend.is_float_dtype(x.dtype):
            raise ValueError(f"{name} must be a float tensor, got dtype {x.dtype}")
        return x

    def encode(self, images) -> DiagonalGaussian:
        """Encode images into the latent posterior.

        Args:
            images: (B, H, W, in_channels) float images in [-1, 1]; H and W must be
                multiples of ``config.downsample_factor`` (8 for SD).

        Returns:
            A ``DiagonalGaussian`` over (B, H/f, W/f, latent_channels) unscaled latents.

        Raises:
            ValueError: for a wrong rank, channel count, size or dtype.
        """
        cfg = self.config
        images = self._check(images, "images", cfg.in_channels, cfg.downsample_factor)
        moments = self.encoder(images)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, latents):
        """Decode unscaled latents into images.

        Args:
            latents: (B, h, w, latent_channels) float latents, NOT multiplied by
                ``scaling_factor`` (divide the UNet's latents by it first).

        Returns:
            (B, h*f, w*f, out_channels) images, roughly in [-1, 1] (not clipped).

        Raises:
            ValueError: for a wrong rank, channel count or dtype.
        """
        latents = self._check(latents, "latents", self.config.latent_channels, 1)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def call(self, images):
        """Reconstruct images through the posterior mean: decode(encode(images).mode())."""
        return self.decode(self.encode(images).mode())
