"""SDXL tasks through generate(): img2img (base and refiner), inpainting, micro-conditioning, the hand-off.

References are diffusers' ``StableDiffusionXLImg2ImgPipeline`` / ``StableDiffusionXLInpaintPipeline`` /
``StableDiffusionXLPipeline`` runs (tools/make_fixtures_sdxl.py --tasks, tests/fixtures/sdxl/tasks.*),
every random draw tf_diffusion.noise's for the same seeds, so ``seed=`` here reproduces them.
"""

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES

SDXL = FIXTURES / "sdxl"
TOL = 1e-3
META = json.loads((SDXL / "tasks.json").read_text())
RUNS = {r["name"]: r for r in META["runs"]}
HANDOFFS = {r["name"]: r for r in META["handoffs"]}


@pytest.fixture(scope="module")
def reference():
    with np.load(SDXL / "tasks.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def models():
    """The tiny base and refiner (diffusers folders) and the base with the 9-channel inpainting UNet."""
    from tf_diffusion import StableDiffusion
    from tf_diffusion.testing import random_state_dict
    from tf_diffusion.weights.diffusers_unet import (
        convert_diffusers_unet_state_dict,
        unet_config_from_diffusers,
    )
    from tf_diffusion.weights.state_dict import load_state_dict, state_dict

    base = StableDiffusion.from_pretrained(SDXL / "sdxl-diffusers")
    refiner = StableDiffusion.from_pretrained(SDXL / "sdxl-refiner-diffusers")
    spec = json.loads((SDXL / "unet_inpaint.json").read_text())
    unet_cfg = unet_config_from_diffusers(spec["config"])
    inpaint = StableDiffusion(
        base.config.replace(name="tiny-sdxl-inpainting", unet=unet_cfg),
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
    )
    for part in ("text_encoder", "text_encoder_2", "vae"):
        load_state_dict(getattr(inpaint, part), state_dict(getattr(base, part)))
    shapes = {k: tuple(v) for k, v in spec["shapes"].items()}
    load_state_dict(
        inpaint.unet, convert_diffusers_unet_state_dict(random_state_dict(shapes, spec["seed"]), unet_cfg)
    )
    return {"base": base, "refiner": refiner, "inpaint9": inpaint}


def task_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*META["size"], 3), dtype=np.uint8)


def task_mask() -> np.ndarray:
    mask = np.zeros(META["size"], dtype=np.uint8)
    mask[3:11, 5:14] = 255
    return mask


def _max_err(out, want) -> float:
    assert np.shape(out) == want.shape
    return float(np.abs(np.asarray(out) - want).max())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_task_matches_diffusers(name, models, reference):
    run = RUNS[name]
    mode = run["mode"]
    sd = models["inpaint9" if mode == "inpaint9" else run["model"]]
    kwargs = dict(
        num_steps=run["steps"],
        guidance_scale=run["guidance"],
        seed=run["seed"],
        scheduler=run["sampler"],
        sdxl_options=run["options"] or None,
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    if mode == "txt2img":
        kwargs.update(height=META["size"][0], width=META["size"][1])
    else:
        kwargs.update(image=task_image(run["seed"] + 1), strength=run["strength"])
    if mode.startswith("inpaint"):
        kwargs.update(mask=task_mask())
    out = sd.generate(run["prompt"], run["negative"], **kwargs)
    err = _max_err(out, reference[f"{name}/images"])
    print(f"{name}: max abs error {err:.2e}")
    assert err <= TOL
    assert out.info.sdxl_options == {
        k: tuple(v) if isinstance(v, list) else v for k, v in run["options"].items()
    }


@pytest.mark.parametrize("name", sorted(HANDOFFS))
def test_base_to_refiner_handoff_matches_diffusers(name, models, reference):
    run = HANDOFFS[name]
    common = dict(
        num_steps=run["steps"], guidance_scale=run["guidance"], scheduler=run["sampler"], progress=False
    )
    common.update(jit_compile=False)
    latents = models["base"].generate(
        run["prompt"],
        run["negative"],
        height=META["size"][0],
        width=META["size"][1],
        seed=run["seeds"][0],
        denoising_end=run["switch"],
        output_type="latent",
        **common,
    )
    err_latents = _max_err(latents, reference[f"{name}/latents"])
    assert latents.info.denoising_end == run["switch"]
    # The base's result itself is the refiner's image (diffusers' image=latents).
    images = models["refiner"].generate(
        run["prompt"],
        run["negative"],
        image=latents,
        seed=run["seeds"][1],
        denoising_start=run["switch"],
        output_type="float",
        **common,
    )
    err = _max_err(images, reference[f"{name}/images"])
    print(f"{name}: latents {err_latents:.2e}, images {err:.2e}")
    assert err_latents <= TOL and err <= TOL
    assert images.info.denoising_start == run["switch"] and images.info.strength is None
