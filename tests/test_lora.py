"""LoRA loading: kohya and diffusers / PEFT files give peft's outputs; removal is exact; no retrace.

tools/make_fixtures_lora.py attached random LoRAs with peft to the tiny pipeline's UNet (attention,
projections, feed-forward, ResBlock convs 3x3 and 1x1 "LoCon", time embedding) and text encoder (q/k/v/out,
fc1/fc2), saved them with diffusers' ``save_lora_weights`` and under kohya names (which diffusers' own
``load_lora_weights`` reads back to the same UNet output), and recorded the reference outputs. The base
weights are ``random_state_dict`` draws, rebuilt here from tests/fixtures/pipeline/shapes.json.
"""

import functools
import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.adapters.lora import LoraError, _unet_names, get_active_adapters, read_lora_file
from tf_diffusion.config import PipelineConfig, TokenizerConfig
from tf_diffusion.schedulers import config_from_diffusers
from tf_diffusion.testing import random_state_dict
from tf_diffusion.weights import load_state_dict
from tf_diffusion.weights.diffusers_configs import clip_config_from_transformers, vae_config_from_diffusers
from tf_diffusion.weights.diffusers_unet import (
    convert_diffusers_unet_state_dict,
    diffusers_key_to_original,
    diffusers_prefix_map,
    unet_config_from_diffusers,
)
from tf_diffusion.weights.safetensors_io import save_safetensors
from tf_diffusion.weights.state_dict import state_dict

TOLERANCE = 1e-4  # float32 components against the reference
FILES = {
    "diffusers": "lora_diffusers.safetensors",
    "kohya": "lora_kohya.safetensors",
    "kohya-pt": "lora_kohya.pt",
}


@functools.cache
def io(fixtures_dir):
    with np.load(fixtures_dir / "lora" / "lora_io.npz") as data:
        return dict(data)


def build(fixtures_dir):
    """The tiny pipeline of tools/make_fixtures_pipeline.py with its reference weights."""
    from tf_diffusion.pipeline import StableDiffusion

    path = fixtures_dir / "pipeline"
    meta = json.loads((path / "cases.json").read_text())
    shapes = json.loads((path / "shapes.json").read_text())
    config = PipelineConfig(
        name="tiny-lora",
        text_encoder=clip_config_from_transformers(meta["text_encoder"]),
        tokenizer=TokenizerConfig(),
        unet=unet_config_from_diffusers(meta["unet"]),
        vae=vae_config_from_diffusers(meta["vae"]),
        scheduler=config_from_diffusers(meta["scheduler"]),
        default_size=meta["size"],
    )
    sd = StableDiffusion(config)
    seeds = meta["weight_seeds"]
    clip = random_state_dict(shapes["text_encoder"], seeds["text_encoder"])
    clip = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()}
    load_state_dict(sd.text_encoder, clip)
    load_state_dict(sd.vae, convert_diffusers_vae(random_state_dict(shapes["vae"], seeds["vae"]), config.vae))
    unet = random_state_dict(shapes["unet"], seeds["unet"])
    load_state_dict(sd.unet, convert_diffusers_unet_state_dict(unet, config.unet))
    return sd


def convert_diffusers_vae(tensors, config):
    from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae as convert

    return convert(tensors, config)


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def sd():
    model = build(FIXTURES)
    yield model
    model.unload_lora_weights()


@pytest.fixture(autouse=True)
def clean(sd):
    sd.unload_lora_weights()
    yield
    sd.unload_lora_weights()


def unet_out(sd, data):
    x = np.transpose(data["x"], (0, 2, 3, 1))
    out = np.asarray(sd.unet(x, data["t"].astype(np.int32), data["context"]))
    return np.transpose(out, (0, 3, 1, 2))


def te_out(sd, data):
    return np.asarray(sd.text_encoder(data["ids"].astype(np.int32)))


def err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_base_matches_reference(sd, fixtures_dir):
    data = io(fixtures_dir)
    assert err(unet_out(sd, data), data["unet_base"]) <= TOLERANCE
    assert err(te_out(sd, data), data["te_base"]) <= TOLERANCE


@pytest.mark.parametrize("fmt", sorted(FILES))
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_lora_matches_peft(sd, fixtures_dir, fmt, weight):
    data = io(fixtures_dir)
    name = sd.load_lora_weights(fixtures_dir / "lora" / FILES[fmt], weight=weight)
    assert name == "default_0"
    tag = f"{weight:.1f}"
    unet_err = err(unet_out(sd, data), data[f"unet_lora_{tag}"])
    te_err = err(te_out(sd, data), data[f"te_lora_{tag}"])
    assert unet_err <= TOLERANCE, f"{fmt} UNet at {weight}: {unet_err:.2e}"
    assert te_err <= TOLERANCE, f"{fmt} text encoder at {weight}: {te_err:.2e}"


