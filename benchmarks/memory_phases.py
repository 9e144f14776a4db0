"""Where a pipeline's peak memory comes from: resident memory sampled in a thread, phase by phase.

One ``generate()`` call (after building the model from a preset, random weights) with the executor's
text encoding, denoising and decode wrapped in phase markers; a thread reads ``VmRSS`` every 20 ms and
keeps each phase's maximum. Prints one JSON line: per phase its peak and its RSS at the end, in GiB.

    python benchmarks/memory_phases.py --preset sd-v1-5 --size 512
    python benchmarks/memory_phases.py --preset sdxl-base-1.0 --size 1024 --guidance 5   # > 6 GiB: bigmem lock
    python benchmarks/memory_phases.py --preset sd-v1-5 --size 1024 --only-vae            # the decode alone
    python benchmarks/memory_phases.py --size 1024 --only-vae --diffusers                 # diffusers' decode
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._harness import status_gib  # noqa: E402


class PhaseSampler:
    """Samples this process's RSS in a thread; ``phase(name)`` starts attributing samples to ``name``."""

    def __init__(self, period: float = 0.02):
        self.period, self.current, self.peaks, self.ends, self.order = period, "start", {}, {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.phase("start")
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            rss = status_gib("VmRSS")
            name = self.current
            self.peaks[name] = max(self.peaks.get(name, 0.0), rss)
            time.sleep(self.period)

    def phase(self, name: str) -> None:
        rss = status_gib("VmRSS")
        self.ends[self.current] = rss
        self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), rss)
        self.current = name
        if name not in self.order:
            self.order.append(name)
        self.peaks[name] = max(self.peaks.get(name, 0.0), rss)

    def stop(self) -> dict:
        self.phase("end")
        self._stop.set()
        self._thread.join()
        return {
            name: {"peak": round(self.peaks[name], 2), "end": round(self.ends.get(name, 0.0), 2)}
            for name in self.order
            if name != "end"
        }


def wrap(executor, sampler: PhaseSampler, method: str, phase: str, trim: bool) -> None:
    original = getattr(executor, method)

    def marked(*args, **kwargs):
        sampler.phase(phase)
        try:
            return original(*args, **kwargs)
        finally:
            sampler.phase("after_" + phase)
            if trim:
                _trim()

    setattr(executor, method, marked)


def _trim() -> None:
    """Hand freed heap pages back to the kernel (glibc's malloc_trim)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def diffusers_vae(size: int) -> dict:
    """diffusers' AutoencoderKL (SDXL's architecture, random weights, bfloat16) decoding one latent."""
    import torch
    from diffusers import AutoencoderKL

    from tf_diffusion.presets import PRESETS
    from tf_diffusion.weights.diffusers_folder import vae_config_to_diffusers

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_config_to_diffusers(PRESETS["sdxl-base-1.0"].vae, 1024))
    vae = vae.to(torch.bfloat16)
    before = status_gib("VmRSS")
    with torch.inference_mode():
        vae.decode(torch.randn(1, 4, size // 8, size // 8, dtype=torch.bfloat16))
    return {"framework": "diffusers", "size": size, "only_vae": True, "rss_before_decode_gib": round(before, 2),
            "peak_rss_gib": round(status_gib("VmHWM"), 2), "loadavg_1min": round(os.getloadavg()[0], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd-v1-5")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiling", type=int, default=0, help="enable_vae_tiling(tile_size) when > 0")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True (XLA) instead of graph mode")
    parser.add_argument(
        "--no-lean", action="store_true", help="GroupNorm + SiLU in one block (before lean.py)"
    )
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after the build and each phase")
    parser.add_argument(
        "--only-vae", action="store_true", help="build only the VAE and decode random latents"
    )
    parser.add_argument("--diffusers", action="store_true", help="with --only-vae: diffusers' VAE instead")
    args = parser.parse_args()
    if args.diffusers:
        print(json.dumps(diffusers_vae(args.size)), flush=True)
        return

    import keras
    import numpy as np

    sampler = PhaseSampler()
    sampler.phase("import")
    from tf_diffusion import StableDiffusion, execution
    from tf_diffusion.denoising.executor import LocalExecutor
    from tf_diffusion.presets import PRESETS
    from tf_diffusion.vae import AutoencoderKL

    if args.no_lean:
        from tf_diffusion.execution import lean

        lean.NORM_BLOCK_ELEMENTS = 2**62
    keras.utils.set_random_seed(0)
    sampler.phase("build")
    if args.only_vae:
        config = PRESETS[args.preset].vae
        vae = execution.apply(AutoencoderKL(config, dtype=args.dtype))  # as StableDiffusion does
        f = config.downsample_factor
        latents = np.random.default_rng(0).standard_normal(
            (1, args.size // f, args.size // f, config.latent_channels), dtype=np.float32
        )
        models = (vae,)
        executor = LocalExecutor()
        for i in range(args.calls):
            sampler.phase(f"decode{i}")
            executor.decode(vae, latents, args.jit)
    else:
        sd = StableDiffusion.from_preset(args.preset, dtype=args.dtype)
        if args.tiling:
            sd.enable_vae_tiling(args.tiling)
        if args.trim:
            _trim()
            sampler.phase("trimmed")
        models = [m for m in (sd.text_encoder, getattr(sd, "text_encoder_2", None), sd.unet, sd.vae) if m]
        for method, phase in (("encode_text", "text"), ("run", "denoise"), ("decode", "decode")):
            wrap(sd.executor, sampler, method, phase, args.trim)
        for i in range(args.calls):
            sampler.phase(f"call{i}")
            sd.generate(
                "a photograph of an astronaut riding a horse",
                num_steps=args.steps,
                height=args.size,
                width=args.size,
                seed=0,
                progress=False,
                jit_compile=args.jit,
                scheduler="euler",
                guidance_scale=args.guidance,
            )
            sampler.phase("after")
    weights = sum(
        math.prod(v.shape) * (2 if keras.backend.standardize_dtype(v.dtype) == "bfloat16" else 4)
        for m in models
        for v in m.weights
    )
    phases = sampler.stop()
    peak = status_gib("VmHWM")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "size": args.size,
                "dtype": args.dtype,
                "tiling": args.tiling,
                "only_vae": args.only_vae,
                "jit": args.jit,
                "lean": not args.no_lean,
                "trim": args.trim,
                "weights_gib": round(weights / 2**30, 2),
                "peak_rss_gib": round(peak, 2),
                "peak_over_weights": round(peak / (weights / 2**30), 2),
                "phases": phases,
                "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
        ),  # fmt: skip
        flush=True,
    )


if __name__ == "__main__":
    main()
