"""LCM-distilled UNet fixtures: diffusers' UNet2DConditionModel with ``time_cond_proj_dim`` and its pipeline.

Written to tests/fixtures/lcm/ (read by tests/test_lcm_unet.py):

* ``guidance.npz``: ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` of a few guidance scales
  at embedding sizes 16, 256 and 7.
* ``unet.npz``: a tiny LCM UNet run by diffusers. Its config is the pipeline fixture's UNet
  (tests/fixtures/pipeline/cases.json) with ``time_cond_proj_dim=16``; its weights are the pipeline
  fixture's (``random_state_dict`` of tests/fixtures/pipeline/shapes.json, rebuilt by the test, not stored)
  plus ``time_embedding.cond_proj.weight``, stored here. Inputs (NHWC) and the outputs for two guidance
  embeddings.
* ``pipeline.npz``: the pipeline fixture's txt2img folder (written by our ``save_pretrained``) turned into an
  LCM one (``cond_proj`` of size 32 stored here, LCMScheduler) by ``tests/test_lcm_unet.py::lcm_folder``,
  then run by diffusers' ``StableDiffusionPipeline`` with the initial latents and LCMScheduler's re-noising
  draws taken from tf_diffusion.noise for the seed; the float image it returns.

Usage (dev only; needs torch, diffusers, transformers): python tools/make_fixtures_lcm.py
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusers import (  # noqa: E402
    LatentConsistencyModelPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_lcm  # noqa: E402
from test_lcm_unet import (  # noqa: E402
    GUIDANCE_DIMS,
    GUIDANCE_SCALES,
    PIPELINE_CASE,
    lcm_folder,
    lcm_unet_inputs,
    pipeline_unet,
)

from tf_diffusion import noise as noise_lib  # noqa: E402
from tf_diffusion.pipeline import StableDiffusion  # noqa: E402
from tf_diffusion.schedulers import get_sampler  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "lcm"


def embedding(w, dim):
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(w), embedding_dim=dim
    )


def guidance():
    return {f"dim{d}": embedding(GUIDANCE_SCALES, d).numpy() for d in GUIDANCE_DIMS}


def unet():
    config, weights = pipeline_unet()
    config = {**config, "time_cond_proj_dim": 16}
    # A projection large enough that the guidance embedding moves the output.
    cond_proj = np.random.default_rng(10).normal(0, 0.5, (config["block_out_channels"][0], 16))
    weights["time_embedding.cond_proj.weight"] = cond_proj.astype(np.float32)
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    x, ctx, t, w = lcm_unet_inputs()
    out = {"cond_proj": weights["time_embedding.cond_proj.weight"]}
    with torch.no_grad():
        for name, scale in (("out", w), ("out_other", w + 3.0)):
            sample = ref(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                torch.from_numpy(t),
                torch.from_numpy(ctx),
                timestep_cond=embedding(scale, 16),
            ).sample
            out[name] = sample.permute(0, 2, 3, 1).numpy()
    return out


def pipeline():
    cond_proj = np.random.default_rng(11).normal(0, 0.3, (32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = lcm_folder(pathlib.Path(tmp), cond_proj)
        sd = StableDiffusion.from_pretrained(folder)  # only for the latent shape and the plan's length
        case = PIPELINE_CASE
        factor = sd.config.vae.downsample_factor
        size = sd.config.default_size
        shape = (size // factor, size // factor, 4)
        seeds = [case["seed"]]
        noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
        plan = get_sampler("lcm", sd.config.scheduler).plan(case["steps"])
        per_step = noise_lib.batch_normal(seeds, noise_lib.STEPS, (plan.num_evals, *shape))[0]  # (E, h, w, C)
        draws = iter(per_step)
        real = scheduling_lcm.randn_tensor

        def our_noise(shape, generator=None, device=None, dtype=None):
            return torch.from_numpy(np.ascontiguousarray(next(draws).transpose(2, 0, 1))[None]).to(dtype)

        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        scheduling_lcm.randn_tensor = our_noise
        try:
            with torch.no_grad():
                image = pipe(
                    case["prompt"],
                    num_inference_steps=case["steps"],
                    guidance_scale=case["guidance_scale"],
                    latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                    output_type="np",
                ).images
        finally:
            scheduling_lcm.randn_tensor = real
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return {"cond_proj": cond_proj, "image": image.astype(np.float32)}, scheduler


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "guidance.npz", **guidance())
    np.savez_compressed(OUT / "unet.npz", **unet())
    arrays, scheduler = pipeline()
    np.savez_compressed(OUT / "pipeline.npz", **arrays)
    print(f"wrote {OUT}; LCM folder scheduler: {scheduler['_class_name']}")


if __name__ == "__main__":
    main()
