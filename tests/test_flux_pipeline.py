"""Flux.1 text-to-image through StableDiffusion against diffusers' FluxPipeline, run here.

A tiny FluxPipeline (one double- and one single-stream block, a random CLIP-L-like CLIPTextModel, the SD3
fixture's tiny T5 and SentencePiece model, a factor-8 16-channel VAE with Flux's scaling and shift) is
written with ``save_pretrained`` and loaded by ``StableDiffusion.from_pretrained``; both run from the same
latents (diffusers' packed, ours NHWC) in a [dev]-like (guidance_embeds, dynamic shifting) and a
[schnell]-like (no guidance input, static shift 1) configuration: text-to-image, image-to-image and inpainting.
"""

import logging
import pathlib
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tf_diffusion.pipeline import StableDiffusion  # noqa: E402

SD3 = pathlib.Path(__file__).parent / "fixtures" / "sd3" / "sd3-diffusers"
IMAGE_TOL = 1e-4  # measured: 1.1e-6 to 2.1e-6, both configurations, all three tasks (float32, CPU)
HEIGHT, WIDTH, STEPS, MAX_LEN = 32, 48, 3, 16
PROMPTS = ["a photo of a cat", "a red bicycle by the sea"]


def _write_pipeline(folder: pathlib.Path, dev: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(0 if dev else 1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=dev,
        axes_dims_rope=[4, 6, 6],
    )  # fmt: skip
    clip = CLIPTextModel(
        CLIPTextConfig(bos_token_id=1112, eos_token_id=1113, pad_token_id=1113, hidden_size=32,
                       intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1114,
                       hidden_act="quick_gelu", projection_dim=32)
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4, 4, 4, 4], layers_per_block=1,
        norm_num_groups=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    if dev:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(SD3 / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(SD3 / "text_encoder_3").eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(SD3 / "tokenizer_3", extra_ids=100),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder)
    # The released repositories ship tokenizer_2/spiece.model, which ours reads.
    shutil.copy(SD3 / "tokenizer_3" / "spiece.model", folder / "tokenizer_2" / "spiece.model")
    return pipe


def _reference(pipe, latents, guidance):
    """diffusers' float images (N, H, W, 3) from NHWC latents (packed for it as FluxPipeline packs)."""
    n, h, w, c = latents.shape
    nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
    packed = pipe._pack_latents(nchw, n, c, h, w)
    with torch.no_grad():
        out = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=packed, max_sequence_length=MAX_LEN, output_type="np")  # fmt: skip
    return out.images


