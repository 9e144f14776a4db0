"""SDXL: components against diffusers / transformers, full-size counts and key manifests.

Fixtures come from tools/make_fixtures_sdxl.py: a tiny ``StableDiffusionXLPipeline`` saved by
diffusers (tests/fixtures/sdxl/sdxl-diffusers), the UNet of diffusers' own SDXL tests (weights
redrawn here from its key shapes and seed), reference outputs, and full-size manifests built on
torch's meta device.
"""

import json

import numpy as np
import pytest

from tf_diffusion import PRESETS
from tf_diffusion.clip import CLIPTextEncoder
from tf_diffusion.config import UNetConfig
from tf_diffusion.testing import random_state_dict
from tf_diffusion.unet import UNetModel
from tf_diffusion.weights import count_parameters, manifest
from tf_diffusion.weights.diffusers_configs import clip_config_from_transformers
from tf_diffusion.weights.diffusers_unet import convert_diffusers_unet_state_dict, unet_config_from_diffusers
from tf_diffusion.weights.safetensors_io import load_safetensors
from tf_diffusion.weights.state_dict import build_abstract, load_state_dict

FLOAT32_TOL = 1e-4

# Parameter counts of the reference models (diffusers / transformers classes from the published configs).
REFERENCE_COUNTS = {
    "sdxl-base-1.0": {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    },
    "sdxl-refiner-1.0": {"unet": 2_259_526_660, "text_encoder_2": 694_659_840, "vae": 83_653_863},
}


@pytest.fixture(scope="module")
def sdxl_dir(request):
    from tests.conftest import FIXTURES

    return FIXTURES / "sdxl"


@pytest.fixture(scope="module")
def reference(sdxl_dir):
    with np.load(sdxl_dir / "reference.npz") as data:
        return dict(data)


def abstract_models(config):
    from tf_diffusion.vae import AutoencoderKL

    def build():
        models = {"unet": UNetModel(config.unet), "vae": AutoencoderKL(config.vae)}
        if config.text_encoder is not None:
            models["text_encoder"] = CLIPTextEncoder(config.text_encoder)
        models["text_encoder_2"] = CLIPTextEncoder(config.text_encoder_2)
        return models

    return build_abstract(build)


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_full_size_counts_keys_and_shapes_match_reference(name, fixtures_dir):
    reference = json.loads((fixtures_dir / "manifests" / f"{name}.json").read_text())
    models = abstract_models(PRESETS[name])
    assert {part: count_parameters(m) for part, m in models.items()} == REFERENCE_COUNTS[name]
    assert reference["counts"] == REFERENCE_COUNTS[name]
    for part, model in models.items():
        ours = {k: list(v) for k, v in manifest(model).items()}
        want = reference[part]
        assert sorted(set(want) - set(ours)) == [], f"{part}: keys missing from our model"
        assert sorted(set(ours) - set(want)) == [], f"{part}: keys the reference does not have"
        assert {k: (ours[k], want[k]) for k in want if ours[k] != want[k]} == {}, part


def test_sdxl_unet_config_translates_from_diffusers(fixtures_dir):
    config = json.loads((fixtures_dir / "sdxl" / "sdxl-diffusers" / "unet" / "config.json").read_text())
    cfg = unet_config_from_diffusers(config)
    # diffusers gives the attention-free level depth 1; the original layout has no transformer there.
    assert cfg.transformer_depth == (0, 2, 3)
    assert (cfg.adm_in_channels, cfg.addition_time_embed_dim, cfg.head_dim) == (80, 8, 4)
    full = dict(config, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20])
    full.update(transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, norm_num_groups=32)
    full.update(layers_per_block=2)
    full.update(projection_class_embeddings_input_dim=2816, addition_time_embed_dim=256)
    assert unet_config_from_diffusers(full) == PRESETS["sdxl-base-1.0"].unet


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(transformer_depth=(1, 2)), "one per level"),
        (dict(transformer_depth=(1, 0, 2)), "gives level 1 no transformer block"),
        (dict(transformer_depth=0), "positive integer"),
        (dict(adm_in_channels=0), "adm_in_channels"),
    ],
)
def test_unet_config_rejects_bad_depths(changes, message):
    base = dict(channel_mult=(1, 2, 2), attention_levels=(False, True, True), head_dim=8, num_heads=None)
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**base, **changes})


