"""tf_diffusion: Stable Diffusion in TensorFlow / Keras 3."""

from tf_diffusion.config import (
    CLIPTextConfig,
    PipelineConfig,
    SchedulerConfig,
    TokenizerConfig,
    UNetConfig,
    VAEConfig,
)
from tf_diffusion.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CLIPTextConfig",
    "PipelineConfig",
    "SchedulerConfig",
    "StableDiffusion",
    "TokenizerConfig",
    "UNetConfig",
    "VAEConfig",
    "get_preset",
]


def __getattr__(name):
    # Import the model stack lazily so `import tf_diffusion` (configs, presets) stays light.
    if name == "StableDiffusion":
        from tf_diffusion.pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'tf_diffusion' has no attribute {name!r}")