@pytest.fixture(scope="module", params=["dev", "schnell"])
def case(request, tmp_path_factory):
    dev = request.param == "dev"
    folder = tmp_path_factory.mktemp(request.param) / f"flux-{request.param}"
    pipe = _write_pipeline(folder, dev)
    latents = np.random.default_rng(3).standard_normal((2, HEIGHT // 8, WIDTH // 8, 16)).astype(np.float32)
    guidance = 3.5 if dev else 0.0
    return StableDiffusion.from_pretrained(folder), pipe, latents, guidance, dev


def test_text_to_image_matches_diffusers(case):
    sd, pipe, latents, guidance, dev = case
    assert type(sd.hooks).__name__ == "FluxHooks"
    assert sd.config.transformer.guidance_embed == dev
    assert sd.config.scheduler.use_dynamic_shifting == dev
    expected = _reference(pipe, latents, guidance)
    images = sd.generate(PROMPTS, num_steps=STEPS, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                         latents=latents, max_sequence_length=MAX_LEN, output_type="float", progress=False,
                         jit_compile=False)  # fmt: skip
    assert images.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    err = np.abs(images - expected).max()
    assert err < IMAGE_TOL, err
    assert images.info.num_evals == STEPS  # one pass per step: no classifier-free guidance


def test_prompt_encoding_matches_diffusers(case):
    sd, pipe, _, _, _ = case
    with torch.no_grad():
        t5, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MAX_LEN)
    context, ours = sd.encode_prompts(PROMPTS, max_sequence_length=MAX_LEN)
    assert np.abs(context - t5.numpy()).max() < 1e-4
    assert np.abs(ours - pooled.numpy()).max() < 1e-4


def test_bad_input(case, caplog):
    sd, _, latents, _, dev = case
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


def test_image_to_image_matches_diffusers(case):
    # diffusers runs with tf_diffusion.noise's draws for the seeds (the posterior sample and the noise).
    import sys

    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    from tf_diffusion import noise as noise_lib

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    from make_fixtures_pipeline import NoiseQueues

    sd, pipe, _, guidance, _ = case
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([yy * 7, xx * 5, (yy + xx) * 3], axis=-1).astype(np.uint8)  # (32, 48, 3)
    seed, strength, steps = 11, 0.7, 4
    seeds = noise_lib.image_seeds(seed, len(PROMPTS))
    latent = (HEIGHT // 8, WIDTH // 8, 16)
    with NoiseQueues() as queues, torch.no_grad():
        queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent))
        queues.queues["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
        expected = FluxImg2ImgPipeline(**pipe.components)(
            PROMPTS, image=[Image.fromarray(image)] * len(PROMPTS), height=HEIGHT, width=WIDTH,
            strength=strength, num_inference_steps=steps, guidance_scale=guidance,
            max_sequence_length=MAX_LEN, output_type="np",
        ).images  # fmt: skip
    images = sd.generate(PROMPTS, image=image.astype(np.float32) / 255.0, strength=strength, num_steps=steps,
                         guidance_scale=guidance, seed=seed, max_sequence_length=MAX_LEN, output_type="float",
                         progress=False, jit_compile=False)  # fmt: skip
    assert images.info.mode == "img2img" and images.info.num_evals == 3  # int(4 * 0.7) steps kept
    err = np.abs(images - expected).max()
    assert err < IMAGE_TOL, err


def test_seeded_generation_is_reproducible_per_image(case):
    sd, _, _, _, _ = case
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


def test_inpainting_matches_diffusers(case):
    # FluxInpaintPipeline (the 16-channel transformer: the kept region re-noised at every step).
    import sys

    from diffusers import FluxInpaintPipeline
    from PIL import Image

    from tf_diffusion import noise as noise_lib

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    from make_fixtures_pipeline import NoiseQueues

    sd, pipe, _, guidance, _ = case
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([yy * 7, xx * 5, (yy + xx) * 3], axis=-1).astype(np.uint8)  # (32, 48, 3)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[8:24, 16:40] = 255
    seed, strength, steps = 21, 0.8, 4
    seeds = noise_lib.image_seeds(seed, len(PROMPTS))
    latent = (HEIGHT // 8, WIDTH // 8, 16)
    with NoiseQueues() as queues, torch.no_grad():
        # The image's posterior, the masked image's (diffusers encodes it; this transformer does not read
        # it), and the noise.
        queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, latent))
        queues.queues["vae"].append(noise_lib.batch_normal(seeds, noise_lib.MASKED_POSTERIOR, latent))
        queues.queues["pipeline"].append(noise_lib.batch_normal(seeds, noise_lib.LATENTS, latent))
        expected = FluxInpaintPipeline(**pipe.components)(
            PROMPTS, image=[Image.fromarray(image)] * len(PROMPTS), mask_image=[Image.fromarray(mask)] * 2,
            height=HEIGHT, width=WIDTH, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
            max_sequence_length=MAX_LEN, output_type="np",
        ).images  # fmt: skip
    images = sd.generate(PROMPTS, image=image.astype(np.float32) / 255.0, mask=mask.astype(np.float32) / 255.0,
                         strength=strength, num_steps=steps, guidance_scale=guidance, seed=seed,
                         max_sequence_length=MAX_LEN, output_type="float", progress=False,
                         jit_compile=False)  # fmt: skip
    assert images.info.mode == "inpaint"
    err = np.abs(images - expected).max()
    assert err < IMAGE_TOL, err
