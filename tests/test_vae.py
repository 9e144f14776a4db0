"""AutoencoderKL: parity with diffusers' AutoencoderKL through committed fixtures.

Fixtures come from tools/make_fixtures_clip_vae.py: tiny random diffusers VAEs,
weights under diffusers keys, loaded here through our diffusers -> original rename.
"""

import json

import keras
import numpy as np
import pytest

from tf_diffusion.config import VAEConfig, from_dict
from tf_diffusion.vae import AutoencoderKL, DiagonalGaussian
from tf_diffusion.weights import StateDictError, count_parameters, load_state_dict, manifest, state_dict
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae, diffusers_vae_key_map

FIXTURES = ("vae_2level", "vae_3level")
TOL = 1e-4  # float32 max abs error


def load_fixture(fixtures_dir, name):
    with np.load(fixtures_dir / "vae" / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    config = from_dict(VAEConfig, json.loads(str(arrays.pop("config"))))
    params = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    io = {k: v for k, v in arrays.items() if not k.startswith("param/")}
    return config, params, io


def loaded_model(fixtures_dir, name):
    config, params, io = load_fixture(fixtures_dir, name)
    model = AutoencoderKL(config)
    load_state_dict(model, convert_diffusers_vae(params, config))
    return model, io


def max_error(got, want):
    return float(np.max(np.abs(keras.ops.convert_to_numpy(got).astype(np.float64) - want)))


@pytest.fixture(params=["mixed_bfloat16", "mixed_float16"])
def mixed_policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("name", FIXTURES)
def test_encode_decode_match_reference(fixtures_dir, name):
    model, io = loaded_model(fixtures_dir, name)
    posterior = model.encode(io["image"])
    assert posterior.mean.shape == io["mean"].shape
    assert max_error(posterior.mean, io["mean"]) <= TOL
    assert max_error(posterior.logvar, io["logvar"]) <= TOL
    assert max_error(posterior.std, np.exp(0.5 * io["logvar"])) <= TOL
    decoded = model.decode(io["mean"])
    assert decoded.shape == io["image"].shape
    assert max_error(decoded, io["decoded"]) <= TOL
    assert max_error(model(io["image"]), io["decoded"]) <= TOL


@pytest.mark.parametrize("name", FIXTURES)
def test_posterior_clamps_logvar_like_reference(fixtures_dir, name):
    _, _, io = load_fixture(fixtures_dir, name)
    assert io["wide_logvar"].min() == -30.0 and io["wide_logvar"].max() == 20.0
    posterior = DiagonalGaussian(io["wide_moments"])
    assert max_error(posterior.mean, io["wide_mean"]) == 0.0
    assert max_error(posterior.logvar, io["wide_logvar"]) == 0.0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(posterior.std), io["wide_std"], rtol=1e-6)


