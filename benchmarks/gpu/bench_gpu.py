"""GPU speed: our SD 1.5 UNet under KERAS_BACKEND=jax against diffusers (float16, SDPA), same weights.

Run on one GPU machine with JAX and PyTorch (see benchmarks/README.md, "GPU"). Both models get
the same random SD 1.5 weights: ours are initialised by Keras, then copied into diffusers'
``UNet2DConditionModel`` under diffusers' names. Timed, at 512x512 with classifier-free guidance
(the UNet at batch 2, then ``uncond + 7.5 * (cond - uncond)``):

    steps_per_s      guided steps per second over a run of ``--steps`` steps after warm-up
                     (ours: one jitted step function called per step; diffusers: eager, SDPA)
    fused_steps_per_s  ours only: the whole loop as one XLA program (``ops.fori_loop``)
    ours_attention_MODE  ours with ``ExecutionOptions(attention=MODE)`` ("auto": cuDNN flash attention
                     through jax.nn.dot_product_attention, "xla": its XLA form, "off": our explicit
                     form, row-blocked as on CPU); attention_parity compares one UNet call of each
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


def bench_ours(unet, config, size: int, steps: int, reps: int, with_fused: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    from keras import ops

    x0, ctx = _inputs(config, size)
    x0, ctx = jnp.asarray(x0), jnp.asarray(ctx)
    timesteps = jnp.linspace(999, 0, steps).astype(jnp.int32)

    # The weights go in as arguments (stateless_call), not as constants folded into the program.
    params = ([v.value for v in unet.trainable_variables], [v.value for v in unet.non_trainable_variables])

    def guided(params, x, t):
        out, _ = unet.stateless_call(
            params[0], params[1], ops.concatenate([x, x], axis=0), ops.broadcast_to(t, (2,)), ctx
        )
        out = ops.cast(out, "float32")
        eps = out[:1] + GUIDANCE * (out[1:] - out[:1])
        return x - 0.01 * eps  # a stand-in for the sampler update (negligible work)

    step = jax.jit(guided)

    def fused_loop(params, x):
        return ops.fori_loop(0, steps, lambda i, x: guided(params, x, timesteps[i]), x)

    fused = jax.jit(fused_loop)

    start = time.perf_counter()
    step(params, x0, timesteps[0]).block_until_ready()
    compile_step = time.perf_counter() - start
    compile_fused = None
    if with_fused:
        start = time.perf_counter()
        fused(params, x0).block_until_ready()
        compile_fused = time.perf_counter() - start

    loop_times, fused_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        x = x0
        for i in range(steps):
            x = step(params, x, timesteps[i])
        x.block_until_ready()
        loop_times.append(time.perf_counter() - start)
        if with_fused:
            start = time.perf_counter()
            fused(params, x0).block_until_ready()
            fused_times.append(time.perf_counter() - start)
    return {
        "steps_per_s": round(steps / statistics.median(loop_times), 3),
        "fused_steps_per_s": round(steps / statistics.median(fused_times), 3) if fused_times else None,
        "first_call_s": round(compile_step, 2),
        "fused_first_call_s": round(compile_fused, 2) if compile_fused is not None else None,
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
            param.copy_(torch.from_numpy(np.ascontiguousarray(named[key], dtype=np.float32)))
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


def bench_generate(preset: str, dtype: str, size: int, steps: int, attention: str = "auto") -> dict:
    from tf_diffusion import execution
    from tf_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_preset(preset, dtype=dtype)
    factor = sd.config.vae.downsample_factor
    latent_shape = (1, size // factor, size // factor, sd.config.vae.latent_channels)
    opts = execution.default_options(sd.unet, latent_shape).replace(attention=attention)
    kwargs = dict(num_steps=steps, scheduler="dpmpp_2m", height=size, width=size, seed=0, progress=False)
    kwargs["execution"] = opts
    start = time.perf_counter()
    sd.generate("an astronaut riding a horse", **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    sd.generate("an astronaut riding a horse", **kwargs)
    return {"generate_s": round(time.perf_counter() - start, 3), "first_generate_s": round(first, 2)}


def _write(result: dict, out) -> None:
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if out:  # rewritten after every part, so a crash later still leaves what was measured
        pathlib.Path(out).write_text(text + "\n")


def _attempt(result: dict, key: str, out, fn):
    """result[key] = fn(), or the error as text; never raises (one failing part keeps the others)."""
    start = time.perf_counter()
    try:
        result[key] = fn()
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        result[key] = {"error": f"{type(error).__name__}: {str(error)[:600]}"}
    result.setdefault("part_seconds", {})[key] = round(time.perf_counter() - start, 1)
    _write(result, out)
    return result[key]


def _parity(unet, config, size: int) -> dict:
    """Max abs difference of one UNet call between the attention forms, on the same inputs."""
    import jax.numpy as jnp
    import numpy as np

    from tf_diffusion import execution

    x0, ctx = _inputs(config, size)
    x = jnp.asarray(np.concatenate([x0, x0]))
    t = jnp.asarray([500, 500], dtype=jnp.int32)
    outputs = {}
    for mode in ("off", "xla", "auto"):
        with execution.options(execution.ExecutionOptions(attention=mode)):
            outputs[mode] = np.asarray(unet(x, t, jnp.asarray(ctx)), dtype=np.float32)
    scale = float(np.abs(outputs["off"]).max())
    return {
        "output_abs_max": round(scale, 4),
        **{f"{mode}_vs_off": float(np.abs(outputs[mode] - outputs["off"]).max()) for mode in ("xla", "auto")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--dtype", default="float16", help="our Keras policy (float16, bfloat16, mixed_float16)"
    )
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument(
        "--attention",
        default="auto,off",
        help="comma-separated ExecutionOptions.attention modes to time; only the first also as one fused program",
    )
    parser.add_argument("--preset", default="sd-v1-5", help="tiny-shapes for a quick check of the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax
    import keras
    import torch

    from tf_diffusion import execution, layers
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
    unet = execution.apply(UNetModel(config, dtype=args.dtype))
    tensors = state_dict(unet)  # the same random weights for diffusers
    _attempt(result, "attention_parity", args.out, lambda: _parity(unet, config, args.size))
    modes = [m for m in args.attention.split(",") if m]

    def ours(mode: str, with_fused: bool):
        # jax.jit traces inside bench_ours, under these options.
        with execution.options(execution.ExecutionOptions(compile="xla", attention=mode)):
            return bench_ours(unet, config, args.size, args.steps, args.reps, with_fused)

    # diffusers right after our first mode, so the comparison exists even if time runs out later.
    _attempt(result, f"ours_attention_{modes[0]}", args.out, lambda: ours(modes[0], True))
    _attempt(
        result,
        "diffusers",
        args.out,
        lambda: bench_diffusers(tensors, config, args.size, args.steps, args.reps),
    )
    tensors = None
    for mode in modes[1:]:
        _attempt(result, f"ours_attention_{mode}", args.out, lambda mode=mode: ours(mode, False))
    unet = None  # free its memory before generate() builds the whole pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reference = result["diffusers"].get("steps_per_s")
    best_attention = "auto"
    timed = {k: v for k, v in result.items() if k.startswith("ours_attention_") and "steps_per_s" in v}
    if reference and timed:
        result["ratios_vs_diffusers"] = {
            k: {
                "stepwise": round(v["steps_per_s"] / reference, 3),
                "fused": round(v["fused_steps_per_s"] / reference, 3) if v["fused_steps_per_s"] else None,
            }
            for k, v in timed.items()
        }
        best = max(timed, key=lambda k: timed[k]["steps_per_s"])
        result["best_stepwise"] = best
        best_attention = best.removeprefix("ours_attention_")
    if not args.skip_generate:
        _attempt(
            result,
            "generate",
            args.out,
            lambda: bench_generate(args.preset, args.dtype, args.size, args.steps, best_attention),
        )
    _write(result, args.out)


if __name__ == "__main__":
    main()
