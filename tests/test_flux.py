"""Flux.1's transformer against diffusers' FluxTransformer2DModel, on tiny random models it wrote.

Fixtures from tools/make_fixtures_flux.py: two tiny ``save_pretrained`` folders, diffusers' own test
config (1 double + 1 single block, no guidance) and a guidance-distilled one with 2 + 2 blocks, with
diffusers' outputs on fixed inputs (within 1e-4 in float32). Their state dicts go through our rename to
the original (Black Forest Labs) keys, which must give exactly the tensors that diffusers' single-file
converter took back to the folder's (fingerprinted in ``transformers.json``). Also: the packing helpers
against FluxPipeline's static methods, config inference, loading files and folders, int8 weights,
full-size parameter counts, and JAX. One slow test at the released width needs torch and diffusers.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from tf_diffusion.flux import (
    FLUX_PRESETS,
    FluxConfig,
    FluxTransformer,
    flux_config_from_state_dict,
    latent_image_ids,
    pack_latents,
    text_ids,
    unpack_latents,
)
from tf_diffusion.weights.flux import (
    convert_diffusers_flux,
    flux_config_from_diffusers,
    load_flux_transformer,
)
from tf_diffusion.weights.safetensors_io import load_safetensors, save_safetensors
from tf_diffusion.weights.state_dict import (
    StateDictError,
    build_abstract,
    count_parameters,
    load_state_dict,
    manifest,
    state_dict,
)

FLOAT32_TOL = 1e-4
ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "flux"
META = json.loads((FIXTURES / "transformers.json").read_text())
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _digest(value) -> list:
    """[shape, dtype, SHA-256 of the C-ordered bytes], as tools/make_fixtures_flux.py fingerprints a tensor."""
    value = np.ascontiguousarray(value)
    return [list(value.shape), str(value.dtype), hashlib.sha256(value.tobytes()).hexdigest()]


def _tiny(name: str):
    """(diffusers' folder, its state dict, our config, the fixed inputs, diffusers' output)."""
    folder = FIXTURES / f"transformer-{name}"
    theirs = load_safetensors(folder / WEIGHTS)
    cfg = flux_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    with np.load(FIXTURES / "transformers.npz") as data:
        x = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{name}/")}
    ref = x.pop("out")
    x.setdefault("guidance", None)
    return folder, theirs, cfg, x, ref


@pytest.fixture(scope="module", params=sorted(META))
def tiny(request):
    return (request.param, *_tiny(request.param))


def test_rename_gives_what_diffusers_converter_takes_back(tiny):
    name, _, theirs, cfg, _, _ = tiny
    original = convert_diffusers_flux(theirs, cfg)
    # The original-layout tensors diffusers' convert_flux_transformer_checkpoint_to_diffusers took back
    # exactly to the folder's state dict, fingerprinted when the fixture was written.
    expected = META[name]["original"]
    assert sorted(original) == sorted(expected)
    for key, value in original.items():
        assert _digest(value) == expected[key], key
    assert META[name]["converter_keys"] == sorted(theirs)
    # lazy=True (what the loader uses): the same tensors, each fused one made only when read.
    from tf_diffusion.weights.lazy import LazyTensor

    lazy = convert_diffusers_flux(theirs, cfg, lazy=True)
    assert sorted(lazy) == sorted(original)
    assert isinstance(lazy["single_blocks.0.linear1.weight"], LazyTensor)
    assert isinstance(lazy["final_layer.adaLN_modulation.1.bias"], LazyTensor)
    for key, value in original.items():
        assert tuple(lazy[key].shape) == value.shape and np.dtype(lazy[key].dtype) == value.dtype, key
        np.testing.assert_array_equal(np.asarray(lazy[key]), value, err_msg=key)


def test_original_keys_are_our_attribute_paths(tiny):
    _, _, theirs, cfg, _, _ = tiny
    original = convert_diffusers_flux(theirs, cfg)
    ours = FluxTransformer(cfg)
    load_state_dict(ours, original)  # strict: every key and shape
    assert {k: v.shape for k, v in state_dict(ours).items()} == {k: v.shape for k, v in original.items()}
    expected = {"img_in.weight", "txt_in.bias", "time_in.in_layer.weight", "vector_in.out_layer.bias",
                "double_blocks.0.img_mod.lin.weight", "double_blocks.0.txt_attn.qkv.bias",
                "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.txt_attn.norm.key_norm.scale",
                "double_blocks.0.img_attn.proj.weight", "double_blocks.0.img_mlp.0.weight",
                "double_blocks.0.txt_mlp.2.bias", "single_blocks.0.linear1.weight", "single_blocks.0.linear2.bias",
                "single_blocks.0.norm.query_norm.scale", "single_blocks.0.modulation.lin.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"}  # fmt: skip
    assert expected <= set(original)
    assert ("guidance_in.in_layer.weight" in original) == cfg.guidance_embed


def test_matches_diffusers(tiny):
    name, _, theirs, cfg, x, ref = tiny
    ours = FluxTransformer(cfg)
    load_state_dict(ours, convert_diffusers_flux(theirs, cfg))
    out = np.asarray(ours(**x))
    assert out.shape == ref.shape == (2, 6, cfg.out_channels)
    err = float(np.abs(out - ref).max())
    assert err < FLOAT32_TOL, (name, err)
    # Batched (B, L, 3) ids give the same as shared ones.
    batched = dict(x, img_ids=np.stack([x["img_ids"]] * 2), txt_ids=np.stack([x["txt_ids"]] * 2))
    assert float(np.abs(np.asarray(ours(**batched)) - ref).max()) < FLOAT32_TOL
    # The test can fail: another timestep (and guidance) moves the output well past the tolerance.
    moved = dict(x, timesteps=x["timesteps"] + 0.05)
    assert float(np.abs(np.asarray(ours(**moved)) - ref).max()) > 100 * FLOAT32_TOL
    if cfg.guidance_embed:
        other = dict(x, guidance=x["guidance"] + 1.0)
        assert float(np.abs(np.asarray(ours(**other)) - ref).max()) > 100 * FLOAT32_TOL


def test_mixed_bfloat16_stays_close(tiny):
    # Norms, the rotation and the softmax stay float32; the rest rounds to bfloat16.
    _, _, theirs, cfg, x, ref = tiny
    ours = FluxTransformer(cfg, dtype="mixed_bfloat16")
    load_state_dict(ours, convert_diffusers_flux(theirs, cfg))
    out = np.asarray(ours(**x)).astype(np.float32)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_config_inference(tiny):
    _, _, theirs, cfg, _, _ = tiny
    original = convert_diffusers_flux(theirs, cfg)
    assert flux_config_from_state_dict(original, axes_dim=cfg.axes_dim) == cfg
    prefixed = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    assert flux_config_from_state_dict(prefixed, axes_dim=cfg.axes_dim) == cfg
    with pytest.raises(ValueError, match="axes_dim"):
        flux_config_from_state_dict(original)  # tiny heads: the rotary split is not in the weights
    with pytest.raises(ValueError, match="not a Flux transformer"):
        flux_config_from_state_dict({"img_in.weight": original["img_in.weight"]})
    with pytest.raises(ValueError, match="SD3Transformer2DModel"):
        flux_config_from_diffusers({"_class_name": "SD3Transformer2DModel"})


def _write_shards(folder: pathlib.Path, out: pathlib.Path, index: dict) -> None:
    """The folder as diffusers' ``save_pretrained(max_shard_size="20KB")`` shards it: its index as written."""
    tensors = load_safetensors(folder / WEIGHTS)
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    for shard in sorted(set(index["weight_map"].values())):
        keys = [k for k, v in index["weight_map"].items() if v == shard]
        save_safetensors({k: tensors[k] for k in keys}, out / shard)
    (out / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(tensors)


def test_loads_single_files_and_folders(tiny, tmp_path):
    name, folder, theirs, cfg, x, ref = tiny
    original = convert_diffusers_flux(theirs, cfg)
    # An original single file as ComfyUI stores it: the model prefix, float16 (upcast on load).
    file = tmp_path / "flux.safetensors"
    save_safetensors({f"model.diffusion_model.{k}": v.astype(np.float16) for k, v in original.items()}, file)
    half = load_flux_transformer(file, axes_dim=cfg.axes_dim)
    assert half.config == cfg and half.img_in.weight.dtype == "float32"
    np.testing.assert_array_equal(
        np.asarray(half.img_in.weight), original["img_in.weight"].astype(np.float16).astype(np.float32).T
    )
    # A diffusers transformer folder and a pipeline folder holding one.
    shutil.copytree(folder, tmp_path / "pipe" / "transformer")
    _write_shards(folder, tmp_path / "sharded", META[name]["shards"])
    for path in (tmp_path / "pipe" / "transformer", tmp_path / "pipe", tmp_path / "sharded"):
        loaded = load_flux_transformer(path)
        assert loaded.config == cfg
        assert float(np.abs(np.asarray(loaded(**x)) - ref).max()) < FLOAT32_TOL, path
    with pytest.raises(ValueError, match="no config.json"):
        load_flux_transformer(tmp_path)
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        load_flux_transformer(tmp_path / "flux.ckpt")


def test_rename_lists_bad_keys(tiny):
    _, _, theirs, cfg, _, _ = tiny
    theirs = dict(theirs)
    theirs["transformer_blocks.9.attn.to_q.weight"] = theirs.pop("transformer_blocks.0.attn.to_q.weight")
    with pytest.raises(StateDictError) as info:
        convert_diffusers_flux(theirs, cfg)
    assert info.value.missing == ["transformer_blocks.0.attn.to_q.weight"]
    assert info.value.unexpected == ["transformer_blocks.9.attn.to_q.weight"]


# int8 weights (execution.quantize): measured relative errors (L2 over the output) against diffusers' float
# model: 8.3e-3 (diffusers-test) and 6.0e-3 (guidance-2x2).
INT8_TOL = 3e-2


def _variable_bytes(model) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables)