def test_posterior_sample():
    moments = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
    posterior = DiagonalGaussian(moments)
    mean, std = moments[..., :4], np.exp(0.5 * moments[..., 4:])
    noise = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(posterior.sample(noise=noise), mean + std * noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(posterior.mode(), mean)
    first, again = posterior.sample(seed=3), posterior.sample(seed=3)
    np.testing.assert_array_equal(first, again)
    assert max_error(first, mean) > 0.1
    with pytest.raises(ValueError, match="noise has shape"):
        posterior.sample(noise=noise[:1])


@pytest.mark.parametrize("name", FIXTURES)
def test_keys_and_shapes_match_checkpoint(fixtures_dir, name):
    config, params, _ = load_fixture(fixtures_dir, name)
    converted = convert_diffusers_vae(params, config)
    assert manifest(AutoencoderKL(config)) == {k: tuple(v.shape) for k, v in converted.items()}
    # Decoder levels are numbered in reverse: diffusers' up_blocks.0 is the deepest level.
    levels = len(config.channel_mult)
    assert diffusers_vae_key_map(config)["decoder.up_blocks.0.resnets.0.conv1.weight"] == (
        f"decoder.up.{levels - 1}.block.0.conv1.weight"
    )


def test_full_size_parameter_count_and_keys():
    model = AutoencoderKL(VAEConfig())
    assert count_parameters(model) == 83_653_863
    keys = set(manifest(model))
    assert set(diffusers_vae_key_map(VAEConfig()).values()) == keys
    assert "encoder.down.3.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert "decoder.up.0.block.2.conv2.weight" in keys


def test_rename_handles_legacy_attention_names(fixtures_dir):
    config, params, _ = load_fixture(fixtures_dir, "vae_2level")
    legacy = {
        k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in params.items()
    }
    assert any(".query." in k for k in legacy)
    new, old = convert_diffusers_vae(params, config), convert_diffusers_vae(legacy, config)
    assert new.keys() == old.keys()
    assert all(np.array_equal(new[k], old[k]) for k in new)
    assert new["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)


def test_rename_rejects_unknown_and_duplicate_keys(fixtures_dir):
    config, params, _ = load_fixture(fixtures_dir, "vae_2level")
    with pytest.raises(StateDictError, match="encoder.bogus.weight"):
        convert_diffusers_vae({**params, "encoder.bogus.weight": np.zeros(1)}, config)
    duplicate = {
        **params,
        "encoder.mid_block.attentions.0.query.weight": params["encoder.mid_block.attentions.0.to_q.weight"],
    }
    with pytest.raises(StateDictError, match="second name"):
        convert_diffusers_vae(duplicate, config)
    with pytest.raises(ValueError, match="channel_mult"):
        diffusers_vae_key_map(VAEConfig(channel_mult=(2, 4)))


def test_failed_load_leaves_weights_unchanged(fixtures_dir):
    config, params, _ = load_fixture(fixtures_dir, "vae_2level")
    model = AutoencoderKL(config)
    before = state_dict(model)
    bad = convert_diffusers_vae(params, config)
    bad["decoder.up.1.upsample.conv.weight"] = bad["decoder.up.1.upsample.conv.weight"][:, :8]
    with pytest.raises(StateDictError, match="upsample.conv.weight"):
        load_state_dict(model, bad)
    after = state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "method, shape, dtype, match",
    [
        ("encode", (32, 32, 3), "float32", "shape"),
        ("encode", (1, 32, 32, 4), "float32", "4 channels"),
        ("encode", (1, 3, 32, 32), "float32", "channels"),
        ("encode", (1, 31, 32, 3), "float32", "height=31"),
        ("encode", (1, 32, 33, 3), "float32", "width=33"),
        ("encode", (1, 32, 32, 3), "int32", "float"),
        ("decode", (1, 4, 4), "float32", "shape"),
        ("decode", (1, 4, 4, 3), "float32", "3 channels"),
    ],
)
def test_bad_input_raises(method, shape, dtype, match):
    model = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    with pytest.raises(ValueError, match=match):
        getattr(model, method)(np.zeros(shape, dtype))


@pytest.mark.parametrize("name", FIXTURES)
def test_mixed_precision_runs_close_to_reference(fixtures_dir, mixed_policy, name):
    model, io = loaded_model(fixtures_dir, name)
    compute = mixed_policy.split("_")[1]
    assert model.encoder.conv_in.compute_dtype == compute
    assert model.encoder.conv_in.weight.dtype == "float32"
    assert model.encoder.mid.attn_1.norm.compute_dtype == "float32"
    assert model.decoder.up[0].block[0].norm1.compute_dtype == "float32"
    posterior = model.encode(io["image"])
    assert keras.backend.standardize_dtype(posterior.mean.dtype) == "float32"
    decoded = model.decode(io["mean"])
    assert keras.backend.standardize_dtype(decoded.dtype) == compute
    # Measured on CPU (outputs up to ~2.7): bfloat16 mean 1.4e-2 / decoded 1.1e-1,
    # float16 1.3e-3 / 1.3e-2.
    bound = {"mixed_bfloat16": 0.3, "mixed_float16": 0.05}[mixed_policy]
    assert max_error(posterior.mean, io["mean"]) < bound
    assert max_error(decoded, io["decoded"]) < bound


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_dtype_argument_applies_to_sublayers(fixtures_dir, policy):
    config, params, io = load_fixture(fixtures_dir, "vae_2level")
    global_policy = keras.config.dtype_policy().name
    model = AutoencoderKL(config, dtype=policy)
    assert keras.config.dtype_policy().name == global_policy
    assert model.decoder.conv_out.compute_dtype == policy.split("_")[1]
    assert model.post_quant_conv.compute_dtype == policy.split("_")[1]
    assert model.decoder.norm_out.compute_dtype == "float32"
    load_state_dict(model, convert_diffusers_vae(params, config))
    decoded = model.decode(io["mean"])
    assert keras.backend.standardize_dtype(decoded.dtype) == policy.split("_")[1]
    bound = {"mixed_bfloat16": 0.3, "mixed_float16": 0.05}[policy]
    assert max_error(decoded, io["decoded"]) < bound


@pytest.mark.parametrize("name", FIXTURES)
def test_xla_decode_with_winograd_matches_reference(fixtures_dir, name, monkeypatch):
    # StableDiffusion.decode's float32 CPU default: XLA, 3x3 convolutions by Winograd F(4x4, 3x3) or F(2x2, 3x3)
    # and the 2x upsamplings' convolutions in sub-pixel form (forced here, where the autotuner
    # would measure, so that this tiny VAE takes every path).
    from tf_diffusion import execution
    from tf_diffusion.execution import cpu

    calls = []
    original = cpu.winograd_conv3x3
    monkeypatch.setattr(cpu, "winograd_conv3x3", lambda x, w, m: calls.append(m) or original(x, w, m))
    upsampled = []
    subpixel = cpu.subpixel_conv3x3
    monkeypatch.setattr(cpu, "subpixel_conv3x3", lambda x, w: upsampled.append(x.shape) or subpixel(x, w))
    model, io = loaded_model(fixtures_dir, name)
    execution.apply(model)
    opts = execution.ExecutionOptions(compile="xla", winograd=True, choose=lambda op, key, names: names[-1])
    decoded = execution.compile(model.decode, opts)(keras.ops.convert_to_tensor(io["mean"]))
    assert 4 in calls and upsampled  # the paths under test ran (upsampling: sub-pixel convolutions)
    assert max_error(decoded, io["decoded"]) <= TOL
