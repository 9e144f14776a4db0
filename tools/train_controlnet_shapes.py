"""Train a small ControlNet on tiny-shapes with position hints, and measure whether shapes follow them.

An experiment (issue 21), not a test. The hint is a blob where the shape goes: a white gaussian
spot (sigma ``--sigma`` pixels) on black at the shape's bounding-box center, at the image size.

1. Training data: ``--train-images`` samples of the tiny-shapes "train" split whose captions never
   name the position (``mention={"position": 0}``), so only the hint tells the net where the shape is.
   The net starts from the shipped UNet (``controlnet_from_unet``, hint encoder (16, 32, 64) for the
   factor-4 VAE) and trains with ``ControlNetTrainer`` (UNet, VAE and text encoder frozen) for
   ``--steps`` steps or ``--minutes``, whichever ends first.
2. Evaluation: ``--eval-images`` prompts naming colour and shape only (no position), each with a
   hinted cell that cycles through the 3x3 grid; every prompt is generated twice from the same
   seed, with and without the net, at the model card's settings. The independent checker
   (``examples/tiny_shapes/checker.py``, plain geometry on the pixels) reads the shape's cell; a hit
   is that cell being the hinted one. Without the net a hit is chance (about 1 in 9).

Writes the result to ``--out`` (default benchmarks/results/controlnet_shapes.json) and the net, as
a diffusers ControlNetModel folder, to ``--save`` when given.

    nohup nice -n 5 python tools/train_controlnet_shapes.py --minutes 20 > cn_shapes.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from tiny_shapes import checker  # noqa: E402
from tiny_shapes import dataset as shapes  # noqa: E402

HINT_CHANNELS = (16, 32, 64)  # three levels: hints 4x the 16x16 latents, the image size


def hint_image(center: tuple[float, float], size: int, sigma: float) -> np.ndarray:
    """(size, size, 3) uint8: a white gaussian spot of std ``sigma`` pixels at ``center`` (x, y) on black."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centers
    d2 = (xs - center[0]) ** 2 + (ys - center[1]) ** 2
    spot = np.round(255.0 * np.exp(-d2 / (2.0 * sigma**2))).astype(np.uint8)
    return np.repeat(spot[..., None], 3, axis=-1)


def training_data(count: int, seed: int, size: int, sigma: float):
    """Images, captions without positions, and hints at each shape's center."""
    data = shapes.ShapesDataset(seed, "train", size, mention={"position": 0.0})
    images, captions, hints = [], [], []
    for i in range(count):
        image, attrs = data[i]
        images.append(image)
        captions.append(attrs.caption)
        hints.append(hint_image(attrs.center, size, sigma))
    return np.stack(images), captions, np.stack(hints)


def eval_cases(count: int, seed: int, size: int, sigma: float):
    """Prompts (colour and shape), the hinted cell of each (cycling through the 9), and the hints."""
    rng = np.random.default_rng(seed)
    cells = list(shapes.POSITIONS)
    data = shapes.ShapesDataset(seed, "train", size)
    prompts, positions, hints = [], [], []
    for i in range(count):
        attrs = data[i][1]
        position = cells[i % len(cells)]
        column, row = shapes.POSITIONS[position]
        # The cell's center, jittered as the dataset places shapes (well inside the cell).
        center = ((np.array([column, row]) + 0.5) * size / 3 + rng.uniform(-0.06, 0.06, 2) * size).tolist()
        prompts.append(shapes.make_caption(attrs.shape, attrs.color))
        positions.append(position)
        hints.append(hint_image(tuple(center), size, sigma))
    return prompts, positions, np.stack(hints)


def generate_all(sd, prompts, hints, seed: int, batch: int, **control):
    out = []
    for start in range(0, len(prompts), batch):
        extra = {}
        if control:
            extra = dict(control, control_image=hints[start : start + batch])
        images = sd.generate(prompts[start : start + batch], seed=seed + start, progress=False, **extra)
        out.extend(np.asarray(images))
    return np.stack(out)


