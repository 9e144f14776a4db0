"""The ControlNet encoder (SD 1.x, SD 2.x, SDXL) on NHWC tensors.

Reference: lllyasviel's ``cldm/cldm.py`` (ControlNet: a copy of the UNet's input and middle
blocks, the hint encoder ``input_hint_block``, one zero convolution per input block
``zero_convs`` and ``middle_block_out``) and diffusers' ``ControlNetModel``, which computes the
same function. Attribute paths equal the keys under ``control_model.`` in an original file, so
``control_v11p_sd15_*.pth`` / ``.safetensors`` load with no mapping table; the blocks are built from
``layout.unet_layout`` with the UNet's own layer classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from tf_diffusion.config import UNetConfig
from tf_diffusion.layers import Conv2d, Linear, SiLU, dtype_policy_scope, run_sequential
from tf_diffusion.layout import unet_layout
from tf_diffusion.unet import _make_layer, _run_block, _shape, timestep_embedding


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the encoder half of a UNet plus its hint encoder. Defaults: SD 1.5 (``control_v11p_sd15_*``).

    Attributes:
        unet: the architecture of the UNet whose input and middle blocks it copies (its
            ``out_channels`` is not used).
        conditioning_channels: channels of the hint image (3 for RGB hints).
        hint_channels: widths of the hint encoder's levels; each level after the first halves the
            size (diffusers' ``conditioning_embedding_out_channels``; the originals use (16, 32, 96, 256),
            which takes 512 pixels to 64 latents).
        global_pool_conditions: average every residual over its spatial axes (the "shuffle"
            ControlNets); such nets also always run in guess mode, as diffusers does.
    """

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def __post_init__(self):
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"ControlNetConfig.unet must be a UNetConfig, got {type(self.unet).__name__}")
        c = self.conditioning_channels
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise ValueError(f"ControlNetConfig.conditioning_channels must be a positive integer, got {c!r}")
        hint = self.hint_channels
        if (
            not isinstance(hint, tuple)
            or not hint
            or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hint)
        ):
            raise ValueError(
                f"ControlNetConfig.hint_channels must be a tuple of positive integers, got {hint!r}"
            )

    @property
    def hint_factor(self) -> int:
        """How many hint pixels make one latent pixel (8 for the originals)."""
        return 2 ** (len(self.hint_channels) - 1)

    @property
    def num_residuals(self) -> int:
        """Number of down residuals (one per input block; the mid residual comes besides)."""
        return sum(1 for b in unet_layout(self.unet) if b.section == "input" and b.position == 0)


