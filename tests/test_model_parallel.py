"""A Flux transformer sharded over a ("batch", "model") mesh of 8 JAX devices equals it on one device.

The JAX run is a fresh process, because the host devices must be configured before JAX initialises
(``--xla_force_host_platform_device_count=8``, as tests/test_distributed.py does). A tiny random
transformer (2 double + 2 single blocks, width 64) runs once on one device, then built sharded
(``build_sharded`` + ``load_state_dict``) on meshes (2, 4) and (1, 8), and moved onto (1, 8) after
loading (``shard_model``); the same with int8 weights on (2, 4); and a tiny SD3.5-style MMDiT (q/k
norm, one dual-attention block) on (2, 4). Outputs must agree within 1e-5 in float32 (measured:
3.6e-7 for Flux, 2.4e-7 for the MMDiT, outputs up to 1.7: the order of float sums across shards),
and every split kernel must lie on its devices as slices of the expected shape, the rest whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TOL = 1e-5

SCRIPT = """
    import json, sys
    import jax, keras
    import numpy as np
    from tf_diffusion.flux import FluxConfig, FluxTransformer, latent_image_ids, text_ids
    from tf_diffusion.execution import model_parallel as mp
    from tf_diffusion.weights.state_dict import load_state_dict, state_dict

    cfg = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=20, hidden_size=64,
                     num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=True)
    single = FluxTransformer(cfg)
    rng = np.random.default_rng(0)
    weights = state_dict(single)
    for key in weights:  # the q/k norm scales start at ones
        if key.endswith(".scale"):
            weights[key] = (1 + 0.3 * rng.standard_normal(weights[key].shape)).astype(np.float32)
    load_state_dict(single, weights)
    B, h, w, T = 2, 4, 4, 5
    args = (rng.standard_normal((B, h * w, 16)).astype(np.float32), latent_image_ids(h, w),
            rng.standard_normal((B, T, 20)).astype(np.float32), text_ids(T),
            np.array([0.3, 0.8], np.float32), rng.standard_normal((B, 24)).astype(np.float32))
    guidance = np.array([3.5, 2.0], np.float32)
    # One device: the model built outside any distribution, its variables on the first device.

    def one_device(model, args, **kwargs):
        step = jax.jit(lambda tv, nv, a, kw: model.stateless_call(tv, nv, *a, **kw)[0])
        return np.asarray(step([v.value for v in model.trainable_variables],
                               [v.value for v in model.non_trainable_variables], args, kwargs))

    want = one_device(single, args, guidance=guidance)
    assert len({d for v in single.variables for d in v.value.sharding.device_set}) == 1

    def shards(model):
        split = {key: (kind, linear) for key, (linear, kind) in mp.sharded_linears(model).items()}
        out = {}
        for key, (kind, linear) in split.items():
            for name in ("weight", "bias"):
                v = getattr(linear, name)
                out[f"{key}.{name}"] = [kind, [list(s.data.shape) for s in v.value.addressable_shards],
                                        len(v.value.sharding.device_set)]
        for key, v in (("img_in.weight", model.img_in.weight), ("final_layer.linear.weight",
                       model.final_layer.linear.weight)):
            out[key] = ["replicated", [list(s.data.shape) for s in v.value.addressable_shards],
                        len(v.value.sharding.device_set)]
        return out

    results, info = {"want": want}, {}
    for name, shape, how in (("2x4", (2, 4), "build"), ("1x8", (1, 8), "build"), ("1x8_moved", (1, 8), "move")):
        mesh = keras.distribution.DeviceMesh(shape, ("batch", "model"), jax.devices())
        if how == "build":
            model, distribution = mp.build_sharded(lambda: FluxTransformer(cfg), mesh)
            load_state_dict(model, weights)  # assignments keep each variable's layout
        else:
            model = FluxTransformer(cfg)
            load_state_dict(model, weights)
            distribution = mp.model_parallel(model, mesh)
            mp.shard_model(model, distribution)
        results[name] = mp.sharded_call(model, distribution)(*args, guidance=guidance)
        info[name] = shards(model)
    # int8 weights (execution.quantize), created sharded: the same as the int8 model on one device.
    from tf_diffusion.execution import quantize

    q_one = quantize.build_model(lambda: FluxTransformer(cfg))
    load_state_dict(q_one, weights)
    results["int8_want"] = one_device(q_one, args, guidance=guidance)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    model, distribution = mp.build_sharded(lambda: FluxTransformer(cfg), mesh, quantize="int8")
    load_state_dict(model, weights)
    results["int8_2x4"] = mp.sharded_call(model, distribution)(*args, guidance=guidance)
    info["int8_2x4"] = {key: [kind, str(linear.weight.dtype),
                              [list(s.data.shape) for s in linear.weight.value.addressable_shards],
                              [list(s.data.shape) for s in linear.weight_scale.value.addressable_shards]]
                        for key, (linear, kind) in mp.sharded_linears(model).items()}
    # SD3's MMDiT (the last block's context stream has no proj or MLP; block 0 has SD3.5's attn2).
    from tf_diffusion.config import MMDiTConfig
    from tf_diffusion.mmdit import MMDiT

    mcfg = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                       num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=64,
                       pooled_projection_dim=20, out_channels=4, pos_embed_max_size=8,
                       dual_attention_layers=(0,), qk_norm="rms_norm")
    one = MMDiT(mcfg)
    mweights = state_dict(one)
    mweights["pos_embed"] = rng.standard_normal(mweights["pos_embed"].shape).astype(np.float32)
    load_state_dict(one, mweights)
    margs = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([500.0, 20.0], np.float32),
             rng.standard_normal((2, 7, 24)).astype(np.float32), rng.standard_normal((2, 20)).astype(np.float32))
    results["mmdit_want"] = one_device(one, margs)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    model, distribution = mp.build_sharded(lambda: MMDiT(mcfg), mesh)
    load_state_dict(model, mweights)
    results["mmdit_2x4"] = mp.sharded_call(model, distribution)(*margs)
    info["mmdit_2x4"] = {key: [kind, [list(s.data.shape) for s in linear.weight.value.addressable_shards]]
                         for key, (linear, kind) in mp.sharded_linears(model).items()}
    # A batch the mesh's batch axis (2) does not divide: refused before anything is traced.
    try:
        mp.sharded_call(model, distribution)(*(a[:1] for a in margs))
    except ValueError as error:
        info["odd_batch"] = str(error)
    np.savez(sys.argv[1], **results)
    print(json.dumps(info))
    """


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    pytest.importorskip("jax")
    tmp = tmp_path_factory.mktemp("model_parallel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="jax")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    # Eight host devices; low XLA optimisation only to cut compile time (every run uses the same flags).
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    )
    (tmp / "run.py").write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(tmp / "run.py"), str(tmp / "out.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(np.load(tmp / "out.npz")), info


@pytest.mark.parametrize("name", ["2x4", "1x8", "1x8_moved"])
def test_sharded_equals_one_device(sharded_run, name):
    out, _ = sharded_run
    assert out[name].shape == out["want"].shape == (2, 16, 16)
    assert np.abs(out["want"]).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(out[name], out["want"], rtol=0, atol=TOL)


@pytest.mark.parametrize("name,parts", [("2x4", 4), ("1x8", 8), ("1x8_moved", 8)])
def test_kernels_lie_in_slices_on_the_model_axis(sharded_run, name, parts):
    _, info = sharded_run
    shards = info[name]
    # 2 double blocks x 10 split Linears + 2 single blocks x 3, weight and bias each, and 2 replicated.
    assert len(shards) == 2 * (2 * 10 + 2 * 3) + 2
    full = {"double_blocks.0.img_attn.qkv.weight": (64, 192), "double_blocks.0.img_attn.proj.weight": (64, 64),
            "double_blocks.1.txt_mlp.0.weight": (64, 256), "double_blocks.1.txt_mlp.2.weight": (256, 64),
            "double_blocks.0.img_mod.lin.weight": (64, 384), "single_blocks.1.linear1.weight": (64, 448),
            "single_blocks.0.linear2.weight": (320, 64), "img_in.weight": (16, 64),
            "final_layer.linear.weight": (64, 16)}  # fmt: skip
    for key, (rows, cols) in full.items():
        kind, shapes, devices = shards[key]
        assert devices == 8 and len(shapes) == 8, key  # every variable is on all 8 devices
        want = {"column": [rows, cols // parts], "row": [rows // parts, cols], "replicated": [rows, cols]}
        assert all(s == want[kind] for s in shapes), (key, kind, shapes)
    for key, (kind, shapes, _) in shards.items():
        if key.endswith(".bias"):
            width = shapes[0][0] * (parts if kind == "column" else 1)
            assert all(s == [width // parts if kind == "column" else width] for s in shapes), key


def test_int8_weights_sharded_equal_int8_on_one_device(sharded_run):
    out, info = sharded_run
    # int8 differs from float (execution.quantize), but sharding it changes nothing more.
    assert np.abs(out["int8_want"] - out["want"]).max() > 10 * TOL
    np.testing.assert_allclose(out["int8_2x4"], out["int8_want"], rtol=0, atol=TOL)
    shards = info["int8_2x4"]
    assert shards["double_blocks.0.img_attn.qkv"] == ["column", "int8", [[64, 48]] * 8, [[48]] * 8]
    assert shards["single_blocks.0.linear1"] == ["column", "int8", [[64, 112]] * 8, [[112]] * 8]
    assert shards["single_blocks.0.linear2"] == ["row", "int8", [[80, 64]] * 8, [[64]] * 8]
    assert shards["double_blocks.1.txt_mlp.2"] == ["row", "int8", [[64, 64]] * 8, [[64]] * 8]


def test_mmdit_sharded_equals_one_device(sharded_run):
    out, info = sharded_run
    assert out["mmdit_2x4"].shape == out["mmdit_want"].shape == (2, 8, 8, 4)
    assert np.abs(out["mmdit_want"]).max() > 0.1
    np.testing.assert_allclose(out["mmdit_2x4"], out["mmdit_want"], rtol=0, atol=TOL)
    shards = info["mmdit_2x4"]
    # Block 1 (the last) has no context proj / MLP; only block 0's image stream has attn2.
    assert "joint_blocks.1.context_block.attn.proj" not in shards
    assert "joint_blocks.1.context_block.mlp.fc1" not in shards
    assert "joint_blocks.0.x_block.attn2.qkv" in shards and "joint_blocks.1.x_block.attn2.qkv" not in shards
    assert len(shards) == 5 + 7 + 2 + 5  # block 0: context, image; block 1: context, image
    want = {"joint_blocks.0.x_block.attn2.qkv": ("column", [64, 48]),
            "joint_blocks.0.context_block.mlp.fc2": ("row", [64, 64]),
            "joint_blocks.1.x_block.adaLN_modulation.1": ("column", [64, 96]),
            "joint_blocks.1.context_block.adaLN_modulation.1": ("column", [64, 32])}  # fmt: skip
    for key, (kind, shape) in want.items():
        assert shards[key][0] == kind and shards[key][1] == [shape] * 8, (key, shards[key])


def test_a_batch_the_mesh_does_not_divide_is_a_clear_error(sharded_run):
    _, info = sharded_run
    assert "latents has a batch of 1" in info["odd_batch"] and "batch axis of size 2" in info["odd_batch"]


def test_bad_meshes_and_backends_are_clear_errors():
    import keras

    from tf_diffusion.execution import model_parallel as mp
    from tf_diffusion.flux import FluxConfig, FluxTransformer

    cfg = FluxConfig(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8, hidden_size=32,
                     num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=False)  # fmt: skip
    model = FluxTransformer(cfg)
    devices = [f"cpu:{i}" for i in range(6)]
    wrong_axes = keras.distribution.DeviceMesh((2, 3), ("data", "model"), devices)
    with pytest.raises(ValueError, match=r"\('batch', 'model'\)"):
        mp.layout_map(model, wrong_axes)
    # Model axis 3 does not divide the 32-wide projections.
    uneven = keras.distribution.DeviceMesh((2, 3), ("batch", "model"), devices)
    with pytest.raises(ValueError, match=r"double_blocks.0.img_attn.proj .*\(32\).* size 3"):
        mp.layout_map(model, uneven)
    with pytest.raises(ValueError, match="DeviceMesh"):
        mp.layout_map(model, (2, 4))
    with pytest.raises(ValueError, match="FluxTransformer or an mmdit.MMDiT"):
        mp.sharded_linears(keras.layers.Dense(2))
    if keras.backend.backend() != "jax":
        even = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), devices[:2])
        with pytest.raises(ValueError, match="JAX backend"):
            mp.model_parallel(model, even)


def test_model_parallel_pipelines_refuse_what_they_cannot_shard(tmp_path):
    import keras
    from test_generate import MICRO

    from tf_diffusion.distributed import ShardedStableDiffusion
    from tf_diffusion.execution import model_parallel as mp
    from tf_diffusion.pipeline import StableDiffusion

    devices = [f"cpu:{i}" for i in range(2)]
    mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), devices)
    sd = StableDiffusion(MICRO)  # a UNet model: nothing to split over "model"
    layouts = keras.distribution.LayoutMap(mesh)
    with pytest.raises(ValueError, match="shards a transformer backbone .*DataParallel"):
        ShardedStableDiffusion(
            sd, keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
        )
    if keras.backend.backend() != "jax":
        with pytest.raises(ValueError, match="needs the JAX backend"):
            ShardedStableDiffusion.from_pretrained(tmp_path, mesh)
        with pytest.raises(ValueError, match="JAX backend"):
            mp.build_sharded_pipeline(StableDiffusion, mesh, None, None, MICRO)
