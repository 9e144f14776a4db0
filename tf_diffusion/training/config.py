"""Training settings and what each ``train`` target trains: plain data, no TensorFlow (the CLI reads it first)."""

from __future__ import annotations

from dataclasses import dataclass

# What each ``train`` option trains; everything else is frozen.
TRAIN_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": ("unet",),
    "unet+text_encoder": ("unet", "text_encoder"),
    "vae": ("vae",),
    "vae_decoder": ("vae",),
    "controlnet": ("controlnet",),
}
# Key prefixes a target trains within its components (every key when absent). Fine-tuning only the
# decoder keeps the latent space, so a UNet trained on it stays valid (as SD's ft-MSE VAE decoders).
TRAIN_PREFIXES: dict[str, tuple[str, ...]] = {"vae_decoder": ("decoder.", "post_quant_conv.")}
RECONSTRUCTION_LOSSES = ("l1", "l2", "l1+l2")
CHECKPOINT_FORMAT = "tf_diffusion.training/1"


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings shared by both trainers.

    Attributes:
        learning_rate: AdamW peak learning rate, reached after ``warmup_steps`` and then held.
        warmup_steps: linear warm-up from 0.
        weight_decay: AdamW decoupled weight decay; biases, norms and 1-D weights are excluded.
        adam_beta1, adam_beta2, adam_epsilon: AdamW moments.
        grad_clip_norm: clip the global gradient norm (after the cross-replica sum); None disables.
        ema_decay: decay of the weight EMA; None keeps no EMA.
        ema_warmup: use min(ema_decay, (1 + n) / (10 + n)) after n updates, so early averages are
            not dominated by the random initialisation.
        caption_dropout: probability of replacing a caption by "" (classifier-free guidance).
        high_noise_fraction: diffusion only: this fraction of each batch draws its timestep from the
            noisier range [high_noise_start * T, T) instead of [0, T), weighting the steps where
            layout is decided (0 is the usual uniform draw).
        high_noise_start: where that noisier range begins, as a fraction of T in [0, 1).
        kl_weight: VAE only: weight of the KL term, relative to a per-pixel reconstruction loss
            (the KL is summed over latent elements and divided by the number of pixel values).
        reconstruction_loss: VAE only: "l1", "l2" or "l1+l2".
        seed: seed of every random draw (noise, timesteps, caption dropout, posterior samples).
        jit_compile: compile the forward and backward pass with XLA.
        prior_loss_weight: diffusion only: DreamBooth's prior preservation; > 0 makes batches carry class
            images and captions too (``dataset_with_prior``), whose loss is added with this weight.
        text_encoder_learning_rate: peak learning rate of the text encoder's weights (or its LoRA
            factors) when they are trained; None: ``learning_rate``. The UNet's is ``learning_rate``.
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    grad_clip_norm: float | None = 1.0
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    caption_dropout: float = 0.1
    high_noise_fraction: float = 0.0
    high_noise_start: float = 0.5
    kl_weight: float = 1e-6
    reconstruction_loss: str = "l1"
    seed: int = 0
    jit_compile: bool = False
    text_encoder_learning_rate: float | None = None
    prior_loss_weight: float = 0.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.text_encoder_learning_rate is not None and not self.text_encoder_learning_rate > 0:
            raise ValueError(
                f"text_encoder_learning_rate={self.text_encoder_learning_rate!r} must be > 0 or None"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in [0, 1) or None")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        if not 0.0 <= self.high_noise_fraction <= 1.0:
            raise ValueError(f"high_noise_fraction={self.high_noise_fraction!r} must be in [0, 1]")
        if not 0.0 <= self.high_noise_start < 1.0:
            raise ValueError(f"high_noise_start={self.high_noise_start!r} must be in [0, 1)")
        if not (
            isinstance(self.prior_loss_weight, (int, float)) and 0.0 <= self.prior_loss_weight < float("inf")
        ):
            raise ValueError(f"prior_loss_weight={self.prior_loss_weight!r} must be a finite number >= 0")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss={self.reconstruction_loss!r} is not allowed; "
                f"expected one of {RECONSTRUCTION_LOSSES}"
            )
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm={self.grad_clip_norm!r} must be > 0 or None")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")


@dataclass(frozen=True)
class LoraTrainingConfig:
    """What a LoRA trainer trains (``tf_diffusion.adapters.lora_training``).

    Attributes:
        rank: the LoRA rank r.
        alpha: the LoRA alpha (scale alpha / rank); None: alpha = rank.
        unet_targets: UNet module names (peft's ``target_modules`` matching: a name or a ``.``-suffix of
            one); None: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
        text_encoder_targets: text-encoder module names, used when the trainer trains the text encoder;
            None: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.
        seed: seed of the down factors' initial draw.
    """

    rank: int = 4
    alpha: float | None = None
    unet_targets: tuple[str, ...] | None = None
    text_encoder_targets: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} must be a number > 0 or None")
        for name in ("unet_targets", "text_encoder_targets"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(t, str) and t for t in value):
                    raise ValueError(f"{name}={value!r} must be a tuple of non-empty module names or None")
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")


def ema_decay_at(updates: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay used for update number ``updates`` (1-based): min(decay, (1+n)/(10+n)) with warm-up."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay
