"""Whole SDXL pipelines on this CPU, random weights of the full-size architecture (values do not change speed).

Two cases, each in its own fresh process (so peak memory is per case):

    memory  ``sdxl-base-1.0`` in bfloat16 (weights stored in bfloat16), 1024x1024, one guided Euler step,
            prompt encoding and the VAE decode included: the process's peak resident memory against the
            weights' own size (issue 19's goal: at most 1.3x, and below diffusers'), ours and diffusers'
            (``StableDiffusionXLPipeline``, ``EulerDiscreteScheduler``, guidance 5, untiled decode).
    turbo   ``sdxl-turbo`` at 512x512, one step, guidance off (its model card's settings), bfloat16, end
            to end: ours (``generate()``, graph mode as the CLI on a CPU) against diffusers'
            ``StableDiffusionXLPipeline`` on the same architecture (each with its own random weights).

    python benchmarks/sdxl_pipeline.py --all                   # every case, one JSON line each
    python benchmarks/sdxl_pipeline.py --case turbo --framework diffusers

Needs torch + diffusers + transformers for the diffusers row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._harness import status_gib  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def ours(case: str, reps: int) -> dict:
    import keras

    from tf_diffusion import StableDiffusion

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    sd = StableDiffusion.from_preset("sdxl-base-1.0" if case == "memory" else "sdxl-turbo", dtype="bfloat16")
    build = time.perf_counter() - start
    build_peak = _reset_peak()
    weights = sum(
        math.prod(v.shape) * (2 if keras.backend.standardize_dtype(v.dtype) == "bfloat16" else 4)
        for m in (sd.text_encoder, sd.text_encoder_2, sd.unet, sd.vae)
        for v in m.weights
    )
    size = 1024 if case == "memory" else 512
    kw = dict(num_steps=1, height=size, width=size, seed=0, progress=False, jit_compile=False)
    kw.update(scheduler="euler", guidance_scale=5.0) if case == "memory" else kw.update(guidance_scale=0.0)
    times = []
    for _ in range(1 + reps):
        start = time.perf_counter()
        sd.generate(PROMPT, **kw)
        times.append(time.perf_counter() - start)
    return _result(case, "ours", build, times, weights, build_peak)


def diffusers(case: str, reps: int) -> dict:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as TorchTokenizer

    from tf_diffusion.presets import PRESETS
    from tf_diffusion.tokenizer import CLIPTokenizer
    from tf_diffusion.weights.diffusers_folder import (
        scheduler_config_to_diffusers,
        text_config_to_transformers,
        unet_config_to_diffusers,
        vae_config_to_diffusers,
    )

    torch.manual_seed(0)
    memory = case == "memory"
    config = PRESETS["sdxl-base-1.0" if memory else "sdxl-turbo"]
    size = 1024 if memory else 512
    start = time.perf_counter()
    tokenizer = CLIPTokenizer(config=config.tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        tokenizers = [
            TorchTokenizer.from_pretrained(folder),
            TorchTokenizer.from_pretrained(folder, pad_token="!"),
        ]

    def text(cfg, cls):
        data = text_config_to_transformers(cfg, tokenizer)
        return cls(CLIPTextConfig(**{k: v for k, v in data.items() if k != "architectures"}))

    dtype = torch.bfloat16
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(vae_config_to_diffusers(config.vae, size)),
        text_encoder=text(config.text_encoder, CLIPTextModel),
        text_encoder_2=text(config.text_encoder_2, CLIPTextModelWithProjection),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=UNet2DConditionModel.from_config(unet_config_to_diffusers(config.unet, size // 8)),
        scheduler=(EulerDiscreteScheduler if memory else EulerAncestralDiscreteScheduler).from_config(
            scheduler_config_to_diffusers(config.scheduler)
        ),
    ).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    build = time.perf_counter() - start
    build_peak = _reset_peak()
    weights = sum(p.numel() * p.element_size() for p in pipe.components["unet"].parameters())
    weights += sum(
        p.numel() * p.element_size()
        for name in ("text_encoder", "text_encoder_2", "vae")
        for p in pipe.components[name].parameters()
    )
    times = []
    for _ in range(1 + reps):
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                PROMPT,
                num_inference_steps=1,
                guidance_scale=5.0 if memory else 0.0,
                height=size,
                width=size,
                output_type="np",
            )
        times.append(time.perf_counter() - start)
    return _result(case, "diffusers", build, times, weights, build_peak)


def _reset_peak() -> float:
    """The peak RSS so far (GiB), then reset it to the current RSS (Linux's clear_refs "5"), so that the
    calls' own peak can be read apart from the build's (diffusers initialises its models in float32)."""
    peak = status_gib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak


def _result(case, framework, build, times, weights, build_peak) -> dict:
    calls_peak = status_gib("VmHWM")
    peak = max(build_peak, calls_peak)
    return {
        "case": case, "framework": framework, "build_s": round(build, 1), "first_call_s": round(times[0], 1),
        "times_s": [round(t, 2) for t in times[1:]],
        "median_s": round(statistics.median(times[1:]), 2) if len(times) > 1 else None,
        "weights_gib": round(weights / 2**30, 2), "peak_rss_gib": round(peak, 2),
        "build_peak_rss_gib": round(build_peak, 2), "calls_peak_rss_gib": round(calls_peak, 2),
        "calls_peak_over_weights": round(calls_peak / (weights / 2**30), 2),
        "peak_over_weights": round(peak / (weights / 2**30), 2), "loadavg_1min": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=("memory", "turbo"), default="turbo")
    parser.add_argument("--framework", choices=("ours", "diffusers"), default="ours")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="memory and turbo, ours and diffusers")
    args = parser.parse_args()
    if not args.all:
        run = ours if args.framework == "ours" else diffusers
        print(json.dumps(run(args.case, args.reps)), flush=True)
        return
    for case, framework in (
        ("memory", "ours"),
        ("memory", "diffusers"),
        ("turbo", "ours"),
        ("turbo", "diffusers"),
    ):
        argv = [sys.executable, __file__, "--case", case, "--framework", framework, "--reps", str(args.reps)]
        done = subprocess.run(argv, capture_output=True, text=True)
        line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
        print(
            line or json.dumps({"case": case, "framework": framework, "error": done.stderr[-800:]}),
            flush=True,
        )


if __name__ == "__main__":
    main()
