"""Flux.1 through StableDiffusion against diffusers' FluxPipeline, on the tiny folders it wrote.

Fixtures from tools/make_fixtures_flux.py: ``flux-dev/`` (one double- and one single-stream block with a
guidance embedder, a random CLIP-L-like CLIPTextModel, the SD3 fixture's tiny T5 and SentencePiece model,
a factor-8 16-channel VAE with Flux's scaling and shift, FLUX.1-dev's dynamic shifting) and
``flux-schnell/`` (its transformer without guidance input and the static shift 1, laid over a copy of
``flux-dev/``), with diffusers' prompt embeddings and float images: text-to-image from given latents
(diffusers' packed, ours NHWC), image-to-image and inpainting with tf_diffusion.noise's draws for the seeds.
"""

import json
import logging
import pathlib
import shutil

import numpy as np
import pytest

from tf_diffusion.pipeline import StableDiffusion

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "flux"
IMAGE_TOL = 1e-4  # measured: 1.7e-6 to 5.3e-6, both configurations, all three tasks (float32, CPU)
META = json.loads((FIXTURES / "pipeline.json").read_text())
HEIGHT, WIDTH, MAX_LEN = META["height"], META["width"], META["max_sequence_length"]
PROMPTS = META["prompts"]
CASES = META["cases"]


def _folder(variant: str, tmp_path_factory) -> pathlib.Path:
    if variant == "dev":
        return FIXTURES / "flux-dev"
    # [schnell] differs from the [dev] folder only in its transformer and scheduler.
    folder = tmp_path_factory.mktemp(variant) / f"flux-{variant}"
    shutil.copytree(FIXTURES / "flux-dev", folder)
    for part in ("transformer", "scheduler"):
        shutil.rmtree(folder / part)
        shutil.copytree(FIXTURES / f"flux-{variant}" / part, folder / part)
    return folder


@pytest.fixture(scope="module")
def arrays():
    return dict(np.load(FIXTURES / "pipeline.npz"))


@pytest.fixture(scope="module", params=["dev", "schnell"])
def case(request, tmp_path_factory, arrays):
    variant = request.param
    ref = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{variant}/")}
    sd = StableDiffusion.from_pretrained(_folder(variant, tmp_path_factory))
    return sd, ref, META["guidance"][variant], variant == "dev"


def test_text_to_image_matches_diffusers(case):
    sd, ref, guidance, dev = case
    assert type(sd.hooks).__name__ == "FluxHooks"
    assert sd.config.transformer.guidance_embed == dev
    assert sd.config.scheduler.use_dynamic_shifting == dev
    expected = ref["txt2img_images"]
    steps = CASES["txt2img"]["steps"]
    images = sd.generate(PROMPTS, num_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                         latents=ref["txt2img_latents"], max_sequence_length=MAX_LEN, output_type="float",
                         progress=False, jit_compile=False)  # fmt: skip
    assert images.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    err = np.abs(images - expected).max()
    assert err < IMAGE_TOL, err
    assert images.info.num_evals == steps  # one pass per step: no classifier-free guidance


def test_prompt_encoding_matches_diffusers(case):
    sd, ref, _, _ = case
    context, pooled = sd.encode_prompts(PROMPTS, max_sequence_length=MAX_LEN)
    assert context.shape == ref["prompt_embeds"].shape and pooled.shape == ref["pooled"].shape
    assert np.abs(context - ref["prompt_embeds"]).max() < 1e-4
    assert np.abs(pooled - ref["pooled"]).max() < 1e-4


