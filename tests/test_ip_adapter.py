"""IP-Adapter's image side against the reference: the CLIP vision encoder (transformers'
CLIPVisionModelWithProjection), its image preparation (CLIPImageProcessor), and the two image-
projection models (diffusers' ImageProjection and IPAdapterPlusImageProjection, loaded by diffusers'
own converter from state dicts in the published layout). tools/make_fixtures_ip_adapter.py wrote them.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.testing import random_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "ip_adapter"
TOLERANCE = 1e-4


@functools.lru_cache(maxsize=1)
def meta():
    return json.loads((FIXTURES / "meta.json").read_text())


@functools.lru_cache(maxsize=1)
def reference():
    return dict(np.load(FIXTURES / "reference.npz"))


def weights(name):
    m = meta()[name]
    return random_state_dict({k: tuple(v) for k, v in m["shapes"].items()}, m["seed"])


@functools.lru_cache(maxsize=1)
def vision():
    from tf_diffusion.clip_vision import CLIPVisionEncoder
    from tf_diffusion.config import CLIPVisionConfig
    from tf_diffusion.weights import load_state_dict

    config = meta()["vision"]["config"]
    model = CLIPVisionEncoder(CLIPVisionConfig(**config))
    load_state_dict(model, weights("vision"))
    return model


def test_image_inputs_match_clip_image_processor():
    from tf_diffusion.clip_vision import image_inputs

    ref = reference()
    ours = image_inputs([ref["pictures/0"], ref["pictures/1"]], size=30)
    assert ours.shape == ref["vision/pixels"].shape
    # Both resize through Pillow's bicubic filter: equal up to float rounding.
    assert float(np.max(np.abs(ours - ref["vision/pixels"]))) <= 1e-5


@pytest.mark.parametrize("output", ["image_embeds", "penultimate", "last_hidden_state"])
def test_vision_encoder_matches_transformers(output):
    ref = reference()
    got = np.asarray(vision()(ref["vision/pixels"], output=output))
    want = ref[f"vision/{output}"]
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)))
    print(f"CLIP vision {output}: max abs error {err:.2e}")
    assert err <= TOLERANCE


def test_vision_encoder_refuses_other_sizes():
    with pytest.raises(ValueError, match=r"this encoder takes \(30, 30, 3\)"):
        vision()(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="output='pooled' is not allowed"):
        vision()(reference()["vision/pixels"], output="pooled")


@pytest.mark.parametrize("name", ["image_proj", "resampler"])
def test_image_projections_match_diffusers(name):
    from tf_diffusion.ip_adapter import ImageProjModel, Resampler, infer_image_proj
    from tf_diffusion.weights import load_state_dict

    tensors = weights(name)
    model = infer_image_proj(tensors)  # the architecture from the shapes alone
    assert isinstance(model, ImageProjModel if name == "image_proj" else Resampler)
    assert {k: v for k, v in vars(model.config).items()} == meta()[name]["config"]
    load_state_dict(model, tensors)
    ref = reference()
    got = np.asarray(model(ref[f"{name}/input"]))
    want = ref[f"{name}/output"]
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)))
    print(f"{meta()[name]['diffusers_class']}: max abs error {err:.2e}")
    assert err <= TOLERANCE


def test_unknown_projection_is_refused():
    from tf_diffusion.ip_adapter import infer_image_proj

    with pytest.raises(ValueError, match="neither an ImageProjModel"):
        infer_image_proj({"perceiver_resampler.proj_in.weight": np.zeros((2, 2))})


@functools.lru_cache(maxsize=1)
def full_size():
    return json.loads((FIXTURES / "full_size.json").read_text())


def _same_manifest(model, shapes):
    from tf_diffusion.weights import manifest

    ours = {k: list(v) for k, v in manifest(model).items()}
    assert sorted(set(shapes) - set(ours)) == [], "keys missing from our model"
    assert sorted(set(ours) - set(shapes)) == [], "keys the reference does not have"
    assert {k: (ours[k], shapes[k]) for k in shapes if ours[k] != shapes[k]} == {}


def _tracked(model):
    """What the key walker loads is what Keras saves and exports (``model.variables``)."""
    from tf_diffusion.weights.state_dict import named_parameters

    tracked = {id(v) for v in model.variables}
    params = named_parameters(model)
    assert all(id(getattr(layer, attr)) in tracked for layer, attr in params.values())
    assert len(model.variables) == len(params)


@pytest.mark.parametrize("name", ["vit-h", "vit-bigg"])
def test_full_size_image_encoders_equal_transformers(name):
    from tf_diffusion.clip_vision import CLIPVisionEncoder
    from tf_diffusion.config import CLIPVisionConfig
    from tf_diffusion.weights import count_parameters
    from tf_diffusion.weights.state_dict import build_abstract

    ref = full_size()["encoders"][name]
    model = build_abstract(lambda: CLIPVisionEncoder(CLIPVisionConfig(**ref["config"])))
    assert count_parameters(model) == ref["parameters"]  # ViT-H/14: 632,076,800
    _same_manifest(model, ref["shapes"])
    _tracked(model)


@pytest.mark.parametrize("name", sorted(json.loads((FIXTURES / "full_size.json").read_text())["adapters"]))
def test_full_size_projections_equal_diffusers(name):
    from tf_diffusion.ip_adapter import infer_image_proj
    from tf_diffusion.weights import count_parameters
    from tf_diffusion.weights.state_dict import build_abstract

    ref = full_size()["adapters"][name]
    shapes = {k: _ShapeOnly(v) for k, v in ref["shapes"].items()}
    model = build_abstract(lambda: infer_image_proj(shapes))  # the architecture from the file's shapes
    assert {k: v for k, v in vars(model.config).items()} == ref["config"]
    assert count_parameters(model) == ref["parameters"]
    _same_manifest(model, ref["shapes"])
    _tracked(model)


class _ShapeOnly:
    def __init__(self, shape):
        self.shape = tuple(shape)
