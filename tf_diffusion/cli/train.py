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
receives the EMA weights as a tf_diffusion folder when training ends.

With --lora only LoRA factors train (on the UNet; with --train unet+text_encoder also on the text
encoder) and --out names the .safetensors LoRA file to write (kohya / A1111 names by default, or
--lora-format diffusers). With --embedding WORD only the vectors of a new prompt word train (textual
inversion); captions must use the word, and --out names the A1111 .safetensors embedding to write.
--class-data adds DreamBooth's prior preservation (class images and their captions, weighted by
--prior-loss-weight) to any of these.

With --train controlnet a ControlNet trains on the frozen model: --hints is a folder with one hint
image per training image (same name, any image extension), cropped and resized as the image. The
net starts as a copy of the UNet's encoder with zero output convolutions (diffusers'
ControlNetModel.from_unet), or from --controlnet; --out receives it as a diffusers ControlNetModel
folder, which generate --control reads.

With KERAS_BACKEND=jax in the environment the same training runs on JAX (one jitted step; the data is
still read with tf.data). --mirrored is TensorFlow's MirroredStrategy and is refused there."""

EXAMPLE = """\
example:
  tf-diffusion train --model weights/sd-v1-5 --data my_images/ --train unet \\
      --size 512 --batch-size 1 --lr 1e-5 --steps 2000 --checkpoint-dir ckpt --out my-model
  tf-diffusion train --model weights/sd-v1-5 --data my_images/ --lora --rank 16 --alpha 8 \
      --train unet+text_encoder --lr 1e-4 --text-encoder-lr 5e-5 --steps 1500 \
      --checkpoint-dir ckpt --out my_lora.safetensors
  tf-diffusion train --model weights/sd-v1-5 --data my_cat/ --embedding my-cat --num-vectors 4 \
      --init-text cat --lr 5e-3 --steps 3000 --checkpoint-dir ckpt --out my-cat.safetensors
  tf-diffusion train --model weights/sd-v1-5 --data my_images/ --train controlnet --hints my_edges/ \
      --size 512 --batch-size 4 --lr 1e-5 --steps 5000 --checkpoint-dir ckpt --out my-controlnet"""
# TrainingConfig argument names -> our options, for messages from the library.
OPTION_NAMES = {
    "learning_rate": "--lr",
    "text_encoder_learning_rate": "--text-encoder-lr",
    "rank": "--rank",
    "alpha": "--alpha",
    "num_vectors": "--num-vectors",
    "init_text": "--init-text",
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
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="0 disables the EMA (default 0.999; 0 with --lora / --embedding)",
    )
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
    lora = p.add_argument_group("LoRA and textual inversion")
    mode = lora.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora", action="store_true", help="train LoRA factors only; --out is the .safetensors file"
    )
    mode.add_argument(
        "--embedding",
        metavar="WORD",
        default=None,
        help="textual inversion: learn the vectors of this new word",
    )
    lora.add_argument(
        "--class-data",
        default=None,
        help="DreamBooth prior preservation: folder of class images with captions (e.g. 'a dog')",
    )
    lora.add_argument(
        "--prior-loss-weight", type=float, default=1.0, help="weight of the class images' loss (default 1)"
    )
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    lora.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    lora.add_argument(
        "--unet-targets",
        default=None,
        help="comma-separated UNet module names (default to_q,to_k,to_v,to_out.0; kohya's: "
        "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2)",
    )
    lora.add_argument(
        "--text-encoder-targets",
        default=None,
        help="comma-separated text-encoder module names (default q_proj,k_proj,v_proj,out_proj)",
    )
    lora.add_argument(
        "--text-encoder-lr", type=float, default=None, help="learning rate of the text encoder (default --lr)"
    )
    lora.add_argument(
        "--lora-format", choices=("kohya", "diffusers"), default="kohya", help="saved LoRA names"
    )
    lora.add_argument(
        "--save-precision", choices=("float32", "float16"), default="float32", help="dtype of the saved LoRA"
    )
    lora.add_argument(
        "--num-vectors", type=int, default=1, help="vectors of the --embedding word (default 1)"
    )
    lora.add_argument(
        "--init-text", default="*", help="the --embedding vectors start as this text's token embeddings"
    )
    control = p.add_argument_group("ControlNet (--train controlnet)")
    control.add_argument(
        "--hints", default=None, help="folder of hint images named as the --data images (required)"
    )
    control.add_argument(
        "--controlnet",
        default=None,
        help="start from this ControlNet (default: a copy of the UNet's encoder)",
    )
    control.add_argument(
        "--hint-channels",
        default=None,
        help="comma-separated hint-encoder widths of a new net (default 16,32,96,256 for SD's factor-8 "
        "VAE, the first levels of it for smaller factors)",
    )
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
    if args.ema_decay is not None and args.ema_decay >= 1.0:
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
    _check_adapter_arguments(args)
    _check_controlnet_arguments(args)
    if args.out is not None and (args.lora or args.embedding is not None):
        if not args.out.lower().endswith(".safetensors"):
            raise UsageError(f"--out {args.out}: with --lora / --embedding it must be a .safetensors file")
        if os.path.lexists(args.out):
            raise FileExistsError(f"--out {args.out}: already exists; choose a new file")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--out {args.out}: no such folder {folder}")
    elif args.out is not None and os.path.exists(args.out):
        if not os.path.isdir(args.out) or os.listdir(args.out):
            raise FileExistsError(f"--out {args.out}: exists and is not an empty folder; choose a new folder")
    return None if args.model is None else check_model(args.model, "--model")


