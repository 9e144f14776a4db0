"""generate(masked_content=, resize_latents=): the web UI's "latent noise" / "latent nothing" inpainting fills
and its "Just resize (latent upscale)".

The web UI (modules/processing.py, StableDiffusionProcessingImg2Img.init) encodes the init image, then with
resize mode 3 resizes the latents with ``torch.nn.functional.interpolate(mode="bilinear")``; under a mask
(rounded at latent size) fill 2 puts the seed's noise where the mask is, fill 3 zeros there, and the
sampler then noises the result as for any image-to-image start. The expected starts below are built from
those rules, the resize from torch's output stored by tools/make_fixtures_pipeline.py --resize.
"""

import pathlib

import numpy as np
import pytest

from tests.test_generate import MICRO, run
from tf_diffusion import noise as noise_lib
from tf_diffusion.schedulers import get_sampler

RESIZE = pathlib.Path(__file__).parent / "fixtures" / "pipeline" / "resize_latents.npz"


@pytest.fixture(scope="module")
def sd():
    import keras

    from tf_diffusion.pipeline import StableDiffusion

    keras.utils.set_random_seed(3)
    return StableDiffusion(MICRO)


def _image(size, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mask(size):
    mask = np.zeros((size, size), np.float32)
    mask[4:20, 8:26] = 1.0
    return mask


def _encoded(sd, pixels, seeds):
    """What generate() encodes: posterior samples from the image-posterior stream, scaled."""
    factor = sd.config.vae.downsample_factor
    shape = (pixels.shape[0] // factor, pixels.shape[1] // factor, sd.config.vae.latent_channels)
    posterior = noise_lib.batch_normal(seeds, noise_lib.IMAGE_POSTERIOR, shape)
    x = pixels[None].astype(np.float32) / 255.0 * 2.0 - 1.0
    return sd._encode_image(x, posterior) * np.float32(sd.config.vae.scaling_factor)


@pytest.mark.parametrize("content", ["original", "latent_noise", "latent_nothing"])
def test_masked_content_fills_the_masked_latents_before_noising(sd, content):
    size, seeds = 32, [11]
    sampler = get_sampler("ddim", sd.config.scheduler)
    plan = sampler.plan(4, strength=0.6)
    shape = (size // 2, size // 2, 4)
    noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
    image, mask = _image(size), _mask(size)
    init = image[None].astype(np.float32) / 255.0
    task = sd._prepare_task(
        sampler, plan, noise, seeds, init, mask[None, :, :, None], 0.6, masked_content=content
    )
    latents = _encoded(sd, image, seeds)
    m = mask[::2, ::2][None, :, :, None]
    fill = {"original": latents, "latent_noise": noise, "latent_nothing": np.zeros_like(latents)}[content]
    want = np.asarray(sampler.add_noise(latents * (1 - m) + fill * m, noise, plan))
    np.testing.assert_allclose(task.x, want, atol=1e-6)
    if content != "original":  # the kept area is the image's, the masked area is not
        base = np.asarray(sampler.add_noise(latents, noise, plan))
        assert np.abs(task.x - base)[m[..., 0] == 0].max() < 1e-6
        assert np.abs(task.x - base)[m[..., 0] == 1].max() > 1e-2


def test_resize_latents_matches_torch_bilinear(sd, monkeypatch):
    """The image is encoded at its own size and its latents resized as torch's bilinear interpolate did
    (tools/make_fixtures_pipeline.py --resize stored torch's output for fixed latents, which the VAE
    here is made to return)."""
    ref = np.load(RESIZE)
    seeds = [5]
    sampler = get_sampler("ddim", sd.config.scheduler)
    plan = sampler.plan(4, strength=0.5)
    image = _image(24, seed=2)
    sf = np.float32(sd.config.vae.scaling_factor)
    assert sd.config.vae.shift_factor == 0.0

    def encode(x, posterior):
        assert x.shape == (1, 24, 24, 3) and posterior.shape == ref["latents"].shape  # at the image's size
        return ref["latents"]

    monkeypatch.setattr(sd, "_encode_image", encode)
    for out in (40, 16):  # up and down
        shape = (out // 2, out // 2, 4)
        noise = noise_lib.batch_normal(seeds, noise_lib.LATENTS, shape)
        init = image[None].astype(np.float32) / 255.0
        task = sd._prepare_task(sampler, plan, noise, seeds, init, None, 0.5)
        want = np.asarray(sampler.add_noise(ref[f"resized_{out // 2}"] * sf, noise, plan))
        np.testing.assert_allclose(task.x, want, atol=2e-6)


def test_generate_with_resize_latents_and_masked_content(sd):
    small = _image(24, seed=4)
    out = run(sd, image=small, strength=0.7, resize_latents=True, height=32, width=32)
    assert out.shape == (1, 32, 32, 3) and out.info.height == 32
    with pytest.raises(ValueError, match="differs from the image's"):
        run(sd, image=small, strength=0.7, height=32, width=32)
    image, mask = _image(32), _mask(32)
    original = run(sd, image=image, mask=mask, strength=0.8, output_type="latent")
    nothing = run(
        sd, image=image, mask=mask, strength=0.8, output_type="latent", masked_content="latent_nothing"
    )
    assert not np.allclose(original, nothing)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"masked_content": "fill"}, "masked_content='fill' is not allowed"),
        ({"masked_content": "latent_noise"}, "applies to inpainting"),
        ({"resize_latents": 1}, "must be True or False"),
        ({"resize_latents": True}, "resize_latents applies to image-to-image"),
        ({"resize_latents": True, "image": np.zeros((31, 31, 3), np.uint8)}, "height=31 is not a multiple"),
        (
            {"resize_latents": True, "image": np.zeros((32, 32, 3), np.uint8), "mask": _mask(32)},
            "without a mask",
        ),
    ],
)
def test_bad_options_are_refused(sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(sd, **kwargs)
