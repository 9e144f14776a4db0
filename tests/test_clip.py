"""CLIP text encoder: parity with transformers' CLIPTextModel through committed fixtures.

Fixtures come from tools/make_fixtures_clip_vae.py (tiny random reference models).
"""

import json

import keras
import numpy as np
import pytest

from tf_diffusion.clip import CLIPTextEncoder
from tf_diffusion.config import CLIPTextConfig, from_dict
from tf_diffusion.weights import StateDictError, count_parameters, load_state_dict, manifest, state_dict

FIXTURES = ("clip_quick_gelu", "clip_gelu")
TOL = 1e-4  # float32 max abs error


def load_fixture(fixtures_dir, name):
    with np.load(fixtures_dir / "clip" / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    config = from_dict(CLIPTextConfig, json.loads(str(arrays.pop("config"))))
    params = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    io = {k: v for k, v in arrays.items() if not k.startswith("param/")}
    return config, params, io


def loaded_model(fixtures_dir, name):
    config, params, io = load_fixture(fixtures_dir, name)
    model = CLIPTextEncoder(config)
    load_state_dict(model, params)
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
def test_last_hidden_state_matches_reference(fixtures_dir, name):
    model, io = loaded_model(fixtures_dir, name)
    out = model(io["input_ids"])
    assert out.shape == io["last_hidden_state"].shape
    assert max_error(out, io["last_hidden_state"]) <= TOL


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("skip", [1, 2])
def test_clip_skip_matches_diffusers(fixtures_dir, name, skip):
    model, io = loaded_model(fixtures_dir, name)
    out = model(io["input_ids"], clip_skip=skip)
    assert max_error(out, io[f"clip_skip_{skip}"]) <= TOL
    # The skipped layers must matter, or this test could not fail.
    assert max_error(out, io["last_hidden_state"]) > 1e-2


def test_short_sequence_matches_reference_prefix(fixtures_dir):
    # With a causal mask the first 10 outputs depend only on the first 10 tokens.
    model, io = loaded_model(fixtures_dir, "clip_quick_gelu")
    out = model(io["input_ids"][:, :10])
    assert out.shape == (2, 10, 32)
    assert max_error(out, io["last_hidden_state"][:, :10]) <= TOL


def test_keys_and_shapes_match_checkpoint(fixtures_dir):
    config, params, _ = load_fixture(fixtures_dir, "clip_quick_gelu")
    want = {k: v.shape for k, v in params.items() if k not in CLIPTextEncoder.IGNORED_CHECKPOINT_KEYS}
    assert "text_model.embeddings.position_ids" in params
    assert manifest(CLIPTextEncoder(config)) == want


@pytest.mark.parametrize(
    "config, expected",
    [
        (CLIPTextConfig(), 123_060_480),  # SD 1.x: OpenAI CLIP ViT-L/14
        (
            CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                hidden_act="gelu",
            ),
            340_387_840,  # SD 2.x: OpenCLIP ViT-H/14 up to the penultimate layer
        ),
    ],
    ids=["sd1", "sd2"],
)
def test_full_size_parameter_count(config, expected):
    assert count_parameters(CLIPTextEncoder(config)) == expected


@pytest.mark.parametrize(
    "ids, kwargs, match",
    [
        (np.zeros((77,), np.int32), {}, "shape"),
        (np.zeros((1, 77, 1), np.int32), {}, "shape"),
        (np.zeros((1, 77), np.float32), {}, "integer"),
        (np.zeros((1, 78), np.int32), {}, "78 tokens"),
        (np.zeros((1, 0), np.int32), {}, "0 tokens"),
        (np.zeros((1, 77), np.int32), {"clip_skip": -1}, "clip_skip"),
        (np.zeros((1, 77), np.int32), {"clip_skip": 5}, "clip_skip"),
        (np.zeros((1, 77), np.int32), {"clip_skip": 1.0}, "clip_skip"),
    ],
)
def test_bad_input_raises(ids, kwargs, match):
    model = CLIPTextEncoder(
        CLIPTextConfig(
            vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=5, num_attention_heads=2
        )
    )
    with pytest.raises(ValueError, match=match):
        model(ids, **kwargs)


def test_failed_load_leaves_weights_unchanged(fixtures_dir):
    config, params, _ = load_fixture(fixtures_dir, "clip_quick_gelu")
    model = CLIPTextEncoder(config)
    before = state_dict(model)
    bad = dict(params)
    bad["text_model.encoder.layers.2.mlp.fc1.weight"] = bad["text_model.encoder.layers.2.mlp.fc1.weight"].T
    with pytest.raises(StateDictError, match="fc1.weight"):
        load_state_dict(model, bad)
    after = state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", FIXTURES)
def test_mixed_precision_runs_close_to_reference(fixtures_dir, mixed_policy, name):
    model, io = loaded_model(fixtures_dir, name)
    layer = model.text_model.encoder.layers[0]
    assert layer.self_attn.q_proj.compute_dtype == mixed_policy.split("_")[1]
    assert layer.self_attn.q_proj.weight.dtype == "float32"
    assert layer.layer_norm1.compute_dtype == "float32"
    assert model.text_model.final_layer_norm.compute_dtype == "float32"
    out = model(io["input_ids"])
    assert keras.backend.standardize_dtype(out.dtype) == "float32"  # final layer norm output
    # Measured on CPU: bfloat16 5.7e-2, float16 7.8e-3 (outputs are O(1) after the final norm).
    bound = {"mixed_bfloat16": 0.2, "mixed_float16": 0.03}[mixed_policy]
    assert max_error(out, io["last_hidden_state"]) < bound


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_dtype_argument_applies_to_sublayers(fixtures_dir, policy):
    config, params, io = load_fixture(fixtures_dir, "clip_quick_gelu")
    global_policy = keras.config.dtype_policy().name
    model = CLIPTextEncoder(config, dtype=policy)
    assert keras.config.dtype_policy().name == global_policy
    q_proj = model.text_model.encoder.layers[0].self_attn.q_proj
    assert q_proj.compute_dtype == policy.split("_")[1]
    assert q_proj.weight.dtype == "float32"
    assert model.text_model.final_layer_norm.compute_dtype == "float32"
    load_state_dict(model, params)
    bound = {"mixed_bfloat16": 0.2, "mixed_float16": 0.03}[policy]
    assert max_error(model(io["input_ids"]), io["last_hidden_state"]) < bound
