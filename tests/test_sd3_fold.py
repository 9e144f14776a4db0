"""SD3 through ``StableDiffusion`` itself (family hooks), against diffusers' StableDiffusion3Pipeline.

The golden images are the fixtures tools/make_fixtures_sd3.py wrote with diffusers (``pipeline.npz``, as
in tests/test_sd3_pipeline.py); here the model is loaded with ``StableDiffusion.from_pretrained`` /
``from_single_file``, not ``StableDiffusion3``. Family options are refused by a family without them.
"""

import json
import pathlib

import keras
import numpy as np
import pytest

from tf_diffusion import StableDiffusion
from tf_diffusion.family_hooks import SD3Hooks, UNetHooks, hooks_for_source

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SD3_FOLDER = FIXTURES / "sd3" / "sd3-diffusers"
IMAGE_TOL = 1e-3  # float images in [0, 1], as tests/test_sd3_pipeline.py


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.from_pretrained(SD3_FOLDER)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "sd3" / "pipeline.npz")), json.loads(
        (FIXTURES / "sd3" / "pipeline.json").read_text()
    )


@pytest.fixture(scope="module")
def sd1():
    return StableDiffusion.from_pretrained(FIXTURES / "checkpoints" / "sd1-diffusers")


def _text_to_image(model, arrays, case, cases, **kwargs):
    prompts, negatives, guidance, steps, _ = cases[case]
    return model.generate(prompts, negatives, num_steps=steps, guidance_scale=guidance, height=12, width=8,
                          latents=arrays[f"{case}_latents"], max_sequence_length=12, output_type="float",
                          progress=False, jit_compile=False, **kwargs)  # fmt: skip


def test_from_pretrained_routes_sd3_folders_to_the_sd3_hooks(sd, ref):
    arrays, cases = ref
    assert type(sd) is StableDiffusion and isinstance(sd.hooks, SD3Hooks)
    assert sd.text_encoder_3 is not None and sd.transformer is not None and not hasattr(sd, "unet")
    images = _text_to_image(sd, arrays, "t5", cases)
    assert np.abs(images - arrays["t5_images"]).max() < IMAGE_TOL
    assert images.info.sampler == "flow_euler" and images.info.num_steps == 4
    assert images.info.extra_params == {"Shift": "3"}  # the PNG parameters' flow shift, as Forge writes it


def test_text_conditioning_and_guidance_off_match_diffusers(sd, ref):
    arrays, cases = ref
    context, pooled = sd.encode_prompts(cases["t5_negative"][0], max_sequence_length=12)
    assert np.abs(context - arrays["t5_negative_prompt_embeds"]).max() < 1e-4
    assert np.abs(pooled - arrays["t5_negative_pooled"]).max() < 1e-4
    images = _text_to_image(sd, arrays, "turbo", cases)
    assert np.abs(images - arrays["turbo_images"]).max() < IMAGE_TOL


def test_without_t5_and_image_to_image(ref):
    arrays, cases = ref
    sd = StableDiffusion.from_pretrained(SD3_FOLDER, load_t5=False)
    assert sd.text_encoder_3 is None
    images = _text_to_image(sd, arrays, "no_t5", cases)
    assert np.abs(images - arrays["no_t5_images"]).max() < IMAGE_TOL
    prompts, negatives, guidance, steps, _, strength, seed = cases["img2img_no_t5"]
    images = sd.generate(prompts, negatives, image=arrays["img2img_image"].astype(np.float32) / 255.0,
                         strength=strength, num_steps=steps, guidance_scale=guidance, seed=seed,
                         max_sequence_length=12, output_type="float", progress=False, jit_compile=False)  # fmt: skip
    assert np.abs(images - arrays["img2img_no_t5_images"]).max() < IMAGE_TOL
    assert images.info.mode == "img2img" and images.info.strength == strength


def test_skip_layer_guidance_is_a_family_option(sd, ref):
    arrays, _ = ref
    images = sd.generate(["a cat wearing a hat"], num_steps=6, guidance_scale=4.0, height=12, width=8,
                         latents=arrays["slg_latents"], max_sequence_length=12, output_type="float",
                         skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1,
                         skip_layer_guidance_stop=0.7, progress=False, jit_compile=False)  # fmt: skip
    assert np.abs(images - arrays["slg_images"]).max() < IMAGE_TOL


def test_from_single_file(sd, ref, tmp_path):
    from tests.test_sd3_pipeline import _single_file

    arrays, cases = ref
    path, config = _single_file(sd, tmp_path)
    assert isinstance(hooks_for_source(path), SD3Hooks)
    loaded = StableDiffusion.from_single_file(path, config=config, text_encoders_from=SD3_FOLDER,
                                              tokenizer_3=SD3_FOLDER / "tokenizer_3" / "spiece.model")  # fmt: skip
    assert type(loaded) is StableDiffusion
    images = _text_to_image(loaded, arrays, "t5", cases)
    assert np.abs(images - arrays["t5_images"]).max() < IMAGE_TOL
    with pytest.raises(
        ValueError, match=r"SD3 / SD3.5 single file; its loader takes .*not \['prediction_type'\]"
    ):
        StableDiffusion.from_single_file(path, config=config, prediction_type="epsilon")


