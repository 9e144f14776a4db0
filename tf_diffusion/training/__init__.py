"""Training and fine-tuning: the VAE, and the text encoder + UNet with the noise-prediction loss.

- ``config``: ``TrainingConfig`` and what each target trains (plain data, no TensorFlow);
- ``trainers``: ``VAETrainer``, ``DiffusionTrainer``, their shared loop, checkpoints that resume exactly;
- ``controlnet``: ``ControlNetTrainer`` (a ControlNet on a frozen UNet);
- ``adapters``: ``LoraTrainer`` and ``TextualInversionTrainer`` (only LoRA factors or new word vectors train);
- ``data``: ``tf.data`` pipelines from arrays, a batch generator or a folder of captioned images.

Names are imported on first use, so reading ``TRAIN_TARGETS`` does not load TensorFlow.

Example:
    >>> from tf_diffusion.training import DiffusionTrainer, TrainingConfig, dataset_from_arrays
    >>> trainer = DiffusionTrainer(sd, "unet+text_encoder", TrainingConfig(learning_rate=2e-4))
    >>> trainer.fit(dataset_from_arrays(images, captions, sd.tokenizer, 32), steps=10_000, checkpoint_dir="ckpt")
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CHECKPOINT_FORMAT": "config",
    "RECONSTRUCTION_LOSSES": "config",
    "TRAIN_PREFIXES": "config",
    "TRAIN_TARGETS": "config",
    "LoraTrainingConfig": "config",
    "TrainingConfig": "config",
    "ema_decay_at": "config",
    "ControlNetTrainer": "controlnet",
    "DiffusionTrainer": "trainers",
    "VAETrainer": "trainers",
    "LoraTrainer": "adapters",
    "TextualInversionTrainer": "adapters",
    "drop_captions": "trainers",
    "draw_timesteps": "trainers",
    "latest_checkpoint": "trainers",
    "training_config_from_checkpoint": "trainers",
    "dataset_from_arrays": "data",
    "dataset_with_prior": "data",
    "dataset_from_generator": "data",
    "load_image_folder": "data",
    "load_hint_folder": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tf_diffusion.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tf_diffusion.training.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