def _dequantized(original: dict) -> dict:
    """The original tensors with every Linear weight (torch layout (out, in)) quantized and back, in NumPy.

    Keras' per-output-channel absmax scheme: scale = 127 / (max |W| over the inputs + 1e-7),
    q = clip(round(W * scale), -127, 127), W' = q / scale (every ``.weight`` of Flux is a Linear's).
    """
    out = {}
    for key, value in original.items():
        w = np.asarray(value, np.float32)
        if key.endswith(".weight"):
            scale = np.float32(127) / (np.abs(w).max(axis=1, keepdims=True) + np.float32(1e-7))
            w = np.clip(np.round(w * scale), -127, 127) / scale
        out[key] = w.astype(np.float32)
    return out


def test_int8_weights_load_smaller_and_stay_close(tiny, tmp_path):
    from tf_diffusion import layers
    from tf_diffusion.execution import quantize

    name, folder, theirs, cfg, x, ref = tiny
    original = convert_diffusers_flux(theirs, cfg)
    file = tmp_path / "flux.safetensors"
    save_safetensors(original, file)
    floats = load_flux_transformer(file, axes_dim=cfg.axes_dim)
    for path in (file, folder):
        q = load_flux_transformer(path, axes_dim=cfg.axes_dim, quantize="int8")
        linears = [m for m in q._flatten_layers(recursive=True) if isinstance(m, layers.Linear)]
        assert linears and all(quantize.is_quantized(m) for m in linears)
        assert all(m.weight.dtype == "int8" and m.weight_scale.dtype == "float32" for m in linears)
        # Bytes: each Linear weight 1 byte per value instead of 4, plus a float32 scale per output.
        weights = sum(m.in_features * m.out_features for m in linears)
        outputs = sum(m.out_features for m in linears)
        assert _variable_bytes(q) == _variable_bytes(floats) - 3 * weights + 4 * outputs
        assert _variable_bytes(q) < 0.35 * _variable_bytes(floats)
        out = np.asarray(q(**x))
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        print(f"{name} {path.name} int8 relative error {err:.2e}")
        assert 1e-5 < err < INT8_TOL, (name, path, err)  # int8 rounding shows, but stays small
        # What the int8 model computes is the float model on the weights quantized in NumPy.
        dequantized = FluxTransformer(cfg)
        load_state_dict(dequantized, _dequantized(original))
        np.testing.assert_allclose(out, np.asarray(dequantized(**x)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not a quantization mode"):
        load_flux_transformer(tmp_path / "missing.safetensors", quantize="int4")


def test_guidance_argument_is_checked():
    dev = FluxTransformer(FluxConfig(in_channels=4, hidden_size=32, num_heads=2, axes_dim=(4, 4, 8),
                                     depth=1, depth_single_blocks=1, context_in_dim=8, vec_in_dim=8))  # fmt: skip
    x = dict(img=np.zeros((1, 4, 4), np.float32), img_ids=latent_image_ids(2, 2), txt=np.zeros((1, 3, 8), np.float32),
             txt_ids=text_ids(3), timesteps=np.ones(1, np.float32), y=np.zeros((1, 8), np.float32))  # fmt: skip
    with pytest.raises(ValueError, match="guidance-distilled"):
        dev(**x)
    schnell = FluxTransformer(dev.config.replace(guidance_embed=False))
    with pytest.raises(ValueError, match="no guidance embedder"):
        schnell(**x, guidance=np.ones(1, np.float32))
    with pytest.raises(ValueError, match="img_ids"):
        schnell(**dict(x, img_ids=latent_image_ids(2, 3)))
    with pytest.raises(ValueError, match="context_in_dim=8"):
        schnell(**dict(x, txt=np.zeros((1, 3, 9), np.float32)))
    with pytest.raises(ValueError, match="axes_dim"):
        FluxConfig(hidden_size=32, num_heads=2, axes_dim=(4, 4, 4))


def test_packing_helpers_equal_diffusers():
    with np.load(FIXTURES / "packing.npz") as data:
        nchw, theirs, back, ids = (data[k] for k in ("nchw", "packed", "unpacked", "ids"))
    _, _, h, w = nchw.shape
    ours = np.asarray(pack_latents(nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(ours, theirs)
    # diffusers unpacked from the image size (8x the latent's), to the latents it packed.
    np.testing.assert_array_equal(np.asarray(unpack_latents(ours, h, w)), back.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(back, nchw)
    np.testing.assert_array_equal(latent_image_ids(h // 2, w // 2), ids)
    assert text_ids(7).shape == (7, 3) and not text_ids(7).any()
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(np.zeros((1, 5, 4, 16), np.float32))
    with pytest.raises(ValueError, match="do not unpack"):
        unpack_latents(ours, h, w + 2)


# The published transformer/config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell, and the
# parameter counts of diffusers' FluxTransformer2DModel built from them.
PUBLISHED = json.loads((FIXTURES / "full_size.json").read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_parameter_counts(name):
    config, count = PUBLISHED[name]["config"], PUBLISHED[name]["parameters"]
    assert flux_config_from_diffusers(config) == FLUX_PRESETS[name]
    ours = build_abstract(lambda: FluxTransformer(FLUX_PRESETS[name]))
    assert count_parameters(ours) == count
    assert count > 11_800_000_000
    # Config inference from the full-size shapes (no values: objects with a shape) gives the preset.
    shapes = {k: types.SimpleNamespace(shape=v) for k, v in manifest(ours).items()}
    assert flux_config_from_state_dict(shapes) == FLUX_PRESETS[name]


JAX_SCRIPT = """
import json, sys
import jax
import numpy as np
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
from tf_diffusion.flux import FluxConfig, FluxTransformer
from tf_diffusion.weights import load_state_dict
data = np.load(sys.argv[1])
cfg = FluxConfig(**json.loads(sys.argv[2]))
model = FluxTransformer(cfg)
load_state_dict(model, {k[2:]: data[k] for k in data.files if k.startswith("w/")})
x = {k[2:]: data[k] for k in data.files if k.startswith("x/")}
guidance = x.pop("guidance", None)
# One compiled call: JAX runs eager ops one compile each, which is slow on two cores.
run = jax.jit(lambda w, x, g: model.stateless_call(w, [], **x, guidance=g)[0])
np.save(sys.argv[3], np.asarray(run([v.value for v in model.trainable_variables], x, guidance)))
"""


@pytest.mark.skipif(not __import__("importlib").util.find_spec("jax"), reason="jax is not installed")
def test_runs_under_jax(tmp_path):
    _, theirs, cfg, x, ref = _tiny("guidance-2x2")
    original = convert_diffusers_flux(theirs, cfg)
    arrays = {f"w/{k}": v for k, v in original.items()} | {f"x/{k}": v for k, v in x.items() if v is not None}
    np.savez(tmp_path / "data.npz", **arrays)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path / "data.npz"), json.dumps(fields), str(tmp_path / "out.npy")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(np.abs(np.load(tmp_path / "out.npy") - ref).max()) < FLOAT32_TOL


# Needs torch and diffusers (the reference extra): at the released width a fixture would weigh
# hundreds of MB, so diffusers runs here. Everything above reads tests/fixtures/flux only.


@pytest.mark.slow  # about 5 GB of memory: the released width with one block of each kind
def test_matches_diffusers_at_full_width():
    # Full width, 128-wide heads split (16, 56, 56): the released rotary layout, and diffusers'
    # converter as it is (its hard-coded 3072 width is right here).
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    config = dict(PUBLISHED["flux1-dev"]["config"], num_layers=1, num_single_layers=1)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    cfg = flux_config_from_diffusers(config)
    rng = np.random.default_rng(2)
    grid = (4, 6)
    x = dict(
        img=rng.standard_normal((1, grid[0] * grid[1], 64)).astype(np.float32),
        img_ids=latent_image_ids(*grid),
        txt=rng.standard_normal((1, 7, 4096)).astype(np.float32),
        txt_ids=text_ids(7),
        timesteps=np.array([0.6], np.float32),
        y=rng.standard_normal((1, 768)).astype(np.float32),
        guidance=np.array([3.5], np.float32),
    )
    with torch.no_grad():
        ref = model(
            hidden_states=torch.from_numpy(x["img"]),
            encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["y"]),
            timestep=torch.from_numpy(x["timesteps"]),
            img_ids=torch.from_numpy(x["img_ids"]),
            txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=torch.from_numpy(x["guidance"]),
            return_dict=False,
        )[0].numpy()
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    original = convert_diffusers_flux(theirs, cfg)
    from diffusers.loaders import single_file_utils

    back = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(np.asarray(v)) for k, v in original.items()}
    )
    assert sorted(back) == sorted(theirs)
    assert all(np.array_equal(back[k].numpy(), theirs[k]) for k in theirs)
    del back, theirs, model
    assert flux_config_from_state_dict(original) == cfg
    ours = FluxTransformer(cfg)
    load_state_dict(ours, original)
    del original
    err = float(np.abs(np.asarray(ours(**x)) - ref).max())
    assert err < FLOAT32_TOL, err
