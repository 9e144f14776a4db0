"""Flow-matching samplers (flow_euler, flow_heun, flow_dpmpp_2m, flow_dpmpp_2m_sde) against diffusers.

Each case runs diffusers' scheduler (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
DPMSolverMultistepScheduler with flow sigmas) and ours side by side on the same toy velocity model and
compares timesteps, sigmas and every step's latents; the SD3 tiny folder then runs through diffusers'
StableDiffusion3Pipeline with the matching scheduler. torch and diffusers are imported in the test.
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.infotext import a1111_sampler, sampler_from_a1111
from tf_diffusion.schedulers import SAMPLERS, config_from_diffusers, flow_shift_mu, get_sampler
from tf_diffusion.schedulers.flow_match import FlowDPMSolverMultistep

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd3"
TOL = 1e-6
# Measured ~6e-8 on the tiny folder; another sampler (or shift) moves these images by ~1e-3.
IMAGE_TOL = 1e-4


def toy_velocity(x, t, phase):
    """A smooth stand-in for the transformer: velocity toward a target, plus terms in x and t."""
    x = np.asarray(x, np.float64)
    s = t / 1000.0
    target = 0.5 * np.sin(phase)
    v = (x - target) / max(1.0 - 0.9 * s, 0.1) * 0.8 + 0.1 * np.tanh(x) + 0.05 * np.cos(t / 97.0 + phase)
    return v.astype(np.float32)


def _reference(name, diffusers_config, steps, mu):
    """The diffusers scheduler for a registry name, set to ``steps`` (with ``mu`` if given)."""
    if name == "flow_euler":
        sched = diffusers.FlowMatchEulerDiscreteScheduler(**diffusers_config)
    elif name == "flow_heun":
        sched = diffusers.FlowMatchHeunDiscreteScheduler(**diffusers_config)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", **diffusers_config
        )
    kwargs = {} if mu is None else {"mu": mu}
    sched.set_timesteps(steps, **kwargs)
    return sched


# (registry name, diffusers config, steps, mu)
CASES = [
    ("flow_euler", {"shift": 3.0}, 6, None),
    ("flow_euler", {"use_dynamic_shifting": True}, 5, 0.9),
    ("flow_heun", {"shift": 1.0}, 4, None),
    ("flow_heun", {"shift": 3.0}, 7, None),
    ("flow_dpmpp_2m", {"flow_shift": 3.0}, 8, None),
    ("flow_dpmpp_2m", {"flow_shift": 1.0}, 20, None),  # 20 steps: no lower-order second-last step
    ("flow_dpmpp_2m", {"use_dynamic_shifting": True}, 6, 1.1),
    ("flow_dpmpp_2m", {"flow_shift": 3.0, "solver_order": 3}, 9, None),
    ("flow_dpmpp_2m", {"flow_shift": 3.0, "solver_order": 1}, 5, None),
    ("flow_dpmpp_2m", {"flow_shift": 2.0, "solver_type": "heun", "lower_order_final": False}, 7, None),
    # sigma_min ends on the VP training schedule's smallest sigma (diffusers' default betas, written out).
    (
        "flow_dpmpp_2m",
        {
            "flow_shift": 3.0,
            "final_sigmas_type": "sigma_min",
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
        },
        6,
        None,
    ),
    ("flow_dpmpp_2m_sde", {"flow_shift": 3.0, "algorithm_type": "sde-dpmsolver++"}, 8, None),
    (
        "flow_dpmpp_2m_sde",
        {"flow_shift": 1.5, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        6,
        None,
    ),
]


def _ours(name, diffusers_config, mu):
    data = dict(diffusers_config)
    if name.startswith("flow_dpmpp"):
        data.update(use_flow_sigmas=True, prediction_type="flow_prediction")
    config = config_from_diffusers(data)
    options = {} if mu is None else {"mu": mu}
    if diffusers_config.get("solver_order", 2) != 2:
        # The registry names fix order 2; the class takes every option from the config.
        return FlowDPMSolverMultistep(config, **options)
    return get_sampler(name, config, **options)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_trajectory_matches_diffusers(case):
    name, diffusers_config, steps, mu = case
    sched = _reference(name, diffusers_config, steps, mu)
    sampler = _ours(name, diffusers_config, mu)
    plan = sampler.plan(steps)
    np.testing.assert_allclose(plan.timesteps, sched.timesteps.numpy().astype(np.float32), rtol=TOL, atol=0)
    sigmas = sched.sigmas.numpy()
    np.testing.assert_allclose(plan.tables["sigma"], sigmas[: plan.num_evals], rtol=TOL, atol=0)
    assert plan.init_noise_sigma == float(getattr(sched, "init_noise_sigma", 1.0))  # FlowMatch*: unscaled

    rng = np.random.default_rng(3)
    x_ref = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)  # NCHW for diffusers
    phase = np.arange(36, dtype=np.float64).reshape(1, 4, 3, 3) * 0.37
    step_noise = rng.standard_normal((plan.num_evals, 1, 4, 3, 3)).astype(np.float32)
    x, state = x_ref.copy(), sampler.init_state(x_ref)
    for i, t in enumerate(sched.timesteps):
        out = toy_velocity(x_ref, float(t), phase)
        kwargs = {"variance_noise": torch.from_numpy(step_noise[i])} if sampler.needs_noise else {}
        x_ref = sched.step(torch.from_numpy(out), t, torch.from_numpy(x_ref), return_dict=False, **kwargs)[0]
        x_ref = x_ref.numpy()
        ours_out = toy_velocity(x, float(plan.timesteps[i]), phase)
        x, state = sampler.step(
            ours_out, i, x, state, plan, noise=step_noise[i] if sampler.needs_noise else None
        )
        x = np.asarray(x)
        err = np.abs(x - x_ref).max()
        assert err <= TOL * max(1.0, np.abs(x_ref).max()), f"step {i}: max abs error {err:.3g}"
    assert i + 1 == plan.num_evals and np.isfinite(x).all()


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun", "flow_dpmpp_2m"])
def test_img2img_noise_and_tail_match_diffusers(name):
    """Img2img keeps the last steps (from diffusers' ``timesteps[t_start * order:]``) and noises to the first."""
    config = {"shift": 3.0} if name != "flow_dpmpp_2m" else {"flow_shift": 3.0}
    sched = _reference(name, config, 10, None)
    sampler = _ours(name, config, None)
    plan = sampler.plan(10, strength=0.6)
    begin = 4 * sampler.order
    np.testing.assert_allclose(plan.timesteps, sched.timesteps.numpy()[begin:].astype(np.float32), rtol=TOL)
    x0, noise = np.full((1, 2, 2, 1), 0.3, np.float32), np.full((1, 2, 2, 1), -1.2, np.float32)
    sigma = sched.sigmas.numpy()[begin]
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
def pipelines():
    from diffusers import StableDiffusion3Pipeline

    from tf_diffusion.sd3 import StableDiffusion3

    ref = StableDiffusion3Pipeline.from_pretrained(
        FIXTURES / "sd3-diffusers", text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    ref.set_progress_bar_config(disable=True)
    return ref, StableDiffusion3.from_pretrained(FIXTURES / "sd3-diffusers", load_t5=False)


@pytest.mark.parametrize("name", ["flow_heun", "flow_dpmpp_2m", "flow_dpmpp_2m_dynamic"])
def test_sd3_pipeline_matches_diffusers(pipelines, name):
    ref, sd = pipelines
    data = json.loads((FIXTURES / "sd3-diffusers" / "scheduler" / "scheduler_config.json").read_text())
    shift = data.get("shift", 3.0)
    scheduler = name
    if name == "flow_heun":
        sched = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        dynamic = name.endswith("_dynamic")
        sched = diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=shift,
            use_dynamic_shifting=dynamic,
        )
        if dynamic:
            # The pipeline's mu from the image's token count, as StableDiffusion3 passes it for such a config.
            config = dataclasses.replace(sd.config.scheduler, use_dynamic_shifting=True)
            p = sd.config.transformer.patch_size
            mu = flow_shift_mu((6 // p) * (4 // p), config)
            scheduler = get_sampler("flow_dpmpp_2m", config, mu=mu)
            assert mu != pytest.approx(np.log(shift))
    pipe = diffusers.StableDiffusion3Pipeline(**{**ref.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(5).standard_normal((1, 16, 6, 4)).astype(np.float32)  # 12x8 pixels
    with torch.no_grad():
        expected = pipe(
            "a red circle",
            negative_prompt="blurry",
            num_inference_steps=4,
            guidance_scale=4.0,
            height=12,
            width=8,
            latents=torch.from_numpy(latents),
            max_sequence_length=12,
            output_type="np",
        ).images
    got = sd.generate(
        "a red circle",
        "blurry",
        num_steps=4,
        guidance_scale=4.0,
        height=12,
        width=8,
        latents=latents.transpose(0, 2, 3, 1),
        max_sequence_length=12,
        scheduler=scheduler,
        output_type="float",
        progress=False,
        jit_compile=False,
    )
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    assert err < IMAGE_TOL, f"{name}: max abs error {err:.3g}"
