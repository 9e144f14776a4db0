"""Flow-matching samplers (flow_euler, flow_heun, flow_dpmpp_2m, flow_dpmpp_2m_sde) against diffusers.

tools/make_fixtures_flow.py ran diffusers' FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
and DPMSolverMultistepScheduler (flow sigmas) on the toy velocity model ``tf_diffusion.testing.toy_velocity``
and stored their configs, timesteps, sigmas and every step's latents (tests/fixtures/flow/); here our
samplers read the same configs, run the same model and must agree. The SD3 tiny folder's images from
diffusers' StableDiffusion3Pipeline with those schedulers are stored too. No torch or diffusers is imported.
"""

import dataclasses
import functools
import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.infotext import a1111_sampler, sampler_from_a1111
from tf_diffusion.schedulers import SAMPLERS, config_from_diffusers, flow_shift_mu, get_sampler
from tf_diffusion.schedulers.flow_match import FlowDPMSolverMultistep
from tf_diffusion.testing import toy_phase, toy_velocity

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd3"
FLOW = pathlib.Path(__file__).parent / "fixtures" / "flow"
META = json.loads((FLOW / "cases.json").read_text())
TOL = 1e-6
# Measured ~6e-8 on the tiny folder; another sampler (or shift) moves these images by ~1e-3.
IMAGE_TOL = 1e-4


@functools.lru_cache(maxsize=1)
def trajectories():
    return dict(np.load(FLOW / "trajectories.npz"))


def _ours(case):
    """Our sampler from the scheduler_config.json diffusers wrote for the case."""
    config = config_from_diffusers(case["config"])
    options = {} if case["mu"] is None else {"mu": case["mu"]}
    if case["options"].get("solver_order", 2) != 2:
        # The registry names fix order 2; the class takes every option from the config.
        return FlowDPMSolverMultistep(config, **options)
    return get_sampler(case["sampler"], config, **options)


@pytest.mark.parametrize("case", META["cases"], ids=[c["id"] for c in META["cases"]])
def test_trajectory_matches_diffusers(case):
    ref = trajectories()
    key = case["id"]
    sampler = _ours(case)
    assert sampler.needs_noise == case["sde"]
    plan = sampler.plan(case["steps"])
    np.testing.assert_allclose(plan.timesteps, ref[f"{key}/timesteps"], rtol=TOL, atol=0)
    np.testing.assert_allclose(plan.tables["sigma"], ref[f"{key}/sigmas"][: plan.num_evals], rtol=TOL, atol=0)
    assert plan.init_noise_sigma == case["init_noise_sigma"]  # FlowMatch*: unscaled

    x = ref[f"{key}/x0"]  # NCHW as diffusers held it; the toy model and the samplers are elementwise
    phase = toy_phase(x.shape)
    step_noise = ref.get(f"{key}/step_noise")
    want = ref[f"{key}/latents"]
    assert len(want) == plan.num_evals
    state = sampler.init_state(x)
    for i in range(plan.num_evals):
        out = toy_velocity(x, float(plan.timesteps[i]), phase)
        x, state = sampler.step(out, i, x, state, plan, noise=None if step_noise is None else step_noise[i])
        x = np.asarray(x)
        err = np.abs(x - want[i]).max()
        assert err <= TOL * max(1.0, np.abs(want[i]).max()), f"step {i}: max abs error {err:.3g}"
    assert np.isfinite(x).all()


@pytest.mark.parametrize("case", META["img2img"], ids=[c["sampler"] for c in META["img2img"]])
def test_img2img_noise_and_tail_match_diffusers(case):
    """Img2img keeps the last steps (from diffusers' ``timesteps[t_start * order:]``) and noises to the first."""
    ref = trajectories()
    name = case["sampler"]
    sampler = get_sampler(name, config_from_diffusers(case["config"]))
    plan = sampler.plan(case["steps"], strength=0.6)
    begin = 4 * sampler.order
    np.testing.assert_allclose(plan.timesteps, ref[f"img2img-{name}/timesteps"][begin:], rtol=TOL)
    x0, noise = np.full((1, 2, 2, 1), 0.3, np.float32), np.full((1, 2, 2, 1), -1.2, np.float32)
    sigma = ref[f"img2img-{name}/sigmas"][begin]
    np.testing.assert_allclose(
        np.asarray(sampler.add_noise(x0, noise, plan)), sigma * noise + (1 - sigma) * x0
    )


