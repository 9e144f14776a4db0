"""Guidance rules: how the conditional and unconditional bundles are batched and the predictions combined.

A rule is static (it shapes the traced program); its scale is data, so one trace serves every scale.
"""

from __future__ import annotations

from keras import ops

from tf_diffusion.denoising.conditioning import Conditioning


class NoGuidance:
    """The conditional prediction alone (guidance scale <= 1, or guidance-distilled models)."""

    name = "none"
    copies = 1

    def batch(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        return cond

    def combine(self, prediction, scale):
        return prediction


class ClassifierFreeGuidance:
    """``uncond + scale * (cond - uncond)``, with both halves in one batch: [uncond..., cond...]."""

    name = "cfg"
    copies = 2

    def batch(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        if uncond is None:
            raise ValueError("classifier-free guidance needs an unconditional (negative prompt) bundle")
        return Conditioning.concat([uncond, cond])

    def combine(self, prediction, scale):
        n = ops.shape(prediction)[0] // 2
        uncond, cond = prediction[:n], prediction[n:]
        return uncond + scale * (cond - uncond)


def guidance_for(scale: float):
    """The rule ``generate()`` uses for a guidance scale: classifier-free above 1, none otherwise."""
    return ClassifierFreeGuidance() if scale > 1.0 else NoGuidance()
