"""End to end: generate() equals diffusers' pipelines on tiny random components.

tools/make_fixtures_pipeline.py ran diffusers' StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline (4- and
9-channel UNets) with weights from ``random_state_dict`` and every random draw
taken from tf_diffusion.noise for the same seeds (image b: seed + b); it stored the
float images diffusers returned. Here the same weights and seeds go through
``StableDiffusion.generate`` and the float images must agree within 1e-3.
"""

import functools
import json

import numpy as np
import pytest

from tf_diffusion.config import PipelineConfig, TokenizerConfig
from tf_diffusion.schedulers import config_from_diffusers
from tf_diffusion.testing import random_state_dict
from tf_diffusion.weights import load_state_dict
from tf_diffusion.weights.diffusers_configs import clip_config_from_transformers, vae_config_from_diffusers
from tf_diffusion.weights.diffusers_unet import convert_diffusers_unet_state_dict, unet_config_from_diffusers
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae

TOLERANCE = 1e-3


@functools.lru_cache(maxsize=1)
def fixture(path):
    meta = json.loads((path / "cases.json").read_text())
    shapes = json.loads((path / "shapes.json").read_text())
    images = dict(np.load(path / "images.npz"))
    return meta, shapes, images


@functools.lru_cache(maxsize=8)
def build(path, inpaint9: bool, prediction_type: str):
    from tf_diffusion.pipeline import StableDiffusion

    meta, shapes, _ = fixture(path)
    unet_json = dict(meta["unet"], in_channels=9) if inpaint9 else meta["unet"]
    config = PipelineConfig(
        name="tiny-parity",
        text_encoder=clip_config_from_transformers(meta["text_encoder"]),
        tokenizer=TokenizerConfig(),
        unet=unet_config_from_diffusers(unet_json),
        vae=vae_config_from_diffusers(meta["vae"]),
        scheduler=config_from_diffusers({**meta["scheduler"], "prediction_type": prediction_type}),
        default_size=meta["size"],
    )
    sd = StableDiffusion(config)
    seeds = meta["weight_seeds"]
    unet_part = "unet_inpaint" if inpaint9 else "unet"
    clip = random_state_dict(shapes["text_encoder"], seeds["text_encoder"])
    # transformers 5 names CLIPTextModel weights without the `text_model.` level checkpoints carry.
    clip = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()}
    load_state_dict(sd.text_encoder, clip)
    load_state_dict(sd.vae, convert_diffusers_vae(random_state_dict(shapes["vae"], seeds["vae"]), config.vae))
    unet_weights = random_state_dict(shapes[unet_part], seeds[unet_part])
    load_state_dict(sd.unet, convert_diffusers_unet_state_dict(unet_weights, config.unet))
    return sd


def reference_image(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def reference_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[6:22, 10:28] = 255
    return mask


def case_names():
    import pathlib

    path = pathlib.Path(__file__).parent / "fixtures" / "pipeline" / "cases.json"
    return [c["name"] for c in json.loads(path.read_text())["cases"]]


@pytest.mark.parametrize("name", case_names())
def test_generate_matches_diffusers(name, fixtures_dir):
    path = fixtures_dir / "pipeline"
    meta, _, images = fixture(path)
    case = next(c for c in meta["cases"] if c["name"] == name)
    mode = case["mode"]
    sd = build(path, mode == "inpaint9", case["prediction_type"])
    kwargs = {}
    if mode != "txt2img":
        kwargs.update(image=reference_image(case["seed"] + 1, meta["size"]), strength=case["strength"])
    if mode.startswith("inpaint"):
        kwargs.update(mask=reference_mask(meta["size"]))
    ours = sd.generate(
        meta["prompts"],
        meta["negative_prompts"],
        num_steps=meta["steps"],
        guidance_scale=case["guidance_scale"],
        seed=case["seed"],
        scheduler=case["sampler"],
        output_type="float",
        progress=False,
        # Graph mode: an XLA compile per sampler and task costs more than these tiny models run
        # (test_generate checks XLA against graph mode).
        jit_compile=False,
        **kwargs,
    )
    want = images[name]
    err = float(np.max(np.abs(ours - want)))
    assert ours.shape == want.shape
    assert err <= TOLERANCE, f"{name}: max abs error {err:.2e}"
