"""Denoisers: ``(x, t, cond) -> prediction``, a backbone and the adapters that act on it.

The sampler scales its input before the call and interprets the prediction (epsilon, v or x0)
after it; a denoiser only evaluates the network. Adapters that change what the backbone sees
(ControlNet residuals, IP-Adapter image tokens) wrap a denoiser and keep this signature.
"""

from __future__ import annotations

from keras import ops

from tf_diffusion.denoising.conditioning import Conditioning


class UNetDenoiser:
    """The SD 1.x / 2.x / SDXL UNet as a denoiser.

    Reads ``cond.context`` and, when present, ``cond.extras["concat"]`` (extra input channels
    appended to the latents, as the 9-channel inpainting UNet expects) and SDXL's added
    conditioning ``cond.extras["text_embeds"]`` (B, P) and ``cond.extras["time_ids"]`` (B, K),
    named as diffusers' ``added_cond_kwargs``, and an LCM-distilled UNet's ``cond.extras["timestep_cond"]``
    (B, time_cond_proj_dim), the guidance scale's embedding.
    """

    known_extras = ("concat", "text_embeds", "time_ids", "timestep_cond")

    def __init__(self, unet):
        self.unet = unet

    @property
    def backbone(self):
        """The network (executors read its dtype and layers to choose execution options)."""
        return self.unet

    @property
    def key(self):
        """What distinguishes this denoiser's traced program from another's."""
        return ("unet", id(self.unet))

    def __call__(self, x, t, cond: Conditioning, down_residuals=None, mid_residual=None):
        """The prediction for ``x`` at ``t``; ``down_residuals`` / ``mid_residual``: ControlNet
        residuals added to the UNet's skips and middle block (``adapters.controlnet``)."""
        residuals = {}
        if down_residuals is not None or mid_residual is not None:
            residuals = {"down_residuals": down_residuals, "mid_residual": mid_residual}
        unknown = set(cond.extras) - set(self.known_extras)
        if unknown:
            raise ValueError(f"the UNet denoiser does not read conditioning {sorted(unknown)}")
        if "concat" in cond.extras:
            x = ops.concatenate([x, ops.cast(cond.extras["concat"], x.dtype)], axis=-1)
        t = ops.broadcast_to(t, (ops.shape(x)[0],))
        if "timestep_cond" in cond.extras:
            residuals["timestep_cond"] = cond.extras["timestep_cond"]
        if "text_embeds" in cond.extras or "time_ids" in cond.extras:
            out = self.unet(
                x, t, cond.context, cond.extras.get("text_embeds"), cond.extras.get("time_ids"), **residuals
            )
        else:
            out = self.unet(x, t, cond.context, **residuals)
        return ops.cast(out, "float32")


class MMDiTDenoiser:
    """SD3's transformer (``mmdit.MMDiT``) as a denoiser: the flow velocity at ``t`` (sigma * 1000).

    Reads ``cond.context`` (B, T, joint_attention_dim) and ``cond.extras["pooled_projections"]``
    (B, P), named as diffusers' ``pooled_projections``. ``skip_layers`` (skip-layer guidance) is a
    call option of the transformer, not of this denoiser.
    """

    known_extras = ("pooled_projections",)

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def backbone(self):
        return self.transformer

    @property
    def key(self):
        return ("mmdit", id(self.transformer))

    def __call__(self, x, t, cond: Conditioning):
        if set(cond.extras) != set(self.known_extras):
            raise ValueError(
                f"the SD3 denoiser reads conditioning {list(self.known_extras)}, got {sorted(cond.extras)}"
            )
        t = ops.broadcast_to(t, (ops.shape(x)[0],))
        out = self.transformer(x, t, cond.context, cond.extras["pooled_projections"])
        return ops.cast(out, "float32")


class FluxDenoiser:
    """Flux.1's transformer (``flux.FluxTransformer``) as a denoiser over NHWC latents.

    Packs the (B, h, w, 16) latents into 2x2-patch tokens with their (0, row, column) ids, runs the
    transformer on ``cond.context`` (T5 tokens, ids all zero), ``cond.extras["pooled_projections"]``
    (B, 768) and, for a guidance-distilled model, ``cond.extras["guidance"]`` (B,), and unpacks its
    flow velocity. ``t`` is the sampler's timestep (sigma * 1000); the transformer takes the sigma and
    scales it by 1000 itself, as diffusers' FluxPipeline passes ``timestep / 1000``.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        guided = transformer.config.guidance_embed
        self.known_extras = ("pooled_projections", "guidance") if guided else ("pooled_projections",)

    @property
    def backbone(self):
        return self.transformer

    @property
    def key(self):
        return ("flux", id(self.transformer))

    def __call__(self, x, t, cond: Conditioning):
        from tf_diffusion.flux import latent_image_ids, pack_latents, unpack_latents

        if set(cond.extras) != set(self.known_extras):
            raise ValueError(
                f"the Flux denoiser reads conditioning {list(self.known_extras)}, got {sorted(cond.extras)}"
            )
        _b, h, w, _c = x.shape
        batch = ops.shape(x)[0]
        sigma = ops.broadcast_to(ops.cast(t, "float32") / 1000.0, (batch,))
        guidance = cond.extras.get("guidance")
        if guidance is not None:
            guidance = ops.broadcast_to(ops.cast(guidance, "float32"), (batch,))
        out = self.transformer(
            pack_latents(x),
            latent_image_ids(h // 2, w // 2),
            cond.context,
            ops.zeros((ops.shape(cond.context)[1], 3), "float32"),  # flux.text_ids: all zeros
            sigma,
            cond.extras["pooled_projections"],
            guidance,
        )  # (B, h/2 * w/2, 64)
        return ops.cast(unpack_latents(out, h, w), "float32")
