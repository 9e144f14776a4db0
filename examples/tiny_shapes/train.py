"""Train the embedded ``tiny-shapes`` model end to end on procedurally drawn shapes.

Stages (each resumes from its checkpoints under ``--ckpt-dir``):

1. ``vae``: the factor-4 VAE on 64x64 shape images (L1 + small KL, EMA). Writes
   ``vae_final.safetensors`` (EMA weights), ``vae_stats.json`` (reconstruction error and the latent
   std that gives ``scaling_factor``) and ``vae_recon.png`` (originals above reconstructions).
2. ``unet``: the UNet and text encoder with the frozen VAE: epsilon loss, caption dropout, EMA.
   Every ``--sample-every-s`` seconds it samples held-out prompts with the EMA weights, writes
   ``samples-<step>.png`` and scores them with ``tiny_shapes.checker``.
3. ``export``: the EMA weights as float16 into ``--out`` in the tf_diffusion folder format (an
   existing model there is replaced only with ``--overwrite``), then ``eval``: held-out prompts
   scored by the checker, ``final_eval.json`` and a generated ``MODEL_CARD.md`` (``model_card.py``; into
   ``--out`` unless one is there already and ``--overwrite`` is not given; then into ``--ckpt-dir``).

Example (from the repository root; ``--ckpt-dir`` defaults to ./tiny-shapes-ckpt):
    nohup python examples/tiny_shapes/train.py --stage all --ckpt-dir tiny-shapes-ckpt \\
        --vae-minutes 20 --unet-minutes 60 > train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __package__ in (None, ""):  # run as a script: make the tiny_shapes package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _share(text: str) -> float:
    """A fraction in [0, 1] for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in [0, 1]")
    return value


def _mention_arg(text: str) -> tuple[str, float]:
    """``ATTR=P`` -> (attr, p), checked against ``shapes.MENTION_PROBABILITY``."""
    from tiny_shapes import dataset as shapes

    key, sep, value = text.partition("=")
    try:
        merged = shapes.mention_probabilities({key.strip(): float(value)}) if sep else None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if merged is None:
        raise argparse.ArgumentTypeError(f"--mention {text!r} must look like ATTR=P, e.g. color=0.85")
    return key.strip(), merged[key.strip()]


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def shapes_batches(
    seed: int,
    batch_size: int,
    mention: dict[str, float] | None = None,
    captions: str = "template",
    varied_share: float = 0.5,
):
    """make_batch(k) -> (images, captions) of batch k of the training split (caption wording: see
    ``dataset.sample``)."""
    from tiny_shapes import dataset as shapes

    data = shapes.ShapesDataset(seed, "train", mention=mention, captions=captions, varied_share=varied_share)

    def make_batch(k: int):
        images, captions, _ = data.batch(k * batch_size, batch_size)
        return images, captions

    return make_batch


def small_heavy_batches(seed: int, batch_size: int, small_share: float):
    """make_batch(k) like ``shapes_batches``, with ``small_share`` of each batch drawn from small shapes.

    For the VAE decoder: small shapes (about 14 pixels across at 64x64, 3.5 latent cells) lose their
    corners and points first. Slot j of batch k takes the first small shape among training items
    8 * (k * batch_size + j) ... + 7 (so every batch is deterministic and independent of the others),
    or the first of them if none is small (about 4% of slots).
    """
    from tiny_shapes import dataset as shapes

    data = shapes.ShapesDataset(seed, "train")
    small = int(round(small_share * batch_size))

    def make_batch(k: int):
        images, captions, _ = data.batch(k * batch_size, batch_size)
        images = images.copy()
        for j in range(small):
            base = 8 * (k * batch_size + j)
            first = None
            for i in range(8):
                image, attrs = data[base + i]
                first = first or (image, attrs)
                if attrs.size == "small":
                    break
            else:
                image, attrs = first
            images[j], captions[j] = image, attrs.caption
        return images, captions

    return make_batch


def save_grid(path: str, rows: list[np.ndarray]) -> None:
    """Write uint8 image rows (each (N, H, W, 3)) as one PNG grid."""
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------- stage 1


