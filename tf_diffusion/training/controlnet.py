"""ControlNet training: the diffusion loss through a frozen UNet steered by the net's residuals.

The loss is the one of diffusers' ``examples/controlnet/train_controlnet.py``: noise the latents of
the image with the training schedule, run the ControlNet on the noisy latents, the timestep, the
caption's text states and the hint image, add its residuals (unscaled) to the UNet's skips and its
middle block, and regress the UNet's output onto the prediction target. Only the net's weights
change; the UNet, the VAE and the text encoder stay frozen. The usual start is
``tf_diffusion.controlnet.controlnet_from_unet`` (a copy of the UNet's encoder with zero output
convs, so the first step predicts exactly what the UNet does alone).

Example:
    >>> sd = StableDiffusion.from_preset("tiny-shapes")
    >>> net = controlnet_from_unet(sd.unet, hint_channels=(16, 32, 64))  # hints at the image size
    >>> trainer = ControlNetTrainer(sd, net, TrainingConfig(learning_rate=1e-4))
    >>> trainer.fit(dataset_from_arrays(images, captions, sd.tokenizer, 16, hints=hints), steps=2_000)
    >>> trainer.save_controlnet("my-controlnet")  # a diffusers ControlNetModel folder
"""

from __future__ import annotations

import dataclasses
import os

import keras

from tf_diffusion.training.config import TrainingConfig
from tf_diffusion.training.trainers import DiffusionTrainer
from tf_diffusion.weights.state_dict import named_parameters


class ControlNetTrainer(DiffusionTrainer):
    """Train a ControlNet with the diffusion loss while the UNet, VAE and text encoder stay frozen.

    As ``DiffusionTrainer`` (the same latents, noise, timesteps, targets and caption dropout, which
    diffusers' script calls ``proportion_empty_prompts``), except that the UNet also gets the net's
    residuals for the batch's hint images and only the net's weights are updated.

    Args:
        pipeline: a ``StableDiffusion`` of the SD 1.x / 2.x or SDXL base families.
        controlnet: the ``ControlNet`` to train; its ``config.unet`` must be the pipeline's UNet
            config and its hints must have the image size (hint factor = the VAE's downscale).
        config: optimisation settings (``prior_loss_weight`` must be 0).
        strategy: a ``tf.distribute`` strategy; default: the current one.

    The data yields ``(images, token_ids, hints)``: images (B, H, W, 3) in [-1, 1], token ids as
    for ``DiffusionTrainer`` and hints (B, H, W, conditioning_channels) in [0, 1]
    (``dataset_from_arrays(..., hints=...)``).

    Raises:
        ValueError: for a net made for another UNet, a hint size that is not the image size, or
            prior preservation.
    """

    kind = "controlnet"
    _targets = ("controlnet",)

    def __init__(self, pipeline, controlnet, config: TrainingConfig | None = None, strategy=None):
        config = config or TrainingConfig()
        unet = pipeline.config.unet
        # A ControlNet has no output half: its config's out_channels is not read.
        if dataclasses.replace(controlnet.config.unet, out_channels=unet.out_channels) != unet:
            raise ValueError(
                f"controlnet: made for another UNet than {pipeline.config.name}'s (its config.unet "
                f"{controlnet.config.unet} vs {unet}); build one with controlnet_from_unet(pipeline.unet)"
            )
        factor = pipeline.config.vae.downsample_factor  # image pixels per latent pixel
        if controlnet.config.hint_factor != factor:
            raise ValueError(
                f"controlnet: its hints are {controlnet.config.hint_factor}x the latents "
                f"(hint_channels={controlnet.config.hint_channels}), but {pipeline.config.name}'s VAE "
                f"makes latents 1/{factor} of the image; give it {factor.bit_length()} hint_channels "
                "so hints have the image size"
            )
        if config.prior_loss_weight > 0:
            raise ValueError(
                f"prior_loss_weight={config.prior_loss_weight}: prior preservation is not supported for "
                "ControlNet training; use 0"
            )
        self.controlnet = controlnet
        params = [
            ("controlnet", key, getattr(layer, attr))
            for key, (layer, attr) in named_parameters(controlnet).items()
        ]
        super().__init__(pipeline, "controlnet", config, strategy, params=params)

    def _components(self, pipeline) -> dict:
        return {
            "controlnet": self.controlnet,
            "unet": pipeline.unet,
            "text_encoder": pipeline.text_encoder,
            "vae": pipeline.vae,
        }

    def _predict(self, x_t, t, conditioning, batch):
        if len(batch) != 3:
            raise ValueError(
                f"ControlNetTrainer needs (images, token_ids, hints) batches; got {len(batch)} parts"
            )
        hints = keras.ops.cast(batch[2], "float32")  # (B, H, W, C) in [0, 1]; the net checks its size
        # The conditioning is frozen: constants for the tape.
        down, mid = self.controlnet(x_t, t, conditioning[0], hints, *conditioning[1:])
        return self.pipeline.unet(x_t, t, *conditioning, down_residuals=down, mid_residual=mid)

    def save_controlnet(self, folder: str | os.PathLike, dtype: str | None = None) -> str:
        """Write the trained net (its EMA weights when kept) as a diffusers ``ControlNetModel`` folder.

        ``tf_diffusion.ControlNet.from_pretrained(folder)`` (and diffusers) read it.

        Args:
            folder: where to write config.json and diffusion_pytorch_model.safetensors.
            dtype: "float16" for a release file; None keeps float32.

        Returns:
            The folder's path.
        """
        from tf_diffusion.weights.controlnet import save_controlnet

        return save_controlnet(self.controlnet, folder, dtype=dtype, tensors=self.export_ema()["controlnet"])
