"""Write the Flux true classifier-free guidance fixture with diffusers' FluxPipeline (torch).

Regenerate (dev only; needs the reference extra: torch, diffusers, transformers):

    PYTHONPATH=. python tools/make_fixtures_flux_true_cfg.py

It reads the tiny pipelines tools/make_fixtures_flux.py wrote (``tests/fixtures/flux/flux-dev``, and
``flux-schnell``'s transformer and scheduler laid over a copy of it) and writes
``tests/fixtures/flux/true_cfg.npz``: for each variant, the NHWC latents given (seeded) and the float
images (``output_type="np"``) of ``FluxPipeline`` with a negative prompt and ``true_cfg_scale`` above 1
(two transformer passes per step), and with ``true_cfg_scale=1`` (the negative prompt ignored).
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "flux"
sys.path.insert(0, str(ROOT))

from diffusers import FluxPipeline  # noqa: E402

HEIGHT, WIDTH, MAX_LEN, STEPS = 32, 48, 16, 3
PROMPTS = ["a photo of a cat", "a red bicycle by the sea"]
NEGATIVES = ["blurry, low quality", "a dog"]
TRUE_CFG = 3.0
GUIDANCE = {"dev": 3.5, "schnell": 0.0}
LATENTS_SEED = 5


def _folder(variant: str, tmp: pathlib.Path) -> pathlib.Path:
    if variant == "dev":
        return FIXTURES / "flux-dev"
    folder = tmp / "flux-schnell"
    shutil.copytree(FIXTURES / "flux-dev", folder)
    for part in ("transformer", "scheduler"):
        shutil.rmtree(folder / part)
        shutil.copytree(FIXTURES / "flux-schnell" / part, folder / part)
    return folder


def main() -> None:
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for variant, guidance in GUIDANCE.items():
            pipe = FluxPipeline.from_pretrained(
                _folder(variant, pathlib.Path(tmp)), torch_dtype=torch.float32
            )
            latent = (HEIGHT // 8, WIDTH // 8, 16)
            latents = np.random.default_rng(LATENTS_SEED).standard_normal((len(PROMPTS), *latent))
            latents = latents.astype(np.float32)  # NHWC, as tf_diffusion takes them
            nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
            packed = pipe._pack_latents(nchw, *nchw.shape)
            common = dict(height=HEIGHT, width=WIDTH, guidance_scale=guidance, max_sequence_length=MAX_LEN,
                          num_inference_steps=STEPS, output_type="np")  # fmt: skip
            arrays[f"{variant}/latents"] = latents
            for name, scale in (("true_cfg", TRUE_CFG), ("true_cfg_1", 1.0)):
                images = pipe(PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=scale, latents=packed.clone(),
                              **common).images  # fmt: skip
                arrays[f"{variant}/{name}_images"] = np.asarray(images, np.float32)
    np.savez_compressed(FIXTURES / "true_cfg.npz", **arrays)


if __name__ == "__main__":
    main()