def test_config_from_diffusers_reads_flow_shift():
    data = {
        "_class_name": "DPMSolverMultistepScheduler",
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "flow_shift": 3.0,
        "algorithm_type": "sde-dpmsolver++",
    }
    config = config_from_diffusers(data)
    assert config.shift == 3.0 and config.algorithm_type == "sde-dpmsolver++"
    # diffusers' DPMSolverMultistepScheduler default flow_shift is 1.0, whatever SD3's FlowMatch shift was.
    assert (
        config_from_diffusers(
            {"shift": 3.0, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}
        ).shift
        == 1.0
    )
    assert config_from_diffusers({"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 2.5}).shift == 2.5
    with pytest.raises(
        ValueError, match="use_flow_sigmas=True together with prediction_type='flow_prediction'"
    ):
        config_from_diffusers({"use_flow_sigmas": True})
    with pytest.raises(ValueError, match="use_flow_sigmas=None with prediction_type='flow_prediction'"):
        config_from_diffusers({"prediction_type": "flow_prediction"})


def test_bad_flow_options():
    with pytest.raises(
        ValueError, match="use_dynamic_shifting=True is not supported by FlowMatchHeunDiscreteScheduler"
    ):
        get_sampler("flow_heun", SchedulerConfig(use_dynamic_shifting=True), mu=0.5)
    with pytest.raises(ValueError, match="needs mu"):
        get_sampler("flow_dpmpp_2m", SchedulerConfig(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="only read with use_dynamic_shifting"):
        get_sampler("flow_dpmpp_2m_sde", mu=0.5)
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported with flow sigmas"):
        FlowDPMSolverMultistep(SchedulerConfig(use_karras_sigmas=True))
    assert get_sampler("flow_dpmpp_2m_sde").needs_noise and not get_sampler("flow_dpmpp_2m").needs_noise


def test_flow_names_in_registry_and_webui_names():
    for name in ("flow_euler", "flow_heun", "flow_dpmpp_2m", "flow_dpmpp_2m_sde"):
        assert name in SAMPLERS
    expected = {
        "flow_euler": "Euler",
        "flow_heun": "Heun",
        "flow_dpmpp_2m": "DPM++ 2M",
        "flow_dpmpp_2m_sde": "DPM++ 2M SDE",
    }
    for ours, theirs in expected.items():
        assert a1111_sampler(ours) == (theirs, None)
        assert sampler_from_a1111(theirs, flow=True) == (ours, {})
        assert sampler_from_a1111(theirs) == (ours[len("flow_") :], {})
    assert a1111_sampler("FlowMatchHeunDiscreteScheduler") == ("Heun", None)
    assert a1111_sampler("FlowMatchEulerDiscreteScheduler") == ("Euler", None)
    flow_dpm = {"use_flow_sigmas": True, "algorithm_type": "sde-dpmsolver++"}
    assert a1111_sampler("DPMSolverMultistepScheduler", flow_dpm) == ("DPM++ 2M SDE", None)
    assert sampler_from_a1111("DPM++ 2M", "Automatic", flow=True) == ("flow_dpmpp_2m", {})
    with pytest.raises(ValueError, match="schedule type 'Karras' has no flow-matching equivalent"):
        sampler_from_a1111("Euler", "Karras", flow=True)
    with pytest.raises(ValueError, match="no flow-matching equivalent"):
        sampler_from_a1111("DPM++ 2M Karras", flow=True)
    with pytest.raises(ValueError, match="no flow-matching equivalent"):
        sampler_from_a1111("Euler a", flow=True)


@pytest.fixture(scope="module")
def sd3():
    from tf_diffusion.sd3 import StableDiffusion3

    return StableDiffusion3.from_pretrained(FIXTURES / "sd3-diffusers", load_t5=False)


@pytest.mark.parametrize("case", META["sd3"], ids=[c["name"] for c in META["sd3"]])
def test_sd3_pipeline_matches_diffusers(sd3, case):
    """generate() with each sampler equals StableDiffusion3Pipeline's stored image from the same latents."""
    images = np.load(FLOW / "sd3_images.npz")
    name, scheduler = case["name"], case["name"]
    ours = config_from_diffusers(case["config"])
    shift = json.loads((FIXTURES / "sd3-diffusers" / "scheduler" / "scheduler_config.json").read_text())[
        "shift"
    ]
    assert ours.shift == shift
    if name.endswith("_dynamic"):
        # The pipeline's mu from the image's token count, as StableDiffusion3 passes it for such a config.
        config = dataclasses.replace(sd3.config.scheduler, use_dynamic_shifting=True)
        p = sd3.config.transformer.patch_size
        mu = flow_shift_mu((6 // p) * (4 // p), config)
        scheduler = get_sampler("flow_dpmpp_2m", config, mu=mu)
        assert mu != pytest.approx(np.log(shift))
    prompt = META["sd3_prompt"]
    got = sd3.generate(
        prompt["prompt"],
        prompt["negative_prompt"],
        num_steps=prompt["steps"],
        guidance_scale=prompt["guidance"],
        height=12,
        width=8,
        latents=images["latents"].transpose(0, 2, 3, 1),
        max_sequence_length=12,
        scheduler=scheduler,
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    expected = images[name]
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    print(f"SD3 {name}: max abs error {err:.2e}")
    assert err < IMAGE_TOL, f"{name}: max abs error {err:.3g}"
