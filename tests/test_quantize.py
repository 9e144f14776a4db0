"""Weight-only int8 quantization (execution.quantize): the NumPy definition, tiny SDXL / SD3 models, generate().

The reference for the quantized layer is the scheme written out in NumPy (Keras' absmax int8 per output
channel); the reference for the quantized models is the same model unquantized, with measured relative
errors as bounds (int8 per output channel is expected to cost well under 1% on these outputs).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from tf_diffusion import layers
from tf_diffusion.execution import quantize
from tf_diffusion.pipeline import StableDiffusion
from tf_diffusion.sd3 import StableDiffusion3

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def reference_quantize(w: np.ndarray):
    """The scheme in NumPy: scale = 127 / (absmax + 1e-7) per output column, q = clip(round(w * scale))."""
    w = w.astype(np.float32)
    scale = np.float32(127) / (np.abs(w).max(axis=0) + np.float32(1e-7))
    q = np.clip(np.round(w * scale), -127, 127).astype(np.int8)
    return q, scale


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def linear(dtype=None, in_features=48, out_features=24, bias=True):
    with layers.dtype_policy_scope(dtype):
        layer = layers.Linear(in_features, out_features, bias=bias)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((in_features, out_features)).astype(np.float32)
    w[:, 3] *= 1e-3  # a column of small weights keeps its own scale
    w[:, 5] = 0.0  # an all-zero column: scale 127 / 1e-7, q = 0
    layer.weight.assign(w)
    return layer, w


# ------------------------------------------------------------------ the quantized layer


@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_numpy_reference(bias):
    layer, w = linear(bias=bias)
    x = np.random.default_rng(1).standard_normal((2, 5, 48)).astype(np.float32)
    float_out = keras.ops.convert_to_numpy(layer(x))
    quantize.quantize_model(layer, "int8")
    q, scale = reference_quantize(w)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.weight), q)  # bit-exact
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.weight_scale), scale)
    want = x @ (q.astype(np.float32) / scale)
    if bias:
        want = want + keras.ops.convert_to_numpy(layer.bias)
    got = keras.ops.convert_to_numpy(layer(x))
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    # And what int8 costs against the float layer (per-channel absmax: about 0.3% here).
    assert 1e-4 < relative_error(got, float_out) < 1e-2


def test_variables_are_int8_and_the_float_kernel_is_gone():
    layer, _ = linear()
    before = {v.name: keras.backend.standardize_dtype(v.dtype) for v in layer.weights}
    quantize.quantize_model(layer, "int8")
    after = {v.path.split("/")[-1]: keras.backend.standardize_dtype(v.dtype) for v in layer.weights}
    assert before == {"weight": "float32", "bias": "float32"}
    assert after == {"weight": "int8", "bias": "float32", "weight_scale": "float32"}
    assert tuple(layer.weight.shape) == (48, 24)  # the checkpoint key and shape stay
    assert quantize.is_quantized(layer)
    quantize.quantize_model(layer, "int8")  # idempotent
    assert len(layer.weights) == 3


def test_mixed_bfloat16_keeps_the_scale_float32():
    layer, w = linear("mixed_bfloat16")
    quantize.quantize_model(layer)
    x = np.random.default_rng(2).standard_normal((3, 48)).astype(np.float32)
    q, scale = reference_quantize(w)
    got = layer(x)
    assert keras.backend.standardize_dtype(got.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.weight_scale.dtype) == "float32"
    want = x @ (q.astype(np.float32) / scale) + keras.ops.convert_to_numpy(layer.bias)
    assert relative_error(keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")), want) < 1e-2


@pytest.mark.parametrize("mode", ["int4", "INT8", 8, True, ""])
def test_bad_mode_is_refused(mode):
    layer, _ = linear()
    with pytest.raises(ValueError, match=r"quantize=.*allowed: None or one of \('int8',\)"):
        quantize.quantize_model(layer, mode)
    with pytest.raises(ValueError, match="not a quantization mode"):
        StableDiffusion.from_pretrained(FIXTURES / "sdxl" / "sdxl-diffusers", quantize=mode)


def test_none_leaves_the_model_float():
    layer, _ = linear()
    quantize.quantize_model(layer, None)
    assert not quantize.is_quantized(layer)
    assert keras.backend.standardize_dtype(layer.weight.dtype) == "float32"


# ------------------------------------------------------------------ SDXL and SD3


@pytest.fixture(scope="module")
def sdxl():
    folder = FIXTURES / "sdxl" / "sdxl-diffusers"
    return StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(folder, quantize="int8")


@pytest.fixture(scope="module")
def sd3():
    folder = FIXTURES / "sd3" / "sd3-diffusers"
    return StableDiffusion3.from_pretrained(folder), StableDiffusion3.from_pretrained(folder, quantize="int8")


def _linears(model):
    return [
        x for x in model._flatten_layers(include_self=True, recursive=True) if isinstance(x, layers.Linear)
    ]


def test_pipeline_quantizes_denoiser_and_text_encoders_not_the_vae(sdxl, sd3):
    _, q = sdxl
    assert q.quantization == ("int8", ("unet", "text_encoder", "text_encoder_2"))
    for model in (q.unet, q.text_encoder, q.text_encoder_2):
        assert _linears(model) and all(quantize.is_quantized(x) for x in _linears(model))
        int8 = [v for v in model.weights if keras.backend.standardize_dtype(v.dtype) == "int8"]
        assert len(int8) == len(_linears(model))
    _, q3 = sd3
    assert q3.quantization == ("int8", ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"))
    assert all(quantize.is_quantized(x) for x in _linears(q3.text_encoder_3))
    assert not any(keras.backend.standardize_dtype(v.dtype) == "int8" for v in q3.vae.weights)


def test_quantize_components_picks_and_checks():
    folder = FIXTURES / "sdxl" / "sdxl-diffusers"
    sd = StableDiffusion.from_pretrained(folder, quantize="int8", quantize_components=["text_encoder_2"])
    assert not any(quantize.is_quantized(x) for x in _linears(sd.unet))
    assert all(quantize.is_quantized(x) for x in _linears(sd.text_encoder_2))
    with pytest.raises(ValueError, match=r"names \['transformer'\]; this model has \['unet'"):
        quantize.quantize_pipeline(sd, "int8", ["transformer"])


# Measured on these fixtures (relative L2 error of the quantized against the float output): tiny SDXL
# UNet 3.6e-2 (channels 8-32 wide: few weights per output channel, and GroupNorm over 4 channels
# amplifies), SD3 MMDiT 4.9e-3; full-size models are measured in benchmarks/quantize.py.
UNET_TOL, MMDIT_TOL = 8e-2, 1.5e-2


def test_sdxl_unet_output_close_to_float(sdxl):
    f, q = sdxl
    rng = np.random.default_rng(0)
    cfg = f.config.unet
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, cfg.context_dim)).astype(np.float32)
    text = rng.standard_normal((2, f.text_encoder_2.config.projection_dim)).astype(np.float32)
    ids = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))
    args = (x, np.array([500, 20], np.int32), ctx, text, ids)
    want, got = (keras.ops.convert_to_numpy(m.unet(*args)) for m in (f, q))
    err = relative_error(got, want)
    print(f"SDXL UNet int8 relative error {err:.2e}")
    assert 1e-5 < err < UNET_TOL


def test_sd3_transformer_output_close_to_float(sd3):
    f, q = sd3
    rng = np.random.default_rng(0)
    cfg = f.config.transformer
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 9, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32)
    args = (x, np.array([500.0, 20.0], np.float32), ctx, pooled)
    want, got = (keras.ops.convert_to_numpy(m.transformer(*args)) for m in (f, q))
    err = relative_error(got, want)
    print(f"SD3 MMDiT int8 relative error {err:.2e}")
    assert 1e-5 < err < MMDIT_TOL


# Images in [0, 1] from the same latents, the text encoders quantized too; measured max abs errors:
# SDXL 1.5e-2, SD1 1.1e-2, SD3 1.8e-4.
IMAGE_TOL = 4e-2


@pytest.mark.slow  # a whole SDXL generate twice; the SDXL UNet output and SD1 generate tests stay in the default run
def test_sdxl_generate_close_to_float(sdxl):
    f, q = sdxl
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    kw = dict(num_steps=3, guidance_scale=5.0, height=16, width=16, latents=latents, output_type="float")
    # Graph mode, as for SD3 below: the quantized layers' XLA run is test_sd1_generate_close_to_float's.
    kw["jit_compile"] = False
    want, got = (np.asarray(m.generate("a photo of a cat", progress=False, **kw)) for m in (f, q))
    err = float(np.abs(got - want).max())
    print(f"SDXL image int8 max abs error {err:.2e}")
    assert 0 < err < IMAGE_TOL


def test_sd3_generate_close_to_float(sd3):
    f, q = sd3
    latents = np.load(FIXTURES / "sd3" / "pipeline.npz")["t5_latents"][:1]
    kw = dict(num_steps=2, guidance_scale=4.0, height=12, width=8, max_sequence_length=12, latents=latents)
    want, got = (
        np.asarray(
            m.generate("a photo of a cat", output_type="float", progress=False, jit_compile=False, **kw)
        )
        for m in (f, q)
    )
    err = float(np.abs(got - want).max())
    print(f"SD3 image int8 max abs error {err:.2e}")
    assert 0 < err < IMAGE_TOL


def test_sd1_generate_close_to_float():
    folder = FIXTURES / "checkpoints" / "sd1-diffusers"
    f, q = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(folder, quantize="int8")
    # The default compilation (XLA for a float32 model on a CPU), as a user of a quantized model gets it.
    kw = dict(seed=0, num_steps=3, height=16, width=16, output_type="float", progress=False)
    want, got = (np.asarray(m.generate("a red circle", **kw)) for m in (f, q))
    err = float(np.abs(got - want).max())
    print(f"SD1 image int8 max abs error {err:.2e}")
    assert 0 < err < IMAGE_TOL


def test_lora_on_a_quantized_model_is_a_clear_error(tmp_path, sdxl):
    from safetensors.numpy import save_file

    from tf_diffusion.weights.state_dict import named_parameters

    _, q = sdxl
    key = next(k for k in named_parameters(q.unet) if k.endswith("attn1.to_q.weight"))
    layer = named_parameters(q.unet)[key][0]
    name, rank = "lora_unet_" + key[: -len(".weight")].replace(".", "_"), 2
    tensors = {
        f"{name}.lora_down.weight": np.ones((rank, layer.in_features), np.float32),
        f"{name}.lora_up.weight": np.ones((layer.out_features, rank), np.float32),
    }
    save_file(tensors, str(tmp_path / "l.safetensors"))
    before = keras.ops.convert_to_numpy(layer.weight).copy()
    with pytest.raises(ValueError, match="LoRA needs float weights.*quantized to int8"):
        q.load_lora_weights(tmp_path / "l.safetensors")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.weight), before)


# ------------------------------------------------------------------ JAX

JAX_SCRIPT = """
import numpy as np, keras
assert keras.backend.backend() == "jax"
from tf_diffusion.sd3 import StableDiffusion3
f = StableDiffusion3.from_pretrained({folder!r}, load_t5=False)
q = StableDiffusion3.from_pretrained({folder!r}, load_t5=False, quantize="int8")
rng = np.random.default_rng(0)
c = f.config.transformer
args = (rng.standard_normal((1, 8, 8, c.in_channels)).astype("float32"), np.array([500.0], "float32"),
        rng.standard_normal((1, 9, c.joint_attention_dim)).astype("float32"),
        rng.standard_normal((1, c.pooled_projection_dim)).astype("float32"))
