"""LCM-distilled UNets (``time_cond_proj_dim``): the guidance scale as an embedding, equal to diffusers.

diffusers' ``UNet2DConditionModel`` with ``time_cond_proj_dim`` adds ``time_embedding.cond_proj`` of the
guidance embedding (``get_guidance_scale_embedding``) to the timestep sinusoid. tools/make_fixtures_lcm.py
ran diffusers on a tiny such UNet (the pipeline fixture's, with a stored ``cond_proj``) and on a tiny LCM
folder through ``StableDiffusionPipeline`` and stored what it returned (tests/fixtures/lcm/); here our
converter, UNet and ``generate()`` must agree in float32. No torch or diffusers is imported.
"""

import json
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LCM = FIXTURES / "lcm"
GUIDANCE_SCALES = np.array([0.0, 1.0, 3.5, 7.0], np.float32)  # guidance scales 1 to 8, less one
GUIDANCE_DIMS = (16, 256, 7)
PIPELINE_CASE = {"prompt": "a red circle", "steps": 4, "guidance_scale": 6.0, "seed": 12}


def pipeline_unet():
    """The pipeline fixture's UNet: its diffusers config and its (rebuilt) diffusers state dict."""
    from tf_diffusion.testing import random_state_dict

    path = FIXTURES / "pipeline"
    meta = json.loads((path / "cases.json").read_text())
    shapes = json.loads((path / "shapes.json").read_text())
    return dict(meta["unet"]), random_state_dict(shapes["unet"], meta["weight_seeds"]["unet"])


def lcm_unet_inputs():
    """Inputs of the UNet comparison: latents (NHWC), text context, timesteps, guidance scales less one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    t = np.array([999, 259], np.int64)
    w = np.array([7.5 - 1, 2.0 - 1], np.float32)
    return x, ctx, t, w


def lcm_folder(root: pathlib.Path, cond_proj: np.ndarray) -> pathlib.Path:
    """The pipeline fixture's txt2img model saved as a diffusers folder, made LCM-distilled.

    The UNet gets ``time_cond_proj_dim`` and the ``time_embedding.cond_proj.weight`` given; the scheduler
    entries name LCMScheduler. tools/make_fixtures_lcm.py runs diffusers on the same folder.
    """
    from safetensors.numpy import load_file, save_file
    from test_pipeline_parity import build

    folder = build(FIXTURES / "pipeline", False, "epsilon").save_pretrained(root / "tiny", format="diffusers")
    unet = folder / "unet"
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "time_cond_proj_dim": cond_proj.shape[1]}))
    weights = unet / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    assert "time_embedding.cond_proj.weight" not in tensors
    save_file({**tensors, "time_embedding.cond_proj.weight": cond_proj}, weights)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "_class_name": "LCMScheduler"}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "LCMScheduler"]})
    )
    return folder


@pytest.mark.parametrize("dim", GUIDANCE_DIMS)
def test_guidance_embedding_equals_diffusers(dim):
    from tf_diffusion.unet import guidance_embedding

    ours = np.asarray(guidance_embedding(GUIDANCE_SCALES, dim))
    want = np.load(LCM / "guidance.npz")[f"dim{dim}"]
    assert ours.shape == want.shape
    # 1000 * w puts the sinusoid's argument in the thousands, where one float32 rounding step of the
    # frequency (exp differs by an ulp between libraries) moves it by about 1e-4 rad.
    err = float(np.abs(ours - want).max())
    print(f"guidance embedding, dim {dim}: max abs error {err:.2e}")
    assert err <= 1e-3


def test_lcm_unet_equals_diffusers():
    from tf_diffusion.unet import UNetModel, guidance_embedding
    from tf_diffusion.weights import load_state_dict
    from tf_diffusion.weights.diffusers_unet import (
        convert_diffusers_unet_state_dict,
        unet_config_from_diffusers,
    )

    ref = np.load(LCM / "unet.npz")
    diffusers_config, tensors = pipeline_unet()
    config = unet_config_from_diffusers({**diffusers_config, "time_cond_proj_dim": 16})
    assert config.time_cond_proj_dim == 16
    ours = UNetModel(config)
    tensors["time_embedding.cond_proj.weight"] = ref["cond_proj"]
    converted = convert_diffusers_unet_state_dict(tensors, config)
    assert "time_cond_proj.weight" in converted
    load_state_dict(ours, converted)

    x, ctx, t, w = lcm_unet_inputs()
    want = ref["out"]
    got = np.asarray(ours(x, t, ctx, timestep_cond=guidance_embedding(w, 16)))
    err = float(np.abs(got - want).max())
    print(f"LCM UNet max abs error {err:.2e} (outputs up to {np.abs(want).max():.2f})")
    assert err <= 1e-4
    # the guidance is an input: another scale, another output (diffusers' too)
    other = np.asarray(ours(x, t, ctx, timestep_cond=guidance_embedding(w + 3.0, 16)))
    assert np.abs(other - got).max() > 1e-3
    assert float(np.abs(other - ref["out_other"]).max()) <= 1e-4
    with pytest.raises(ValueError, match="LCM-distilled .* pass timestep_cond"):
        ours(x, t, ctx)


def test_generate_with_an_lcm_unet_equals_diffusers(tmp_path):
    """A diffusers folder with an LCM-distilled UNet and LCMScheduler: StableDiffusionPipeline (which turns
    guidance into timestep_cond and drops the unconditional pass; tools/make_fixtures_lcm.py fed its
    scheduler's re-noising from tf_diffusion.noise) against generate() on the same folder and seed."""
    from tf_diffusion.pipeline import StableDiffusion

    ref = np.load(LCM / "pipeline.npz")
    sd = StableDiffusion.from_pretrained(lcm_folder(tmp_path, ref["cond_proj"]))
    assert sd.config.unet.time_cond_proj_dim == 32 and sd.config.default_sampler == "lcm"
    case = PIPELINE_CASE
    ours = sd.generate(case["prompt"], num_steps=case["steps"], guidance_scale=case["guidance_scale"],
                       seed=case["seed"], output_type="float", progress=False, jit_compile=False)  # fmt: skip
    want = ref["image"]
    assert np.asarray(ours).shape == want.shape
    err = float(np.abs(np.asarray(ours) - want).max())
    print(f"LCM pipeline max abs error {err:.2e}")
    assert err <= 1e-3
