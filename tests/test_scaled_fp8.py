"""ComfyUI "scaled fp8" SD3 single files: float8 weights with a per-tensor scale_weight, dequantized on load.

tools/make_fixtures_scaled_fp8.py wrote the file with torch from the tiny SD3 folder's weights, as
ComfyUI's scaled files are laid out (a float8_e4m3fn ``weight`` and a float32 ``scale_weight`` per linear
layer, a ``scaled_fp8`` marker, a ``scale_input``), and torch's own dequantization of every scaled
weight, ``weight.to(float32) * scale_weight``, beside it.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

FOLDER = pathlib.Path(__file__).parent / "fixtures" / "sd3" / "sd3-diffusers"
PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
}
SCALED_FILE = pathlib.Path(__file__).parent / "fixtures" / "float8" / "sd3_scaled_fp8.safetensors"


@pytest.fixture(scope="module")
def scaled_file():
    """(path, {original key: torch's dequantized float32 weight}, the folder's model)."""
    from tf_diffusion import StableDiffusion

    with np.load(SCALED_FILE.with_suffix(".npz")) as data:
        expected = dict(data)
    return SCALED_FILE, expected, StableDiffusion.from_pretrained(FOLDER, load_t5=False)


def test_scaled_fp8_weights_load_dequantized_as_torch_computes_them(scaled_file):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.weights.state_dict import state_dict

    path, expected, source = scaled_file
    # The folder gives the tiny tokenizers only: every weight named below is in the file.
    sd = StableDiffusion.from_pretrained(path, load_t5=False, config=source.config, text_encoders_from=FOLDER)
    assert sd.text_encoder_3 is None
    loaded = {p + k: v for name, p in PREFIXES.items() for k, v in state_dict(getattr(sd, name)).items()}
    assert len(expected) > 10
    for key, want in expected.items():
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)  # float32 products: bit for bit
    # The float8 rounding is real (the weights moved), and unscaled tensors arrived as they were.
    key = next(iter(expected))
    original = state_dict(source.transformer)[key[len(PREFIXES["transformer"]) :]]
    assert 0 < np.abs(loaded[key] - original).max() < 0.1 * np.abs(original).max()
    vae_key = next(iter(state_dict(source.vae)))
    np.testing.assert_array_equal(loaded["first_stage_model." + vae_key], state_dict(source.vae)[vae_key])


def test_info_reports_scaled_fp8(scaled_file):
    from tf_diffusion.family_hooks import describe_source

    path, expected, _ = scaled_file
    info = describe_source(path)
    assert info["family"] == "sd3"
    assert any(f"scaled fp8 (ComfyUI): {len(expected)} float8 weights" in note for note in info["notes"])
    assert "float8_e4m3fn" in info["transformer"] and not any("keys outside" in n for n in info["notes"])


def test_a_scale_without_its_weight_is_refused():
    from tf_diffusion.weights.scaled_fp8 import dequantize_scaled_fp8

    scale = np.ones((), np.float32)
    with pytest.raises(ValueError, match=r"f.safetensors: a.scale_weight scales no weight \(no a.weight"):
        dequantize_scaled_fp8({"a.scale_weight": scale}, "f.safetensors")
    with pytest.raises(ValueError, match=r"a.weight: its scale_weight has shape \(2,\); expected one number"):
        dequantize_scaled_fp8({"a.weight": np.ones((2, 2)), "a.scale_weight": np.ones(2)}, "f")["a.weight"]


def test_convert_writes_the_dequantized_weights(scaled_file, tmp_path):
    """``tf-diffusion convert`` of a scaled file: a diffusers folder, and back a single file, holding torch's
    dequantized float32 weights and no scale tensors."""
    from tf_diffusion.weights.safetensors_io import load_safetensors
    from tf_diffusion.weights.sd3_convert import convert_sd3

    path, expected, _ = scaled_file
    convert_sd3(path, tmp_path / "out", format="diffusers", config=FOLDER)
    convert_sd3(tmp_path / "out", tmp_path / "back.safetensors", format="single-file")
    back = load_safetensors(tmp_path / "back.safetensors")
    assert not [k for k in back if "scale" in k]
    for key, want in expected.items():
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], want, err_msg=key)