# ------------------------------------------------------------------ UNet parity


def _unet_from(config_dict: dict, tensors: dict) -> UNetModel:
    cfg = unet_config_from_diffusers(config_dict)
    model = UNetModel(cfg)
    load_state_dict(model, convert_diffusers_unet_state_dict(tensors, cfg))
    return model


@pytest.fixture(scope="module")
def unets(sdxl_dir):
    folder = sdxl_dir / "sdxl-diffusers" / "unet"
    ours = _unet_from(
        json.loads((folder / "config.json").read_text()),
        load_safetensors(folder / "diffusion_pytorch_model.safetensors"),
    )
    test = json.loads((sdxl_dir / "unet_diffusers_test.json").read_text())
    shapes = {k: tuple(v) for k, v in test["shapes"].items()}
    diffusers_test = _unet_from(test["config"], random_state_dict(shapes, test["seed"]))
    return {"unet": ours, "unet_test": diffusers_test}


@pytest.mark.parametrize("name", ["unet", "unet_test"])
def test_unet_added_conditioning_matches_diffusers(name, unets, reference):
    r = {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith(f"{name}/")}
    out = np.asarray(
        unets[name](
            r["x"], np.array([10.0, 500.0], np.float32), r["context"], r["text_embeds"], r["time_ids"]
        )
    )
    err = float(np.abs(out - r["out"]).max())
    print(f"{name}: max abs error {err:.2e}")
    assert out.shape == r["out"].shape
    assert err <= FLOAT32_TOL


def test_unet_added_conditioning_errors(unets, reference):
    unet = unets["unet"]
    x, ctx = reference["unet/x"], reference["unet/context"]
    with pytest.raises(ValueError, match="needs text_embeds"):
        unet(x, 10, ctx)
    with pytest.raises(ValueError, match="adm_in_channels=80"):
        unet(x, 10, ctx, reference["unet/text_embeds"], reference["unet/time_ids"][:, :5])
    plain = UNetModel(UNetConfig(model_channels=8, channel_mult=(1,), attention_levels=(True,), num_heads=2,
                                 context_dim=8, norm_groups=4))  # fmt: skip
    with pytest.raises(ValueError, match="no added conditioning"):
        plain(np.zeros((1, 4, 4, 4), np.float32), 1, np.zeros((1, 3, 8), np.float32), np.zeros((1, 2)), None)


# ------------------------------------------------------------- text encoders


@pytest.fixture(scope="module")
def text_encoders(sdxl_dir):
    out = {}
    for sub in ("text_encoder", "text_encoder_2"):
        folder = sdxl_dir / "sdxl-diffusers" / sub
        encoder = CLIPTextEncoder(
            clip_config_from_transformers(json.loads((folder / "config.json").read_text()))
        )
        tensors = load_safetensors(folder / "model.safetensors")
        # transformers 5 writes CLIPTextModel keys without the `text_model.` level.
        tensors = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                   for k, v in tensors.items()}  # fmt: skip
        load_state_dict(encoder, tensors)
        out[sub] = encoder
    return out


def test_projection_config_is_read():
    cfg = clip_config_from_transformers({"hidden_size": 32, "projection_dim": 16, "num_attention_heads": 4})
    assert cfg.projection_dim is None  # a plain CLIPTextModel config: projection_dim is not used
    cfg = clip_config_from_transformers(
        {
            "hidden_size": 32,
            "projection_dim": 16,
            "num_attention_heads": 4,
            "architectures": ["CLIPTextModelWithProjection"],
        }
    )
    assert cfg.projection_dim == 16


