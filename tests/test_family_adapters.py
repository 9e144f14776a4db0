"""What each family's pipeline takes: SD3 / Flux refuse the UNet adapters with a clear error, and
``load_vae`` works for every family (a VAE of another latent width is refused by name)."""

import pathlib

import numpy as np
import pytest

from tf_diffusion import StableDiffusion
from tf_diffusion.family_hooks import ADAPTERS, SD3Hooks, UNetHooks
from tf_diffusion.flux_pipeline import FluxHooks

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SD3_FOLDER = FIXTURES / "sd3" / "sd3-diffusers"


@pytest.fixture(scope="module")
def sd3():
    return StableDiffusion.from_pretrained(SD3_FOLDER)


def test_the_unet_families_take_every_adapter():
    assert UNetHooks.adapters == frozenset(ADAPTERS)
    for adapter in ADAPTERS:
        with pytest.raises(ValueError, match=f"{ADAPTERS[adapter]} are not supported"):
            SD3Hooks().require_adapter(type("C", (), {"name": "sd3.5-medium"})(), adapter)
    assert FluxHooks.adapters == frozenset({"lora"})


@pytest.mark.parametrize(
    "call",
    [
        lambda sd: sd.load_lora_weights(FIXTURES / "lora" / "lora_kohya.safetensors"),
        lambda sd: sd.load_textual_inversion(FIXTURES / "textual_inversion"),
        lambda sd: sd.load_ip_adapter(FIXTURES / "ip_adapter" / "tiny_sd15.bin"),
        lambda sd: sd.generate(
            "a", num_steps=1, height=32, width=32, controlnet=object(), control_image=np.zeros((32, 32, 3))
        ),
    ],
    ids=["lora", "textual_inversion", "ip_adapter", "controlnet"],
)
def test_sd3_refuses_unet_adapters_by_name(sd3, call):
    with pytest.raises(ValueError, match=r"not supported for sd3-diffusers \(mmdit family"):
        call(sd3)


def test_sd3_load_vae_replaces_its_vae(sd3):
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 16)).astype(np.float32)
    before = np.asarray(sd3.vae.decode(latents))
    old = sd3.vae
    sd3.load_vae(SD3_FOLDER / "vae")
    assert sd3.vae is not old and sd3.vae_source.endswith("vae")
    assert np.array_equal(np.asarray(sd3.vae.decode(latents)), before)


def test_sd3_refuses_a_four_channel_vae(sd3):
    old = sd3.vae
    with pytest.raises(
        ValueError, match="4 latent channels cannot replace the 16-channel VAE of sd3-diffusers"
    ):
        sd3.load_vae(FIXTURES / "vae_file" / "sdxl_vae.safetensors")
    assert sd3.vae is old  # unchanged
