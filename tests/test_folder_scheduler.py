"""A diffusers folder's scheduler is the default sampler, as diffusers samples with it.

The tiny pipeline of tests/fixtures/pipeline (tools/make_fixtures_pipeline.py) is written as a
diffusers folder; its scheduler_config.json (and model_index.json's scheduler entry, which is
the class diffusers' from_pretrained instantiates) is set to a class and options, and the loaded
config's default sampler and scheduler options are checked. The parity cases put the
scheduler files diffusers' save_pretrained wrote into the folder and compare ``generate()``
without ``scheduler=`` against the images diffusers' ``from_pretrained(folder)`` pipeline made
(tools/make_fixtures_pipeline.py --folders), within the pipeline parity tolerance.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
from test_pipeline_parity import TOLERANCE, build, fixture

from tf_diffusion.noise import NoiseSource
from tf_diffusion.schedulers import get_sampler
from tf_diffusion.weights.loading import load_pipeline_weights

PIPELINE = pathlib.Path(__file__).parent / "fixtures" / "pipeline"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    sd = build(PIPELINE, False, "epsilon")
    return sd.save_pretrained(tmp_path_factory.mktemp("folder") / "tiny", format="diffusers")


def with_scheduler(folder, tmp_path, class_name, **options):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    data = json.loads(path.read_text())
    data.update(options, _class_name=class_name)
    path.write_text(json.dumps(data))
    index = json.loads((copy / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", class_name]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize(
    "class_name, options, sampler, fields",
    [
        ("DDIMScheduler", {}, "ddim", {}),
        ("PNDMScheduler", {}, "pndm", {}),
        ("EulerAncestralDiscreteScheduler", {}, "euler_a", {}),
        (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
            "dpmpp_2m_karras",
            {"use_karras_sigmas": True},
        ),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde", {}),
        # No registry name fixes a third order: the class name takes every option from the config.
        (
            "DPMSolverMultistepScheduler",
            {"solver_order": 3},
            "DPMSolverMultistepScheduler",
            {"solver_order": 3},
        ),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", {"use_karras_sigmas": True}),
        ("LMSDiscreteScheduler", {}, "lms", {}),
        ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, "heun", {"timestep_spacing": "trailing"}),
        ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "unipc", {"solver_type": "bh1"}),
        ("DDPMScheduler", {"variance_type": "fixed_small"}, "ddpm", {"variance_type": "fixed_small"}),
    ],
)
def test_folder_scheduler_is_the_default_sampler(tiny_folder, tmp_path, class_name, options, sampler, fields):
    folder = with_scheduler(tiny_folder, tmp_path, class_name, **options)
    with load_pipeline_weights(folder) as weights:
        config = weights.config
        notes = weights.report.notes
    assert config.default_sampler == sampler
    for name, value in fields.items():
        assert getattr(config.scheduler, name) == value, name
    assert any(f"default sampler: {sampler}" in n for n in notes)
    # The name and the config make the sampler of the folder's class with the folder's options.
    made = get_sampler(config.default_sampler, config.scheduler)
    assert made.diffusers_class == class_name
    for name, value in options.items():
        assert getattr(made.config, name) == value, name


def test_model_index_class_wins_over_scheduler_config(tiny_folder, tmp_path):
    # diffusers instantiates model_index.json's scheduler class with scheduler_config.json's options.
    folder = with_scheduler(tiny_folder, tmp_path, "DDIMScheduler")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), _class_name="PNDMScheduler")))
    with load_pipeline_weights(folder) as weights:
        assert weights.config.default_sampler == "ddim"


def test_unimplemented_scheduler_loads_and_fails_by_name(tiny_folder, tmp_path):
    folder = with_scheduler(tiny_folder, tmp_path, "KDPM2DiscreteScheduler")
    with load_pipeline_weights(folder) as weights:
        config = weights.config
        notes = weights.report.notes
    assert config.default_sampler == "KDPM2DiscreteScheduler"
    assert any("KDPM2DiscreteScheduler is not implemented" in n for n in notes)
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler"):
        get_sampler(config.default_sampler, config.scheduler)


def test_unsupported_scheduler_option_is_refused(tiny_folder, tmp_path):
    folder = with_scheduler(tiny_folder, tmp_path, "DDIMScheduler", thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        load_pipeline_weights(folder)


def test_own_folder_keeps_the_default_sampler(tiny_folder, tmp_path):
    # Our folders store the whole config (config.json), default sampler included.
    from tf_diffusion.weights.loading import save

    folder = with_scheduler(tiny_folder, tmp_path, "EulerAncestralDiscreteScheduler")
    with load_pipeline_weights(folder) as weights:
        save(weights, tmp_path / "ours", format="tf_diffusion")
    with load_pipeline_weights(tmp_path / "ours") as weights:
        assert weights.report.format == "tf_diffusion"
        assert weights.config.default_sampler == "euler_a"


def test_diffusers_round_trip_keeps_the_sampler_and_writes_float32_and_fp16(tiny_folder, tmp_path):
    import dataclasses

    from tf_diffusion.weights.loading import save
    from tf_diffusion.weights.safetensors_io import open_safetensors

    with load_pipeline_weights(tiny_folder) as weights:
        # The tiny-shapes model's sampling settings: DPM++ 2M on a zero-SNR v-prediction schedule.
        scheduler = dataclasses.replace(
            weights.config.scheduler,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        )
        weights.config = weights.config.replace(default_sampler="dpmpp_2m", scheduler=scheduler)
        save(weights, tmp_path / "out", format="diffusers", dtype="float16")
    out = tmp_path / "out"
    written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "DPMSolverMultistepScheduler"
    assert (written["algorithm_type"], written["solver_order"], written["use_karras_sigmas"]) == (
        "dpmsolver++",
        2,
        False,
    )
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "DPMSolverMultistepScheduler",
    ]
    with load_pipeline_weights(out) as back:
        assert back.config.default_sampler == "dpmpp_2m"
        assert back.config.scheduler == scheduler
        assert {t.dtype for c in back.components.values() for t in c.values()} == {np.dtype("float32")}
    with load_pipeline_weights(out, variant="fp16") as half:
        assert {t.dtype for c in half.components.values() for t in c.values()} == {np.dtype("float16")}
    # The default files are float32, what diffusers' from_pretrained runs without torch_dtype.
    for component, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        with open_safetensors(out / component / f"{stem}.safetensors") as f:
            assert {np.dtype(t.dtype) for t in dict(f).values()} == {np.dtype("float32")}
        assert (out / component / f"{stem}.fp16.safetensors").is_file()


def folder_case_names():
    return [c["name"] for c in json.loads((PIPELINE / "folder_schedulers.json").read_text())["cases"]]


@pytest.mark.parametrize("name", folder_case_names())
def test_diffusers_written_scheduler_matches_diffusers_from_pretrained(tiny_folder, tmp_path, name):
    # tools/make_fixtures_pipeline.py --folders: diffusers saved the pipeline with this scheduler,
    # loaded it back with from_pretrained(folder) and sampled; the same files here give the same image.
    from tf_diffusion.pipeline import StableDiffusion

    meta, _, _ = fixture(PIPELINE)
    folder_meta = json.loads((PIPELINE / "folder_schedulers.json").read_text())
    case = next(c for c in folder_meta["cases"] if c["name"] == name)
    want = np.load(PIPELINE / "folder_schedulers.npz")[name]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(case["scheduler_config"]))
    index = json.loads((copy / "model_index.json").read_text())
    index["scheduler"] = case["model_index_scheduler"]
    (copy / "model_index.json").write_text(json.dumps(index))
    sd = StableDiffusion.from_pretrained(copy)
    size = meta["size"] // sd.config.vae.downsample_factor
    latents = NoiseSource(folder_meta["seed"]).normal((len(meta["prompts"]), size, size, 4))
    ours = sd.generate(
        meta["prompts"],
        meta["negative_prompts"],
        num_steps=meta["steps"],
        guidance_scale=folder_meta["guidance_scale"],
        latents=latents,
        output_type="float",
        progress=False,
        jit_compile=False,  # graph mode: the sampler is the point; an XLA compile per case costs seconds
    )
    err = float(np.max(np.abs(ours - want)))
    assert err <= TOLERANCE, f"{name} ({sd.config.default_sampler}): max abs error {err:.2e}"
    if name == "ddim":
        # Naming another sampler explicitly still wins (and changes the image).
        other = sd.generate(
            meta["prompts"],
            meta["negative_prompts"],
            num_steps=meta["steps"],
            guidance_scale=folder_meta["guidance_scale"],
            latents=latents,
            scheduler="pndm",
            output_type="float",
            progress=False,
            jit_compile=False,
        )
        assert float(np.max(np.abs(other - want))) > 10 * TOLERANCE