a, b = (np.asarray(m.transformer(*args)) for m in (f, q))
int8 = [v for v in q.transformer.weights if keras.backend.standardize_dtype(v.dtype) == "int8"]
assert int8, "no int8 variables"
np.save({out!r}, np.stack([a, b]))
"""


@pytest.mark.slow  # an XLA compile under JAX; test_flux's JAX test stays in the default run
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_quantized_transformer_under_jax(tmp_path, sd3):
    out = tmp_path / "out.npy"
    script = JAX_SCRIPT.format(folder=str(FIXTURES / "sd3" / "sd3-diffusers"), out=str(out))
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = np.load(out)
    err = relative_error(got, want)
    assert 1e-5 < err < MMDIT_TOL


def test_cli_quantize_option(tmp_path, monkeypatch):
    from tf_diffusion import cli

    seen = []
    original = StableDiffusion.from_pretrained.__func__

    def spy(cls, source, **kwargs):
        sd = original(cls, source, **kwargs)
        seen.append(getattr(sd, "quantization", None))
        return sd

    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(spy))
    folder = FIXTURES / "checkpoints" / "sd1-diffusers"
    out = tmp_path / "a.png"
    args = ["generate", "a red circle", "--model", str(folder), "-o", str(out), "--steps", "2"]
    assert cli.main([*args, "--height", "16", "--width", "16", "--no-progress", "--quantize", "int8"]) == 0
    assert out.is_file() and seen == [("int8", ("unet", "text_encoder"))]
    assert cli.main([*args, "--quantize", "int4"]) != 0


def test_quantized_loading_equals_quantizing_the_float_model(sdxl):
    """The loaders build int8 weights before reading (no float copy); the result is the same as quantizing after."""
    f, q = sdxl
    folder = FIXTURES / "sdxl" / "sdxl-diffusers"
    after = quantize.quantize_pipeline(StableDiffusion.from_pretrained(folder), "int8")
    from tf_diffusion.weights.state_dict import named_parameters

    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine, theirs = named_parameters(getattr(q, name)), named_parameters(getattr(after, name))
        assert mine.keys() == theirs.keys()
        for key, (layer, attr) in mine.items():
            other = theirs[key][0]
            np.testing.assert_array_equal(
                *(keras.ops.convert_to_numpy(getattr(x, attr)) for x in (layer, other))
            )
            assert (
                quantize.is_quantized(layer)
                == quantize.is_quantized(other)
                == (name != "vae" and isinstance(layer, layers.Linear))
            )
            if quantize.is_quantized(layer):
                np.testing.assert_array_equal(
                    *(keras.ops.convert_to_numpy(x.weight_scale) for x in (layer, other))
                )


def test_built_int8_weights_are_created_from_the_loaded_values():
    """build_model allocates no int8 buffer before loading; assigned layers get the reference's values,
    ones a partial load skips get zeros and unit scales, and an unloaded model is usable after materialize."""
    from tf_diffusion.weights.state_dict import load_state_dict, named_parameters, state_dict

    def two():
        with layers.dtype_policy_scope("bfloat16"):
            return [layers.Linear(16, 8), layers.Linear(8, 4)]

    class Pair(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.a, self.b = two()
            self.built = True

    model = quantize.build_model(Pair, "int8")
    weights = [model.a.weight, model.a.weight_scale, model.b.weight, model.b.weight_scale]
    assert all(v._value is None for v in weights)  # nothing allocated yet
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 16)).astype(np.float32)  # torch layout (out, in)
    bias = rng.standard_normal(8).astype(np.float32)
    load_state_dict(model, {"a.weight": w, "a.bias": bias}, strict=False)
    q, scale = reference_quantize(w.T)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.a.weight), q)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.a.weight_scale), scale, rtol=1e-6)
    # b was not in the checkpoint: allocated by the load with the start values.
    assert model.b.weight._value is not None and model.b.weight_scale._value is not None
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.b.weight), np.zeros((8, 4), np.int8))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.b.weight_scale), np.ones(4, np.float32))
    assert set(state_dict(model)) == set(named_parameters(model))
    # Assigning again (a second load) writes into the now allocated variable.
    load_state_dict(model, {"a.weight": 2 * w}, strict=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.a.weight), reference_quantize(2 * w.T)[0])

    unloaded = quantize.materialize(quantize.build_model(Pair, "int8"))
    x = np.ones((1, 16), np.float32)
    out = keras.ops.convert_to_numpy(unloaded.b(unloaded.a(x)))
    np.testing.assert_array_equal(out[0], keras.ops.convert_to_numpy(unloaded.b.bias))  # zero weight


def test_mixed_float16_dequantizes_the_weight_first():
    """Under float16, x @ q (sums of products up to 127 x) could overflow; the weight is dequantized first."""
    layer, w = linear("mixed_float16")
    layer.weight.assign(w * 1e-3)  # outputs ~ 0.1 while x @ q reaches ~ 1e4 x more
    quantize.quantize_model(layer)
    x = np.full((2, 48), 200.0, np.float32)  # x @ q alone would be ~ 1e6: inf in float16
    got = keras.ops.convert_to_numpy(keras.ops.cast(layer(x), "float32"))
    q, scale = reference_quantize(w * 1e-3)
    want = x @ (q.astype(np.float32) / scale) + keras.ops.convert_to_numpy(layer.bias)
    assert np.isfinite(got).all() and relative_error(got, want) < 2e-3


def test_saving_a_quantized_model_is_a_clear_error(tmp_path, sdxl):
    _, q = sdxl
    with pytest.raises(ValueError, match=r"save_pretrained needs float weights.*quantized to int8"):
        q.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sd3_single_file_quantizes_as_the_folder(tmp_path, sd3):
    from tests.test_sd3_pipeline import _single_file
    from tf_diffusion.weights.state_dict import named_parameters

    f, q = sd3
    path, config = _single_file(f, tmp_path)
    spiece = FIXTURES / "sd3" / "sd3-diffusers" / "tokenizer_3" / "spiece.model"
    folder = FIXTURES / "sd3" / "sd3-diffusers"  # the tokenizers
    kw = dict(config=config, tokenizer_3=spiece, text_encoders_from=folder)
    loaded = StableDiffusion3.from_single_file(path, quantize="int8", **kw)
    assert loaded.quantization == q.quantization
    for name in ("transformer", "text_encoder_3"):
        mine, theirs = named_parameters(getattr(loaded, name)), named_parameters(getattr(q, name))
        for key, (layer, attr) in mine.items():
            other = theirs[key][0]
            assert quantize.is_quantized(layer) == quantize.is_quantized(other)
            np.testing.assert_array_equal(
                *(keras.ops.convert_to_numpy(getattr(x, attr)) for x in (layer, other))
            )
    with pytest.raises(ValueError, match="not a quantization mode"):
        StableDiffusion3.from_single_file(path, quantize="fp8", **kw)