def test_text_encoders_match_transformers(text_encoders, reference):
    hidden = np.asarray(text_encoders["text_encoder"](reference["ids"], clip_skip=1, final_norm=False))
    err1 = float(np.abs(hidden - reference["text_encoder/penultimate"]).max())
    last = np.asarray(text_encoders["text_encoder"](reference["ids"]))
    err_last = float(np.abs(last - reference["text_encoder/last"]).max())
    hidden2, pooled = text_encoders["text_encoder_2"](
        reference["ids_2"], clip_skip=1, final_norm=False, pooled=True
    )
    err2 = float(np.abs(np.asarray(hidden2) - reference["text_encoder_2/penultimate"]).max())
    err_pooled = float(np.abs(np.asarray(pooled) - reference["text_encoder_2/text_embeds"]).max())
    print(
        f"CLIP-L penultimate {err1:.2e}, last {err_last:.2e}; bigG penultimate {err2:.2e}, pooled {err_pooled:.2e}"
    )
    for err in (err1, err_last, err2, err_pooled):
        assert err <= FLOAT32_TOL
    with pytest.raises(ValueError, match="projection"):
        text_encoders["text_encoder"](reference["ids"], pooled=True)


# ------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def sd(sdxl_dir):
    from tf_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(sdxl_dir / "sdxl-diffusers")


def test_diffusers_folder_loads_as_sdxl(sd):
    report = sd.load_report
    assert report.family == "sdxl"
    assert sorted(report.parameters) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    cfg = sd.config
    assert cfg.force_zeros_for_empty_prompt and not cfg.requires_aesthetics_score
    assert (cfg.text_encoder_2.projection_dim, cfg.unet.context_dim, cfg.vae.scaling_factor) == (
        32,
        72,
        0.13025,
    )
    assert (sd.tokenizer.config.pad_token_id, sd.tokenizer_2.config.pad_token_id) == (1113, 0)
    assert cfg.default_sampler == "euler"


def test_single_file_is_detected_and_holds_the_folders_weights(sd, sdxl_dir):
    from tf_diffusion.weights.loading import load_pipeline_weights

    path = sdxl_dir / "sdxl.safetensors"
    with load_pipeline_weights(path, config=sdxl_dir / "sdxl-diffusers") as weights:
        assert weights.report.family == "sdxl"
        assert weights.report.problems == []
        assert weights.config.unet == sd.config.unet
        assert weights.config.text_encoder_2 == sd.config.text_encoder_2
        from tf_diffusion.weights.state_dict import state_dict

        for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
            ours = state_dict(getattr(sd, name))
            theirs = weights.components[name]
            assert sorted(ours) == sorted(theirs), name
            bad = [k for k in ours if not np.array_equal(ours[k], np.asarray(theirs[k]))]
            assert bad == [], (name, bad[:3])
    # Without a config the family and the architecture's shape come from the weights (the tiny
    # vocabulary's tokenizer still has to be given).
    with load_pipeline_weights(path, tokenizer=sdxl_dir / "sdxl-diffusers" / "tokenizer") as weights:
        assert weights.report.family == "sdxl"
        unet = weights.config.unet
        assert (unet.transformer_depth, unet.adm_in_channels, unet.context_dim) == ((0, 2, 3), 80, 72)


def test_sdxl_file_forced_into_an_sd1_preset_names_both(sdxl_dir):
    from tf_diffusion import StableDiffusion

    with pytest.raises(ValueError, match=r"SDXL .*sd1.*|sd1.*SDXL") as info:
        StableDiffusion.from_pretrained(sdxl_dir / "sdxl.safetensors", config="sd-v1-5")
    assert "sdxl" in str(info.value) and "sd-v1-5" in str(info.value)


# ------------------------------------------------------------ conditioning


def test_prompt_encoding_matches_diffusers_encoders(sd, reference):
    from tf_diffusion import sdxl

    prompts = ["a photo of a cat", "a red car on the street at night"]
    context, pooled = sdxl.encode_prompts(sd, prompts, sd.executor)
    want = np.concatenate(
        [reference["text_encoder/penultimate"], reference["text_encoder_2/penultimate"]], -1
    )
    assert context.shape == want.shape
    assert float(np.abs(context - want).max()) <= FLOAT32_TOL
    assert float(np.abs(pooled - reference["text_encoder_2/text_embeds"]).max()) <= FLOAT32_TOL


