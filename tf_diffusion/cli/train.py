"""``tf-diffusion train``: train or fine-tune a model on a folder of captioned images.

(What ``--help`` shows is ``DESCRIPTION`` and ``EXAMPLE`` below, written as plain text.)
"""

from __future__ import annotations

import argparse
import os

from tf_diffusion.cli._common import UsageError, check_model, finite_float, import_tensorflow, positive_int
from tf_diffusion.training.config import TRAIN_TARGETS

DESCRIPTION = """\
Train or fine-tune a model on a folder of captioned images.

The folder holds name.png, name.jpg, name.jpeg or name.webp images, each with a name.txt caption.
The model comes from a preset (random initial weights) or from --model (a folder, checkpoint file or
hub id). Checkpoints go to --checkpoint-dir, and a rerun with the same arguments resumes; --out
receives the EMA weights as a tf_diffusion folder when training ends."""

EXAMPLE = """\
example:
  tf-diffusion train --model weights/sd-v1-5 --data my_images/ --train unet \\
      --size 512 --batch-size 1 --lr 1e-5 --steps 2000 --checkpoint-dir ckpt --out my-model"""
# TrainingConfig argument names -> our options, for messages from the library.
OPTION_NAMES = {
    "learning_rate": "--lr",
    "warmup_steps": "--warmup-steps",
    "weight_decay": "--weight-decay",
    "ema_decay": "--ema-decay",
    "caption_dropout": "--caption-dropout",
    "high_noise_fraction": "--high-noise-fraction",
    "high_noise_start": "--high-noise-start",
    "kl_weight": "--kl-weight",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "size": "--size",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune on a folder of captioned images",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", help="a model folder or checkpoint to fine-tune (StableDiffusion.from_pretrained)"
    )
    source.add_argument("--preset", help="train from scratch: a preset name (random initial weights)")
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions")
    p.add_argument(
        "--train", choices=sorted(TRAIN_TARGETS), default="unet", help="what to train; the rest is frozen"
    )
    p.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default: the model's default size)"
    )
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (1e-5 for fine-tuning SD)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--ema-decay", type=float, default=0.999, help="0 disables the EMA")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--high-noise-fraction",
        type=float,
        default=0.0,
        help="share of each batch whose timestep is drawn from the noisier range (default 0: uniform)",
    )
    p.add_argument(
        "--high-noise-start",
        type=float,
        default=0.5,
        help="where that noisier range starts, as a fraction of the timesteps (default 0.5)",
    )
    p.add_argument("--kl-weight", type=float, default=1e-6, help="VAE training only")
    p.add_argument(
        "--reconstruction-loss", choices=("l1", "l2", "l1+l2"), default="l1", help="VAE training only"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", required=True, help="where checkpoints are written and resumed from")
    p.add_argument("--checkpoint-every", type=float, default=600.0, help="seconds between checkpoints")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--out", default=None, help="write the EMA weights (tf_diffusion folder) here at the end")
    p.add_argument("--xla", action="store_true", help="compile the forward/backward pass with XLA")
    p.add_argument("--mirrored", action="store_true", help="train on all local GPUs with MirroredStrategy")
    p.set_defaults(func=run, option_names=OPTION_NAMES)
    return p


def check_arguments(args: argparse.Namespace) -> str | None:
    """Every check that needs no model; returns the resolved ``--model`` source (None with --preset).

    Raises:
        UsageError: a bad option value.
        FileNotFoundError: a missing --data folder or --model.
    """
    from tf_diffusion.presets import PRESETS

    positive_int(args.steps, "--steps")
    positive_int(args.batch_size, "--batch-size")
    positive_int(args.size, "--size")
    positive_int(args.warmup_steps, "--warmup-steps", minimum=0)
    positive_int(args.seed, "--seed", minimum=0)
    finite_float(args.lr, "--lr", 0.0)
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr:g}: must be > 0")
    finite_float(args.weight_decay, "--weight-decay", 0.0)
    finite_float(args.ema_decay, "--ema-decay", 0.0, 1.0)
    if args.ema_decay >= 1.0:
        raise UsageError(f"--ema-decay {args.ema_decay:g}: must be in [0, 1) (0 disables the EMA)")
    finite_float(args.caption_dropout, "--caption-dropout", 0.0, 1.0)
    finite_float(args.high_noise_fraction, "--high-noise-fraction", 0.0, 1.0)
    finite_float(args.high_noise_start, "--high-noise-start", 0.0, 1.0)
    if args.high_noise_start >= 1.0:
        raise UsageError(f"--high-noise-start {args.high_noise_start:g}: must be in [0, 1)")
    finite_float(args.kl_weight, "--kl-weight", 0.0)
    finite_float(args.checkpoint_every, "--checkpoint-every", 0.0)
    finite_float(args.time_limit, "--time-limit", 0.0)
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset}: unknown; allowed: {', '.join(sorted(PRESETS))}")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
        raise UsageError(f"--checkpoint-dir {args.checkpoint_dir}: exists and is not a folder")
    if args.out is not None and os.path.exists(args.out):
        if not os.path.isdir(args.out) or os.listdir(args.out):
            raise FileExistsError(f"--out {args.out}: exists and is not an empty folder; choose a new folder")
    return None if args.model is None else check_model(args.model, "--model")


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit code."""
    source = check_arguments(args)
    tf = import_tensorflow()
    import numpy as np

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import (
        DiffusionTrainer,
        TrainingConfig,
        VAETrainer,
        dataset_from_arrays,
        load_image_folder,
    )

    strategy = tf.distribute.MirroredStrategy() if args.mirrored else tf.distribute.get_strategy()
    with strategy.scope():
        if source is not None:
            sd = StableDiffusion.from_pretrained(source)
        else:
            sd = StableDiffusion.from_preset(args.preset)
    size = args.size or sd.config.default_size
    images, captions = load_image_folder(args.data, size)
    config = TrainingConfig(
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay or None,
        caption_dropout=args.caption_dropout,
        high_noise_fraction=args.high_noise_fraction,
        high_noise_start=args.high_noise_start,
        kl_weight=args.kl_weight,
        reconstruction_loss=args.reconstruction_loss,
        seed=args.seed,
        jit_compile=args.xla,
    )
    if args.train in ("vae", "vae_decoder"):
        trainer = VAETrainer(sd.vae, config, strategy=strategy, train=args.train)
    else:
        trainer = DiffusionTrainer(sd, args.train, config, strategy=strategy)
    data = dataset_from_arrays(images, captions, sd.tokenizer, args.batch_size, seed=args.seed)
    history = trainer.fit(
        data,
        args.steps,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_s=args.checkpoint_every,
        time_limit_s=None if args.time_limit is None else args.time_limit * 60,
        log_file=os.path.join(args.checkpoint_dir, "log.jsonl"),
    )
    if history:
        print(
            f"step {trainer.step}: loss {np.mean([h['loss'] for h in history[-50:]]):.4f} (mean of the last 50)"
        )
    if args.out is not None:
        save_trained(sd, trainer, args.out)
        print(f"wrote {args.out}")
    return 0


def save_trained(sd, trainer, out: str | os.PathLike) -> None:
    """Write ``sd`` with the trainer's EMA weights in place of the trained ones, in our folder format."""
    import pathlib

    from tf_diffusion.families import components_of
    from tf_diffusion.weights.folder import write_folder
    from tf_diffusion.weights.state_dict import state_dict

    components = {name: state_dict(getattr(sd, name)) for name in components_of(sd.config)}
    components.update(trainer.export_ema())
    folder = pathlib.Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_folder(folder, components, sd.config, sd.tokenizer)
