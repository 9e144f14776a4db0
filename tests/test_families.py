"""The family registry (tf_diffusion.families): its entries agree with the presets and each other.

Detection of every fixture checkpoint by the registry is tested where those fixtures are read
(tests/test_loading*.py, tests/test_loading_keras_cv.py, tests/test_ckpt.py).
"""

import pytest

from tf_diffusion.families import (
    COMPONENTS,
    FAMILIES,
    components_of,
    diffusers_pipeline_classes,
    family_of_config,
    family_of_keras_cv,
    get_family,
    text_encoder_prefixes,
)
from tf_diffusion.presets import PRESETS


# SD3's entry (an MMDiT family with its own presets) is checked in tests/test_sd3.py.
@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if f.backbone == "unet"))
def test_family_presets_are_of_the_family(name):
    family = FAMILIES[name]
    assert family.base_preset in family.presets
    for preset in family.presets:
        assert family_of_config(PRESETS[preset]) is family, preset
        assert PRESETS[preset].unet.in_channels == family.unet_in_channels
        encoders = [e for e in (PRESETS[preset].text_encoder, PRESETS[preset].text_encoder_2) if e]
        assert PRESETS[preset].unet.context_dim in (family.context_dim, sum(e.hidden_size for e in encoders))
        assert components_of(PRESETS[preset]) == family.components
    assert set(family.prefixes) == set(family.components)
    expected = "infer_sdxl_config" if family.is_sdxl else "infer_sd_config"
    assert family.config_inference().__name__ == expected
    if not family.is_sdxl:
        assert family.components == COMPONENTS


def test_every_preset_has_one_family():
    owners = {p: [f.name for f in FAMILIES.values() if p in f.presets] for p in PRESETS}
    assert all(len(v) == 1 for v in owners.values()), owners


def test_lookups():
    # diffusers' pipeline classes for SD 1.x / 2.x folders; the first is the one written.
    assert diffusers_pipeline_classes() == (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionInpaintPipelineLegacy",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    assert FAMILIES["sd1-inpainting"].diffusers_pipelines[0] == "StableDiffusionInpaintPipeline"
    assert text_encoder_prefixes() == {
        "clip": "cond_stage_model.transformer.",
        "openclip": "cond_stage_model.model.",
    }
    assert family_of_keras_cv("StableDiffusionV2").name == "sd2"
    assert family_of_keras_cv("StableDiffusion").name == "sd1"
    with pytest.raises(ValueError, match="StableDiffusionXL"):
        family_of_keras_cv("StableDiffusionXL")
    with pytest.raises(ValueError, match="'flux2'.*known families"):
        get_family("flux2")
    assert get_family("flux").backbone == "flux" and get_family("flux").presets == (
        "flux1-dev",
        "flux1-schnell",
    )
    assert get_family("sdxl").prefixes["text_encoder_2"] == "conditioner.embedders.1.model."
    assert get_family("sdxl-refiner").prefixes["text_encoder_2"] == "conditioner.embedders.0.model."