def train_vae(args, config) -> dict:
    import tensorflow as tf

    from tf_diffusion.training import TrainingConfig, VAETrainer, dataset_from_generator
    from tf_diffusion.vae import AutoencoderKL
    from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors
    from tf_diffusion.weights.state_dict import load_state_dict
    from tiny_shapes import dataset as shapes

    folder = os.path.join(args.ckpt_dir, "vae")
    final = os.path.join(args.ckpt_dir, "vae_final.safetensors")
    vae = AutoencoderKL(config.vae)
    if not os.path.exists(final):
        trainer = VAETrainer(
            vae,
            TrainingConfig(
                learning_rate=args.vae_lr,
                warmup_steps=100,
                weight_decay=0.0,
                ema_decay=0.999,
                kl_weight=args.kl_weight,
                reconstruction_loss=args.vae_loss,
                seed=args.seed,
            ),
        )
        make_batch = shapes_batches(args.seed + 1, args.vae_batch)
        tokenizer = _tokenizer(config)

        def data(start):
            return dataset_from_generator(make_batch, tokenizer, args.vae_batch, 64, start=start)

        t0 = time.time()
        history = trainer.fit(
            data,
            args.vae_steps,
            checkpoint_dir=folder,
            checkpoint_every_s=args.checkpoint_every_s,
            time_limit_s=args.vae_minutes * 60,
            log_file=os.path.join(args.ckpt_dir, "vae_log.jsonl"),
            progress=False,
            callbacks=[_log_every(100)],
        )
        log(
            f"vae: {trainer.step} steps, {time.time() - t0:.0f}s this run, last loss {history[-1] if history else None}"
        )
        save_safetensors(trainer.export_ema()["vae"], final, overwrite=True)
    load_state_dict(vae, load_safetensors(final))

    # Reconstruction error and latent statistics on held-out-split images (never trained on).
    images, _, _ = shapes.numpy_batch(args.seed + 99, 256, split="heldout")
    x = tf.constant(images.astype(np.float32) / 127.5 - 1.0)
    latents, recons = [], []
    for i in range(0, len(x), 64):
        posterior = vae.encode(x[i : i + 64])
        latents.append(posterior.mean.numpy())
        recons.append(vae.decode(posterior.mean).numpy())
    latents, recons = np.concatenate(latents), np.concatenate(recons)
    recon_u8 = np.clip((recons + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    err = np.abs(recon_u8.astype(np.float32) - images.astype(np.float32))
    stats = {
        "mae_uint8": float(err.mean()),
        "max_err_uint8_p99": float(np.percentile(err, 99)),
        "psnr_db": float(10 * np.log10(255.0**2 / np.mean(np.square(err)))),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "scaling_factor": float(1.0 / latents.std()),
    }
    with open(os.path.join(args.ckpt_dir, "vae_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    save_grid(
        os.path.join(args.ckpt_dir, "vae_recon.png"),
        [images[:12], recon_u8[:12], images[12:24], recon_u8[12:24]],
    )
    log("vae stats", stats)
    return stats


def train_vae_decoder(args, config) -> dict:
    """Fine-tune only the VAE decoder (the encoder and so the UNet's latent space stay fixed)."""
    from tf_diffusion.training import TrainingConfig, VAETrainer, dataset_from_generator
    from tf_diffusion.vae import AutoencoderKL
    from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors
    from tf_diffusion.weights.state_dict import load_state_dict

    final = os.path.join(args.ckpt_dir, "vae_final.safetensors")
    first = os.path.join(args.ckpt_dir, "vae_stage1.safetensors")
    if not os.path.exists(first):
        os.replace(final, first)
    vae = AutoencoderKL(config.vae)
    weights = load_safetensors(first)
    load_state_dict(vae, weights)
    trainer = VAETrainer(
        vae,
        TrainingConfig(
            learning_rate=args.vae_lr,
            warmup_steps=50,
            weight_decay=0.0,
            ema_decay=0.998,
            reconstruction_loss=args.vae_loss,
            seed=args.seed + 5,
        ),
        train="vae_decoder",
    )
    if args.vae_small_share:
        make_batch = small_heavy_batches(args.seed + 3, args.vae_batch, args.vae_small_share)
    else:
        make_batch = shapes_batches(args.seed + 3, args.vae_batch)
    tokenizer = _tokenizer(config)
    trainer.fit(
        lambda start: dataset_from_generator(make_batch, tokenizer, args.vae_batch, 64, start=start),
        args.vae_steps,
        checkpoint_dir=os.path.join(args.ckpt_dir, "vae_decoder"),
        checkpoint_every_s=args.checkpoint_every_s,
        time_limit_s=args.vae_minutes * 60,
        log_file=os.path.join(args.ckpt_dir, "vae_decoder_log.jsonl"),
        progress=False,
        callbacks=[_log_every(100)],
    )
    weights.update(trainer.export_ema()["vae"])
    save_safetensors(weights, final, overwrite=True)
    log(f"vae decoder: {trainer.step} steps")
    return train_vae(args, config)  # vae_final exists: only measures and writes the stats and images


# ---------------------------------------------------------------- stage 2


def _tokenizer(config):
    from tf_diffusion.tokenizer import CLIPTokenizer

    return CLIPTokenizer(config=config.tokenizer)


def _log_every(n: int):
    t0 = [time.time()]
    acc: dict = {}

    def callback(trainer, step, logs):
        for k, v in logs.items():
            acc.setdefault(k, []).append(v)
        if step % n == 0:
            now = time.time()
            means = {k: round(float(np.mean(v)), 5) for k, v in acc.items()}
            log(f"step {step} {means} {(now - t0[0]) / n:.3f}s/step")
            t0[0] = now
            acc.clear()

    return callback


def sample_and_score(
    sd, prompts, targets, seed: int, steps: int, sampler: str, guidance: float, path: str | None
):
    """Generate one image per prompt; returns (images, checker score dict)."""
    from tiny_shapes import checker as shapes_checker

    images = []
    for i in range(0, len(prompts), 16):
        images.append(
            sd.generate(
                prompts[i : i + 16],
                num_steps=steps,
                guidance_scale=guidance,
                scheduler=sampler,
                seed=seed + i,
                progress=False,
            )
        )
    images = np.concatenate(images)
    score = shapes_checker.score(images, targets)
    if path is not None:
        per = min(len(images), 8)
        n = min(len(images), 32) // per * per
        save_grid(path, [images[j : j + per] for j in range(0, n, per)])
    return images, score


def train_unet(args, config) -> None:
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import DiffusionTrainer, TrainingConfig, dataset_from_generator
    from tf_diffusion.weights.safetensors_io import load_safetensors
    from tf_diffusion.weights.state_dict import load_state_dict, state_dict
    from tiny_shapes import dataset as shapes

    sd = StableDiffusion(config)
    load_state_dict(sd.vae, load_safetensors(os.path.join(args.ckpt_dir, "vae_final.safetensors")))
    if args.init_from:
        # Start from another model's text encoder and UNet (e.g. the shipped folder); a resumed
        # checkpoint below still takes precedence.
        init = load_folder(args.init_from)
        for name in ("text_encoder", "unet"):
            load_state_dict(getattr(sd, name), state_dict(getattr(init, name)))
        del init
        log(f"text encoder and UNet initialised from {args.init_from}")
    trainer = DiffusionTrainer(
        sd,
        train="unet+text_encoder",
        config=TrainingConfig(
            learning_rate=args.unet_lr,
            warmup_steps=200,
            weight_decay=1e-2,
            ema_decay=args.ema_decay,
            caption_dropout=0.1,
            high_noise_fraction=args.high_noise_fraction,
            high_noise_start=args.high_noise_start,
            seed=args.seed,
        ),
    )
    mention = dict(args.mention or [])
    if args.position_mention is not None:
        mention["position"] = args.position_mention
    make_batch = shapes_batches(args.seed + 2, args.unet_batch, mention, args.captions, args.varied_share)

    def data(start):
        return dataset_from_generator(make_batch, sd.tokenizer, args.unet_batch, 64, start=start)

    targets = shapes.heldout_prompts(args.eval_prompts, seed=args.seed)
    prompts = [t.prompt for t in targets]
    last_sample = [time.time()]

    def sampler_callback(trainer, step, logs):
        if time.time() - last_sample[0] < args.sample_every_s:
            return
        with trainer.ema_weights():
            _, score = sample_and_score(
                sd,
                prompts,
                targets,
                1234,
                args.eval_steps,
                args.sampler,
                args.guidance,
                os.path.join(args.ckpt_dir, f"samples-{step:06d}.png"),
            )
        log(f"eval step {step}: {json.dumps(score.get('accuracy', score))}")
        last_sample[0] = time.time()

    t0 = time.time()
    trainer.fit(
        data,
        args.unet_steps,
        checkpoint_dir=os.path.join(args.ckpt_dir, "unet"),
        checkpoint_every_s=args.checkpoint_every_s,
        time_limit_s=args.unet_minutes * 60,
        log_file=os.path.join(args.ckpt_dir, "unet_log.jsonl"),
        progress=False,
        callbacks=[_log_every(50), sampler_callback],
    )
    log(f"unet: {trainer.step} steps, {time.time() - t0:.0f}s this run")


# ---------------------------------------------------------------- stage 3


def export(args, config) -> None:
    """Write the EMA weights as float16 in the tf_diffusion folder format into ``args.out``."""
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.training import DiffusionTrainer, TrainingConfig, latest_checkpoint
    from tf_diffusion.weights.folder import write_folder
    from tf_diffusion.weights.safetensors_io import load_safetensors

    sd = StableDiffusion(config)
    trainer = DiffusionTrainer(sd, train="unet+text_encoder", config=TrainingConfig(ema_decay=args.ema_decay))
    ckpt = latest_checkpoint(os.path.join(args.ckpt_dir, "unet"))
    if ckpt is None:
        raise SystemExit(f"no UNet checkpoint under {args.ckpt_dir}/unet; run --stage unet first")
    trainer.load_checkpoint(ckpt)
    components = trainer.export_ema(dtype="float16")
    vae = load_safetensors(os.path.join(args.ckpt_dir, "vae_final.safetensors"))
    components["vae"] = {k: v.astype(np.float16) for k, v in vae.items()}
    os.makedirs(args.out, exist_ok=True)
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    import pathlib

    write_folder(pathlib.Path(args.out), components, config, sd.tokenizer)
    info = {"checkpoint": os.path.basename(ckpt), "step": trainer.step}
    with open(os.path.join(args.ckpt_dir, "export.json"), "w") as f:
        json.dump(info, f)
    log(f"exported {ckpt} (step {trainer.step}) to {args.out}")


WEIGHT_FILES = ("config.json", "text_encoder.safetensors", "unet.safetensors", "vae.safetensors")


def check_out_folder(args) -> None:
    """Refuse, before any training, to replace an exported model in ``--out`` without ``--overwrite``."""
    if args.stage not in ("export", "all") or args.overwrite:
        return
    present = [n for n in WEIGHT_FILES if os.path.exists(os.path.join(args.out, n))]
    if present:
        raise SystemExit(
            f"--out {args.out} already holds {', '.join(present)}; pass --overwrite to replace them "
            "or choose another --out"
        )


def load_folder(path: str):
    """A StableDiffusion with the weights of one of our folders."""
    from tf_diffusion.pipeline import StableDiffusion

    if hasattr(StableDiffusion, "from_pretrained"):
        return StableDiffusion.from_pretrained(path)
    from tf_diffusion.weights.folder import read_folder
    from tf_diffusion.weights.state_dict import load_state_dict

    folder = read_folder(path)
    sd = StableDiffusion(folder.config, tokenizer=folder.tokenizer)
    for name in ("text_encoder", "unet", "vae"):
        load_state_dict(
            getattr(sd, name),
            {k: np.asarray(v).astype(np.float32) for k, v in folder.components[name].items()},
        )
    for handle in folder.handles:
        handle.close()
    return sd


def evaluate(args) -> dict:
    """Score the exported model on held-out prompts with the independent checker; time one image."""
    from tiny_shapes import dataset as shapes

    sd = load_folder(args.out)
    targets = shapes.heldout_prompts(args.final_eval_prompts, seed=args.seed + 7)
    prompts = [t.prompt for t in targets]
    _, score = sample_and_score(
        sd,
        prompts,
        targets,
        4321,
        args.eval_steps,
        args.sampler,
        args.guidance,
        os.path.join(args.ckpt_dir, "final_samples.png"),
    )
    # The same attributes in frames training never used (tiny_shapes.phrasing.HELDOUT_FRAMES).
    from tiny_shapes import phrasing

    reworded = phrasing.heldout_phrasing_prompts(args.final_eval_prompts, seed=args.seed + 7)
    _, phrasing_score = sample_and_score(
        sd, [t.prompt for t in reworded], reworded, 4321, args.eval_steps, args.sampler, args.guidance, None
    )
    # Per-image wall time after warm-up, one prompt at a time as a user would call it.
    sd.generate(
        "a red circle",
        num_steps=args.eval_steps,
        guidance_scale=args.guidance,
        scheduler=args.sampler,
        seed=0,
        progress=False,
    )
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        sd.generate(
            prompts[i % len(prompts)],
            num_steps=args.eval_steps,
            guidance_scale=args.guidance,
            scheduler=args.sampler,
            seed=i,
            progress=False,
        )
        times.append(time.perf_counter() - t0)
    result = {
        "prompts": len(prompts),
        "sampler": args.sampler,
        "steps": args.eval_steps,
        "guidance": args.guidance,
        "score": score,
        "phrasing_score": phrasing_score,
        "seconds_per_image_median": float(np.median(times)),
    }
    with open(os.path.join(args.ckpt_dir, "final_eval.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    from tiny_shapes.model_card import write_model_card

    write_model_card(args, sd, result, log=log)
    log("final eval", json.dumps({k: v for k, v in result.items() if k != "score"}, default=str))
    log("final score", json.dumps({k: v for k, v in score.items() if k != "items"}, default=str))
    log(
        "held-out phrasings",
        json.dumps({k: v for k, v in phrasing_score.items() if k != "items"}, default=str),
    )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Train the tiny-shapes model end to end on procedurally drawn shapes."
    )
    p.add_argument("--stage", choices=("vae", "vae_decoder", "unet", "export", "eval", "all"), default="all")
    p.add_argument(
        "--ckpt-dir",
        default="tiny-shapes-ckpt",
        help="checkpoints, logs, samples and evaluations; each stage resumes from here (default: %(default)s)",
    )
    p.add_argument("--out", default="weights/tiny-shapes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the weights and model card already in --out (otherwise export refuses)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--vae-minutes", type=float, default=20)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--vae-loss", choices=("l1", "l2", "l1+l2"), default="l1+l2")
    p.add_argument(
        "--vae-small-share",
        type=_share,
        default=0.0,
        help="vae_decoder stage: fraction of each batch drawn from small shapes (default 0: as drawn)",
    )
    p.add_argument("--unet-steps", type=int, default=100_000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=3e-4)
    p.add_argument("--unet-minutes", type=float, default=60)
    p.add_argument(
        "--init-from",
        default=None,
        help="a tf_diffusion folder whose text encoder and UNet start the unet stage",
    )
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--high-noise-fraction",
        type=float,
        default=0.0,
        help="fraction of each UNet batch whose timestep comes from the noisier range (layout steps)",
    )
    p.add_argument(
        "--high-noise-start",
        type=float,
        default=0.5,
        help="where that noisier range starts, as a fraction of the timesteps (default 0.5)",
    )
    p.add_argument(
        "--position-mention",
        type=float,
        default=None,
        help="UNet stage: probability that a caption names the position (default: the dataset's 0.5)",
    )
    p.add_argument(
        "--mention",
        type=_mention_arg,
        action="append",
        metavar="ATTR=P",
        help="UNet stage: probability that a caption names ATTR (color, shape, size, position or "
        "background), e.g. --mention color=0.85 --mention shape=0.85; repeatable",
    )
    p.add_argument(
        "--captions",
        choices=("template", "varied"),
        default="template",
        help="UNet stage: caption wording; 'varied' says a share of captions in other words "
        "(tiny_shapes.phrasing) (default: %(default)s)",
    )
    p.add_argument(
        "--varied-share",
        type=_share,
        default=0.5,
        help="with --captions varied: the share of captions phrased that way (default: %(default)s)",
    )
    p.add_argument("--checkpoint-every-s", type=float, default=240)
    p.add_argument("--sample-every-s", type=float, default=900)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--final-eval-prompts", type=int, default=200)
    args = p.parse_args(argv)

    from tf_diffusion.presets import get_preset

    check_out_folder(args)
    config = get_preset("tiny-shapes")
    os.makedirs(args.ckpt_dir, exist_ok=True)
    if args.stage in ("vae", "all"):
        train_vae(args, config)
    if args.stage == "vae_decoder":
        train_vae_decoder(args, config)
    stats_path = os.path.join(args.ckpt_dir, "vae_stats.json")
    if args.stage in ("unet", "export", "all"):
        with open(stats_path) as f:
            factor = round(json.load(f)["scaling_factor"], 4)
        if abs(factor - config.vae.scaling_factor) > 1e-9:
            log(f"using measured scaling_factor {factor} (preset has {config.vae.scaling_factor})")
            config = config.replace(vae=dataclasses.replace(config.vae, scaling_factor=factor))
    if args.stage in ("unet", "all"):
        train_unet(args, config)
    if args.stage in ("export", "all"):
        export(args, config)
    if args.stage in ("eval", "export", "all"):
        evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
