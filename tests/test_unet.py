"""UNetModel: parity with diffusers' UNet2DConditionModel, full-size layout, input checks, mixed precision.

Fixtures come from tools/make_fixtures_unet.py (tiny diffusers UNets with fixed seeds; full-size
key manifests built on torch's meta device and renamed by our rename, which the tool checks
against diffusers' own converter).
"""

import functools
import json

import keras
import numpy as np
import pytest

from tf_diffusion import execution
from tf_diffusion.config import UNetConfig
from tf_diffusion.layers import GroupNorm, LayerNorm
from tf_diffusion.unet import ResBlock, UNetModel
from tf_diffusion.weights.diffusers_unet import (
    convert_diffusers_unet_state_dict,
    diffusers_key_to_original,
    diffusers_prefix_map,
    unet_config_from_diffusers,
)
from tf_diffusion.weights.state_dict import (
    StateDictError,
    build_abstract,
    count_parameters,
    load_state_dict,
    manifest,
    named_parameters,
)

TINY = ["sd1", "sd2", "inpaint"]
# The XLA-islands paths are the same code for every config; sd1 runs by default, the others (a
# minute of XLA compiles each) in the slow run.
ISLAND_CONFIGS = [
    "sd1",
    pytest.param("sd2", marks=pytest.mark.slow),
    pytest.param("inpaint", marks=pytest.mark.slow),
]
FLOAT32_TOL = 1e-4

SD15 = UNetConfig()
SD21 = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)
FULL = {
    "sd-v1-5": (SD15, 859_520_964),
    "sd-v2-1": (SD21, 865_910_724),
    "sd-v1-5-inpainting": (UNetConfig(in_channels=9), 859_520_964 + 5 * 320 * 9),
}


@functools.cache
def read_tiny(fixtures_dir, name):
    """A fixture's UNetConfig, its weights under original keys, and its inputs/outputs."""
    folder = fixtures_dir / "unet"
    config = unet_config_from_diffusers(json.loads((folder / f"{name}_config.json").read_text()))
    with np.load(folder / f"{name}_weights.npz") as weights:
        tensors = convert_diffusers_unet_state_dict(dict(weights), config)
    with np.load(folder / f"{name}_io.npz") as io:
        return config, tensors, dict(io)


@functools.cache
def tiny_model(fixtures_dir, name):
    config, tensors, io = read_tiny(fixtures_dir, name)
    model = UNetModel(config)
    load_state_dict(model, tensors)
    execution.apply(model)  # processors run the reference call unless options ask otherwise
    return model, io


@pytest.mark.parametrize("name", TINY)
def test_matches_diffusers(name, fixtures_dir):
    model, io = tiny_model(fixtures_dir, name)
    out_int = np.asarray(model(io["latents"], io["timesteps_int"], io["context"]))
    out_float = np.asarray(model(io["latents"], float(io["timestep_float"]), io["context"]))
    err_int = np.abs(out_int - io["out_int"]).max()
    err_float = np.abs(out_float - io["out_float"]).max()
    print(f"{name}: max abs error int timesteps {err_int:.2e}, float timestep {err_float:.2e}")
    assert out_int.shape == io["out_int"].shape
    assert err_int <= FLOAT32_TOL
    assert err_float <= FLOAT32_TOL


def test_tiny_configs_translate_as_intended(fixtures_dir):
    """The legacy `attention_head_dim` becomes heads (sd1) or a head width (sd2)."""
    configs = {
        name: unet_config_from_diffusers(
            json.loads((fixtures_dir / "unet" / f"{name}_config.json").read_text())
        )
        for name in TINY
    }
    assert (configs["sd1"].num_heads, configs["sd1"].head_dim, configs["sd1"].num_res_blocks) == (2, None, 2)
    assert (configs["sd2"].num_heads, configs["sd2"].head_dim, configs["sd2"].transformer_depth) == (
        None,
        8,
        2,
    )
    assert configs["sd2"].use_linear_projection and not configs["sd1"].use_linear_projection
    assert configs["inpaint"].in_channels == 9
    assert configs["sd1"].attention_levels == (True, True, False)
    assert configs["sd1"].channel_mult == (1, 2, 2) and configs["sd1"].model_channels == 8


def abstract(config):
    """A full-size model with shapes only: variables are never allocated."""
    return build_abstract(lambda: UNetModel(config))


@pytest.mark.parametrize("preset", sorted(FULL))
def test_full_size_layout(preset, fixtures_dir):
    config, count = FULL[preset]
    reference = json.loads((fixtures_dir / "unet" / f"manifest_{preset}.json").read_text())
    assert unet_config_from_diffusers(reference["diffusers_config"]) == config
    model = abstract(config)
    assert count_parameters(model) == count == reference["num_parameters"]
    ours = {k: list(v) for k, v in manifest(model).items()}
    assert sorted(set(reference["parameters"]) ^ set(ours)) == []
    assert ours == reference["parameters"]