def test_conditioning_bundle(sd):
    from tf_diffusion import sdxl

    kwargs = dict(guided=True, num_images=2, height=16, width=24, executor=sd.executor)
    cond, uncond = sdxl.text_conditioning(sd, ["a cat"], [""], negatives_given=False, **kwargs)
    assert cond.context.shape == (2, 77, 72) and cond.extras["text_embeds"].shape == (2, 32)
    np.testing.assert_array_equal(cond.extras["time_ids"], [[16, 24, 0, 0, 16, 24]] * 2)
    # force_zeros_for_empty_prompt: no negative prompt given -> zeros, as diffusers.
    assert not uncond.context.any() and not uncond.extras["text_embeds"].any()
    _, given = sdxl.text_conditioning(sd, ["a cat"], [""], negatives_given=True, **kwargs)
    assert given.context.any() and given.extras["text_embeds"].any()


def test_refiner_needs_an_image():
    from tf_diffusion.config import CLIPTextConfig, PipelineConfig, TokenizerConfig, VAEConfig
    from tf_diffusion.pipeline import StableDiffusion

    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), attention_levels=(False, True), num_heads=None,
                      head_dim=4, context_dim=16, norm_groups=4, use_linear_projection=True,
                      adm_in_channels=8 + 5 * 8, addition_time_embed_dim=8)  # fmt: skip
    config = PipelineConfig(
        name="tiny-refiner", text_encoder=None, text_encoder_2=CLIPTextConfig(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, projection_dim=8),
        tokenizer_2=TokenizerConfig(pad_token_id=0), unet=unet,
        vae=VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4),
        requires_aesthetics_score=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="refiner .*pass image"):
        StableDiffusion(config).generate("a cat", num_steps=1, height=16, width=16, progress=False)


# ------------------------------------------------------- generate parity (slow)

PIPELINE_TOL = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("run", ["euler", "dpmpp_2m_karras", "euler_two"])
def test_generate_matches_stable_diffusion_xl_pipeline(run, sd, sdxl_dir, reference):
    meta = json.loads((sdxl_dir / "meta.json").read_text())
    case = next(r for r in meta["runs"] if r["name"] == run)
    out = sd.generate(
        case["prompt"],
        case["negative_prompt"],
        num_steps=case["steps"],
        guidance_scale=case["guidance"],
        height=case["height"],
        width=case["width"],
        latents=reference[f"run/{run}/latents"],
        scheduler=case["scheduler"],
        output_type="float",
        progress=False,
    )
    want = reference[f"run/{run}/images"]
    err = float(np.abs(np.asarray(out) - want).max())
    print(f"{run}: max abs error {err:.2e}")
    assert out.shape == want.shape
    assert err <= PIPELINE_TOL


# ------------------------------------------------------- convert


def _json_without_versions(path):
    data = json.loads(path.read_text())
    drop = (
        "_diffusers_version",
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_commit_hash",
    )
    return {k: v for k, v in data.items() if k not in drop}


