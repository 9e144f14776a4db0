"""The SavedModel export of SD3 without T5, on the tiny diffusers folder of tests/fixtures/sd3.

What is proven here:
- ``tf-diffusion export FOLDER DIR --no-t5`` writes a SavedModel that ``tf.saved_model.load`` reads back;
  its ``generate_from_noise`` gives the latents of ``generate(latents=...)`` (flow-matching Euler at the
  model's shift, classifier-free guidance, the 16-channel VAE with its shift factor) within 1e-5 and the
  same uint8 images, with and without guidance and a negative prompt;
- its ``serving_default`` gives the image ``generate(seed=...)`` gives for each seed (within 1/255);
- ``encode_text`` gives ``encode_prompts``' context (CLIP-L and CLIP-G padded, then the zero tokens
  standing for T5) and pooled embedding; ``denoise`` and ``decode`` chain to the same images;
- a model loaded with T5 is refused with a message naming ``load_t5=False`` / ``--no-t5``, as are
  SD3 options the export does not take; a family without an export (Flux) is named.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd3"
FOLDER = FIXTURES / "sd3-diffusers"
PROMPTS = ["a photo of a cat", "a red car"]
NEGATIVES = ["", "blurry"]
GUIDANCE = [5.0, 1.0]  # the second row: generate()'s unguided path
STEPS, SIZE, LENGTH = 2, 16, 8
SEEDS = [5, 6]


@pytest.fixture(scope="module")
def sd():
    from tf_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(FOLDER, load_t5=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The CLI's export, loaded back with tf.saved_model.load, and its outputs for fixed inputs."""
    import tensorflow as tf

    from tf_diffusion.cli import export as export_cli
    from tf_diffusion.export import read_metadata

    work = tmp_path_factory.mktemp("sd3-export")
    parser = argparse.ArgumentParser()
    export_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["export", str(FOLDER), str(work), "--no-t5", "--steps", str(STEPS), "--height", str(SIZE),
         "--width", str(SIZE), "--max-sequence-length", str(LENGTH)]
    )  # fmt: skip
    assert args.func(args) == 0
    sig = tf.saved_model.load(str(work / "1")).signatures
    noise = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 16), dtype=np.float32)
    strings = lambda values: tf.constant(values, tf.string)  # noqa: E731
    guidance = tf.constant(GUIDANCE, tf.float32)
    out = {"noise": noise, "metadata": read_metadata(work / "1")}
    gen = sig["generate_from_noise"](
        prompt=strings(PROMPTS), negative_prompt=strings(NEGATIVES), guidance_scale=guidance, noise=noise
    )
    out["latents"], out["images"] = gen["latents"].numpy(), gen["images"].numpy()
    out["png"] = np.stack([tf.io.decode_png(p).numpy() for p in gen["png_bytes"]])
    out["seeded"] = sig["serving_default"](
        prompt=strings(PROMPTS),
        negative_prompt=strings(NEGATIVES),
        seed=tf.constant(SEEDS, tf.int64),
        guidance_scale=guidance,
    )["images"].numpy()
    text, negative = (
        sig["encode_text"](prompt=strings(PROMPTS)),
        sig["encode_text"](prompt=strings(NEGATIVES)),
    )
    out["hidden"], out["pooled"] = text["hidden"].numpy(), text["pooled"].numpy()
    latents = sig["denoise"](
        noise=noise,
        context=text["hidden"],
        negative_context=negative["hidden"],
        guidance_scale=guidance,
        pooled=text["pooled"],
        negative_pooled=negative["pooled"],
    )["latents"]
    out["chained"] = sig["decode"](latents=latents)["images"].numpy()
    out["signatures"] = sorted(sig.keys())
    return out


def _generate(sd, row, **kwargs):
    return sd.generate(
        PROMPTS[row],
        NEGATIVES[row],
        guidance_scale=GUIDANCE[row],
        num_steps=STEPS,
        height=SIZE,
        width=SIZE,
        max_sequence_length=LENGTH,
        progress=False,
        jit_compile=False,
        **kwargs,
    )


