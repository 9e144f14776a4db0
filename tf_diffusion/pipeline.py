"""StableDiffusion: the four components built from one PipelineConfig."""

from __future__ import annotations

from tf_diffusion.clip import CLIPTextEncoder
from tf_diffusion.config import PipelineConfig
from tf_diffusion.presets import get_preset
from tf_diffusion.tokenizer import CLIPTokenizer
from tf_diffusion.unet import UNetModel
from tf_diffusion.vae import AutoencoderKL


class StableDiffusion:
    """A Stable Diffusion model: tokenizer, CLIP text encoder, UNet and VAE.

    Attributes:
        config: the PipelineConfig the components were built from.
        tokenizer: CLIPTokenizer giving (B, 77) int32 token ids.
        text_encoder: CLIPTextEncoder, ids -> (B, 77, D) hidden states as SD consumes them.
        unet: UNetModel, (latents NHWC, timesteps, context) -> noise prediction.
        vae: AutoencoderKL with ``encode`` (images in [-1, 1]) and ``decode`` (unscaled latents).

    Example:
        >>> sd = StableDiffusion.from_preset("sd-v1-5")  # random weights, full size
    """

    def __init__(self, config: PipelineConfig, *, dtype: str | None = None):
        """Build every component of ``config`` with freshly initialised weights.

        Args:
            config: the model to build.
            dtype: a Keras dtype policy name ("float32", "mixed_float16",
                "mixed_bfloat16", ...) for all components; None uses the global policy.
        """
        if not isinstance(config, PipelineConfig):
            raise ValueError(f"config must be a PipelineConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = CLIPTokenizer(config=config.tokenizer)
        self.text_encoder = CLIPTextEncoder(config.text_encoder, dtype=dtype)
        self.unet = UNetModel(config.unet, dtype=dtype)
        self.vae = AutoencoderKL(config.vae, dtype=dtype)

    @classmethod
    def from_preset(cls, name: str, *, dtype: str | None = None) -> StableDiffusion:
        """Build a preset's architecture with random weights.

        Args:
            name: a key of ``tf_diffusion.PRESETS`` ("sd-v1-5", "sd-v2-1", ...).
            dtype: optional Keras dtype policy name for all components.

        Raises:
            ValueError: for an unknown preset name.
        """
        return cls(get_preset(name), dtype=dtype)

    def __repr__(self) -> str:
        return f"StableDiffusion(config={self.config.name!r})"