def test_rename_examples():
    table = diffusers_prefix_map(SD15)
    cases = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight": (
            "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight"
        ),
        "down_blocks.2.downsamplers.0.conv.weight": "input_blocks.9.0.op.weight",
        "mid_block.resnets.1.time_emb_proj.bias": "middle_block.2.emb_layers.1.bias",
        "up_blocks.0.upsamplers.0.conv.bias": "output_blocks.2.1.conv.bias",
        "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
        "up_blocks.3.attentions.2.proj_out.weight": "output_blocks.11.1.proj_out.weight",
        "conv_norm_out.weight": "out.0.weight",
    }
    assert {k: diffusers_key_to_original(k, table) for k in cases} == cases
    assert (
        diffusers_key_to_original("up_blocks.0.attentions.0.norm.weight", table) is None
    )  # no attention there
    with pytest.raises(StateDictError, match="class_embedding"):
        convert_diffusers_unet_state_dict({"class_embedding.linear_1.weight": np.zeros(1)}, SD15)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"layers_per_block": [2, 2, 1, 2]}, "layers_per_block"),
        ({"attention_head_dim": [5, 8, 20, 20]}, "attention_head_dim"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "down_block_types"),
        ({"block_out_channels": [320, 480, 1280, 1280]}, "block_out_channels"),
        ({"some_new_field": 1}, "some_new_field"),
    ],
)
def test_unsupported_diffusers_configs(change, message, fixtures_dir):
    data = json.loads((fixtures_dir / "unet" / "manifest_sd-v2-1.json").read_text())["diffusers_config"]
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers({**data, **change})


def test_bad_inputs(fixtures_dir):
    model, io = tiny_model(fixtures_dir, "sd1")
    latents, context, t = io["latents"], io["context"], io["timesteps_int"]
    with pytest.raises(ValueError, match=r"latents must be NHWC .*\(2, 16, 16\)"):
        model(latents[..., 0], t, context)
    with pytest.raises(
        ValueError, match=r"latents must be NHWC \(batch, height, width, 4\), got shape \(2, 16, 16, 3\)"
    ):
        model(latents[..., :3], t, context)
    with pytest.raises(ValueError, match=r"height must be at least 1, got 0"):
        model(latents[:, :0], t, context)
    with pytest.raises(
        ValueError, match=r"context must have shape \(batch, tokens, 16\), got shape \(2, 77, 8\)"
    ):
        model(latents, t, context[..., :8])
    with pytest.raises(ValueError, match="context must have shape"):
        model(latents, t, context[0])
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or shape \(2,\), got shape \(2, 1\)"):
        model(latents, t[:, None], context)
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or shape \(2,\), got shape \(3,\)"):
        model(latents, np.array([1, 2, 3]), context)


# Measured on the tiny SD2-style model (|out| max 1.14): bfloat16 1.8e-2, float16 2.6e-3.
@pytest.mark.parametrize("policy, bound", [("mixed_bfloat16", 0.1), ("mixed_float16", 0.02)])
def test_mixed_precision(policy, bound, fixtures_dir):
    config, weights, io = read_tiny(fixtures_dir, "sd2")
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(policy)
        model = UNetModel(config)
        load_state_dict(model, weights)
        out = model(io["latents"], io["timesteps_int"], io["context"])
        # Float timesteps must reach the sinusoid unrounded: in bfloat16 421.37 would become 422.
        t_float = np.full((2,), io["timestep_float"], np.float32)
        out_float = model(io["latents"], t_float, io["context"])
        out_422 = model(io["latents"], np.full((2,), 422.0, np.float32), io["context"])
    finally:
        keras.config.set_dtype_policy(previous)
    norms = [
        layer for layer, _ in named_parameters(model).values() if isinstance(layer, (GroupNorm, LayerNorm))
    ]
    assert norms and all(layer.compute_dtype == "float32" for layer in norms)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    err = np.abs(np.asarray(keras.ops.cast(out, "float32")) - io["out_int"]).max()
    err_float = np.abs(np.asarray(keras.ops.cast(out_float, "float32")) - io["out_float"]).max()
    print(f"{policy}: max abs error vs diffusers float32 {err:.3e}, float timestep {err_float:.3e}")
    assert err <= bound
    assert err_float <= bound
    assert np.abs(np.asarray(keras.ops.cast(out_float - out_422, "float32"))).max() > 1e-3