@pytest.mark.parametrize("name", ["sdxl-diffusers", "sdxl-refiner-diffusers"])
def test_convert_round_trips_are_bit_identical(name, sdxl_dir, tmp_path):
    """diffusers folder -> single file -> diffusers folder -> tf_diffusion folder -> single file: the
    two single files are the same tensors; the written diffusers folder is laid out as diffusers' own
    (model_index.json and every component config, base and refiner) and reads back to the same config."""
    from safetensors.numpy import load_file

    from tf_diffusion.cli import main
    from tf_diffusion.weights.diffusers_folder import read_diffusers_config

    src = sdxl_dir / name
    first, folder, ours, last = (
        tmp_path / "a.safetensors",
        tmp_path / "b",
        tmp_path / "c",
        tmp_path / "d.safetensors",
    )
    steps = [
        ["convert", str(src), str(first), "--to", "single-file"],
        ["convert", str(first), str(folder), "--to", "diffusers", "--config", str(src)],
        ["convert", str(folder), str(ours), "--to", "tf_diffusion"],
        ["convert", str(ours), str(last), "--to", "single-file"],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    a, d = load_file(first), load_file(last)
    assert sorted(a) == sorted(d)
    assert all(a[k].dtype == d[k].dtype and np.array_equal(a[k], d[k]) for k in a)
    if name == "sdxl-diffusers":  # diffusers' own single-file layout of the same weights
        ref = load_file(sdxl_dir / "sdxl.safetensors")
        assert sorted(ref) == sorted(a) and all(np.array_equal(ref[k], a[k]) for k in ref)
    index, want = (
        _json_without_versions(folder / "model_index.json"),
        _json_without_versions(src / "model_index.json"),
    )
    # diffusers writes the optional components it was given as nulls; we write none of them.
    optional = ("feature_extractor", "image_encoder", "add_watermarker")
    assert index == {k: v for k, v in want.items() if k not in optional}
    for component in ("unet", "vae", "text_encoder_2"):
        want = _json_without_versions(src / component / "config.json")
        got = _json_without_versions(folder / component / "config.json")
        assert {k: got.get(k) for k in want if k in got} == {k: want[k] for k in want if k in got}, component
    assert (folder / "text_encoder").is_dir() == (src / "text_encoder").is_dir()
    import dataclasses

    written, original = read_diffusers_config(folder)[0], read_diffusers_config(src)[0]
    assert written == dataclasses.replace(original, name=written.name)


# ------------------------------------------------------- export


def test_serving_module_equals_generate(sd):
    """The SavedModel's serving function for SDXL (both tokenizers in the graph, the pooled embedding
    and the default time ids as generate() makes them): the image generate() gives from the same seed,
    with and without a negative prompt (none: zeros, as force_zeros_for_empty_prompt says)."""
    import tensorflow as tf

    from tf_diffusion.export import build_serving_module

    module, signatures = build_serving_module(sd, sampler="euler", num_steps=3, height=16, width=16)
    assert module.metadata["context_shape"] == [77, sd.config.unet.context_dim]
    prompts, negatives, seeds, guidance = (
        ["a photo of a cat", "a red car"],
        ["", "blurry"],
        [5, 6],
        [5.0, 4.0],
    )
    served = signatures["serving_default"](
        prompt=tf.constant(prompts),
        negative_prompt=tf.constant(negatives),
        seed=tf.constant(seeds, tf.int64),
        guidance_scale=tf.constant(guidance),
    )["images"].numpy()
    for row in range(2):
        ours = sd.generate(
            prompts[row],
            negatives[row] or None,
            seed=seeds[row],
            guidance_scale=guidance[row],
            scheduler="euler",
            num_steps=3,
            height=16,
            width=16,
            progress=False,
            jit_compile=False,
        )
        assert np.abs(served[row].astype(int) - ours[0].astype(int)).max() <= 2, row
    text = signatures["encode_text"](prompt=tf.constant(prompts))
    from tf_diffusion import sdxl

    context, pooled = sdxl.encode_prompts(sd, prompts, sd.executor)
    assert np.abs(text["hidden"].numpy() - context).max() <= 1e-5
    assert np.abs(text["pooled"].numpy() - pooled).max() <= 1e-5


def test_refiner_export_is_refused(sdxl_dir):
    from tf_diffusion import StableDiffusion
    from tf_diffusion.export import build_serving_module

    refiner = StableDiffusion.from_pretrained(sdxl_dir / "sdxl-refiner-diffusers")
    with pytest.raises(ValueError, match="SDXL refiner .* export supports text-to-image"):
        build_serving_module(refiner)


@pytest.mark.slow  # the same graph as above, through the disk and tf.saved_model.load
def test_saved_model_round_trip(sd, tmp_path):
    import tensorflow as tf

    from tf_diffusion.export import export_saved_model, read_metadata

    export_saved_model(sd, tmp_path / "sdxl", sampler="euler", num_steps=3, height=16, width=16)
    version = tmp_path / "sdxl" / "1"
    assert read_metadata(version)["pooled_shape"] == [sd.config.text_encoder_2.projection_dim]
    loaded = tf.saved_model.load(str(version))
    out = loaded.signatures["serving_default"](
        prompt=tf.constant(["a photo of a cat"]),
        negative_prompt=tf.constant([""]),
        seed=tf.constant([5], tf.int64),
        guidance_scale=tf.constant([5.0]),
    )["images"].numpy()
    ours = sd.generate("a photo of a cat", seed=5, guidance_scale=5.0, scheduler="euler", num_steps=3,
                       height=16, width=16, progress=False, jit_compile=False)  # fmt: skip
    assert np.abs(out[0].astype(int) - ours[0].astype(int)).max() <= 2
