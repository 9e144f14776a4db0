"""keras-hub StableDiffusion3Backbone presets on disk: loading, parity with keras-hub, detection, errors.

The fixtures (tests/fixtures/sd3/keras_hub/) are written by tools/make_fixtures_keras_hub_sd3.py with
keras-hub; these tests never import it. Tolerance: float32 max abs error 1e-4.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from tf_diffusion.mmdit import MMDiT
from tf_diffusion.sd3 import StableDiffusion3
from tf_diffusion.weights.diffusers_mmdit import convert_diffusers_mmdit, mmdit_config_from_diffusers
from tf_diffusion.weights.keras_hub_sd3 import (
    is_keras_hub_sd3_preset,
    load_keras_hub_sd3,
    read_keras_hub_sd3,
)
from tf_diffusion.weights.safetensors_io import load_safetensors
from tf_diffusion.weights.state_dict import load_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd3"
KERAS_HUB = FIXTURES / "keras_hub"
PRESET = KERAS_HUB / "preset"
TOL = 1e-4


@pytest.fixture(scope="module")
def outputs():
    return dict(np.load(KERAS_HUB / "outputs.npz"))


@pytest.fixture(scope="module")
def sd():
    return load_keras_hub_sd3(StableDiffusion3, PRESET)


def _max_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_mmdit_matches_keras_hub(sd, outputs):
    velocity = sd.transformer(
        outputs["latents"], outputs["timestep"][:, 0], outputs["context"], outputs["pooled"]
    )
    assert np.abs(outputs["velocity"]).max() > 0.5  # not a degenerate output
    assert _max_error(velocity, outputs["velocity"]) < TOL


def test_vae_decode_matches_keras_hub(sd, outputs):
    image = sd.vae.decode(outputs["decode_latents"])
    assert _max_error(image, outputs["image"]) < TOL


def test_vae_encoder_matches_keras_hub(sd, outputs):
    posterior = sd.vae.encode(outputs["encode_images"])
    mean, logvar = np.split(outputs["moments"], 2, axis=-1)
    assert _max_error(posterior.mean, mean) < TOL
    assert _max_error(posterior.logvar, np.clip(logvar, -30.0, 20.0)) < TOL


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_matches_keras_hub(sd, outputs, name):
    encoder = sd.text_encoder if name == "clip_l" else sd.text_encoder_2
    hidden, pooled = encoder(outputs["token_ids"], clip_skip=1, final_norm=False, pooled=True)
    assert _max_error(hidden, outputs[f"{name}_hidden"]) < TOL
    # keras-hub's final CLIP LayerNorm has epsilon 1e-6, transformers' 1e-5: far below the tolerance here.
    assert _max_error(pooled, outputs[f"{name}_pooled"]) < TOL


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_same_weights_in_keras_hub_and_ours(name):
    """The diffusers fixtures' transformers, put into keras-hub's MMDiT by the generator, match ours."""
    if name == "sd3":
        config_file, weights = FIXTURES / "transformer_sd3.json", FIXTURES / "transformer_sd3.safetensors"
    else:
        folder = FIXTURES / "sd3-diffusers" / "transformer"
        config_file, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    cfg = mmdit_config_from_diffusers(json.loads(config_file.read_text()))
    model = MMDiT(cfg)
    load_state_dict(model, convert_diffusers_mmdit(load_safetensors(weights), cfg))
    ref = np.load(FIXTURES / "reference.npz")
    keras_hub = np.load(KERAS_HUB / "same_weights.npz")[f"{name}_out"]
    ours = model(
        ref[f"{name}_latents"], ref[f"{name}_timesteps"], ref[f"{name}_context"], ref[f"{name}_pooled"]
    )
    assert _max_error(ours, keras_hub) < TOL


def test_config_from_preset(sd):
    cfg = sd.config
    assert cfg.transformer.patch_size == 2 and cfg.transformer.num_layers == 2
    assert cfg.transformer.joint_attention_dim == 4096 and cfg.transformer.pooled_projection_dim == 48
    assert cfg.vae.channel_mult == (1, 1, 1, 1) and cfg.vae.num_res_blocks == 1
    assert (cfg.vae.scaling_factor, cfg.vae.shift_factor) == (1.5305, 0.0609)
    assert cfg.text_encoder.hidden_act == "quick_gelu" and cfg.text_encoder_2.hidden_act == "gelu"
    assert cfg.text_encoder_3 is None and cfg.scheduler.shift == 3.0


def test_format_detection():
    from tf_diffusion.families import FAMILIES
    from tf_diffusion.family_hooks import describe_source, hooks_for_source
    from tf_diffusion.weights.loading import detect_format, load_pipeline_weights

    assert is_keras_hub_sd3_preset(PRESET)
    assert not is_keras_hub_sd3_preset(FIXTURES / "sd3-diffusers")
    assert detect_format(PRESET) == "keras-hub"
    assert type(hooks_for_source(PRESET)).__name__ == FAMILIES["sd3"].hooks.rsplit(":", 1)[1]
    info = describe_source(PRESET)
    assert info["format"] == "keras-hub preset (StableDiffusion3Backbone)"
    assert info["transformer"].startswith("219,520 parameters")
    with pytest.raises(ValueError, match="keras-hub StableDiffusion3Backbone preset.*StableDiffusion3"):
        load_pipeline_weights(PRESET)


def _copy(tmp_path) -> pathlib.Path:
    folder = tmp_path / "preset"
    shutil.copytree(PRESET, folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["config"].update(changes)
    path.write_text(json.dumps(data))


def test_missing_weights_file(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.weights.h5").unlink()
    with pytest.raises(ValueError, match="no model.weights.h5"):
        read_keras_hub_sd3(folder)


def test_missing_variable_is_named(tmp_path):
    import h5py

    folder = _copy(tmp_path)
    with h5py.File(folder / "model.weights.h5", "r+") as h5:
        del h5["layers/mm_di_t/layers/mm_di_t_block_1/x_block/attention_qkv/vars/0"]
    with pytest.raises(
        ValueError,
        match=r"model.weights.h5: the weights lack 1 variable.*mm_di_t_block_1/x_block/attention_qkv",
    ):
        read_keras_hub_sd3(folder)


def test_misshaped_variable_is_named(tmp_path):
    import h5py

    folder = _copy(tmp_path)
    with h5py.File(folder / "model.weights.h5", "r+") as h5:
        del h5["layers/vae_decoder/output_projection/vars/1"]
        h5["layers/vae_decoder/output_projection/vars/1"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        load_keras_hub_sd3(StableDiffusion3, folder)
    with h5py.File(folder / "model.weights.h5", "r+") as h5:
        del h5["layers/mm_di_t/layers/dense_1/vars/0"]
        h5["layers/mm_di_t/layers/dense_1/vars/0"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"dense_1/vars/0 has shape \(4,\); a rank-2 .*final_layer.linear"):
        read_keras_hub_sd3(folder)


def test_bad_config_values(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, mmdit_qk_norm="layer_norm")
    with pytest.raises(ValueError, match="mmdit_qk_norm='layer_norm'"):
        read_keras_hub_sd3(folder)
    folder = _copy(tmp_path / "b")
    data = json.loads((folder / "config.json").read_text())
    data["config"]["clip_g"]["config"]["intermediate_output_index"] = None
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="clip_g.*intermediate_output_index=None.*penultimate"):
        read_keras_hub_sd3(folder)


def test_t5_needs_load_t5_false(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, t5={"class_name": "T5Encoder", "config": {"hidden_dim": 4096}})
    with pytest.raises(ValueError, match="T5 encoder.*load_t5=False"):
        load_keras_hub_sd3(StableDiffusion3, folder)


def test_not_a_backbone_config(tmp_path):
    folder = _copy(tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["class_name"] = "CLIPBackbone"
    (folder / "config.json").write_text(json.dumps(data))
    assert not is_keras_hub_sd3_preset(folder)
    with pytest.raises(ValueError, match="'CLIPBackbone' config, not a keras-hub StableDiffusion3Backbone"):
        read_keras_hub_sd3(folder)


def _full_size_backbone(preset) -> dict:
    """The backbone config keras-hub's own presets of this architecture have (its constructor's fields)."""
    mm = preset.transformer

    def clip(c, name):
        fields = {
            "vocabulary_size": c.vocab_size, "embedding_dim": c.hidden_size, "hidden_dim": c.hidden_size,
            "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "intermediate_dim": c.intermediate_size, "intermediate_activation": c.hidden_act,
            "intermediate_output_index": c.num_hidden_layers - 2, "max_sequence_length": 77, "name": name,
        }  # fmt: skip
        return {"class_name": "CLIPTextEncoder", "config": fields}

    vae = {
        "encoder_num_filters": [128, 256, 512, 512], "encoder_num_blocks": [2, 2, 2, 2],
        "decoder_num_filters": [512, 512, 256, 128], "decoder_num_blocks": [3, 3, 3, 3],
        "sampler_method": "sample", "input_channels": 3, "sample_channels": 32, "output_channels": 3,
        "scale": 1.5305, "shift": 0.0609,
    }  # fmt: skip
    return {
        "mmdit_patch_size": 2, "mmdit_hidden_dim": mm.inner_dim, "mmdit_num_layers": mm.num_layers,
        "mmdit_num_heads": mm.num_attention_heads, "mmdit_position_size": mm.pos_embed_max_size,
        "mmdit_qk_norm": mm.qk_norm, "mmdit_dual_attention_indices": list(mm.dual_attention_layers) or None,
        "vae": {"class_name": "VAEBackbone", "config": vae}, "clip_l": clip(preset.text_encoder, "clip_l"),
        "clip_g": clip(preset.text_encoder_2, "clip_g"), "t5": None, "latent_channels": 16, "output_channels": 3,
        "num_train_timesteps": 1000, "shift": 3.0, "image_shape": [1024, 1024, 3],
    }  # fmt: skip


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium"])  # 3.5 Large: Medium without attn2
def test_full_size_configs_and_renames(name):
    """keras-hub's full-size architectures give our presets, and the renames name every one of their weights."""
    from tf_diffusion.clip import CLIPTextEncoder
    from tf_diffusion.presets import get_sd3_preset
    from tf_diffusion.vae import AutoencoderKL
    from tf_diffusion.weights.keras_hub_sd3 import (
        clip_entries,
        mmdit_entries,
        sd3_config_from_keras_hub,
        vae_entries,
    )
    from tf_diffusion.weights.state_dict import build_abstract, manifest

    preset = get_sd3_preset(name)
    cfg = sd3_config_from_keras_hub(_full_size_backbone(preset), name)
    assert cfg.transformer == preset.transformer
    assert cfg.vae == preset.vae
    assert (cfg.text_encoder, cfg.text_encoder_2) == (preset.text_encoder, preset.text_encoder_2)
    assert cfg.tokenizer_2 == preset.tokenizer_2
    built = {
        "mmdit": (build_abstract(lambda: MMDiT(cfg.transformer)), mmdit_entries(cfg.transformer)),
        "vae": (build_abstract(lambda: AutoencoderKL(cfg.vae)), vae_entries(cfg.vae)),
        "clip_l": (
            build_abstract(lambda: CLIPTextEncoder(cfg.text_encoder)),
            clip_entries(cfg.text_encoder, "clip_text_encoder", "clip_projection"),
        ),
    }
    for part, (model, entries) in built.items():
        ours = [key for _, key, _ in entries]
        assert len(ours) == len(set(ours)), part
        assert set(ours) == set(manifest(model)), part
    assert any(key.endswith("nin_shortcut.weight") for _, key, _ in built["vae"][1])


