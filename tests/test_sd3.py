"""SD3 / SD3.5 components against diffusers / transformers, and full-size parameter counts.

Fixtures from tools/make_fixtures_sd3.py: tiny random ``SD3Transformer2DModel``s (diffusers' SD3 test
config; one with SD3.5's q/k norm and dual attention), a tiny ``T5EncoderModel``, a 16-channel
``AutoencoderKL`` without quant convs, a tiny SentencePiece model with ``T5TokenizerFast`` ids, and
``FlowMatchEulerDiscreteScheduler`` trajectories.
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.clip import CLIPTextEncoder
from tf_diffusion.config import MMDiTConfig, SchedulerConfig, T5Config, VAEConfig
from tf_diffusion.families import FAMILIES, diffusers_pipeline_classes, family_of_config, is_sd3_single_file
from tf_diffusion.mmdit import MMDiT
from tf_diffusion.presets import SD3_PRESETS, get_sd3_preset
from tf_diffusion.schedulers import get_sampler
from tf_diffusion.t5 import T5Encoder, T5Tokenizer, t5_config_from_transformers
from tf_diffusion.vae import AutoencoderKL
from tf_diffusion.weights.diffusers_configs import vae_config_from_diffusers
from tf_diffusion.weights.diffusers_mmdit import (
    convert_diffusers_mmdit,
    mmdit_config_from_checkpoint,
    mmdit_config_from_diffusers,
)
from tf_diffusion.weights.diffusers_vae import convert_diffusers_vae
from tf_diffusion.weights.safetensors_io import load_safetensors
from tf_diffusion.weights.state_dict import StateDictError, build_abstract, count_parameters, load_state_dict

FLOAT32_TOL = 1e-4


@pytest.fixture(scope="module")
def sd3_dir():
    return pathlib.Path(__file__).parent / "fixtures" / "sd3"


@pytest.fixture(scope="module")
def ref(sd3_dir):
    return dict(np.load(sd3_dir / "reference.npz"))


def _transformer_files(sd3_dir, name):
    if name == "sd3":
        return sd3_dir / "transformer_sd3.json", sd3_dir / "transformer_sd3.safetensors"
    folder = sd3_dir / "sd3-diffusers" / "transformer"
    return folder / "config.json", folder / "diffusion_pytorch_model.safetensors"


def _transformer(sd3_dir, name):
    config_file, weights = _transformer_files(sd3_dir, name)
    cfg = mmdit_config_from_diffusers(json.loads(config_file.read_text()))
    original = convert_diffusers_mmdit(load_safetensors(weights), cfg)
    model = MMDiT(cfg)
    load_state_dict(model, original)
    return model, original


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_transformer_matches_diffusers(sd3_dir, ref, name):
    model, original = _transformer(sd3_dir, name)
    args = [ref[f"{name}_{k}"] for k in ("latents", "timesteps", "context", "pooled")]
    out = np.asarray(model(*args))
    assert out.shape == ref[f"{name}_out"].shape
    assert np.abs(out - ref[f"{name}_out"]).max() < FLOAT32_TOL
    skipped = np.asarray(model(*args, skip_layers=(0,)))
    assert np.abs(skipped - ref[f"{name}_out_skip0"]).max() < FLOAT32_TOL
    # The config inferred from the original-layout tensors is the folder's (the head width is read
    # from the q/k norm where there is one; SD3 has none, so its fixture's head width is passed).
    inferred = mmdit_config_from_checkpoint(original, head_dim=8)
    assert dataclasses.replace(inferred, sample_size=model.config.sample_size) == model.config


def test_transformer_keys_are_the_original_ones(sd3_dir):
    model, original = _transformer(sd3_dir, "sd35")
    keys = set(original)
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in keys
    assert "joint_blocks.2.context_block.attn.ln_q.weight" in keys
    assert "joint_blocks.2.context_block.attn.proj.weight" not in keys  # the last context block: pre-only
    assert "joint_blocks.2.x_block.attn2.qkv.weight" not in keys
    assert "final_layer.adaLN_modulation.1.weight" in keys


def test_transformer_rejects_bad_sizes(sd3_dir, ref):
    model, _ = _transformer(sd3_dir, "sd35")
    args = [ref[f"sd35_{k}"] for k in ("timesteps", "context", "pooled")]
    with pytest.raises(ValueError, match="multiple of patch_size=2"):
        model(np.zeros((2, 7, 8, 16), np.float32), *args)
    with pytest.raises(ValueError, match="pos_embed_max_size=12"):
        model(np.zeros((2, 26, 8, 16), np.float32), *args)
    with pytest.raises(ValueError, match="joint_attention_dim=48"):
        model(ref["sd35_latents"], args[0], args[1][..., :40], args[2])


def test_diffusers_rename_refuses_unknown_and_missing_keys(sd3_dir):
    cfg = mmdit_config_from_diffusers(json.loads((sd3_dir / "transformer_sd3.json").read_text()))
    tensors = dict(load_safetensors(sd3_dir / "transformer_sd3.safetensors"))
    tensors["transformer_blocks.0.attn2.to_q.weight"] = tensors.pop("transformer_blocks.0.attn.to_q.weight")
    with pytest.raises(StateDictError, match="attn2.to_q.weight") as err:
        convert_diffusers_mmdit(tensors, cfg)
    assert "transformer_blocks.0.attn.to_q.weight" in str(err.value)


def test_t5_matches_transformers(sd3_dir, ref):
    folder = sd3_dir / "sd3-diffusers" / "text_encoder_3"
    model = T5Encoder(t5_config_from_transformers(json.loads((folder / "config.json").read_text())))
    load_state_dict(model, load_safetensors(folder / "model.safetensors"))
    out = np.asarray(model(ref["t5_ids"]))
    assert np.abs(out - ref["t5_out"]).max() < FLOAT32_TOL


def test_t5_tokenizer_matches_t5_tokenizer_fast(sd3_dir):
    tok = T5Tokenizer(sd3_dir / "sd3-diffusers" / "tokenizer_3" / "spiece.model")
    data = json.loads((sd3_dir / "tokenizer_ids.json").read_text(encoding="utf-8"))
    assert tok.vocab_size == data["vocab_size"]
    wrong = [c["text"] for c in data["cases"] if tok.ids(c["text"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} of {len(data['cases'])} differ: {wrong}"
    padded = tok([c["text"] for c in data["cases"]], max_length=24)
    assert padded.tolist() == [c["padded_24"] for c in data["cases"]]


def test_t5_tokenizer_errors(tmp_path, sd3_dir):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        T5Tokenizer(bad)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        T5Tokenizer(sd3_dir / "sd3-diffusers" / "tokenizer_3" / "spiece.model")("a cat", max_length=0)


def test_vae_matches_diffusers(sd3_dir, ref):
    folder = sd3_dir / "sd3-diffusers" / "vae"
    cfg = vae_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    assert not cfg.use_quant_conv and cfg.shift_factor == pytest.approx(0.0609)
    vae = AutoencoderKL(cfg)
    weights = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    load_state_dict(vae, convert_diffusers_vae(weights, cfg))
    mean = np.asarray(vae.encode(ref["vae_images"]).mean)
    assert np.abs(mean - ref["vae_mean"]).max() < FLOAT32_TOL
    decoded = np.asarray(vae.decode(ref["vae_latents"]))
    assert np.abs(decoded - ref["vae_decoded"]).max() < FLOAT32_TOL


@pytest.mark.parametrize("name", ["shift3", "shift1", "dynamic"])
def test_flow_match_euler_trajectory(sd3_dir, ref, name):
    spec = json.loads((sd3_dir / "schedules.json").read_text())[name]
    sampler = get_sampler(
        "FlowMatchEulerDiscreteScheduler", SchedulerConfig(**spec["config"]), **spec["kwargs"]
    )
    plan = sampler.plan(spec["steps"])
    np.testing.assert_allclose(plan.timesteps, ref[f"flow_{name}_timesteps"], rtol=0, atol=1e-3)
    x, state = ref[f"flow_{name}_x0"], sampler.init_state(ref[f"flow_{name}_x0"])
    for i in range(plan.num_evals):
        x, state = sampler.step(ref[f"flow_{name}_outputs"][i], i, x, state, plan)
        assert np.abs(np.asarray(x) - ref[f"flow_{name}_trajectory"][i]).max() < 1e-5
    x0, noise, noised = ref[f"flow_{name}_img2img"]
    img2img = sampler.plan(spec["steps"], strength=0.6)
    assert np.abs(np.asarray(sampler.add_noise(x0, noise, img2img)) - noised).max() < 1e-6


def test_flow_match_mu_errors():
    with pytest.raises(ValueError, match="needs mu"):
        get_sampler("FlowMatchEulerDiscreteScheduler", SchedulerConfig(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        get_sampler("FlowMatchEulerDiscreteScheduler", SchedulerConfig(use_karras_sigmas=True))
    with pytest.raises(ValueError, match="only read with use_dynamic_shifting"):
        get_sampler("FlowMatchEulerDiscreteScheduler", SchedulerConfig(shift=3.0), mu=0.5)


# diffusers' / transformers' parameter counts of the full-size models (issue 22); the MMDiT's position
# table counted apart, as the checkpoint stores it (diffusers holds it as a buffer).
FULL_SIZE = {
    "sd3-medium": (MMDiTConfig(), 2_028_328_000, 56_623_104),
    "sd3.5-medium": (
        MMDiTConfig(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        2_243_171_520,
        226_492_416,
    ),
    "sd3.5-large": (
        MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
        8_056_627_520,
        89_653_248,
    ),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_transformer_parameter_counts(name):
    cfg, count, table = FULL_SIZE[name]
    assert get_sd3_preset(name).transformer == cfg  # the presets are these architectures
    model = build_abstract(lambda: MMDiT(cfg))
    assert count_parameters(model) == count + table
    assert int(np.prod(model.pos_embed.shape)) == table
    # A single file without config= gets the preset whose transformer its shapes describe.
    import types

    from tf_diffusion.weights.sd3_single_file import _config_for
    from tf_diffusion.weights.state_dict import manifest

    shapes = {key: types.SimpleNamespace(shape=shape) for key, shape in manifest(model).items()}
    assert _config_for(shapes, None).transformer == cfg


def test_full_size_t5_and_vae_parameter_counts():
    t5 = build_abstract(lambda: T5Encoder(T5Config()))
    assert count_parameters(t5) == 4_762_310_656
    vae = build_abstract(
        lambda: AutoencoderKL(VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=1.5305))
    )
    assert count_parameters(vae) == 83_819_683


def test_family_entry_and_presets():
    family = FAMILIES["sd3"]
    assert family.backbone == "mmdit" and family.default_sampler == "FlowMatchEulerDiscreteScheduler"
    assert sorted(family.presets) == sorted(SD3_PRESETS)
    assert set(family.prefixes) == set(family.components)
    for name in family.presets:
        preset = get_sd3_preset(name)
        assert family_of_config(preset) is family
        assert preset.transformer.joint_attention_dim == family.context_dim
        assert preset.transformer.in_channels == family.unet_in_channels
        get_sampler(preset.default_sampler, preset.scheduler)
    assert get_sd3_preset("sd3.5-large-turbo").default_guidance == 0.0
    assert family.config_inference() is mmdit_config_from_checkpoint
    # StableDiffusion's loaders do not mistake SD3 for a UNet family.
    assert "StableDiffusion3Pipeline" not in diffusers_pipeline_classes()
    with pytest.raises(ValueError, match="unknown SD3 preset"):
        get_sd3_preset("sdxl-base-1.0")


def test_sd3_files_are_refused_by_the_unet_loader(tmp_path, sd3_dir):
    from safetensors.numpy import save_file

    from tf_diffusion.weights.loading import load_pipeline_weights

    _, original = _transformer(sd3_dir, "sd3")
    path = tmp_path / "sd3_medium.safetensors"
    save_file({f"model.diffusion_model.{k}": np.ascontiguousarray(v) for k, v in original.items()}, str(path))
    assert is_sd3_single_file(load_safetensors(path))
    with pytest.raises(
        ValueError, match=r"SD3 / SD3.5 \(MMDiT\) weights \(preset 'sdxl-base-1.0' describes a sdxl"
    ):
        load_pipeline_weights(path, config="sdxl-base-1.0")
    with pytest.raises(ValueError, match="load it with tf_diffusion.sd3.StableDiffusion3"):
        load_pipeline_weights(path)
    # The SD3 loader (StableDiffusion.from_pretrained claims the file) names the other family's preset too.
    from tf_diffusion import StableDiffusion

    with pytest.raises(
        ValueError, match=r"SD3 / SD3.5 \(MMDiT\) weights, but preset 'sdxl-base-1.0' describes a sdxl"
    ):
        StableDiffusion.from_pretrained(path, config="sdxl-base-1.0")
    with pytest.raises(ValueError, match="unknown SD3 preset 'nope'"):
        StableDiffusion.from_pretrained(path, config="nope")
    with pytest.raises(ValueError, match="StableDiffusion3.from_pretrained"):
        load_pipeline_weights(sd3_dir / "sd3-diffusers")


def test_full_size_clip_parameter_counts():
    preset = get_sd3_preset("sd3-medium")
    clip_l = build_abstract(lambda: CLIPTextEncoder(preset.text_encoder))
    assert count_parameters(clip_l) == 123_650_304
    clip_g = build_abstract(lambda: CLIPTextEncoder(preset.text_encoder_2))
    assert count_parameters(clip_g) == 694_659_840


def test_t5_runs_in_bfloat16(sd3_dir, ref):
    # Norms, the position bias sum and the softmax stay float32; the rest rounds to bfloat16.
    folder = sd3_dir / "sd3-diffusers" / "text_encoder_3"
    model = T5Encoder(
        t5_config_from_transformers(json.loads((folder / "config.json").read_text())), dtype="mixed_bfloat16"
    )
    load_state_dict(model, load_safetensors(folder / "model.safetensors"))
    out = np.asarray(model(ref["t5_ids"]))
    assert out.dtype == np.float32
    assert np.abs(out - ref["t5_out"]).max() < 0.05 * np.abs(ref["t5_out"]).max()
