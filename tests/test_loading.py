"""Every checkpoint format loads into StableDiffusion and reproduces the reference outputs.

tools/make_fixtures_checkpoints.py wrote tiny SD 1.x / SD 2.x / inpainting models with
diffusers (``save_pretrained``: safetensors, fp16 variant, torch pickles) and in the original
single-file layout (safetensors in float16 and bfloat16, a ``torch.save`` .ckpt with EMA
weights), checked each single file with diffusers' own single-file loader, and stored the
outputs of the diffusers / transformers components (float32). Weights are exact in float16
and bfloat16, so every file must reproduce the same outputs within the float32 tolerance.
"""

import dataclasses
import functools
import json

import numpy as np
import pytest

from tf_diffusion.config import PipelineConfig
from tf_diffusion.presets import PRESETS
from tf_diffusion.weights.lazy import LazyTensor
from tf_diffusion.weights.loading import LoadReport, detect_format, load_pipeline_weights
from tf_diffusion.weights.single_file import detect_family, infer_config, split_single_file, to_single_file

TOL = 1e-4  # float32 max abs error per component


@functools.lru_cache(maxsize=1)
def reference(path):
    with np.load(path / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def build(source, **kwargs):
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights.loading import from_pretrained

    return from_pretrained(StableDiffusion, source, **kwargs)


def run_components(sd, ref, family, x):
    import keras

    ids = ref["ids_sd2"] if family == "sd2" else ref["ids"]
    out = {
        "text": sd.text_encoder(ids),
        "unet": sd.unet(x, np.array([10.0, 500.0], np.float32), ref[f"{family}/context"]),
        "vae_mean": sd.vae.encode(ref["image"]).mean,
        "vae_decoded": sd.vae.decode(ref["latents"]),
    }
    return {k: keras.ops.convert_to_numpy(v).astype(np.float64) for k, v in out.items()}


def assert_matches(got, ref, family, unet_key=None):
    errors = {}
    for key in ("text", "unet", "vae_mean", "vae_decoded"):
        want = ref[unet_key] if key == "unet" and unet_key else ref[f"{family}/{key}"]
        assert got[key].shape == want.shape, key
        errors[key] = float(np.max(np.abs(got[key] - want)))
    assert max(errors.values()) <= TOL, errors
    return errors


CASES = {
    # name: (source, kwargs, family, reference key for the UNet output)
    "diffusers-safetensors-fp32": ("sd1-diffusers", {}, "sd1", None),
    "diffusers-fp16-variant": ("sd1-diffusers", {"variant": "fp16"}, "sd1", None),
    "diffusers-bin-fp16-sd2-v": ("sd2-diffusers", {}, "sd2", None),
    "single-safetensors-fp16": ("sd1.safetensors", {"config": "sd1-diffusers"}, "sd1", None),
    "single-ckpt-non-ema": ("sd1-full.ckpt", {"config": "sd1-diffusers"}, "sd1", None),
    "single-ckpt-ema": ("sd1-full.ckpt", {"config": "sd1-diffusers", "use_ema": True}, "sd1", "sd1/unet_ema"),
    "single-openclip-bf16": ("sd2.safetensors", {"config": "sd2-diffusers"}, "sd2", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_format_reproduces_reference(name, fixtures_dir):
    root = fixtures_dir / "checkpoints"
    source, kwargs, family, unet_key = CASES[name]
    if "config" in kwargs:
        kwargs = dict(kwargs, config=str(root / kwargs["config"]))
    ref = reference(root)
    sd = build(str(root / source), **kwargs)
    assert isinstance(sd.load_report, LoadReport)
    assert sd.load_report.family == family
    got = run_components(sd, ref, family, ref["x"])
    assert_matches(got, ref, family, unet_key)
    # The tokenizer that came with the weights gives the ids the reference used.
    ids = ref["ids_sd2"] if family == "sd2" else ref["ids"]
    np.testing.assert_array_equal(sd.tokenizer(json.loads((root / "meta.json").read_text())["prompts"]), ids)


def test_ema_weights_differ_and_are_chosen_on_request(fixtures_dir):
    root = fixtures_dir / "checkpoints"
    ref = reference(root)
    # The two UNet weight sets give different outputs, so the EMA test above cannot pass by accident.
    assert np.max(np.abs(ref["sd1/unet"] - ref["sd1/unet_ema"])) > 0.1
    with load_pipeline_weights(root / "sd1-full.ckpt", config=str(root / "sd1-diffusers")) as plain:
        assert plain.report.ema == "available"
        assert "use_ema=True" in str(plain.report)
        ignored = set(plain.report.ignored_keys)
        assert {"betas", "alphas_cumprod", "model_ema.decay", "model_ema.num_updates"} <= ignored
    with load_pipeline_weights(
        root / "sd1-full.ckpt", config=str(root / "sd1-diffusers"), use_ema=True
    ) as ema:
        assert ema.report.ema == "used"
        key = "input_blocks.1.1.proj_in.weight"
        assert not np.array_equal(
            np.asarray(plain.components["unet"][key]), np.asarray(ema.components["unet"][key])
        )


def test_inpainting_single_file(fixtures_dir):
    root = fixtures_dir / "checkpoints"
    ref = reference(root)
    with load_pipeline_weights(root / "sd1-diffusers") as base:
        unet = dataclasses.replace(base.config.unet, in_channels=9)
        config = base.config.replace(name="tiny-inpainting", unet=unet)
        tokenizer = base.tokenizer
    sd = build(str(root / "sd1-inpainting.safetensors"), config=config, tokenizer=tokenizer)
    assert sd.load_report.family == "sd1-inpainting"
    assert sd.config.is_inpainting
    got = run_components(sd, ref, "sd1", ref["x9"])
    assert_matches(got, ref, "sd1", "sd1-inpainting/unet")


def test_dtype_policy_is_applied(fixtures_dir):
    import keras

    root = fixtures_dir / "checkpoints"
    sd = build(str(root / "sd1-diffusers"), variant="fp16", dtype="float16")
    assert keras.backend.standardize_dtype(sd.unet.weights[0].dtype) == "float16"
    ref = reference(root)
    got = keras.ops.convert_to_numpy(sd.vae.decode(ref["latents"].astype(np.float16))).astype(np.float64)
    assert np.max(np.abs(got - ref["sd1/vae_decoded"])) < 0.05  # float16 compute


def test_detect_format(fixtures_dir):
    root = fixtures_dir / "checkpoints"
    assert detect_format(root / "sd1-diffusers") == "diffusers"
    assert detect_format(root / "sd1.safetensors") == "single-file (.safetensors)"
    assert detect_format(root / "sd1-full.ckpt") == "single-file (.ckpt)"


def test_prediction_type_sources(fixtures_dir, tmp_path):
    root = fixtures_dir / "checkpoints"
    # diffusers: from scheduler_config.json, and overridable.
    with load_pipeline_weights(root / "sd2-diffusers") as w:
        assert w.config.scheduler.prediction_type == "v_prediction"
        assert w.report.prediction_type_source == "scheduler/scheduler_config.json"
    with load_pipeline_weights(root / "sd2-diffusers", prediction_type="epsilon") as w:
        assert (w.config.scheduler.prediction_type, w.report.prediction_type_source) == (
            "epsilon",
            "argument",
        )
    # single file: an explicit argument wins over the config folder's scheduler.
    with load_pipeline_weights(
        root / "sd1.safetensors", config=str(root / "sd1-diffusers"), prediction_type="v_prediction"
    ) as w:
        assert w.config.scheduler.prediction_type == "v_prediction"
    # single file next to an LDM yaml that says parameterization: "v".
    link = tmp_path / "model.safetensors"
    link.symlink_to(root / "sd1.safetensors")
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    with load_pipeline_weights(link, strict=False) as w:
        assert w.report.prediction_type == "v_prediction"
        assert "model.yaml" in w.report.prediction_type_source


def fake_single_file(preset_name):
    """A full-size original checkpoint with the reference keys and shapes, values never read."""
    import pathlib

    path = pathlib.Path(__file__).parent / "fixtures" / "manifests" / f"{preset_name}.json"
    manifest = json.loads(path.read_text())

    def fake(shape):
        return LazyTensor(tuple(shape), np.float16, lambda: pytest.fail("a value was read"))

    components = {
        part: {
            ("text_model." + k if part == "text_encoder" and not k.startswith("text_model.") else k): fake(v)
            for k, v in keys.items()
        }
        for part, keys in manifest.items()
    }
    return to_single_file(components, PRESETS[preset_name])


@pytest.mark.parametrize(
    "preset,family,prediction_type",
    [
        ("sd-v1-5", "sd1", "epsilon"),
        ("sd-v1-5-inpainting", "sd1-inpainting", "epsilon"),
        ("sd-v2-1", "sd2", "v_prediction"),
        ("sd-v2-1-base", "sd2", "epsilon"),
        ("sd-v2-inpainting", "sd2-inpainting", "epsilon"),
    ],
)
def test_full_size_families_and_presets_detected_from_shapes(preset, family, prediction_type):
    parts = split_single_file(fake_single_file(preset))
    assert detect_family(parts) == family
    config = infer_config(parts, family, prediction_type)
    assert config == PRESETS[preset]
    if family.startswith("sd2"):
        # OpenCLIP: 24 resblocks in the file, the 24th (unused by SD 2.x) set aside.
        assert parts.openclip_layers == 24
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in parts.extras
        assert "cond_stage_model.model.text_projection" in parts.extras


def test_full_size_sd2_default_prediction_type_follows_diffusers(tmp_path):
    # A float16 SD 2.1 file without any hint is taken as v-prediction (768) as diffusers does.
    from tf_diffusion.weights.loading import _guess_prediction_type

    pred, why = _guess_prediction_type(tmp_path / "x.safetensors", "sd2", {})
    assert pred == "v_prediction" and why.startswith("assumed")
    pred, _ = _guess_prediction_type(tmp_path / "x.ckpt", "sd2", {"global_step": 875000})
    assert pred == "epsilon"
    assert _guess_prediction_type(tmp_path / "x.ckpt", "sd1", {})[0] == "epsilon"


def test_older_sd1_keys_without_text_model_level(fixtures_dir):
    from tf_diffusion.weights.safetensors_io import load_safetensors

    state = load_safetensors(fixtures_dir / "checkpoints" / "sd1.safetensors")
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in state.items()
    }
    assert any(k.startswith("cond_stage_model.transformer.encoder.") for k in old)
    parts = split_single_file(old)
    new = split_single_file(state)
    assert parts.components["text_encoder"].keys() == new.components["text_encoder"].keys()


def test_config_argument_forms(fixtures_dir):
    root = fixtures_dir / "checkpoints"
    with load_pipeline_weights(root / "sd1-diffusers") as w:
        config = w.config
    assert isinstance(config, PipelineConfig)
    with load_pipeline_weights(
        root / "sd1.safetensors", config=config, tokenizer=str(root / "sd1-diffusers" / "tokenizer")
    ) as w:
        assert w.config == config
        assert w.report.config_source == "the config argument"