# -- sharded presets (save_to_preset with max_shard_size: model.weights.json and model_0000N.weights.h5)

SHARDED = KERAS_HUB / "preset_sharded"


def test_sharded_preset_loads_the_same_weights(sd, outputs):
    assert len(list(SHARDED.glob("model_*.weights.h5"))) > 1  # keras really split it
    sharded = load_keras_hub_sd3(StableDiffusion3, SHARDED)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(sd, name).weights, getattr(sharded, name).weights  # the same build order
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{name}: {a.path}")
    velocity = sharded.transformer(
        outputs["latents"], outputs["timestep"][:, 0], outputs["context"], outputs["pooled"]
    )
    assert _max_error(velocity, outputs["velocity"]) < TOL
    from tf_diffusion.weights.loading import detect_format

    assert detect_format(SHARDED) == "keras-hub"


def _sharded_copy(tmp_path) -> pathlib.Path:
    folder = tmp_path / "preset"
    shutil.copytree(SHARDED, folder)
    return folder


def test_sharded_preset_missing_shard_is_named(tmp_path):
    folder = _sharded_copy(tmp_path)
    (folder / "model_00001.weights.h5").unlink()
    with pytest.raises(ValueError, match="model_00001.weights.h5"):
        read_keras_hub_sd3(folder)


@pytest.mark.parametrize("name", ["../model_00000.weights.h5", "/etc/passwd", "sub/model_00000.weights.h5"])
def test_sharded_preset_map_cannot_point_outside_its_folder(tmp_path, name):
    folder = _sharded_copy(tmp_path)
    index = folder / "model.weights.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = name
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a plain file name"):
        read_keras_hub_sd3(folder)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": {}}', '{"weight_map": {"/a/vars": 3}}'])
def test_sharded_preset_bad_map(tmp_path, text):
    folder = _sharded_copy(tmp_path)
    (folder / "model.weights.json").write_text(text)
    with pytest.raises(ValueError, match="model.weights.json"):
        read_keras_hub_sd3(folder)
