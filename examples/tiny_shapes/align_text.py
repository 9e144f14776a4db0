"""Teach the text encoder new wordings while the UNet, and what it does with the old wordings, stay fixed.

Fine-tuning text encoder and UNet together on re-worded captions broke the UNet's reading of position words
(MODEL_CARD.md, "tried and not shipped"). Here only the text encoder trains, and its target is the frozen
model itself: for an image drawn with some attributes, the frozen UNet's prediction from the frozen text
encoder's states of the template caption is what the trained text encoder must produce through that same
frozen UNet, both from a re-wording of the caption (``phrasing.phrase``) and from the template caption
itself (so the template wording keeps its behaviour). A share of rows has the empty caption on both sides,
so guidance's unconditional branch is kept too.

    python examples/tiny_shapes/align_text.py --init weights/tiny-shapes --out /tmp/aligned --minutes 45

``--out`` receives a copy of ``--init`` with the new text encoder (float16), ready for
``train.py --stage eval --out <it>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="weights/tiny-shapes")
    p.add_argument(
        "--student-init",
        help="start the trained text encoder from this folder's (to continue a run); default: --init's",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=45)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--empty-share", type=float, default=0.1)
    p.add_argument("--high-noise-fraction", type=float, default=0.35)
    p.add_argument("--high-noise-start", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        raise SystemExit(f"--out {args.out} exists; choose a new folder")

    import keras
    import tensorflow as tf

    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.schedulers.schedule import alphas_cumprod
    from tf_diffusion.training.trainers import _latent_noise_shape, draw_timesteps
    from tf_diffusion.weights.state_dict import state_dict
    from tiny_shapes import dataset as shapes
    from tiny_shapes import phrasing

    teacher = StableDiffusion.from_pretrained(args.init)
    student_te = StableDiffusion.from_pretrained(args.student_init or args.init).text_encoder
    unet, vae, teacher_te = teacher.unet, teacher.vae, teacher.text_encoder
    cfg = teacher.config
    abar = alphas_cumprod(cfg.scheduler, rescale=True).astype(np.float64)
    sqrt_a = tf.constant(np.sqrt(abar), tf.float32)
    sqrt_1ma = tf.constant(np.sqrt(1.0 - abar), tf.float32)
    optimizer = keras.optimizers.AdamW(learning_rate=args.lr, weight_decay=1e-2)
    variables = student_te.trainable_variables
    data = shapes.ShapesDataset(
        args.seed + 11, "train", mention={"color": 0.8, "shape": 0.8, "position": 0.7}
    )
    rng = np.random.default_rng(args.seed + 12)

    def batch(k):
        images, captions, attrs = data.batch(k * args.batch, args.batch)
        varied = []
        for i, a in enumerate(attrs):
            if rng.random() < args.empty_share:
                captions[i] = ""
                varied.append("")
                continue
            named = {m: getattr(a, m) for m in a.mentions}
            varied.append(
                phrasing.phrase(
                    rng,
                    named.get("shape"),
                    named.get("color"),
                    named.get("size"),
                    named.get("position"),
                    named.get("background"),
                )
            )
        ids_t = np.asarray(teacher.tokenizer(captions), np.int32)
        ids_v = np.asarray(teacher.tokenizer(varied), np.int32)
        return images.astype(np.float32) / 127.5 - 1.0, ids_t, ids_v

    @tf.function(jit_compile=False, reduce_retracing=True)
    def step(images, ids_t, ids_v, seed):
        seeds = tf.random.experimental.stateless_split(seed, 3)
        shape = _latent_noise_shape(images, cfg.vae.downsample_factor, cfg.vae.latent_channels)
        z = vae.encode(images).sample(noise=tf.random.stateless_normal(shape, seed=seeds[0]))
        z = tf.stop_gradient(z * cfg.vae.scaling_factor)
        n = tf.shape(z)[0]
        t = draw_timesteps(
            seeds[1], n, cfg.scheduler.num_train_timesteps, args.high_noise_fraction, args.high_noise_start
        )
        noise = tf.random.stateless_normal(tf.shape(z), seed=seeds[2])
        x_t = (
            tf.gather(sqrt_a, t)[:, None, None, None] * z
            + tf.gather(sqrt_1ma, t)[:, None, None, None] * noise
        )
        target = tf.stop_gradient(unet(x_t, t, teacher_te(ids_t)))
        with tf.GradientTape() as tape:
            context = student_te(tf.concat([ids_v, ids_t], axis=0))
            out = unet(tf.concat([x_t, x_t], 0), tf.concat([t, t], 0), context)
            loss_v = tf.reduce_mean(tf.square(out[:n] - target))
            loss_t = tf.reduce_mean(tf.square(out[n:] - target))
            loss = loss_v + loss_t
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss_v, loss_t

    os.makedirs(args.out + ".log", exist_ok=True)
    log_path = os.path.join(args.out + ".log", "align_log.jsonl")
    t0 = time.time()
    k = 0
    while k < args.steps and time.time() - t0 < args.minutes * 60:
        images, ids_t, ids_v = batch(k)
        loss_v, loss_t = step(images, ids_t, ids_v, tf.constant([args.seed, k], tf.int32))
        if k % 25 == 0:
            row = {
                "step": k,
                "loss_varied": float(loss_v),
                "loss_template": float(loss_t),
                "time": time.time(),
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)
        k += 1
    # Written beside --out and moved into place only once checked, so a failed export leaves nothing.
    staging = args.out + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(args.init, staging)
    from tf_diffusion.weights.safetensors_io import save_safetensors

    # state_dict's torch-layout arrays are transposed views; the writer stores them in C order.
    weights = {name: np.asarray(v).astype(np.float16) for name, v in state_dict(student_te).items()}
    save_safetensors(weights, os.path.join(staging, "text_encoder.safetensors"), overwrite=True)
    check = StableDiffusion.from_pretrained(staging).text_encoder
    ids = np.asarray(teacher.tokenizer(["a red circle in the top left corner"]), np.int32)
    gap = float(np.max(np.abs(np.asarray(check(ids)) - np.asarray(student_te(ids)))))
    if gap > 1e-2:  # float16 storage rounds the weights; anything larger means the export is wrong
        shutil.rmtree(staging)
        raise SystemExit(f"the written text encoder differs from the trained one by {gap:.3g}")
    os.rename(staging, args.out)
    print(f"{k} steps in {time.time() - t0:.0f} s; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