def test_original_layout_kohya_names(sd, fixtures_dir, tmp_path):
    """kohya names spelled with the single-file paths (lora_unet_input_blocks_...) load the same LoRA."""
    tensors, meta = read_lora_file(fixtures_dir / "lora" / FILES["kohya"])
    prefix_map = diffusers_prefix_map(sd.config.unet)
    dotted = {}
    for theirs, ours in _unet_names(sd.unet, sd.config.unet).items():
        if theirs != ours:
            assert diffusers_key_to_original(theirs + ".weight", prefix_map) == ours + ".weight"
            dotted[theirs.replace(".", "_")] = ours.replace(".", "_")
    renamed = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if module.startswith("lora_unet_"):
            module = "lora_unet_" + dotted[module[len("lora_unet_") :]]
        renamed[f"{module}.{suffix}"] = np.asarray(value)
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    save_safetensors(renamed, tmp_path / "ldm.safetensors", meta)
    sd.load_lora_weights(tmp_path / "ldm.safetensors")
    data = io(fixtures_dir)
    assert err(unet_out(sd, data), data["unet_lora_1.0"]) <= TOLERANCE


def test_two_loras_with_their_weights(sd, fixtures_dir):
    data = io(fixtures_dir)
    sd.load_lora_weights(fixtures_dir / "lora" / FILES["kohya"], adapter_name="a")
    sd.load_lora_weights(fixtures_dir / "lora" / "lora_second.safetensors", adapter_name="b")
    sd.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert err(unet_out(sd, data), data["unet_two_0.7_0.4"]) <= TOLERANCE
    # Switching one off and back on recomputes from the base: the single-LoRA reference again.
    sd.set_adapters("a")
    assert get_active_adapters(sd) == {"a": {"unet": 1.0, "text_encoder": 1.0}}
    assert err(unet_out(sd, data), data["unet_lora_1.0"]) <= TOLERANCE
    sd.set_adapters([])
    assert err(unet_out(sd, data), data["unet_base"]) <= TOLERANCE


def test_a_failure_while_merging_restores_the_previous_adapters(sd, fixtures_dir, monkeypatch):
    # Kernels are merged and assigned one at a time; should one fail midway, the adapters active
    # before are merged again from the kept bases and the new one is not loaded.
    from tf_diffusion.adapters import lora as lora_lib

    data = io(fixtures_dir)
    sd.load_lora_weights(fixtures_dir / "lora" / FILES["kohya"], adapter_name="a")
    before = state_dict(sd.unet)
    merged, calls = lora_lib._merged, []

    def fails_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room for this kernel")
        return merged(*args)

    monkeypatch.setattr(lora_lib, "_merged", fails_on_the_third)
    with pytest.raises(MemoryError, match="no room"):
        sd.load_lora_weights(fixtures_dir / "lora" / "lora_second.safetensors", adapter_name="b")
    monkeypatch.setattr(lora_lib, "_merged", merged)
    assert len(calls) > 3  # the rollback merged "a" again after the failure
    assert get_active_adapters(sd) == {"a": {"unet": 1.0, "text_encoder": 1.0}}
    after = state_dict(sd.unet)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert err(unet_out(sd, data), data["unet_lora_1.0"]) <= TOLERANCE


def test_separate_text_encoder_and_unet_weights(sd, fixtures_dir):
    data = io(fixtures_dir)
    sd.load_lora_weights(
        fixtures_dir / "lora" / FILES["diffusers"], weight={"unet": 0.5, "text_encoder": 0.0}
    )
    assert err(unet_out(sd, data), data["unet_lora_0.5"]) <= TOLERANCE
    assert err(te_out(sd, data), data["te_base"]) <= TOLERANCE


def test_unload_restores_weights_bit_for_bit(sd, fixtures_dir):
    before = {c: state_dict(getattr(sd, c)) for c in ("unet", "text_encoder")}
    sd.load_lora_weights(fixtures_dir / "lora" / FILES["kohya"], adapter_name="a", weight=0.7)
    sd.load_lora_weights(fixtures_dir / "lora" / "lora_second.safetensors", adapter_name="b", weight=0.3)
    sd.set_adapters(["b", "a"], [1.3, 0.2])
    changed = state_dict(sd.unet)
    assert any(not np.array_equal(changed[k], before["unet"][k]) for k in changed)
    sd.unload_lora_weights()
    for c in ("unet", "text_encoder"):
        after = state_dict(getattr(sd, c))
        for key, value in before[c].items():
            assert after[key].tobytes() == value.tobytes(), key
    assert get_active_adapters(sd) == {}


