"""ControlNet: the model, its file formats and generate() against diffusers.

tools/make_fixtures_controlnet.py ran diffusers' ControlNetModel on tiny random configs (weights
from ``random_state_dict``, redrawn here) and StableDiffusionControlNetPipeline on the tiny SD
components of tools/make_fixtures_pipeline.py; it also wrote original-format single files, whose
key names diffusers' own single-file converter maps back onto every diffusers key.
"""

import functools
import json
import logging
import pathlib

import numpy as np
import pytest

from tf_diffusion.testing import random_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "controlnet"
COMPONENT_TOLERANCE = 1e-4
PIPELINE_TOLERANCE = 1e-3


@functools.lru_cache(maxsize=1)
def cases():
    return json.loads((FIXTURES / "cases.json").read_text())


def diffusers_weights(name):
    meta = cases()[name]
    return random_state_dict({k: tuple(v) for k, v in meta["shapes"].items()}, meta["seed"])


@functools.lru_cache(maxsize=8)
def net(name):
    """Our ControlNet with the fixture's weights, through the diffusers rename."""
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import load_state_dict
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers, convert_diffusers_controlnet

    config = controlnet_config_from_diffusers(cases()[name]["config"])
    model = ControlNet(config)
    load_state_dict(model, convert_diffusers_controlnet(diffusers_weights(name), config))
    return model


def run(model, arrays, scale=0.7, guess=False):
    from tf_diffusion.adapters.controlnet import scaled_residuals

    extra = {}
    if "text_embeds" in arrays:
        extra = {"text_embeds": arrays["text_embeds"], "time_ids": arrays["time_ids"]}
    down, mid = model(arrays["latents"], arrays["timesteps"], arrays["context"], arrays["hint"], **extra)
    down, mid = scaled_residuals(model, down, mid, np.float32(scale), guess)
    return [np.asarray(d) for d in down], np.asarray(mid)


def max_error(ours, arrays, tag):
    down, mid = ours
    count = len([k for k in arrays if k.startswith(f"{tag}.down.")])
    assert len(down) == count
    errors = [float(np.max(np.abs(d - arrays[f"{tag}.down.{i}"]))) for i, d in enumerate(down)]
    errors.append(float(np.max(np.abs(mid - arrays[f"{tag}.mid"]))))
    return max(errors)


@pytest.mark.parametrize("name", ["tiny", "tiny_original", "sdxl"])
@pytest.mark.parametrize("guess", [False, True])
def test_residuals_match_diffusers(name, guess):
    arrays = dict(np.load(FIXTURES / f"{name}.npz"))
    tag = "guess" if guess else "plain"
    err = max_error(run(net(name), arrays, guess=guess), arrays, tag)
    assert err <= COMPONENT_TOLERANCE, f"{name} {tag}: max abs error {err:.2e}"
    # The residuals are not trivially small: a wrong weight would show.
    assert float(np.max(np.abs(arrays[f"{tag}.mid"]))) > 0.05


def test_full_size_sd15_count_and_keys():
    """The full-size SD1.5 ControlNet (control_v11p_sd15_*) has diffusers' keys, shapes and count."""
    from tf_diffusion.controlnet import ControlNet
    from tf_diffusion.weights import count_parameters, manifest
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers, convert_diffusers_controlnet
    from tf_diffusion.weights.state_dict import build_abstract

    reference = json.loads((FIXTURES / "sd15_manifest.json").read_text())
    config = controlnet_config_from_diffusers(reference["config"])
    model = build_abstract(lambda: ControlNet(config))
    assert count_parameters(model) == 361_279_120
    want = {k: list(v) for k, v in convert_diffusers_controlnet(reference["shapes"], config).items()}
    ours = {k: list(v) for k, v in manifest(model).items()}
    assert sorted(set(want) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}


# ------------------------------------------------------------------ formats


def original_config():
    """The tiny original net's architecture (single files store neither heads nor norm groups)."""
    from tf_diffusion.weights.controlnet import controlnet_config_from_diffusers

    return controlnet_config_from_diffusers(cases()["tiny_original"]["config"])


def assert_original_outputs(model):
    arrays = dict(np.load(FIXTURES / "tiny_original.npz"))
    err = max_error(run(model, arrays), arrays, "plain")
    assert err <= COMPONENT_TOLERANCE, f"max abs error {err:.2e}"


def test_diffusers_folder(tmp_path):
    """A ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) loads by from_pretrained."""
    import tf_diffusion
    from tf_diffusion.weights.safetensors_io import save_safetensors

    folder = tmp_path / "controlnet"
    folder.mkdir()
    config = dict(cases()["tiny_original"]["config"], _class_name="ControlNetModel")
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(diffusers_weights("tiny_original"), str(folder / "diffusion_pytorch_model.safetensors"))
    assert_original_outputs(tf_diffusion.ControlNet.from_pretrained(folder))


def test_original_safetensors():
    import tf_diffusion

    model = tf_diffusion.ControlNet.from_pretrained(FIXTURES / "tiny_original.safetensors", config=original_config())
    assert_original_outputs(model)


def test_original_safetensors_infers_the_architecture():
    """Without a config the blocks, widths, context and hint encoder come from the shapes."""
    import tf_diffusion

    model = tf_diffusion.ControlNet.from_pretrained(FIXTURES / "tiny_original.safetensors")
    want, got = original_config(), model.config
    assert got.hint_channels == want.hint_channels == (16, 32, 96, 256)
    for field in ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "context_dim"):
        assert getattr(got.unet, field) == getattr(want.unet, field), field


def reference_variables(model):
    from tf_diffusion.weights import state_dict

    return state_dict(model)


def test_original_pth_and_whole_sd_file(caplog):
    """.pth through the safe unpickler (float16 copies of the same weights); a control_sd15-style
    file with a whole SD model besides: its control_model part is used, and a warning says so."""
    import tf_diffusion

    base = reference_variables(
        tf_diffusion.ControlNet.from_pretrained(FIXTURES / "tiny_original.safetensors", config=original_config())
    )
    pth = tf_diffusion.ControlNet.from_pretrained(FIXTURES / "tiny_original.pth", config=original_config())
    with caplog.at_level(logging.WARNING, logger="tf_diffusion.weights.controlnet"):
        whole = tf_diffusion.ControlNet.from_pretrained(
            FIXTURES / "tiny_control_sd15_whole.pth", config=original_config()
        )
    assert any("whole Stable Diffusion model" in r.getMessage() for r in caplog.records)
    for model in (pth, whole):
        got = reference_variables(model)
        assert sorted(got) == sorted(base)
        for k in base:
            np.testing.assert_allclose(got[k], base[k].astype(np.float16).astype(np.float32), rtol=0, atol=0)


def test_not_a_controlnet(tmp_path):
    import tf_diffusion
    from tf_diffusion.weights.safetensors_io import save_safetensors

    path = tmp_path / "unet.safetensors"
    save_safetensors({"model.diffusion_model.out.2.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a ControlNet"):
        tf_diffusion.ControlNet.from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        tf_diffusion.ControlNet.from_pretrained(tmp_path / "missing.safetensors")