class ControlNet(keras.Model):
    """The ControlNet encoder, built from a ``ControlNetConfig``.

    ``ControlNet.from_pretrained(path)`` reads diffusers ``ControlNetModel`` folders and original
    single files (``tf_diffusion.weights.controlnet``).

    Args:
        config: the architecture; the default is SD 1.5.
        **kwargs: passed to ``keras.Model`` (e.g. ``name``, ``dtype``).

    Example:
        >>> net = ControlNet(ControlNetConfig())
        >>> down, mid = net(latents, 999, context, hint)  # hint (B, 512, 512, 3) in [0, 1]
    """

    def __init__(self, config: ControlNetConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config if config is not None else ControlNetConfig()
        cfg = self.config.unet
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        # As UNetModel: the timestep must reach the sinusoid unrounded.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

        with dtype_policy_scope(kwargs.get("dtype")):
            # time_embed.1 is nn.SiLU in the reference.
            self.time_embed = [Linear(mc, emb_dim), SiLU(), Linear(emb_dim, emb_dim)]
            if cfg.adm_in_channels is not None:
                self.label_emb = [[Linear(cfg.adm_in_channels, emb_dim), SiLU(), Linear(emb_dim, emb_dim)]]
            # cldm's input_hint_block: conv, SiLU, then per level a conv and a stride-2 conv, each
            # followed by SiLU, and the zero-initialised conv to the model width (SiLUs keep the
            # nn.Sequential indices: convs sit at even ones).
            hint = self.config.hint_channels
            layers = [Conv2d(self.config.conditioning_channels, hint[0], 3, padding=1), SiLU()]
            for cin, cout in zip(hint[:-1], hint[1:], strict=True):
                layers += [Conv2d(cin, cin, 3, padding=1), SiLU()]
                layers += [Conv2d(cin, cout, 3, stride=2, padding=1), SiLU()]
            layers.append(Conv2d(hint[-1], mc, 3, padding=1))
            self.input_hint_block = layers

            inputs, middle, widths = [], [], []
            for block in unet_layout(cfg):
                if block.section == "output":
                    continue
                layer = _make_layer(block, cfg, emb_dim)
                if block.section == "middle":
                    middle.append(layer)
                elif block.position == 0:
                    inputs.append([layer])
                    widths.append(block.out_channels)
                else:
                    inputs[-1].append(layer)
            self.input_blocks, self.middle_block = inputs, middle
            # One zero conv (1x1) per input block's output, and one after the middle block.
            self.zero_convs = [[Conv2d(w, w, 1)] for w in widths]
            deepest = cfg.channel_mult[-1] * mc
            self.middle_block_out = [Conv2d(deepest, deepest, 1)]
            self.built = True

    @classmethod
    def from_pretrained(cls, source, **kwargs) -> ControlNet:
        """Load a ControlNet: a diffusers ``ControlNetModel`` folder, or an original ``.safetensors`` /
        ``.pth`` file (``tf_diffusion.weights.controlnet.load_controlnet`` for the arguments)."""
        from tf_diffusion.weights.controlnet import load_controlnet

        return load_controlnet(source, **kwargs)

    def __call__(self, latents, timesteps, context, hint, text_embeds=None, time_ids=None, **kwargs):
        # Checked here, before Keras wraps errors from call() with a dump of every argument.
        self._check_inputs(latents, context, hint)
        cfg = self.config.unet
        if (cfg.adm_in_channels is None) != (text_embeds is None and time_ids is None):
            raise ValueError(
                f"this ControlNet (adm_in_channels={cfg.adm_in_channels}) "
                + (
                    "takes no text_embeds or time_ids"
                    if cfg.adm_in_channels is None
                    else "needs text_embeds and time_ids"
                )
            )
        if cfg.adm_in_channels is None:
            return super().__call__(latents, timesteps, context, hint, **kwargs)
        return super().__call__(latents, timesteps, context, hint, text_embeds, time_ids, **kwargs)

    def _check_inputs(self, latents, context, hint) -> None:
        cfg, factor = self.config.unet, self.config.hint_factor
        shape, ctx, hs = _shape(latents), _shape(context), _shape(hint)
        if len(shape) != 4 or shape[-1] != cfg.in_channels:
            raise ValueError(
                f"latents must be NHWC (batch, height, width, {cfg.in_channels}), got shape {shape}"
            )
        if len(ctx) != 3 or ctx[-1] != cfg.context_dim:
            raise ValueError(
                f"context must have shape (batch, tokens, {cfg.context_dim}) for this ControlNet, got shape {ctx}"
            )
        channels = self.config.conditioning_channels
        if len(hs) != 4 or hs[-1] != channels:
            raise ValueError(f"the hint must be NHWC (batch, height, width, {channels}), got shape {hs}")
        want = tuple(None if s is None else s * factor for s in shape[1:3])
        if None not in want and None not in hs[1:3] and tuple(hs[1:3]) != want:
            raise ValueError(
                f"hint size {hs[1]}x{hs[2]} does not fit latents of {shape[1]}x{shape[2]}: this "
                f"ControlNet takes hints {factor} times the latent size, {want[0]}x{want[1]}"
            )

    def call(self, latents, timesteps, context, hint, text_embeds=None, time_ids=None):
        """The residuals for the UNet's skips and its middle block (unscaled).

        Args:
            latents: (B, h, w, in_channels) NHWC, as the UNet gets them (without inpainting channels).
            timesteps: a scalar or (B,) tensor.
            context: (B, T, context_dim) text hidden states.
            hint: (B, h * f, w * f, conditioning_channels) hint image in [0, 1], f = ``config.hint_factor``.
            text_embeds, time_ids: SDXL ControlNets only, as for ``UNetModel``.

        Returns:
            ``(down, mid)``: a list of one (B, h_i, w_i, C_i) residual per input block, and the
            (B, h_last, w_last, C_last) middle residual; spatially averaged when
            ``config.global_pool_conditions``.
        """
        latents = ops.convert_to_tensor(latents)
        batch = ops.shape(latents)[0]
        cfg = self.config.unet
        t = ops.broadcast_to(ops.cast(ops.convert_to_tensor(timesteps), "float32"), (batch,))
        emb = run_sequential(self.time_embed, timestep_embedding(t, cfg.model_channels))  # (B, E)
        if cfg.adm_in_channels is not None:
            emb = emb + run_sequential(self.label_emb[0], _added_input(text_embeds, time_ids, cfg))
        context = ops.convert_to_tensor(context)
        # input_hint_block: SiLU after every conv but the last.
        guided = ops.convert_to_tensor(hint)
        guided = run_sequential(self.input_hint_block, guided)  # (B, h, w, model_channels)

        h, down = latents, []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = _run_block(block, h, emb, context)
            if i == 0:
                h = h + ops.cast(guided, h.dtype)  # the hint joins after the input conv
            down.append(zero[0](h))
        h = _run_block(self.middle_block, h, emb, context)
        mid = self.middle_block_out[0](h)
        if self.config.global_pool_conditions:
            down = [ops.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = ops.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


def _added_input(text_embeds, time_ids, cfg: UNetConfig):
    """label_emb's input as the UNet builds it: pooled embedding, then each time id's sinusoid."""
    time_ids = ops.cast(ops.convert_to_tensor(time_ids), "float32")
    batch, count = ops.shape(time_ids)[0], ops.shape(time_ids)[1]
    sinusoids = timestep_embedding(ops.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim)
    sinusoids = ops.reshape(sinusoids, (batch, count * cfg.addition_time_embed_dim))
    pooled = ops.cast(ops.convert_to_tensor(text_embeds), "float32")
    return ops.concatenate([pooled, sinusoids], axis=-1)


def guess_mode_scales(count: int) -> np.ndarray:
    """diffusers' guess-mode factors: ``logspace(-1, 0, count + 1)``, 0.1 for the first residual to 1
    for the middle one (float32, as torch computes them)."""
    return (10.0 ** np.linspace(-1.0, 0.0, count + 1)).astype(np.float32)


def controlnet_from_unet(
    unet,
    conditioning_channels: int = 3,
    hint_channels: tuple[int, ...] = (16, 32, 96, 256),
    dtype: str | None = None,
) -> ControlNet:
    """A new ControlNet for ``unet``, initialised for training as diffusers' ``ControlNetModel.from_unet``.

    The time embedding (and SDXL's ``label_emb``), the input blocks and the middle block start as
    copies of the UNet's weights. The zero convs, ``middle_block_out`` and the hint encoder's last
    conv start at zero, so the net's residuals are zero and the UNet predicts what it does alone
    until training moves them; the rest of the hint encoder keeps its random start.

    Args:
        unet: the ``UNetModel`` the net will steer; its config is the net's ``ControlNetConfig.unet``.
        conditioning_channels: channels of the hint images (3 for RGB).
        hint_channels: widths of the hint encoder's levels; their count sets the hint size
            (``2 ** (len - 1)`` times the latents: 8 for SD's VAE, 4 for tiny-shapes').
        dtype: a Keras dtype policy name for the net.

    Returns:
        The ControlNet.

    Raises:
        ValueError: if a copied weight's shape differs from the UNet's (it cannot: same config).
    """
    from tf_diffusion.weights.state_dict import named_parameters

    net = ControlNet(
        ControlNetConfig(
            unet=unet.config, conditioning_channels=conditioning_channels, hint_channels=tuple(hint_channels)
        ),
        dtype=dtype,
    )
    source = named_parameters(unet)
    # diffusers' zero_module: every parameter of these convs (weights and biases) is 0.
    zeroed = ("zero_convs.", "middle_block_out.", f"input_hint_block.{len(net.input_hint_block) - 1}.")
    for key, (layer, attr) in named_parameters(net).items():
        variable = getattr(layer, attr)
        if key.startswith(zeroed):
            variable.assign(np.zeros(tuple(variable.shape), variable.dtype))
        elif key.startswith("input_hint_block."):
            continue  # random start, as diffusers' ControlNetConditioningEmbedding's other convs
        else:
            src_layer, src_attr = source[key]
            value = getattr(src_layer, src_attr)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{key}: UNet shape {tuple(value.shape)}, ControlNet {tuple(variable.shape)}"
                )
            variable.assign(ops.cast(value, variable.dtype))
    return net
