"""Flux LoRAs through the LoRA loader, against diffusers + peft.

tools/make_fixtures_flux_lora.py built a tiny diffusers ``FluxTransformer2DModel``, attached a random
rank-4 peft LoRA to every Linear layer Flux LoRAs target (split q / k / v, ``proj_mlp``, output
projections, feed-forwards, adaLN linears, embedders, ``norm_out.linear``) and wrote it in diffusers'
format (``FluxPipeline.save_lora_weights``) and in kohya sd-scripts' (on the original fused layers), with
diffusers' transformer outputs at LoRA scale 1.0 and 0.5; and another LoRA in XLabs' format with diffusers'
output after its XLabs converter. Our transformer has the original fused layers,
so diffusers' split modules land on row blocks of them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tf_diffusion.adapters.lora import LoraError, get_active_adapters, read_lora, read_lora_file
from tf_diffusion.config import CLIPTextConfig, T5Config, VAEConfig
from tf_diffusion.weights import load_state_dict
from tf_diffusion.weights.flux import flux_config_from_diffusers
from tf_diffusion.weights.safetensors_io import save_safetensors

HERE = FIXTURES / "flux_lora"
FILES = {"diffusers": "lora_diffusers.safetensors", "kohya": "lora_kohya.safetensors"}
# float32 on CPU; measured: 9.5e-6 at weight 1.0 and 5.4e-6 at 0.5 (both files), 3.9e-6 (XLabs), 3.9e-6 without LoRA.
TOL = 1e-4


@pytest.fixture(scope="module")
def sd():
    from tf_diffusion.flux_pipeline import FluxPipelineConfig
    from tf_diffusion.pipeline import StableDiffusion

    cfg = json.loads((HERE / "config.json").read_text())
    transformer = flux_config_from_diffusers({"_class_name": "FluxTransformer2DModel", **cfg})
    config = FluxPipelineConfig(
        name="tiny-flux-lora",
        text_encoder=CLIPTextConfig(
            vocab_size=1000, hidden_size=transformer.vec_in_dim, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_encoder_2=T5Config(
            vocab_size=100, d_model=transformer.context_in_dim, d_kv=8, d_ff=16, num_layers=1, num_heads=2
        ),
        transformer=transformer,
        vae=VAEConfig(latent_channels=transformer.in_channels // 4, base_channels=8, channel_mult=(1, 1),
                      num_res_blocks=1, norm_groups=2),
    )  # fmt: skip
    model = StableDiffusion(config)
    tensors, _ = read_lora_file(HERE / "base.safetensors")
    load_state_dict(model.transformer, tensors)
    return model


@pytest.fixture(scope="module")
def io():
    with np.load(HERE / "inputs.npz") as x, np.load(HERE / "outputs.npz") as y:
        return dict(x), dict(y)


@pytest.fixture(autouse=True)
def clean(sd):
    sd.unload_lora_weights()
    yield
    sd.unload_lora_weights()


def _out(sd, x) -> np.ndarray:
    return np.asarray(
        sd.transformer(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])
    )


def test_base_matches_diffusers(sd, io):
    x, y = io
    np.testing.assert_allclose(_out(sd, x), y["base"], atol=TOL, rtol=0)


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_lora_matches_diffusers(sd, io, fmt):
    x, y = io
    assert np.abs(y["lora_1"] - y["base"]).max() > 100 * TOL  # the LoRA moves the output
    name = sd.load_lora_weights(HERE / FILES[fmt], adapter_name=fmt)
    np.testing.assert_allclose(_out(sd, x), y["lora_1"], atol=TOL, rtol=0)
    sd.set_adapters([name], [0.5])
    np.testing.assert_allclose(_out(sd, x), y["lora_half"], atol=TOL, rtol=0)
    sd.fuse_lora()  # a no-op: merged already
    np.testing.assert_allclose(_out(sd, x), y["lora_half"], atol=TOL, rtol=0)
    sd.set_adapters([name], {"unet": 1.0})  # the "unet" part scales a Flux transformer's LoRA
    np.testing.assert_allclose(_out(sd, x), y["lora_1"], atol=TOL, rtol=0)
    sd.unload_lora_weights()
    np.testing.assert_allclose(_out(sd, x), y["base"], atol=TOL, rtol=0)
    assert get_active_adapters(sd) == {}


def test_xlabs_lora_matches_diffusers(sd, io):
    x, y = io
    assert np.abs(y["xlabs_1"] - y["base"]).max() > 100 * TOL
    lora = read_lora(HERE / "lora_xlabs.safetensors", sd)
    assert lora.format == "xlabs" and {m.scale for m in lora.modules} == {1.0}
    sd.load_lora_weights(HERE / "lora_xlabs.safetensors")
    np.testing.assert_allclose(_out(sd, x), y["xlabs_1"], atol=TOL, rtol=0)


def test_unload_restores_the_base_exactly(sd, io):
    x, _ = io
    before = {v.path: np.array(v) for v in sd.transformer.weights}
    base = _out(sd, x)
    sd.load_lora_weights(HERE / FILES["kohya"])
    sd.load_lora_weights(HERE / FILES["diffusers"], weight=-0.3)
    sd.unload_lora_weights()
    for v in sd.transformer.weights:
        np.testing.assert_array_equal(np.array(v), before[v.path])
    np.testing.assert_array_equal(_out(sd, x), base)


def test_split_modules_land_on_row_blocks(sd):
    lora = read_lora(HERE / FILES["diffusers"], sd)
    by_key = {m.key: m for m in lora.modules}
    h = sd.config.transformer.hidden_size
    q, v = by_key["transformer_blocks.0.attn.to_q"], by_key["transformer_blocks.0.attn.to_v"]
    assert (q.path, q.rows, v.rows) == ("double_blocks.0.img_attn.qkv", ((0, 0, h),), ((2 * h, 0, h),))
    mlp = by_key["single_transformer_blocks.0.proj_mlp"]
    assert (mlp.path, mlp.rows) == ("single_blocks.0.linear1", ((3 * h, 0, 4 * h),))
    out = by_key["norm_out.linear"]
    assert (out.path, out.rows) == ("final_layer.adaLN_modulation.1", ((h, 0, h), (0, h, h)))
    kohya = read_lora(HERE / FILES["kohya"], sd)
    assert all(m.rows is None for m in kohya.modules)
    assert len(lora.modules) == 30 and len(kohya.modules) == 23


def test_kohya_style_keys_on_diffusers_paths(sd, io, tmp_path):
    """``lora_transformer_<diffusers path>`` keys (kohya-style names on diffusers' split layers)."""
    x, y = io
    tensors, meta = read_lora_file(HERE / FILES["diffusers"])
    alpha = json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"]
    out = {}
    for key, value in tensors.items():
        module, part = key.removeprefix("transformer.").removesuffix(".weight").rsplit(".", 1)
        name = "lora_transformer_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = np.asarray(value)
        out[f"{name}.alpha"] = np.array(alpha, np.float32)
    save_safetensors(out, tmp_path / "split.safetensors")
    sd.load_lora_weights(tmp_path / "split.safetensors")
    np.testing.assert_allclose(_out(sd, x), y["lora_1"], atol=TOL, rtol=0)


def test_peft_keys_on_original_paths(sd, io, tmp_path):
    """``diffusion_model.<original path>.lora_A.weight`` (ComfyUI / BFL-style names on the fused layers)."""
    x, y = io
    tensors, _ = read_lora_file(HERE / FILES["kohya"])
    parts = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    out = {}
    for key, value in tensors.items():
        module, part = key.split(".", 1)
        path = _original_path(sd, module.removeprefix("lora_unet_"))
        out[f"diffusion_model.{path}.{parts[part]}"] = np.asarray(value)
    save_safetensors(out, tmp_path / "bfl.safetensors")
    lora = read_lora(tmp_path / "bfl.safetensors", sd)
    assert lora.format == "diffusers" and len(lora.modules) == 23
    sd.load_lora_weights(tmp_path / "bfl.safetensors")
    np.testing.assert_allclose(_out(sd, x), y["lora_1"], atol=TOL, rtol=0)


def _original_path(sd, underscored: str) -> str:
    """Our dotted layer path for kohya's underscored spelling of it."""
    from tf_diffusion.weights.state_dict import named_parameters

    paths = {k.removesuffix(".weight") for k in named_parameters(sd.transformer) if k.endswith(".weight")}
    return next(p for p in paths if p.replace(".", "_") == underscored)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_flux_lora_on_sd_and_sdxl_models_is_refused_clearly(fixtures_dir, family):
    from tests.test_lora import build
    from tf_diffusion import StableDiffusion

    if family == "sd1":
        model = build(fixtures_dir)
    else:
        model = StableDiffusion.from_pretrained(fixtures_dir / "sdxl" / "sdxl-diffusers")
    for name in FILES.values():
        with pytest.raises(LoraError, match="Flux LoRA keys") as info:
            model.load_lora_weights(HERE / name)
        assert ("SD 1" if family == "sd1" else "SDXL") in str(info.value)
    assert get_active_adapters(model) == {}


@pytest.mark.parametrize("path", ["sdxl_lora/lora_kohya.safetensors", "sdxl_lora/lora_diffusers.safetensors",
                                  "lora/lora_kohya.safetensors"])  # fmt: skip
def test_unet_loras_on_flux_are_refused_clearly(sd, io, path):
    x, y = io
    with pytest.raises(LoraError, match="UNet LoRA keys") as info:
        sd.load_lora_weights(FIXTURES / path)
    assert "Flux" in str(info.value)
    assert ("SDXL UNet" in str(info.value)) == path.startswith("sdxl")
    assert get_active_adapters(sd) == {}
    np.testing.assert_allclose(_out(sd, x), y["base"], atol=TOL, rtol=0)


def test_t5_keys_are_refused_clearly(sd, tmp_path):
    tensors, _ = read_lora_file(HERE / FILES["kohya"])
    t5 = {k: np.asarray(v) for k, v in tensors.items()}
    t5["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = np.zeros((4, 24), np.float32)
    save_safetensors(t5, tmp_path / "t5.safetensors")
    with pytest.raises(LoraError, match="(?s)lora_te3_encoder_block_0.*T5 text encoder"):
        sd.load_lora_weights(tmp_path / "t5.safetensors")
    assert get_active_adapters(sd) == {}


def test_bad_shapes_name_the_module(sd, tmp_path):
    tensors, _ = read_lora_file(HERE / FILES["kohya"])
    bad = {k: np.asarray(v) for k, v in tensors.items()}
    key = "lora_unet_single_blocks_0_linear1.lora_up.weight"
    bad[key] = bad[key][:-1]
    save_safetensors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(LoraError, match="lora_unet_single_blocks_0_linear1"):
        sd.load_lora_weights(tmp_path / "bad.safetensors")
    assert get_active_adapters(sd) == {}