def test_quantize_through_stable_diffusion(sd):
    q = StableDiffusion.from_pretrained(SD3_FOLDER, load_t5=False, quantize="int8")
    assert q.quantization[0] == "int8" and "transformer" in q.quantization[1]
    assert any(keras.backend.standardize_dtype(v.dtype) == "int8" for v in q.transformer.weights)
    assert all(keras.backend.standardize_dtype(v.dtype) != "int8" for v in q.vae.weights)


def test_family_options_are_refused_by_other_families(sd, sd1):
    assert isinstance(sd1.hooks, UNetHooks)
    assert isinstance(hooks_for_source(FIXTURES / "checkpoints" / "sd1-diffusers"), UNetHooks)
    with pytest.raises(ValueError, match=r"max_sequence_length=12, an option of the flux, sd3 family; .* is a sd1 model, "
                                         r"whose family options are: none"):  # fmt: skip
        sd1.generate("a", max_sequence_length=12, num_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"skip_guidance_layers=\[1\], an option of the sd3 family"):
        sd1.generate("a", skip_guidance_layers=[1], num_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"no_such_option=1, not an option of any family; .* whose family options are: "
                                         r"\['max_sequence_length'"):  # fmt: skip
        sd.generate("a", no_such_option=1, num_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"SD 1.x / 2.x / SDXL loader, which takes .*not \['load_t5'\]"):
        StableDiffusion.from_pretrained(FIXTURES / "checkpoints" / "sd1-diffusers", load_t5=False)
    with pytest.raises(ValueError, match="sdxl_options apply to SDXL models only"):
        sd.generate(
            "a", sdxl_options={"original_size": (8, 8)}, height=12, width=8, num_steps=1, progress=False
        )
    with pytest.raises(ValueError, match="denoising_start / denoising_end .* do not apply to SD3"):
        sd.generate("a", height=12, width=8, denoising_end=0.5, num_steps=2, progress=False)


def test_sizes_and_presets_come_from_the_family(sd):
    with pytest.raises(
        ValueError, match=r"height=10 is not a multiple of 4 \(the VAE's factor 2 times the patch size 2\)"
    ):
        sd.generate("a", height=10, width=8, num_steps=1, progress=False)
    # Full size: 16-pixel sides (the VAE's 8 times the 2x2 latent patches), what check_size asks of them.
    from tf_diffusion.presets import SD3_PRESETS

    for preset in SD3_PRESETS.values():
        assert sd.hooks.size_multiple(preset) == (16, " (the VAE's factor 8 times the patch size 2)")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; available presets: .*'sd3-medium'"):
        StableDiffusion.from_preset("nope")
    with pytest.raises(
        ValueError, match="config must be a PipelineConfig or SD3Config or FluxPipelineConfig, got dict"
    ):
        StableDiffusion({})


def test_cli_info_and_generate_for_sd3(tmp_path, capsys):
    from tf_diffusion import cli

    assert cli.main(["info", str(SD3_FOLDER)]) == 0
    out = capsys.readouterr().out
    assert "family: sd3" in out and "format: diffusers (StableDiffusion3Pipeline)" in out
    assert "transformer: " in out and "text_encoder_3: " in out
    path = tmp_path / "sd3.png"
    args = ["generate", "a cat", "--model", str(SD3_FOLDER), "-o", str(path), "--steps", "2", "--height", "12",
            "--width", "8", "--no-progress", "--no-t5", "--max-sequence-length", "4", "--seed", "3"]  # fmt: skip
    assert cli.main(args) == 0
    from PIL import Image

    from tf_diffusion.infotext import parse_parameters

    with Image.open(path) as png:
        text = png.info["parameters"]  # the PNG parameters, as the web UI writes them
    fields = parse_parameters(text)
    assert fields["prompt"] == "a cat" and (fields["seed"], fields["steps"]) == (3, 2), text
    assert (fields["width"], fields["height"]) == (8, 12) and fields["extra"]["Shift"] == "3", text
    sd1_args = ["generate", "a", "--model", str(FIXTURES / "checkpoints" / "sd1-diffusers"), "-o",
                str(tmp_path / "sd1.png"), "--steps", "1", "--no-progress", "--max-sequence-length", "4"]  # fmt: skip
    assert cli.main(sd1_args) != 0
    assert "--max-sequence-length" in capsys.readouterr().err