@pytest.mark.parametrize("name", ["sd1", "sd2", "inpaint"])
def test_odd_latent_sizes_match_diffusers(fixtures_dir, name):
    # 10x14 latents with three levels: 10 -> 5 -> 3 on the way down, upsampled back to the skips' sizes.
    model, io = tiny_model(fixtures_dir, name)
    out = np.asarray(model(io["latents_odd"], io["timesteps_int"], io["context"]))
    assert out.shape == io["out_odd"].shape
    assert np.abs(out - io["out_odd"]).max() <= FLOAT32_TOL


def island_names(model, opts) -> set:
    """The names of the XLA islands built under ``opts`` for every layer of ``model``."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    return {name for layer in layers for name in execution.island_names(layer, opts)}


def forced(*, prepared=False, winograd=True):
    """A ``choose`` policy that takes every path these tests cover without timing anything:
    Winograd F(4) where the sizes allow (else F(2), else direct; direct only without
    ``winograd``), sub-pixel upsampling, and graph-mode matmuls for ResBlocks with direct
    convolutions or at most 16 F(4) tiles (16x16 latents, batch 2: the 8x8 and 4x4 levels), or
    prepared filters for every F(4) ResBlock (``prepared``)."""

    def choose(op, key, names):
        if op == "conv3x3":
            return names[-1] if winograd else "direct"
        if op == "upsample_conv3x3":
            return "subpixel"
        assert op == "resblock", op
        b, h, w, _, _, _, m, _ = key
        if prepared and m == 4:
            return "prepared"
        return "graph" if m == 0 or (m == 4 and b * (h // 4) * (w // 4) <= 16) else "island"

    return choose


def islands_options(**policy):
    # Post-attention work in token blocks of 100: 16x16 latents (256 tokens) give 100, 100, 56.
    return execution.ExecutionOptions(
        compile="islands",
        winograd=True,
        graph_matmuls=True,
        prepared_filters=policy.get("prepared", False),
        post_attention_tokens=100,
        choose=forced(**policy),
    )


@pytest.fixture
def fast_path_calls(monkeypatch):
    """Count the calls of each islands-only path: Winograd, the sub-pixel upsampling, the
    per-head attention, the token blocks, the filter transforms of graph-mode matmuls."""
    from tf_diffusion.execution import cpu

    calls = {"winograd_conv3x3": [], "subpixel_conv3x3": [], "head_attention": [], "post_blocks": []}
    calls["graph_matmul"] = []

    def spy(name, key, record):
        original = getattr(cpu, name)

        def wrapped(*args, **kwargs):
            calls[key].append(record(*args))
            return original(*args, **kwargs)

        monkeypatch.setattr(cpu, name, wrapped)

    spy("winograd_conv3x3", "winograd_conv3x3", lambda x, weight, m: m)
    spy("subpixel_conv3x3", "subpixel_conv3x3", lambda x, weight: tuple(x.shape[1:3]))
    spy("head_attention", "head_attention", lambda q, k_t, v, *rest: tuple(q.shape))
    spy("conv3x3_filter", "graph_matmul", lambda weight, m: m)
    original_blocks = cpu.split_blocks

    def blocks(x, size, axis):
        parts = original_blocks(x, size, axis)
        calls["post_blocks"].append([p.shape[axis] for p in parts])
        return parts

    monkeypatch.setattr(cpu, "split_blocks", blocks)
    return calls


@pytest.mark.slow  # XLA islands compiled per ResBlock; test_generate's default-compilation test covers the default path
@pytest.mark.parametrize("name", ISLAND_CONFIGS)
def test_xla_islands_with_winograd_match_diffusers(name, fixtures_dir, fast_path_calls):
    # Graph mode with each block an XLA island (the float32 CPU default for large latents), the
    # islands' 3x3 convolutions by Winograd F(4x4, 3x3) or F(2x2, 3x3) (some as graph-mode matmuls
    # between islands), their 2x upsamplings by sub-pixel convolutions and the self-attention core
    # per head: still diffusers' numbers.
    model, io = tiny_model(fixtures_dir, name)
    opts = islands_options()
    fn = execution.compile(lambda x, t, c: model(x, t, c), opts)
    out = np.asarray(fn(io["latents"], io["timesteps_int"], io["context"]))
    assert np.abs(out - io["out_int"]).max() <= FLOAT32_TOL
    # Islands were built for this model's blocks and each islands-only path ran.
    assert execution.island_names(model.input_blocks[1][0], opts) == {"call"}  # 32 tiles
    assert any(key.startswith("mid_4_") for key in island_names(model, opts))  # 8 or 2 tiles
    assert set(fast_path_calls["winograd_conv3x3"]) == {4}  # 16x16 latents: every level a multiple of 4
    assert fast_path_calls["subpixel_conv3x3"] and fast_path_calls["head_attention"]
    assert [100, 100, 56] in fast_path_calls["post_blocks"]
    assert set(fast_path_calls["graph_matmul"]) == {4}
    # Odd sizes (Winograd needs even ones; the island Upsample takes the skip's size).
    out_odd = np.asarray(fn(io["latents_odd"], io["timesteps_int"], io["context"]))
    assert np.abs(out_odd - io["out_odd"]).max() <= FLOAT32_TOL


@pytest.mark.slow  # XLA islands compiled per ResBlock; test_generate's default-compilation test covers the default path
@pytest.mark.parametrize("name", ISLAND_CONFIGS[:2])
def test_xla_islands_with_im2col_graph_matmuls_match_diffusers(name, fixtures_dir, fast_path_calls):
    # Direct convolutions only: each ResBlock's two become im2col patches (XLA), a matmul in graph
    # mode and a reshape, even and odd latent sizes.
    model, io = tiny_model(fixtures_dir, name)
    opts = islands_options(winograd=False)
    fn = execution.compile(lambda x, t, c: model(x, t, c), opts)
    out = np.asarray(fn(io["latents"], io["timesteps_int"], io["context"]))
    assert np.abs(out - io["out_int"]).max() <= FLOAT32_TOL
    out_odd = np.asarray(fn(io["latents_odd"], io["timesteps_int"], io["context"]))
    assert np.abs(out_odd - io["out_odd"]).max() <= FLOAT32_TOL
    assert set(fast_path_calls["graph_matmul"]) == {0}
    assert not fast_path_calls["winograd_conv3x3"]
    assert any(key.startswith("mid_0_") for key in island_names(model, opts))


@pytest.mark.parametrize("name", ["sd1", "sd2", "inpaint"])
def test_resblock_input_sizes_follow_a_call(name, fixtures_dir, monkeypatch):
    # The sizes execution.prepare plans with are the ones each ResBlock sees, odd sizes included.
    model, io = tiny_model(fixtures_dir, name)
    seen = []
    original = ResBlock.call

    def call(self, x, emb):
        seen.append((self, tuple(x.shape[1:3])))
        return original(self, x, emb)

    monkeypatch.setattr(ResBlock, "call", call)
    for latents in (io["latents"], io["latents_odd"]):
        model.call(latents, io["timesteps_int"], io["context"])  # builds, if a first call does more
        seen.clear()
        model.call(latents, io["timesteps_int"], io["context"])
        planned = execution.resblock_input_sizes(model, *latents.shape[1:3])
        assert [(id(block), size) for block, size in planned] == [(id(block), size) for block, size in seen]


@pytest.mark.slow  # XLA islands compiled per ResBlock; test_generate's default-compilation test covers the default path
@pytest.mark.parametrize("name", ISLAND_CONFIGS)
def test_xla_islands_with_prepared_filters_match_diffusers(name, fixtures_dir, fast_path_calls):
    # Filters transformed once (execution.prepare) and passed in as the traced function's
    # argument: every ResBlock at a multiple-of-4 size takes them, and none is transformed again.
    model, io = tiny_model(fixtures_dir, name)
    opts = islands_options(prepared=True)
    filters = execution.prepare(model, io["latents"].shape, opts)
    prepared = len(fast_path_calls["graph_matmul"])
    assert filters and prepared == len(filters)
    fn = execution.compile(lambda x, t, c: model(x, t, c), opts)
    out = np.asarray(fn(io["latents"], io["timesteps_int"], io["context"], execution_state=filters))
    assert np.abs(out - io["out_int"]).max() <= FLOAT32_TOL
    assert len(fast_path_calls["graph_matmul"]) == prepared  # no filter transformed in the call
    assert {"in_4_16x16", "mid_4_16x16", "out_4_16x16"} <= execution.island_names(
        model.input_blocks[1][0], opts
    )
    # Filters prepared for another size are left alone (10x14 latents: no level a multiple of 4).
    out_odd = np.asarray(fn(io["latents_odd"], io["timesteps_int"], io["context"], execution_state=filters))
    assert np.abs(out_odd - io["out_odd"]).max() <= FLOAT32_TOL


def test_islands_and_winograd_stay_off_outside_their_contexts(fixtures_dir, fast_path_calls):
    # Eager calls and plain graph mode (as in training) never see them, and the context is restored.
    from tf_diffusion.execution.options import in_xla

    model, io = tiny_model(fixtures_dir, "sd1")
    model(io["latents"], io["timesteps_int"], io["context"])
    graph = execution.ExecutionOptions(compile="graph", winograd=True, graph_matmuls=True, choose=forced())
    execution.compile(lambda x, t, c: model(x, t, c), graph)(
        io["latents"], io["timesteps_int"], io["context"]
    )
    assert not any(fast_path_calls.values())
    assert execution.current() == execution.ExecutionOptions() and not in_xla()
