"""tf_diffusion: Stable Diffusion in TensorFlow / Keras 3.

Every public name is imported on first use (PEP 562), so ``import tf_diffusion`` stays light and
the command line can check its arguments before TensorFlow is loaded.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "CLIPTextConfig": "tf_diffusion.config",
    "ControlNet": "tf_diffusion.controlnet",
    "ControlNetConfig": "tf_diffusion.controlnet",
    "controlnet_from_unet": "tf_diffusion.controlnet",
    "PipelineConfig": "tf_diffusion.config",
    "SchedulerConfig": "tf_diffusion.config",
    "TokenizerConfig": "tf_diffusion.config",
    "UNetConfig": "tf_diffusion.config",
    "VAEConfig": "tf_diffusion.config",
    "PRESETS": "tf_diffusion.presets",
    "get_preset": "tf_diffusion.presets",
    "StableDiffusion": "tf_diffusion.pipeline",
    "StableDiffusion3": "tf_diffusion.sd3",
    "SD3Config": "tf_diffusion.config",
    "SD3_PRESETS": "tf_diffusion.presets",
    "resolve_model": "tf_diffusion.models",
    "shipped_weights_dirs": "tf_diffusion.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tf_diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