def test_bad_input(case, caplog):
    sd, ref, _, dev = case
    latents = ref["txt2img_latents"]
    kwargs = dict(num_steps=1, max_sequence_length=4, output_type="latent", progress=False, jit_compile=False)
    with pytest.raises(ValueError, match="height=40 is not a multiple of 16"):
        sd.generate("a cat", height=40, width=WIDTH, **kwargs)
    with pytest.raises(ValueError, match="negative_prompt is not supported"):
        sd.generate("a cat", "blurry", height=HEIGHT, width=WIDTH, **kwargs)
    with pytest.raises(ValueError, match="max_sequence_length=513"):
        sd.encode_prompts(["a cat"], max_sequence_length=513)
    with caplog.at_level(logging.WARNING, logger="tf_diffusion.flux_pipeline"):
        sd.generate("a cat", guidance_scale=3.5, height=HEIGHT, width=WIDTH, latents=latents[:1], **kwargs)
    # A guidance scale is [dev]'s input; [schnell] has none and ignores it with a warning, as diffusers.
    assert ("is ignored" in caplog.text) == (not dev)
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    with pytest.raises(ValueError, match="strength=0 must be a number in"):
        sd.generate("a cat", image=image, strength=0, **kwargs)


def test_image_to_image_matches_diffusers(case, arrays):
    # diffusers ran with tf_diffusion.noise's draws for the seeds (the posterior sample and the noise).
    sd, ref, guidance, _ = case
    params = CASES["img2img"]
    images = sd.generate(PROMPTS, image=arrays["image"].astype(np.float32) / 255.0, strength=params["strength"],
                         num_steps=params["steps"], guidance_scale=guidance, seed=params["seed"],
                         max_sequence_length=MAX_LEN, output_type="float", progress=False,
                         jit_compile=False)  # fmt: skip
    assert images.info.mode == "img2img" and images.info.num_evals == 3  # int(4 * 0.7) steps kept
    err = np.abs(images - ref["img2img_images"]).max()
    assert err < IMAGE_TOL, err