def _targets(value: str | None, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(","))
    if not all(names):
        raise UsageError(f"{option} {value!r}: give comma-separated module names such as to_q,to_v")
    return names


def _check_controlnet_arguments(args: argparse.Namespace) -> None:
    """--hints / --controlnet / --hint-channels: only with --train controlnet, which needs --hints."""
    given = [
        o
        for o, v in (
            ("--hints", args.hints),
            ("--controlnet", args.controlnet),
            ("--hint-channels", args.hint_channels),
        )
        if v is not None
    ]
    if args.train != "controlnet":
        if given:
            raise UsageError(f"{', '.join(given)}: only with --train controlnet")
        return
    if args.hints is None:
        raise UsageError("--train controlnet needs --hints FOLDER (one hint image per training image)")
    if not os.path.isdir(args.hints):
        raise FileNotFoundError(f"--hints {args.hints}: no such folder")
    if args.class_data is not None:
        raise UsageError("--class-data: prior preservation is not supported with --train controlnet")
    if args.controlnet is not None and args.hint_channels is not None:
        raise UsageError("--hint-channels shapes a new net; --controlnet brings its own")
    if args.controlnet is not None and not os.path.exists(args.controlnet):
        raise FileNotFoundError(f"--controlnet {args.controlnet}: no such file or folder")
    args.hint_channels_list = None
    if args.hint_channels is not None:
        try:
            widths = tuple(int(w) for w in args.hint_channels.split(","))
        except ValueError:
            widths = ()
        if not widths or min(widths) < 1:
            raise UsageError(
                f"--hint-channels {args.hint_channels!r}: give positive integers such as 16,32,96"
            )
        args.hint_channels_list = widths


def _new_controlnet(sd, widths: tuple[int, ...] | None):
    """A ControlNet copied from ``sd``'s UNet, its hint encoder as deep as the VAE's downscale."""
    from tf_diffusion.controlnet import controlnet_from_unet

    levels = sd.config.vae.downsample_factor.bit_length()  # factor 8: 4 levels (16, 32, 96, 256)
    if widths is None:
        widths = (16, 32, 96, 256, 512)[:levels]
    if len(widths) != levels:
        raise UsageError(
            f"--hint-channels {','.join(map(str, widths))}: {sd.config.name}'s VAE scales by "
            f"{sd.config.vae.downsample_factor}, so give {levels} widths"
        )
    return controlnet_from_unet(sd.unet, hint_channels=widths)