def score(images, prompts, positions) -> dict:
    hits, shape_ok, color_ok, found = 0, 0, 0, 0
    cells = {}
    for image, prompt, position in zip(images, prompts, positions, strict=True):
        result = checker.check(image)
        found += result["position"] is not None
        hits += result["position"] == position
        shape_ok += result["shape"] is not None and result["shape"] in prompt
        color_ok += result["color"] is not None and result["color"] in prompt.split()
        cells[str(result["position"])] = cells.get(str(result["position"]), 0) + 1
    n = len(prompts)
    return {
        "position_hits": hits,
        "position_hit_rate": round(hits / n, 4),
        "shape_found": found,
        "shape_correct_rate": round(shape_ok / n, 4),
        "color_correct_rate": round(color_ok / n, 4),
        "cells_read": dict(sorted(cells.items())),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument(
        "--high-noise-fraction",
        type=float,
        default=0.0,
        help="share of each batch drawn from [0.85 T, T), the steps that place the shape (docs/training.md)",
    )
    parser.add_argument("--eval-images", type=int, default=144)
    parser.add_argument("--eval-seed", type=int, default=2026)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "controlnet_shapes.json"))
    parser.add_argument("--save", default=None, help="write the trained net here (diffusers folder)")
    parser.add_argument("--log", default=None, help="JSON lines of training logs")
    parser.add_argument(
        "--init", default=None, help="continue from this saved net (a --save folder) instead of the UNet"
    )
    parser.add_argument(
        "--init-steps", type=int, default=0, help="steps the --init net had trained (for the report)"
    )
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tf_diffusion import StableDiffusion, controlnet_from_unet, resolve_model
    from tf_diffusion.training import ControlNetTrainer, TrainingConfig, dataset_from_arrays

    t0 = time.time()
    sd = StableDiffusion.from_pretrained(resolve_model("tiny-shapes"))
    size = sd.config.default_size
    images, captions, hints = training_data(args.train_images, args.seed, size, args.sigma)
    print(f"data: {len(images)} images in {time.time() - t0:.0f} s", flush=True)

    tf.keras.utils.set_random_seed(args.seed)  # the hint encoder's random start
    if args.init:
        from tf_diffusion import ControlNet

        net = ControlNet.from_pretrained(args.init)
    else:
        net = controlnet_from_unet(sd.unet, hint_channels=HINT_CHANNELS)
    params = int(sum(int(np.prod(v.shape)) for v in net.weights))
    config = TrainingConfig(
        learning_rate=args.lr,
        warmup_steps=100,
        ema_decay=None,
        caption_dropout=0.1,
        seed=args.seed,
        high_noise_fraction=args.high_noise_fraction,
        high_noise_start=0.85,
    )
    trainer = ControlNetTrainer(sd, net, config)
    data = dataset_from_arrays(images, captions, sd.tokenizer, args.batch, hints=hints, seed=args.seed)
    t_train = time.time()
    history = trainer.fit(data, args.steps, time_limit_s=args.minutes * 60, progress=False, log_file=args.log)
    train_s = time.time() - t_train
    losses = [h["loss"] for h in history]
    print(f"trained {trainer.step} steps in {train_s:.0f} s", flush=True)
    if args.save:
        trainer.save_controlnet(args.save)

    prompts, positions, eval_hints = eval_cases(args.eval_images, args.eval_seed, size, args.sigma)
    t_eval = time.time()
    without = generate_all(sd, prompts, eval_hints, args.eval_seed, 16)
    with_net = generate_all(sd, prompts, eval_hints, args.eval_seed, 16, controlnet=net)
    eval_s = time.time() - t_eval
    result = {
        "experiment": "tiny-shapes ControlNet on position hints (issue 21)",
        "script": "tools/train_controlnet_shapes.py",
        "hint": f"white gaussian spot, sigma {args.sigma} px, at the shape's bbox center, 64x64x3",
        "controlnet": {
            "hint_channels": list(HINT_CHANNELS),
            "parameters": params,
            "init": "controlnet_from_unet",
        },
        "training": {
            "images": len(images),
            "captions": "tiny-shapes train split, position never named",
            "steps": args.init_steps + trainer.step,
            "runs": "one run"
            if not args.init
            else f"{args.init_steps} steps, saved, then {trainer.step} more (a fresh optimizer)",
            "batch": args.batch,
            "learning_rate": args.lr,
            "caption_dropout": 0.1,
            "high_noise_fraction": args.high_noise_fraction,
            "high_noise_start": 0.85,
            "seconds": round(train_s, 1),
            "loss_first_100": round(float(np.mean(losses[:100])), 4) if losses else None,
            "loss_last_100": round(float(np.mean(losses[-100:])), 4) if losses else None,
        },
        "evaluation": {
            "images_each": len(prompts),
            "prompts": "colour and shape only; hinted cell cycles through the 3x3 grid",
            "settings": {
                "steps": sd.config.default_steps,
                "guidance": sd.config.default_guidance,
                "sampler": sd.config.default_sampler,
                "controlnet_conditioning_scale": 1.0,
            },
            "checker": "examples/tiny_shapes/checker.py (geometry on pixels, no model)",
            "without_controlnet": score(without, prompts, positions),
            "with_controlnet": score(with_net, prompts, positions),
            "seconds": round(eval_s, 1),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), nice 5",
        "total_seconds": round(time.time() - t0, 1),
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["evaluation"], indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