def test_metadata_describes_the_sd3_export(served):
    meta = served["metadata"]
    assert (meta["sampler"], meta["num_steps"], meta["height"], meta["width"]) == ("flow_euler", 2, 16, 16)
    assert meta["latent_shape"] == [8, 8, 16] and meta["context_shape"] == [77 + LENGTH, 48]
    assert meta["pooled_shape"] == [40] and meta["max_sequence_length"] == LENGTH
    assert meta["vae_shift_factor"] == pytest.approx(0.0609) and "zeros" in meta["text_encoder_3"]
    assert set(meta["signatures"]["denoise"]["inputs"]) == {
        "noise", "context", "negative_context", "guidance_scale", "pooled", "negative_pooled",
    }  # fmt: skip
    assert served["signatures"] == sorted(meta["signatures"])


def test_saved_model_equals_generate_from_the_same_noise(sd, served):
    noise = served["noise"]
    for row in range(2):
        latents = _generate(sd, row, latents=noise[row : row + 1], output_type="latent")
        # Measured 1.5e-6 on latents of scale ~3: the same float32 ops, batched differently.
        np.testing.assert_allclose(served["latents"][row], latents[0], atol=1e-5)
        images = _generate(sd, row, latents=noise[row : row + 1])
        assert np.abs(served["images"][row].astype(int) - images[0]).max() <= 1, row
    np.testing.assert_array_equal(served["png"], served["images"])
    assert np.abs(served["images"][0].astype(int) - served["images"][1]).max() > 10  # rows differ


def test_served_seed_gives_the_image_generate_gives(sd, served):
    for row, seed in enumerate(SEEDS):
        ours = _generate(sd, row, seed=seed)
        assert np.abs(served["seeded"][row].astype(int) - ours[0]).max() <= 1, row


def test_text_signature_and_chained_parts(sd, served):
    context, pooled = sd.encode_prompts(PROMPTS, max_sequence_length=LENGTH)
    np.testing.assert_allclose(served["hidden"], context, atol=1e-5)
    np.testing.assert_allclose(served["pooled"], pooled, atol=1e-5)
    assert not served["hidden"][:, 77:].any()  # T5 left out: zeros, as diffusers
    assert np.abs(served["chained"].astype(int) - served["images"]).max() <= 1


def test_export_refuses_t5_and_options_it_does_not_take(sd):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.export import build_serving_module

    with_t5 = StableDiffusion.from_pretrained(FOLDER)
    assert with_t5.text_encoder_3 is not None
    with pytest.raises(ValueError, match=r"loaded with T5 .*load_t5=False.*--no-t5"):
        build_serving_module(with_t5, num_steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="skip_guidance_layers is not part of the SavedModel export"):
        build_serving_module(sd, num_steps=1, height=SIZE, width=SIZE, skip_guidance_layers=[1])
    with pytest.raises(ValueError, match="max_sequence_length=600 must be an integer in 1..512"):
        build_serving_module(sd, num_steps=1, height=SIZE, width=SIZE, max_sequence_length=600)
    with pytest.raises(ValueError, match="height=10 is not a multiple of 4"):
        build_serving_module(sd, num_steps=1, height=10, width=SIZE)
    with pytest.raises(ValueError, match="sdxl_options"):
        build_serving_module(sd, num_steps=1, height=SIZE, width=SIZE, sdxl_options={})


def test_a_family_without_an_export_is_named():
    from tf_diffusion import StableDiffusion
    from tf_diffusion.export import build_serving_module

    flux = StableDiffusion.from_pretrained(FIXTURES.parent / "flux" / "flux-dev")
    with pytest.raises(
        ValueError, match=r"\(flux family\) has no SavedModel export; .*SD3 / SD3.5 \(without T5\)"
    ):
        build_serving_module(flux, num_steps=1, height=SIZE, width=SIZE)
