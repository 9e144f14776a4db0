"""GPU speed: our SD 1.5 UNet under KERAS_BACKEND=jax against diffusers (float16, SDPA), same weights.

Run on one GPU machine with JAX and PyTorch (see benchmarks/README.md, "GPU"). Both models get
the same random SD 1.5 weights: ours are initialised by Keras, then copied into diffusers'
``UNet2DConditionModel`` under diffusers' names. Timed, at 512x512 with classifier-free guidance
(the UNet at batch 2, then ``uncond + 7.5 * (cond - uncond)``):

    steps_per_s      guided steps per second over a run of ``--steps`` steps after warm-up
                     (ours: one jitted step function called per step; diffusers: eager, SDPA)
    fused_steps_per_s  ours only: the whole loop as one XLA program (``ops.fori_loop``)
    ours_one_attention_block  ours again with ``layers.ATTENTION_BLOCK_ELEMENTS = None``
    generate_s       ours only: ``StableDiffusion.generate`` end to end (text, ``--steps`` DPM-Solver++
                     steps fused into one XLA program, VAE decode), after a warm-up call

Prints one JSON object (and writes it to ``--out``), with the GPU's name.

Usage (the machine needs keras, diffusers and ftfy beside JAX and PyTorch; README.md says how
to bring them as wheels):
    KERAS_BACKEND=jax python3 benchmarks/gpu/bench_gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
# JAX would otherwise reserve 75% of the GPU up front, leaving PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GUIDANCE = 7.5


def _inputs(config, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size // 8, size // 8, config.in_channels), dtype=np.float32)
    ctx = rng.standard_normal((2, 77, config.context_dim), dtype=np.float32)
    return x, ctx


def bench_ours(unet, config, size: int, steps: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from keras import ops

    x0, ctx = _inputs(config, size)
    x0, ctx = jnp.asarray(x0), jnp.asarray(ctx)
    timesteps = jnp.linspace(999, 0, steps).astype(jnp.int32)

    def guided(x, t):
        out = ops.cast(unet(ops.concatenate([x, x], axis=0), ops.broadcast_to(t, (2,)), ctx), "float32")
        eps = out[:1] + GUIDANCE * (out[1:] - out[:1])
        return x - 0.01 * eps  # a stand-in for the sampler update (negligible work)

    step = jax.jit(guided)

    def loop_body(i, x):
        return guided(x, timesteps[i])

    fused = jax.jit(lambda x: ops.fori_loop(0, steps, loop_body, x))

    start = time.perf_counter()
    step(x0, timesteps[0]).block_until_ready()
    compile_step = time.perf_counter() - start
    start = time.perf_counter()
    fused(x0).block_until_ready()
    compile_fused = time.perf_counter() - start

    loop_times, fused_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        x = x0
        for i in range(steps):
            x = step(x, timesteps[i])
        x.block_until_ready()
        loop_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fused(x0).block_until_ready()
        fused_times.append(time.perf_counter() - start)
    return {
        "steps_per_s": round(steps / statistics.median(loop_times), 3),
        "fused_steps_per_s": round(steps / statistics.median(fused_times), 3),
        "first_call_s": round(compile_step, 2),
        "fused_first_call_s": round(compile_fused, 2),
        "loop_times_s": [round(t, 3) for t in loop_times],
        "fused_times_s": [round(t, 3) for t in fused_times],
        "finite": bool(jnp.isfinite(x).all()),
    }


def bench_diffusers(tensors: dict, config, size: int, steps: int, reps: int) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from tf_diffusion.weights.diffusers_folder import unet_config_to_diffusers, unet_to_diffusers

    model = UNet2DConditionModel.from_config(unet_config_to_diffusers(config, size // 8))
    named = unet_to_diffusers(tensors, config)
    with torch.no_grad():
        for key, param in model.state_dict().items():
            param.copy_(torch.from_numpy(np.ascontiguousarray(named[key])))
    # CPU (float32) only for a smoke test of this script; timings are meant for a GPU.
    device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
    model = model.to(device, dtype).eval()
    model.set_attn_processor(__import__("diffusers").models.attention_processor.AttnProcessor2_0())

    x0, ctx = _inputs(config, size)
    x0 = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()).to(device, dtype)
    ctx = torch.from_numpy(ctx).to(device, dtype)
    timesteps = torch.linspace(999, 0, steps).long().to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        x = x0
        with torch.inference_mode():
            for i in range(steps):
                out = model(torch.cat([x, x]), timesteps[i], encoder_hidden_states=ctx).sample
                eps = out[:1] + GUIDANCE * (out[1:] - out[:1])
                x = x - 0.01 * eps
        sync()
        return x

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x = run()
        times.append(time.perf_counter() - start)
    return {
        "steps_per_s": round(steps / statistics.median(times), 3),
        "first_run_s": round(first, 2),
        "times_s": [round(t, 3) for t in times],
        "attention": "AttnProcessor2_0 (torch SDPA)",
        "finite": bool(torch.isfinite(x).all()),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


def bench_generate(preset: str, dtype: str, size: int, steps: int) -> dict:
    from tf_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_preset(preset, dtype=dtype)
    kwargs = dict(num_steps=steps, scheduler="dpmpp_2m", height=size, width=size, seed=0, progress=False)
    start = time.perf_counter()
    sd.generate("an astronaut riding a horse", **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    sd.generate("an astronaut riding a horse", **kwargs)
    return {"generate_s": round(time.perf_counter() - start, 3), "first_generate_s": round(first, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--dtype", default="float16", help="our Keras policy (float16, bfloat16, mixed_float16)"
    )
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-unblocked", action="store_true", help="skip the run with unblocked attention")
    parser.add_argument("--preset", default="sd-v1-5", help="tiny-shapes for a quick check of the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax
    import keras
    import torch

    from tf_diffusion import layers
    from tf_diffusion.presets import PRESETS
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.weights.state_dict import state_dict

    if keras.backend.backend() != "jax":
        raise SystemExit(f"run with KERAS_BACKEND=jax (got {keras.backend.backend()})")
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {
            "jax": jax.__version__,
            "keras": keras.__version__,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
        },
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "guidance": GUIDANCE,
        "ours_policy": args.dtype,
        "diffusers_dtype": "float16",
        "attention_block_elements": layers.ATTENTION_BLOCK_ELEMENTS,
    }
    config = PRESETS[args.preset].unet
    keras.utils.set_random_seed(0)
    unet = UNetModel(config, dtype=args.dtype)
    tensors = state_dict(unet)  # the same random weights for diffusers
    result["ours"] = bench_ours(unet, config, args.size, args.steps, args.reps)
    print(json.dumps(result["ours"]), flush=True)
    if not args.skip_unblocked:
        # The row-blocked attention is a CPU lever; XLA on a GPU may prefer one block.
        saved, layers.ATTENTION_BLOCK_ELEMENTS = layers.ATTENTION_BLOCK_ELEMENTS, None
        result["ours_one_attention_block"] = bench_ours(unet, config, args.size, args.steps, args.reps)
        layers.ATTENTION_BLOCK_ELEMENTS = saved
        print(json.dumps(result["ours_one_attention_block"]), flush=True)
    del unet
    result["diffusers"] = bench_diffusers(tensors, config, args.size, args.steps, args.reps)
    print(json.dumps(result["diffusers"]), flush=True)
    del tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["ours_vs_diffusers"] = round(result["ours"]["steps_per_s"] / result["diffusers"]["steps_per_s"], 3)
    result["ours_fused_vs_diffusers"] = round(
        result["ours"]["fused_steps_per_s"] / result["diffusers"]["steps_per_s"], 3
    )
    if not args.skip_generate:
        result["generate"] = bench_generate(args.preset, args.dtype, args.size, args.steps)
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
