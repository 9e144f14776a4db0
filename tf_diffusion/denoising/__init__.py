"""The seams between what a model computes and how the sampling loop runs.

- ``Conditioning``: the bundle a denoiser reads (text context and family-specific extras).
- denoisers: ``(x, t, cond) -> prediction`` (``UNetDenoiser``, ``MMDiTDenoiser``, ``FluxDenoiser``; adapters wrap one).
- guidance rules: ``ClassifierFreeGuidance``, ``NoGuidance``.
- ``DenoiseProgram``: sampler + denoiser + guidance + step hooks, as pure step / loop functions.
- executors: ``LocalExecutor`` here, ``ShardedExecutor`` in ``tf_diffusion.distributed``; the
  SavedModel export traces ``DenoiseProgram.loop`` itself.
"""

from tf_diffusion.denoising.conditioning import Conditioning
from tf_diffusion.denoising.denoiser import FluxDenoiser, MMDiTDenoiser, UNetDenoiser
from tf_diffusion.denoising.executor import LocalExecutor
from tf_diffusion.denoising.guidance import ClassifierFreeGuidance, NoGuidance, guidance_for
from tf_diffusion.denoising.program import DenoiseProgram, MaskBlend, sampler_key

__all__ = [
    "ClassifierFreeGuidance",
    "Conditioning",
    "DenoiseProgram",
    "LocalExecutor",
    "FluxDenoiser",
    "MMDiTDenoiser",
    "MaskBlend",
    "NoGuidance",
    "UNetDenoiser",
    "guidance_for",
    "sampler_key",
]