def _check_adapter_arguments(args: argparse.Namespace) -> None:
    """The --lora / --embedding options: in range, and only with what they apply to."""
    adapter = args.lora or args.embedding is not None
    if not args.lora:
        given = [
            o
            for o, v in (
                ("--alpha", args.alpha),
                ("--unet-targets", args.unet_targets),
                ("--text-encoder-targets", args.text_encoder_targets),
            )
            if v is not None
        ]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --lora")
    if adapter and args.train not in ("unet", "unet+text_encoder"):
        raise UsageError(
            f"--train {args.train}: --lora / --embedding train on the UNet's loss (unet or unet+text_encoder)"
        )
    if args.embedding is not None:
        if args.train != "unet":
            raise UsageError("--embedding trains only the word's vectors; leave --train at unet")
        if not args.embedding.strip() or args.embedding != args.embedding.strip():
            raise UsageError(f"--embedding {args.embedding!r}: give a word without surrounding spaces")
        if not 1 <= args.num_vectors <= 75:
            raise UsageError(f"--num-vectors {args.num_vectors}: must be an integer in [1, 75]")
        if not args.init_text.strip():
            raise UsageError("--init-text: give a word such as cat or *")
    finite_float(args.prior_loss_weight, "--prior-loss-weight", 0.0)
    if args.class_data is not None:
        if not os.path.isdir(args.class_data):
            raise FileNotFoundError(f"--class-data {args.class_data}: no such folder")
        if args.train in ("vae", "vae_decoder"):
            raise UsageError(
                f"--class-data: prior preservation is for the UNet's loss, not --train {args.train}"
            )
    positive_int(args.rank, "--rank")
    finite_float(args.alpha, "--alpha", 0.0)
    if args.alpha is not None and args.alpha <= 0:
        raise UsageError(f"--alpha {args.alpha:g}: must be > 0")
    finite_float(args.text_encoder_lr, "--text-encoder-lr", 0.0)
    if args.text_encoder_lr is not None:
        if args.text_encoder_lr <= 0:
            raise UsageError(f"--text-encoder-lr {args.text_encoder_lr:g}: must be > 0")
        if args.train != "unet+text_encoder":
            raise UsageError("--text-encoder-lr: only with --train unet+text_encoder")
    args.unet_targets_list = _targets(args.unet_targets, "--unet-targets")
    args.text_encoder_targets_list = _targets(args.text_encoder_targets, "--text-encoder-targets")


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit code."""
    source = check_arguments(args)
    tf = import_tensorflow()
    import keras
    import numpy as np

    if args.mirrored and keras.backend.backend() != "tensorflow":
        raise UsageError(
            f"--mirrored: MirroredStrategy is TensorFlow's; KERAS_BACKEND={keras.backend.backend()} trains "
            "on one device from the command line (use keras.distribution from Python for several)"
        )

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import (
        ControlNetTrainer,
        DiffusionTrainer,
        LoraTrainer,
        LoraTrainingConfig,
        TextualInversionTrainer,
        TrainingConfig,
        VAETrainer,
        dataset_from_arrays,
        dataset_with_prior,
        load_hint_folder,
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
    hints = load_hint_folder(args.data, args.hints, size) if args.train == "controlnet" else None
    config = TrainingConfig(
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        ema_decay=_ema_decay(args),
        caption_dropout=args.caption_dropout,
        high_noise_fraction=args.high_noise_fraction,
        high_noise_start=args.high_noise_start,
        kl_weight=args.kl_weight,
        reconstruction_loss=args.reconstruction_loss,
        seed=args.seed,
        jit_compile=args.xla,
        text_encoder_learning_rate=args.text_encoder_lr,
        prior_loss_weight=args.prior_loss_weight if args.class_data is not None else 0.0,
    )
    tokenizer = sd.tokenizer
    if args.lora:
        lora = LoraTrainingConfig(
            rank=args.rank,
            alpha=args.alpha,
            unet_targets=args.unet_targets_list,
            text_encoder_targets=args.text_encoder_targets_list,
            seed=args.seed,
        )
        trainer = LoraTrainer(sd, args.train, config, strategy=strategy, lora=lora)
    elif args.embedding is not None:
        trainer = TextualInversionTrainer(
            sd, args.embedding, args.num_vectors, args.init_text, config, strategy=strategy
        )
        if not any(args.embedding.lower() in c.lower() for c in captions):
            raise UsageError(f"--embedding {args.embedding}: no caption in --data uses the word")
        tokenizer = trainer.tokenize
    elif args.train == "controlnet":
        from tf_diffusion.controlnet import ControlNet

        with strategy.scope():
            if args.controlnet is not None:
                net = ControlNet.from_pretrained(args.controlnet)
            else:
                net = _new_controlnet(sd, args.hint_channels_list)
        trainer = ControlNetTrainer(sd, net, config, strategy=strategy)
    elif args.train in ("vae", "vae_decoder"):
        trainer = VAETrainer(sd.vae, config, strategy=strategy, train=args.train)
    else:
        trainer = DiffusionTrainer(sd, args.train, config, strategy=strategy)
    if isinstance(trainer, DiffusionTrainer) and not isinstance(trainer, TextualInversionTrainer):
        tokenizer = trainer.tokenize  # SDXL: both tokenizers' ids
    data = dataset_from_arrays(images, captions, tokenizer, args.batch_size, seed=args.seed, hints=hints)
    if args.class_data is not None:
        class_images, class_captions = load_image_folder(args.class_data, size)
        prior = dataset_from_arrays(
            class_images,
            class_captions,
            tokenizer,
            min(args.batch_size, len(class_images)),
            seed=args.seed + 1,
        )
        data = dataset_with_prior(data, prior)
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
        if args.lora:
            dtype = None if args.save_precision == "float32" else args.save_precision
            trainer.save_lora(args.out, args.lora_format, dtype=dtype)
        elif args.embedding is not None:
            trainer.save_embedding(args.out)
        elif args.train == "controlnet":
            trainer.save_controlnet(args.out)
        else:
            save_trained(sd, trainer, args.out)
        print(f"wrote {args.out}")
    return 0


def _ema_decay(args: argparse.Namespace) -> float | None:
    """--ema-decay, default 0.999 for whole models and none for LoRA factors and embeddings (as kohya)."""
    if args.ema_decay is None:
        return None if (args.lora or args.embedding is not None) else 0.999
    return args.ema_decay or None


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
