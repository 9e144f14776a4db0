"""Peak memory and time of one SD 1.5 LoRA training step at 512x512 in bfloat16: our LoraTrainer against
diffusers + peft doing the same step, each in its own process.

The step, on both sides: a full-size SD 1.5 pipeline with random weights (timings and memory do not depend on
them), frozen; a rank-4 LoRA (alpha 4) on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``,
``to_out.0``: the default of both our trainer and diffusers' ``train_text_to_image_lora.py``); batch 1: VAE
encode of a 512x512 image, text encoder, noise and a timestep, UNet forward and backward, one AdamW update
(learning rate 1e-4).

- ours: ``StableDiffusion.from_preset("sd-v1-5", dtype="bfloat16")`` and ``LoraTrainer(sd, "unet")``;
  ``train_step`` as ``fit`` calls it (one compiled function: tracing in the first call).
- diffusers: what ``train_text_to_image_lora.py --mixed_precision bf16`` does: frozen weights in bfloat16,
  ``unet.add_adapter(LoraConfig(...))``, the LoRA factors in float32 (``cast_training_params``), the forward
  pass under ``torch.autocast(bfloat16)``, ``torch.optim.AdamW`` on the factors.

The first step (ours: tracing included) and a second, timed; the process's peak resident memory (``VmHWM``,
building included) and its resident memory once the models are built.

    python benchmarks/lora_train_memory.py all --out benchmarks/results/lora_train_memory.json
    python benchmarks/lora_train_memory.py case ours
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._harness import run_case, status_gib, write_report  # noqa: E402
from benchmarks.lora import SD15_UNET, machine  # noqa: E402

RANK, LEARNING_RATE, SIZE = 4, 1e-4, 512
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# runwayml/stable-diffusion-v1-5's vae/config.json and text_encoder/config.json (architecture fields).
SD15_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512,
)  # fmt: skip
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip


def batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)  # NHWC in [-1, 1]
    ids = np.full((1, 77), 49407, np.int32)
    ids[0, :6] = [49406, 320, 1125, 539, 320, 2368]  # "<bos> a photo of a cat", then eos padding
    return images, ids


def timed_steps(step) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    step()
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    loss = step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return dict(
        first_step_s=round(first, 1), first_step_cpu_s=round(first_cpu, 1), step_s=round(wall, 2),
        step_cpu_s=round(cpu, 2), loss=round(float(loss), 4),
    )  # fmt: skip


def ours() -> dict:
    import keras
    import tensorflow as tf

    from tf_diffusion import StableDiffusion
    from tf_diffusion.training import LoraTrainer, LoraTrainingConfig, TrainingConfig

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    sd = StableDiffusion.from_preset("sd-v1-5", dtype="bfloat16")
    config = TrainingConfig(learning_rate=LEARNING_RATE, ema_decay=None, caption_dropout=0.0)
    trainer = LoraTrainer(
        sd, "unet", config, lora=LoraTrainingConfig(rank=RANK, alpha=RANK, unet_targets=TARGETS)
    )
    build = time.perf_counter() - start
    rss_built = status_gib("VmRSS")
    images, ids = batch()
    data = (tf.constant(images), tf.constant(ids))
    row = timed_steps(lambda: trainer.train_step(data)["loss"])
    trained = sum(int(np.prod(v.shape)) for v in trainer.trainable_variables)
    return dict(build_s=round(build, 1), rss_built_gib=round(rss_built, 2), lora_params=trained, **row)


def reference() -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.to(torch.bfloat16)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-2)
    build = time.perf_counter() - start
    rss_built = status_gib("VmRSS")
    images, ids = batch()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(ids.astype(np.int64))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
            noisy = scheduler.add_noise(latents, noise, t)
            context = text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, t, context, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    row = timed_steps(step)
    return dict(build_s=round(build, 1), rss_built_gib=round(rss_built, 2), lora_params=sum(p.numel() for p in params),
                **row)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    case = sub.add_parser("case")
    case.add_argument("name", choices=("ours", "diffusers"))
    every = sub.add_parser("all")
    every.add_argument("--out", default="benchmarks/results/lora_train_memory.json")
    args = parser.parse_args()
    if args.command == "case":
        row = ours() if args.name == "ours" else reference()
        row = {"case": args.name, **row, "peak_rss_gib": round(status_gib("VmHWM"), 2),
               "loadavg_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
        print(json.dumps(row), flush=True)
        return
    rows = []
    for name in ("ours", "diffusers"):
        rows.append(run_case(__file__, name, []))
        print(json.dumps(rows[-1]), flush=True)
    write_report(args.out, {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "what": f"one SD 1.5 LoRA training step (UNet attention, rank {RANK}, batch 1, AdamW) at {SIZE}x{SIZE}, "
                "bfloat16, random weights; fresh process per row",
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
