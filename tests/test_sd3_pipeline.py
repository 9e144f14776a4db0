"""SD3 text-to-image against diffusers' StableDiffusion3Pipeline on the tiny folder it wrote.

Fixtures from tools/make_fixtures_sd3.py: ``sd3-diffusers/`` (CLIP-L/G with projections, T5, an SD3.5-like
transformer with q/k norm and dual attention, the 16-channel VAE, FlowMatchEuler shift 3.0) and the
pipeline's float images (``output_type="np"``) from given latents, with and without T5, guided with
and without a negative prompt, and guidance off (a Turbo setting).
"""

import json
import logging
import pathlib

import numpy as np
import pytest

from tf_diffusion.sd3 import StableDiffusion3

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd3"
IMAGE_TOL = 1e-3


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion3.from_pretrained(FIXTURES / "sd3-diffusers")


@pytest.fixture(scope="module")
def sd_no_t5():
    return StableDiffusion3.from_pretrained(FIXTURES / "sd3-diffusers", load_t5=False)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "pipeline.npz")), json.loads((FIXTURES / "pipeline.json").read_text())


@pytest.mark.parametrize("case", ["t5", "t5_negative", "no_t5", "turbo"])
def test_text_to_image_matches_diffusers(sd, sd_no_t5, ref, case):
    arrays, cases = ref
    prompts, negatives, guidance, steps, with_t5 = cases[case]
    model = sd if with_t5 else sd_no_t5
    context, pooled = model.encode_prompts(prompts, max_sequence_length=12)
    assert np.abs(context - arrays[f"{case}_prompt_embeds"]).max() < 1e-4
    assert np.abs(pooled - arrays[f"{case}_pooled"]).max() < 1e-4
    images = model.generate(
        prompts,
        negatives,
        num_steps=steps,
        guidance_scale=guidance,
        height=12,
        width=8,
        latents=arrays[f"{case}_latents"],
        max_sequence_length=12,
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    assert images.shape == arrays[f"{case}_images"].shape
    assert np.abs(images - arrays[f"{case}_images"]).max() < IMAGE_TOL


def test_seeded_generation_is_reproducible_per_image(sd_no_t5):
    kwargs = dict(num_steps=2, guidance_scale=0.0, height=12, width=8, output_type="latent", progress=False,
                  jit_compile=False, max_sequence_length=4)  # fmt: skip
    both = sd_no_t5.generate(["a", "b"], seed=7, **kwargs)
    second = sd_no_t5.generate(["b"], seed=8, **kwargs)
    np.testing.assert_allclose(both[1], second[0], atol=1e-6)
    assert both.info.seeds == (7, 8) and both.info.mode == "txt2img" and both.info.num_evals == 2
    assert both.info.sampler == "flow_euler" and both.info.prompts == ("a", "b")


def test_bad_input_is_refused(sd, caplog):
    with pytest.raises(ValueError, match="height=10 is not a multiple of 4"):
        sd.generate("a cat", height=10, width=8, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="max_sequence_length=513"):
        sd.encode_prompts(["a cat"], max_sequence_length=513)
    with caplog.at_level(logging.WARNING, logger="tf_diffusion.sd3"):
        context, _ = sd.encode_prompts(["a photo of an astronaut riding a horse"], max_sequence_length=3)
    assert "truncated" in caplog.text
    assert context.shape[1] == 77 + 3


def test_folder_without_spiece_model_asks_for_load_t5_false(tmp_path):
    import shutil

    folder = tmp_path / "sd3"
    shutil.copytree(FIXTURES / "sd3-diffusers", folder)
    (folder / "tokenizer_3" / "spiece.model").unlink()
    with pytest.raises(ValueError, match="load_t5=False"):
        StableDiffusion3.from_pretrained(folder)


@pytest.mark.parametrize("case", ["img2img", "img2img_no_t5"])
def test_image_to_image_matches_diffusers(sd, sd_no_t5, ref, case):
    # diffusers ran with tf_diffusion.noise's draws for the seeds (posterior sample and latents).
    arrays, cases = ref
    prompts, negatives, guidance, steps, with_t5, strength, seed = cases[case]
    images = (sd if with_t5 else sd_no_t5).generate(
        prompts,
        negatives,
        image=arrays["img2img_image"].astype(np.float32) / 255.0,
        strength=strength,
        num_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        max_sequence_length=12,
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    assert np.abs(images - arrays[f"{case}_images"]).max() < IMAGE_TOL


def test_image_to_image_arguments(sd_no_t5):
    image = np.zeros((12, 8, 3), np.float32)
    with pytest.raises(ValueError, match="differs from the image's 12x8"):
        sd_no_t5.generate("a", image=image, height=16, width=8, progress=False)
    with pytest.raises(ValueError, match="strength=0 must be a number in"):
        sd_no_t5.generate("a", image=image, strength=0, progress=False)
    with pytest.raises(ValueError, match="strength applies to image-to-image and inpainting only"):
        sd_no_t5.generate("a", strength=0.5, height=12, width=8, progress=False)


def _single_file(sd, tmp_path, with_text_encoders=True, with_t5=True):
    """The tiny folder's weights in the original single-file layout (transformer keys by our rename,
    which tools/make_fixtures_sd3.py checks against diffusers' own converter)."""
    from safetensors.numpy import save_file

    from tf_diffusion.weights.state_dict import state_dict

    tensors = {}
    prefixes = {"transformer": "model.diffusion_model.", "vae": "first_stage_model."}
    if with_text_encoders:
        prefixes.update(
            text_encoder="text_encoders.clip_l.transformer.",
            text_encoder_2="text_encoders.clip_g.transformer.",
        )
    if with_t5:
        prefixes["text_encoder_3"] = "text_encoders.t5xxl.transformer."
    for name, prefix in prefixes.items():
        for key, value in state_dict(getattr(sd, name)).items():
            if name == "text_encoder" and key == "text_projection.weight":
                continue  # SD3 files hold none: the identity (the tiny folder's is the identity too)
            tensors[prefix + key] = np.ascontiguousarray(value)
    path = tmp_path / "sd3_tiny.safetensors"
    save_file(tensors, str(path))
    return path, sd.config


def test_original_single_file(sd, tmp_path, ref):
    arrays, cases = ref
    prompts, negatives, guidance, steps, _ = cases["t5"]
    path, config = _single_file(sd, tmp_path)
    spiece = FIXTURES / "sd3-diffusers" / "tokenizer_3" / "spiece.model"
    with pytest.raises(ValueError, match="carry no T5 tokenizer"):
        StableDiffusion3.from_single_file(path, config=config)
    loaded = StableDiffusion3.from_single_file(path, config=config, tokenizer_3=spiece,
                                           text_encoders_from=FIXTURES / "sd3-diffusers")  # fmt: skip
    images = loaded.generate(prompts, negatives, num_steps=steps, guidance_scale=guidance, height=12, width=8,
                             latents=arrays["t5_latents"], max_sequence_length=12, output_type="float",
                         progress=False, jit_compile=False)  # fmt: skip
    assert np.abs(images - arrays["t5_images"]).max() < IMAGE_TOL


def test_single_file_without_text_encoders(sd, tmp_path, ref):
    arrays, cases = ref
    prompts, negatives, guidance, steps, _ = cases["no_t5"]
    path, config = _single_file(sd, tmp_path, with_text_encoders=False, with_t5=False)
    with pytest.raises(
        ValueError, match="no text_encoder and text_encoder_2 .CLIP. weights; pass text_encoders_from"
    ):
        StableDiffusion3.from_single_file(path, config=config)
    loaded = StableDiffusion3.from_single_file(path, config=config, text_encoders_from=FIXTURES / "sd3-diffusers",
                                               load_t5=False)  # fmt: skip
    assert loaded.text_encoder_3 is None
    images = loaded.generate(prompts, negatives, num_steps=steps, guidance_scale=guidance, height=12, width=8,
                             latents=arrays["no_t5_latents"], max_sequence_length=12, output_type="float",
                         progress=False, jit_compile=False)  # fmt: skip
    assert np.abs(images - arrays["no_t5_images"]).max() < IMAGE_TOL


def test_single_file_without_t5_warns_when_t5_is_asked_for(sd, tmp_path, caplog):
    """Bad input: T5 asked for (load_t5=True, the default) from a file that has none: a warning naming the
    file, and the model runs without T5 (zeros, as diffusers without text_encoder_3)."""
    import shutil

    path, config = _single_file(sd, tmp_path, with_t5=False)
    # The tiny tokenizers from a copy of the folder without T5 (the file has every CLIP weight).
    folder = tmp_path / "no-t5"
    shutil.copytree(FIXTURES / "sd3-diffusers", folder, ignore=shutil.ignore_patterns("*_3"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="tf_diffusion.weights.sd3_single_file"):
        loaded = StableDiffusion3.from_single_file(path, config=config, text_encoders_from=folder)
    assert loaded.text_encoder_3 is None
    assert f"{path} has no T5 weights" in caplog.text and "running without T5" in caplog.text


@pytest.mark.parametrize("case", ["inpaint", "inpaint_full"])
def test_inpainting_matches_diffusers(sd, sd_no_t5, ref, case):
    arrays, cases = ref
    prompts, negatives, guidance, steps, with_t5, strength, seed = cases[case]
    latents = (sd if with_t5 else sd_no_t5).generate(
        prompts,
        negatives,
        image=arrays["img2img_image"].astype(np.float32) / 255.0,
        mask=arrays["inpaint_mask"].astype(np.float32) / 255.0,
        strength=strength,
        num_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        max_sequence_length=12,
        output_type="latent",
        progress=False,
        jit_compile=False,
    )
    # The loop's latents against diffusers' (its inpaint pipeline then decodes without shift_factor;
    # the fixture's images are those latents decoded with it, as the other SD3 pipelines decode).
    assert np.abs(latents - arrays[f"{case}_latents_out"]).max() < 1e-4
    images = np.clip(sd_no_t5.decode(latents) * 0.5 + 0.5, 0.0, 1.0)
    assert np.abs(images - arrays[f"{case}_images"]).max() < IMAGE_TOL


def test_inpainting_arguments(sd_no_t5):
    with pytest.raises(ValueError, match="mask needs an image"):
        sd_no_t5.generate("a", mask=np.ones((12, 8)), progress=False)
    with pytest.raises(ValueError, match="mask size 4x12 .WxH. differs from the image size 8x12"):
        sd_no_t5.generate("a", image=np.zeros((12, 8, 3)), mask=np.ones((12, 4)), progress=False)


def test_skip_layer_guidance_matches_diffusers(sd, ref):
    arrays, _ = ref
    images = sd.generate(["a cat wearing a hat"], num_steps=6, guidance_scale=4.0, height=12, width=8,
                         latents=arrays["slg_latents"], max_sequence_length=12, output_type="float",
                         skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1,
                         skip_layer_guidance_stop=0.7, progress=False, jit_compile=False)  # fmt: skip
    assert np.abs(images - arrays["slg_images"]).max() < IMAGE_TOL
    with pytest.raises(ValueError, match="skip_guidance_layers .3. are not blocks"):
        sd.generate("a", guidance_scale=4.0, height=12, width=8, skip_guidance_layers=[3], progress=False)
    with pytest.raises(ValueError, match="applies to text-to-image with guidance"):
        sd.generate("a", guidance_scale=1.0, height=12, width=8, skip_guidance_layers=[1], progress=False)
