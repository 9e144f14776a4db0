"""TFLite conversion of the text encoder, UNet and VAE decoder, run in the TFLite interpreter (micro model).

Measured maximum absolute errors against the Keras components on the micro model (outputs of scale
~1-3): float32 1e-6 to 4e-6, float16 weights 1e-3 to 2e-3, dynamic-range int8 weights 0.05 to 0.06.
The bounds below leave about 5x headroom. The full-size UNet's 2 GiB flatbuffer limit is handled by
``convert_tflite`` (buffer-offset format for float32; float16 / int8 weights fit) and measured on a
full-size model outside the test suite (docs/serving.md).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_generate import MICRO

TOLERANCE = {None: 2e-5, "float16": 1e-2, "dynamic_range": 0.3}


@pytest.fixture(scope="module")
def case():
    from tf_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion(MICRO)
    rng = np.random.default_rng(0)
    ids = sd.tokenizer(["a red circle"]).astype(np.int32)
    latents = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    timestep = np.array([500.0], np.float32)
    context = np.asarray(sd.text_encoder(ids))
    inputs = {
        "text_encoder": {"ids": ids},
        "unet": {"latents": latents, "timestep": timestep, "context": context},
        "decoder": {"latents": latents},
    }
    expected = {
        "text_encoder": context,
        "unet": np.asarray(sd.unet(latents, timestep, context)),
        "decoder": np.asarray(sd.vae.decode(latents)),
    }
    return sd, inputs, expected


@pytest.fixture(scope="module")
def convert(case):
    """convert_tflite on the micro model, each (component, quantization) once."""
    from tf_diffusion.export import convert_tflite

    done = {}

    def get(component, quantization):
        if (component, quantization) not in done:
            done[component, quantization] = convert_tflite(case[0], component, quantization=quantization)
        return done[component, quantization]

    return get


@pytest.mark.parametrize("quantization", [None, "float16", "dynamic_range"])
@pytest.mark.parametrize("component", ["text_encoder", "unet", "decoder"])
def test_component_runs_in_the_interpreter(case, convert, component, quantization):
    from tf_diffusion.export import run_tflite

    _, inputs, expected = case
    model = convert(component, quantization)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        (out,) = run_tflite(model, inputs[component]).values()
    assert out.shape == expected[component].shape
    error = np.abs(out - expected[component]).max()
    assert error <= TOLERANCE[quantization], f"{component} {quantization}: {error}"
    if quantization is not None:
        assert error > 0  # the weights really were stored in fewer bits


def test_quantization_shrinks_the_unet(convert):
    sizes = {q: len(convert("unet", q)) for q in (None, "float16", "dynamic_range")}
    assert sizes["float16"] < 0.6 * sizes[None] and sizes["dynamic_range"] < 0.35 * sizes[None]


def test_cli_writes_files_and_refuses_to_overwrite(case, tmp_path, capsys):
    import argparse

    from tf_diffusion.cli import export as export_cli

    sd, _, _ = case
    sd.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    export_cli.add_parser(parser.add_subparsers())
    argv = ["export", str(tmp_path / "model"), str(tmp_path / "lite"), "--format", "tflite"]
    args = parser.parse_args(argv + ["--components", "text_encoder", "--quantization", "float16"])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "lite").iterdir()) == ["text_encoder.tflite"]
    assert "text_encoder.tflite" in capsys.readouterr().out
    args = parser.parse_args(argv + ["--components", "text_encoder"])
    with pytest.raises(FileExistsError, match="overwrite"):
        args.func(args)


def test_bad_options(case):
    from tf_diffusion.export import convert_tflite

    sd, _, _ = case
    with pytest.raises(ValueError, match="component='vae'"):
        convert_tflite(sd, "vae")
    with pytest.raises(ValueError, match="quantization='int4'"):
        convert_tflite(sd, "unet", quantization="int4")


def test_models_over_the_flatbuffer_limit(case, monkeypatch):
    """The >2 GiB path, on the micro UNet with the limit lowered: refused, or written with buffer offsets."""
    from tf_diffusion import export

    sd, inputs, expected = case
    monkeypatch.setattr(export, "FLATBUFFER_LIMIT", 1 << 20)  # the micro UNet holds 3.2 MiB of float32
    with pytest.raises(ValueError, match="over TFLite's 2 GiB flatbuffer limit"):
        export.convert_tflite(sd, "unet", allow_large=False)
    model = export.convert_tflite(sd, "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (out,) = export.run_tflite(model, inputs["unet"]).values()
    assert np.abs(out - expected["unet"]).max() <= TOLERANCE[None]


# ------------------------------------------------------------------ SDXL

# float32 TFLite against diffusers (text encoders) and Keras (UNet); measured on the tiny SDXL: states
# 1.5e-6 / 1.9e-6 (values up to 7), pooled 6.3e-7, UNet 7.1e-6 base and 2.3e-6 refiner (outputs up to 1.9).
SDXL_TOL = 1e-4


@pytest.fixture(scope="module")
def sdxl_models():
    """The tiny SDXL base and refiner that diffusers wrote (tests/fixtures/sdxl)."""
    from tests.conftest import FIXTURES
    from tf_diffusion.pipeline import StableDiffusion

    folder = FIXTURES / "sdxl"
    return {
        name: StableDiffusion.from_pretrained(folder / f"{name}-diffusers")
        for name in ("sdxl", "sdxl-refiner")
    }


def _interpret(model: bytes, inputs: dict) -> dict:
    from tf_diffusion.export import run_tflite

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return run_tflite(model, inputs)


def test_sdxl_text_encoders_give_diffusers_states(sdxl_models):
    # Both encoders as generate() reads them: the penultimate states (no final norm) and CLIP-G's
    # projected pooled output, against what diffusers' encoders computed (reference.npz).
    from tests.conftest import FIXTURES
    from tf_diffusion.export import convert_tflite, tflite_components

    sd = sdxl_models["sdxl"]
    assert tflite_components(sd.config) == ("text_encoder", "text_encoder_2", "unet", "decoder")
    with np.load(FIXTURES / "sdxl" / "reference.npz") as data:
        ref = dict(data)
    first = _interpret(convert_tflite(sd, "text_encoder", batch=2), {"ids": ref["ids"]})
    second = _interpret(convert_tflite(sd, "text_encoder_2", batch=2), {"ids": ref["ids_2"]})
    errors = {
        "text_encoder": np.abs(first["hidden"] - ref["text_encoder/penultimate"]).max(),
        "text_encoder_2": np.abs(second["hidden"] - ref["text_encoder_2/penultimate"]).max(),
        "pooled": np.abs(second["pooled"] - ref["text_encoder_2/text_embeds"]).max(),
    }
    assert max(errors.values()) <= SDXL_TOL, errors


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_sdxl_unet_takes_its_added_conditioning(sdxl_models, name):
    from tf_diffusion import sdxl
    from tf_diffusion.export import convert_tflite, tflite_components

    sd = sdxl_models[name]
    cfg = sd.config
    height, width = sd.check_size(None, None)
    rng = np.random.default_rng(1)
    f = cfg.vae.downsample_factor
    latents = rng.standard_normal((1, height // f, width // f, cfg.vae.latent_channels)).astype(np.float32)
    context = rng.standard_normal((1, 77, cfg.unet.context_dim)).astype(np.float32)
    text_embeds = rng.standard_normal((1, cfg.text_encoder_2.projection_dim)).astype(np.float32)
    time_ids = np.asarray(sdxl.time_ids(cfg, height, width, 1)[0], np.float32)  # (1, 6); the refiner's (1, 5)
    assert time_ids.shape == (1, 6 if name == "sdxl" else 5)
    inputs = {
        "latents": latents,
        "timestep": np.array([700.0], np.float32),
        "context": context,
        "text_embeds": text_embeds,
        "time_ids": time_ids,
    }
    out = _interpret(convert_tflite(sd, "unet"), inputs)["prediction"]
    want = np.asarray(
        sd.unet(**{k: v for k, v in inputs.items() if k != "timestep"}, timesteps=inputs["timestep"])
    )
    assert out.shape == want.shape and np.abs(out - want).max() <= SDXL_TOL
    if name == "sdxl-refiner":
        assert tflite_components(cfg) == ("text_encoder_2", "unet", "decoder")
        with pytest.raises(ValueError, match=r"has no text_encoder; its TFLite components are"):
            convert_tflite(sd, "text_encoder")


def test_sd1_models_have_no_second_text_encoder(case, tmp_path):
    from tf_diffusion.export import export_tflite, tflite_components

    sd = case[0]
    assert tflite_components(sd.config) == ("text_encoder", "unet", "decoder")
    with pytest.raises(ValueError, match=r"has no \['text_encoder_2'\]"):
        export_tflite(sd, tmp_path / "out", components=["unet", "text_encoder_2"])
    assert not (tmp_path / "out").exists()  # refused before anything was written