def test_seeded_generation_is_reproducible_per_image(case):
    sd, _, _, _ = case
    kwargs = dict(num_steps=2, height=HEIGHT, width=WIDTH, output_type="latent", progress=False,
                  jit_compile=False, max_sequence_length=4)  # fmt: skip
    both = sd.generate(["a", "b"], seed=7, **kwargs)
    second = sd.generate(["b"], seed=8, **kwargs)
    assert both.shape == (2, HEIGHT // 8, WIDTH // 8, 16)
    np.testing.assert_allclose(both[1], second[0], atol=1e-5)
    assert both.info.seeds == (7, 8) and both.info.sampler == "FlowMatchEulerDiscreteScheduler"


def test_presets_are_the_released_architectures():
    from tf_diffusion.families import get_family
    from tf_diffusion.flux import FLUX_PRESETS
    from tf_diffusion.presets import get_any_preset

    for name in get_family("flux").presets:
        config = get_any_preset(name)
        assert config.transformer == FLUX_PRESETS[name] and config.size_multiple == 16
        assert config.vae.scaling_factor == 0.3611 and config.vae.shift_factor == 0.1159
    dev, schnell = get_any_preset("flux1-dev"), get_any_preset("flux1-schnell")
    assert (dev.max_sequence_length, dev.default_guidance, dev.scheduler.use_dynamic_shifting) == (
        512,
        3.5,
        True,
    )
    assert (schnell.max_sequence_length, schnell.default_steps, schnell.scheduler.shift) == (256, 4, 1.0)


def test_inpainting_matches_diffusers(case, arrays):
    # FluxInpaintPipeline (the 16-channel transformer: the kept region re-noised at every step), run with
    # tf_diffusion.noise's draws for the seeds.
    sd, ref, guidance, _ = case
    params = CASES["inpaint"]
    images = sd.generate(PROMPTS, image=arrays["image"].astype(np.float32) / 255.0,
                         mask=arrays["mask"].astype(np.float32) / 255.0, strength=params["strength"],
                         num_steps=params["steps"], guidance_scale=guidance, seed=params["seed"],
                         max_sequence_length=MAX_LEN, output_type="float", progress=False,
                         jit_compile=False)  # fmt: skip
    assert images.info.mode == "inpaint"
    err = np.abs(images - ref["inpaint_images"]).max()
    assert err < IMAGE_TOL, err


def test_int8_weights_give_images_close_to_float(case, tmp_path_factory):
    # quantize="int8": the transformer's and both text encoders' Linear weights int8 per output channel.
    # Images in [0, 1] from diffusers' latents; measured max abs error 6.9e-3 ([dev]) and 5.4e-3 ([schnell])
    # against the float model, whose own error against diffusers is about 5e-6.
    from tf_diffusion.execution import quantize

    sd, ref, guidance, dev = case
    folder = _folder("dev" if dev else "schnell", tmp_path_factory)
    q = StableDiffusion.from_pretrained(folder, quantize="int8")
    assert q.quantization == ("int8", ("transformer", "text_encoder", "text_encoder_2"))
    assert quantize.is_quantized(q.transformer.double_blocks[0].img_attn.qkv)
    kw = dict(num_steps=CASES["txt2img"]["steps"], guidance_scale=guidance, height=HEIGHT, width=WIDTH,
              latents=ref["txt2img_latents"], max_sequence_length=MAX_LEN, output_type="float",
              progress=False, jit_compile=False)  # fmt: skip
    got = np.asarray(q.generate(PROMPTS, **kw))
    err = float(np.abs(got - ref["txt2img_images"]).max())
    print(f"Flux {'dev' if dev else 'schnell'} image int8 max abs error {err:.2e}")
    assert 1e-5 < err < 4e-2  # int8 rounding shows, but the images stay close


def test_true_cfg_with_a_negative_prompt_matches_diffusers(case):
    # FluxPipeline(negative_prompt=..., true_cfg_scale=3): two transformer passes per step, combined as
    # neg + 3 * (cond - neg) ([dev]: both passes read the guidance input); written by
    # tools/make_fixtures_flux_true_cfg.py. Measured max abs error: 2.7e-6 ([dev]), 1.9e-6 ([schnell]).
    sd, _, guidance, dev = case
    variant = "dev" if dev else "schnell"
    with np.load(FIXTURES / "true_cfg.npz") as data:
        latents, want, ignored = (
            data[f"{variant}/{k}"] for k in ("latents", "true_cfg_images", "true_cfg_1_images")
        )
    negatives = ["blurry, low quality", "a dog"]
    kw = dict(num_steps=3, guidance_scale=guidance, height=HEIGHT, width=WIDTH, latents=latents,
              max_sequence_length=MAX_LEN, output_type="float", progress=False, jit_compile=False)  # fmt: skip
    images = sd.generate(PROMPTS, negatives, true_cfg_scale=3.0, **kw)
    err = float(np.abs(images - want).max())
    assert err < IMAGE_TOL, err
    assert images.info.num_evals == 3
    assert np.abs(want - ignored).max() > 0.01  # the negative pass changes the images
    # true_cfg_scale=1 (the default) runs one pass: diffusers ignores the negative prompt there; here a
    # negative prompt is refused, and the plain prompt gives diffusers' true_cfg_scale=1 images.
    with pytest.raises(ValueError, match="negative_prompt is not supported .* unless true_cfg_scale > 1"):
        sd.generate(PROMPTS, negatives, **kw)
    err = float(np.abs(sd.generate(PROMPTS, **kw) - ignored).max())
    assert err < IMAGE_TOL, err


def test_true_cfg_scale_is_checked(case, caplog):
    sd, ref, _, _ = case
    kw = dict(num_steps=1, height=HEIGHT, width=WIDTH, max_sequence_length=4, output_type="latent",
              progress=False, jit_compile=False, latents=ref["txt2img_latents"][:1])  # fmt: skip
    for bad in ("3", None, float("nan")):
        with pytest.raises(ValueError, match="true_cfg_scale="):
            sd.generate("a cat", "blurry", true_cfg_scale=bad, **kw)
    with caplog.at_level(logging.WARNING, logger="tf_diffusion.flux_pipeline"):
        out = sd.generate("a cat", true_cfg_scale=2.0, **kw)
    assert "needs a negative_prompt" in caplog.text and out.info.num_evals == 1
