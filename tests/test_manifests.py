"""Full-size architectures: parameter counts and key manifests equal the reference models.

The manifests (checkpoint key -> torch shape) were written by tools/make_manifests.py from
the original CompVis LDM code (UNet, VAE) and transformers' CLIPTextModel (text encoders).
Models are built without allocating their variables, so this stays cheap.
"""

import json

import pytest

from tf_diffusion import PRESETS
from tf_diffusion.weights import count_parameters, manifest
from tf_diffusion.weights.state_dict import build_abstract

# Parameter counts of the reference models (diffusers / original checkpoints).
REFERENCE_COUNTS = {
    "sd-v1-5": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd-v1-5-inpainting": {"unet": 859_535_364, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd-v2-1-base": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sd-v2-1": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sd-v2-inpainting": {"unet": 865_925_124, "text_encoder": 340_387_840, "vae": 83_653_863},
}
REAL_PRESETS = sorted(REFERENCE_COUNTS)


def abstract_models(config):
    """The three networks of a preset with shapes only (variables never allocated)."""
    from tf_diffusion.clip import CLIPTextEncoder
    from tf_diffusion.unet import UNetModel
    from tf_diffusion.vae import AutoencoderKL

    return build_abstract(
        lambda: {
            "unet": UNetModel(config.unet),
            "text_encoder": CLIPTextEncoder(config.text_encoder),
            "vae": AutoencoderKL(config.vae),
        }
    )


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_full_size_parameter_counts(name):
    models = abstract_models(PRESETS[name])
    counts = {part: count_parameters(model) for part, model in models.items()}
    assert counts == REFERENCE_COUNTS[name]


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_full_size_keys_and_shapes_match_reference(name, fixtures_dir):
    reference = json.loads((fixtures_dir / "manifests" / f"{name}.json").read_text())
    models = abstract_models(PRESETS[name])
    for part, model in models.items():
        ours = {k: list(v) for k, v in manifest(model).items()}
        want = reference[part]
        assert sorted(set(want) - set(ours)) == [], f"{part}: keys missing from our model"
        assert sorted(set(ours) - set(want)) == [], f"{part}: keys the reference does not have"
        bad = {k: (ours[k], want[k]) for k in want if ours[k] != want[k]}
        assert bad == {}, f"{part}: shapes differ (ours, reference)"


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_every_checkpoint_weight_is_a_tracked_keras_variable(name):
    """What the key walker loads is what Keras saves, exports and trains (``model.variables``)."""
    from tf_diffusion.weights.state_dict import named_parameters

    for part, model in abstract_models(PRESETS[name]).items():
        tracked = {id(v) for v in model.variables}
        params = named_parameters(model)
        untracked = [k for k, (layer, attr) in params.items() if id(getattr(layer, attr)) not in tracked]
        assert not untracked, (part, len(untracked), untracked[:5])
        assert len(model.variables) == len(params), part