def test_unknown_keys_are_listed_and_nothing_changes(sd, fixtures_dir, tmp_path):
    tensors, meta = read_lora_file(fixtures_dir / "lora" / FILES["kohya"])
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = np.zeros((4, 32), np.float32)
    tensors["lora_te_text_model_encoder_layers_9_mlp_fc1.lora_up.weight"] = np.zeros((37, 4), np.float32)
    tensors["something_else"] = np.zeros((2,), np.float32)
    save_safetensors(tensors, tmp_path / "bad.safetensors", meta)
    before = state_dict(sd.unet)
    with pytest.raises(LoraError) as e:
        sd.load_lora_weights(tmp_path / "bad.safetensors")
    message = str(e.value)
    assert "3 keys match no layer" in message
    for key in ("lora_unet_down_blocks_7_attentions_0_proj_in", "layers_9_mlp_fc1", "something_else"):
        assert key in message
    after = state_dict(sd.unet)
    assert all(after[k].tobytes() == before[k].tobytes() for k in before)
    assert get_active_adapters(sd) == {}


def test_other_family_is_named(sd, fixtures_dir, tmp_path):
    """Cross-attention downs 2048 wide (an SDXL LoRA's) on this 32-wide model: both families named."""
    tensors, _ = read_lora_file(fixtures_dir / "lora" / FILES["kohya"])
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    for key in list(tensors):
        if "attn2_to_k.lora_down" in key or "attn2_to_v.lora_down" in key:
            tensors[key] = np.zeros((tensors[key].shape[0], 2048), np.float32)
    save_safetensors(tensors, tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match=r"SD 1\.x.*\n?.*SDXL|SDXL.*SD 1\.x") as e:
        sd.load_lora_weights(tmp_path / "xl.safetensors")
    assert "attn2_to_k" in str(e.value) and "2048" in str(e.value)
    # SDXL-only keys (its second text encoder) are named as SDXL keys.
    save_safetensors(
        {"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": np.ones((), np.float32)},
        tmp_path / "te2.safetensors",
    )
    with pytest.raises(LoraError, match="SDXL LoRA keys"):
        sd.load_lora_weights(tmp_path / "te2.safetensors")


def test_rank_mismatch_and_missing_half(sd, fixtures_dir, tmp_path):
    tensors, _ = read_lora_file(fixtures_dir / "lora" / FILES["kohya"])
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    tensors[f"{key}.lora_up.weight"] = np.zeros((37, 3), np.float32)
    save_safetensors(tensors, tmp_path / "rank.safetensors")
    with pytest.raises(LoraError, match=r"rank of down \(4, 32\) \(4\) differs from up \(37, 3\) \(3\)"):
        sd.load_lora_weights(tmp_path / "rank.safetensors")
    del tensors[f"{key}.lora_up.weight"]
    save_safetensors(tensors, tmp_path / "half.safetensors")
    with pytest.raises(LoraError, match="without both down and up"):
        sd.load_lora_weights(tmp_path / "half.safetensors")


