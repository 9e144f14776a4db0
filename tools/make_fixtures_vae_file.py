"""Write tiny stand-alone VAEs in the forms people download them, with diffusers, and what diffusers makes of them.

From the tiny SDXL pipeline (tests/fixtures/sdxl/sdxl-diffusers) and the tiny SD 1.x one
(tests/fixtures/checkpoints/sd1-diffusers), each given a second VAE of the same architecture with other random
weights. Written to tests/fixtures/vae_file/:

* ``sdxl-vae-fix/``: that VAE as diffusers' ``AutoencoderKL.save_pretrained`` writes it, with
  ``force_upcast=False`` and another scaling factor (0.2), as a fine-tuned fp16-safe VAE's folder would say.
* ``sdxl_vae.safetensors``: the same weights in the original LDM layout (``encoder.down.0.block.0...``),
  float32, as stabilityai/sdxl-vae ships ``sdxl_vae.safetensors``; checked here by reading it back with
  diffusers' ``AutoencoderKL.from_single_file`` (the reference reader of that layout) to identical weights.
* ``sd1.vae.pt``: the SD 1.x VAE as the web UI's ``models/VAE/*.vae.pt`` files are: ``torch.save`` of
  ``{"state_dict": {...}}`` with the LDM keys plus training-loss (``loss.*``) and EMA bookkeeping keys that
  are not weights; also checked with ``from_single_file``.
* ``reference.npz``: whole ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline`` runs from given
  latents with the VAE replaced (``vae=`` at construction, as diffusers users do), ``output_type="np"``.

Usage (dev only; needs torch, diffusers, transformers): python tools/make_fixtures_vae_file.py
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file  # noqa: E402

from tf_diffusion.weights.diffusers_configs import vae_config_from_diffusers  # noqa: E402
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "vae_file"
SDXL = FIXTURES / "sdxl" / "sdxl-diffusers"
SD1 = FIXTURES / "checkpoints" / "sd1-diffusers"
# Each run: (name, pipeline folder, pipeline class, prompt, size, steps, guidance).
RUNS = [
    ("sdxl", SDXL, StableDiffusionXLPipeline, "a photo of a cat", 16, 2, 5.0),
    ("sd1", SD1, StableDiffusionPipeline, "a red circle", 32, 2, 7.5),
]


def other_vae(folder: pathlib.Path, seed: int, **changes) -> AutoencoderKL:
    """The folder's VAE architecture with new random weights (small, so decoded images stay in range)."""
    config = dict(AutoencoderKL.load_config(folder / "vae"), **changes)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config)
    with torch.no_grad():
        for value in vae.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.1)
    return vae.eval()


def ldm_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE in the original LDM layout (our rename; verified below with diffusers' own single-file reader)."""
    config = vae_config_from_diffusers(dict(vae.config))
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in convert_diffusers_vae(state, config).items()
    }


def check_single_file(path: pathlib.Path, vae: AutoencoderKL, folder: pathlib.Path) -> None:
    read = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae")
    theirs, ours = read.state_dict(), vae.state_dict()
    assert theirs.keys() == ours.keys(), sorted(set(theirs) ^ set(ours))[:5]
    worst = max(float((theirs[k].float() - ours[k].float()).abs().max()) for k in ours)
    assert worst == 0.0, f"{path}: diffusers reads other weights (max diff {worst})"
    print(f"{path.name}: diffusers' from_single_file reads the same weights")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    ref, meta = {}, {"runs": []}

    fix = other_vae(SDXL, 1, force_upcast=False, scaling_factor=0.2)
    fix.save_pretrained(OUT / "sdxl-vae-fix")
    plain = other_vae(SDXL, 1)  # the same weights, the SDXL folder's own config (scaling 0.13025, upcast)
    save_file(ldm_state(plain), str(OUT / "sdxl_vae.safetensors"))
    check_single_file(OUT / "sdxl_vae.safetensors", plain, SDXL)

    sd1_vae = other_vae(SD1, 2)
    state = ldm_state(sd1_vae)
    state.update(
        {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    )
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    torch.save({"state_dict": state, "global_step": 10}, OUT / "sd1.vae.pt")
    check_single_file(OUT / "sd1.vae.pt", sd1_vae, SD1)

    rng = np.random.default_rng(0)
    for name, folder, cls, prompt, size, steps, guidance in RUNS:
        for variant, vae in (("fix", fix), ("plain", plain)) if name == "sdxl" else (("plain", sd1_vae),):
            pipe = cls.from_pretrained(folder, vae=vae, torch_dtype=torch.float32)
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            latents = rng.standard_normal((1, size // 2, size // 2, 4)).astype(np.float32)
            with torch.no_grad():
                images = pipe(
                    prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                    latents=torch.from_numpy(latents).permute(0, 3, 1, 2), output_type="np",
                ).images  # fmt: skip
            key = f"{name}/{variant}"
            ref[f"{key}/latents"], ref[f"{key}/images"] = latents, np.asarray(images, np.float32)
            meta["runs"].append(dict(name=key, prompt=prompt, size=size, steps=steps, guidance=guidance))
            print(f"{key}: images {images.shape} mean {images.mean():.4f}")
    np.savez_compressed(OUT / "reference.npz", **ref)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