def test_api_errors(sd, fixtures_dir):
    path = fixtures_dir / "lora" / FILES["diffusers"]
    sd.load_lora_weights(path, adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        sd.load_lora_weights(path, adapter_name="x")
    with pytest.raises(ValueError, match=r"\['nope'\] are not loaded"):
        sd.set_adapters(["nope"])
    with pytest.raises(ValueError, match="allowed parts"):
        sd.set_adapters(["x"], [{"vae": 1.0}])
    with pytest.raises(ValueError, match="suffix"):
        sd.load_lora_weights(fixtures_dir / "lora" / "lora_configs.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.load_lora_weights(fixtures_dir / "lora" / "missing.safetensors")
    with pytest.raises(ValueError, match="lora_scale"):
        sd.fuse_lora(lora_scale=0.5)
    sd.fuse_lora()
    sd.unfuse_lora()


def test_loading_does_not_retrace_generate(sd, fixtures_dir):
    # Graph mode: a traced program reads the LoRA's variables as an XLA one does, and traces the same
    # way (executor.traces); an XLA compile would cost seconds more here.
    kwargs = dict(
        num_steps=2,
        guidance_scale=5.0,
        seed=3,
        scheduler="ddim",
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    base = sd.generate(["a red circle"], **kwargs)
    traces = sd.executor.traces
    assert traces >= 1  # the loop is traced, so a retrace would show
    sd.load_lora_weights(fixtures_dir / "lora" / FILES["kohya"], weight=0.8)
    with_lora = sd.generate(["a red circle"], **kwargs)
    sd.set_adapters(["default_0"], [0.3])
    sd.generate(["a red circle"], **kwargs)
    sd.unload_lora_weights()
    again = sd.generate(["a red circle"], **kwargs)
    assert sd.executor.traces == traces
    assert err(with_lora, base) > 1e-3  # the LoRA reached the compiled loop
    assert np.array_equal(again, base)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sd2_shapes(fmt):
    """SD 2.x layout: linear proj_in / proj_out, per-level head counts, gelu text encoder."""
    from tf_diffusion.pipeline import StableDiffusion

    folder = FIXTURES / "lora"
    meta = json.loads((folder / "sd2_components.json").read_text())
    base = json.loads((FIXTURES / "pipeline" / "cases.json").read_text())
    config = PipelineConfig(
        name="tiny-lora-sd2",
        text_encoder=clip_config_from_transformers(meta["text_encoder"]),
        unet=unet_config_from_diffusers(meta["unet"]),
        vae=vae_config_from_diffusers(base["vae"]),
        default_size=32,
    )
    assert config.unet.use_linear_projection
    model = StableDiffusion(config)
    clip = random_state_dict(meta["shapes"]["text_encoder"], meta["seeds"]["text_encoder"])
    clip = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()}
    load_state_dict(model.text_encoder, clip)
    unet = random_state_dict(meta["shapes"]["unet"], meta["seeds"]["unet"])
    load_state_dict(model.unet, convert_diffusers_unet_state_dict(unet, config.unet))
    with np.load(folder / "sd2_lora_io.npz") as f:
        data = dict(f)
    model.load_lora_weights(folder / f"sd2_lora_{fmt}.safetensors")
    assert err(unet_out(model, data), data["unet_lora_1.0"]) <= TOLERANCE
    assert err(te_out(model, data), data["te_lora_1.0"]) <= TOLERANCE


LYCORIS = ["loha", "loha_tucker", "lokr", "lokr_full", "locon_tucker", "locon_dora", "loha_dora"]


@pytest.mark.parametrize("case", LYCORIS)
def test_lycoris_matches_the_package(sd, fixtures_dir, case):
    """LoHa, LoKr (low-rank and whole factors), LoCon Tucker (lora_mid) and DoRA (dora_scale, per output
    row and per input column) written by lycoris-lora (tools/make_fixtures_lycoris.py), at multiplier 1."""
    with np.load(fixtures_dir / "lora" / "lycoris_io.npz") as f:
        data = dict(f)
    base = unet_out(sd, data)
    sd.load_lora_weights(fixtures_dir / "lora" / f"lycoris_{case}.safetensors")
    unet_err = err(unet_out(sd, data), data[f"{case}_unet"])
    te_err = err(te_out(sd, data), data[f"{case}_te"])
    assert unet_err <= TOLERANCE, f"{case} UNet: {unet_err:.2e}"
    assert te_err <= TOLERANCE, f"{case} text encoder: {te_err:.2e}"
    assert err(data[f"{case}_unet"], base) > 1e-2  # the network changes the output


def test_truncated_and_bad_files_change_nothing(sd, fixtures_dir, tmp_path):
    before = {c: state_dict(getattr(sd, c)) for c in ("unet", "text_encoder")}
    raw = (fixtures_dir / "lora" / "lycoris_lokr.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(ValueError, match="cut.safetensors"):
        sd.load_lora_weights(tmp_path / "cut.safetensors")
    (tmp_path / "cut.pt").write_bytes((fixtures_dir / "lora" / "lora_kohya.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pt"):
        sd.load_lora_weights(tmp_path / "cut.pt")
    tensors, _ = read_lora_file(fixtures_dir / "lora" / "lycoris_loha.safetensors")
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    key = next(k for k in tensors if k.endswith("attn1_to_q.hada_w2_b"))
    tensors[key] = tensors[key][:, :5]
    save_safetensors(tensors, tmp_path / "loha.safetensors")
    with pytest.raises(LoraError, match=r"attn1_to_q: hada_w1_a .* do not make the layer's"):
        sd.load_lora_weights(tmp_path / "loha.safetensors")
    tensors, _ = read_lora_file(fixtures_dir / "lora" / "lycoris_locon_dora.safetensors")
    tensors = {k: np.asarray(v) for k, v in tensors.items()}
    key = next(k for k in tensors if k.endswith("dora_scale"))
    tensors[key] = np.ones((3, 1), np.float32)
    save_safetensors(tensors, tmp_path / "dora.safetensors")
    with pytest.raises(LoraError, match=r"DoRA magnitude \(3, 1\) fits neither"):
        sd.load_lora_weights(tmp_path / "dora.safetensors")
    for c in ("unet", "text_encoder"):
        after = state_dict(getattr(sd, c))
        assert all(after[k].tobytes() == v.tobytes() for k, v in before[c].items())
    assert get_active_adapters(sd) == {}
