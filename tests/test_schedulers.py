"""Samplers against diffusers' schedulers (committed trajectories), input checks, and compiled loops."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.schedulers import SAMPLERS, config_from_diffusers, get_sampler

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "schedulers"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
LCM_CASES = json.loads((FIXTURES / "lcm_tcd_cases.json").read_text())["cases"]
RTOL = 1e-5
# Zero-terminal-SNR ladders start at sigma 4096, where float32 resolves only ~2.4e-4 and torch's float32
# sqrt (not correctly rounded) puts diffusers' top sigma one ulp from ours; the first Euler step cancels
# two ~1e4 terms, so the reference itself carries errors ~1e-3 on latents of scale ~40.
RTOL_ZERO_SNR_LADDER = 5e-5
SIGMA_LADDER = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"}


def synthetic_model(x_in, t, phase, prediction_type):
    """tools/make_fixtures_schedulers.py's stand-in UNet (keep the two in sync)."""
    x_in = np.asarray(x_in, np.float64)
    ab = np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    a, s = np.sqrt(ab), np.sqrt(max(1 - ab, 1e-4))
    target = 0.5 * np.sin(phase)
    eps = 0.9 * (x_in - a * target) / s + 0.1 * np.tanh(x_in) + 0.05 * np.sin(t / 97.0 + phase)
    if prediction_type == "epsilon":
        out = eps
    elif prediction_type == "v_prediction":
        out = a * eps - s * target
    else:
        out = target + 0.1 * np.tanh(x_in) + 0.05 * np.cos(t / 97.0 + phase)
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def trajectories():
    return np.load(FIXTURES / "trajectories.npz")


def _sampler_for(case):
    options = {"eta": case["eta"]} if case["eta"] or case["sampler"] == "tcd" else {}
    return get_sampler(case["sampler"], config_from_diffusers(case["config"]), **options)


@pytest.fixture(scope="module")
def lcm_trajectories():
    return np.load(FIXTURES / "lcm_tcd.npz")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_trajectory_matches_diffusers(case, trajectories):
    check_trajectory(case, trajectories)


@pytest.mark.parametrize("case", LCM_CASES, ids=[c["id"] for c in LCM_CASES])
def test_lcm_tcd_trajectory_matches_diffusers(case, lcm_trajectories):
    """diffusers' LCMScheduler and TCDScheduler (tools/make_fixtures_schedulers.py --lcm)."""
    check_trajectory(case, lcm_trajectories)


def test_lcm_step_limits():
    with pytest.raises(ValueError, match="num_steps=51 exceeds original_inference_steps=50"):
        get_sampler("lcm").plan(51)
    sampler = get_sampler("LCMScheduler", SchedulerConfig(original_inference_steps=4))
    np.testing.assert_array_equal(sampler.plan(4).timesteps, [999, 749, 499, 249])
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 1.5"):
        get_sampler("tcd", eta=1.5)
    assert get_sampler("tcd").options() == {"eta": 0.3} and not get_sampler("tcd", eta=0).needs_noise


def check_trajectory(case, trajectories):
    def ref(key):
        return trajectories[f"{case['id']}/{key}"]

    sampler = _sampler_for(case)
    plan = sampler.plan(case["steps"], case["strength"])
    # Same model evaluations as diffusers; Karras timesteps are fractional, one float32 ulp may differ.
    np.testing.assert_allclose(plan.timesteps, ref("timesteps"), rtol=1e-6, atol=0)

    if case["strength"] == 1.0:
        np.testing.assert_allclose(plan.init_noise_sigma, ref("init_noise_sigma"), rtol=1e-6)
        x = ref("noise0") * np.float32(plan.init_noise_sigma)
    else:
        x = np.asarray(sampler.add_noise(ref("clean"), ref("noise0"), plan))
    x_init = ref("x_init")
    np.testing.assert_allclose(x, x_init, rtol=0, atol=RTOL * max(1.0, np.abs(x_init).max()))

    # The inpainting pipeline re-noises the known region to each next evaluation's level.
    next_scales = [sampler.noise_scales_at(plan, i) for i in range(1, plan.num_evals)]
    np.testing.assert_allclose(np.reshape(next_scales, (-1, 2)), ref("next_noise_scales"), rtol=1e-6)

    zero_snr_ladder = case["config"].get("rescale_betas_zero_snr") and case["cls"] in SIGMA_LADDER
    rtol = RTOL_ZERO_SNR_LADDER if zero_snr_ladder else RTOL
    phase = trajectories["phase"].astype(np.float64)
    prediction_type = sampler.config.prediction_type
    traj = ref("traj")
    assert np.isfinite(traj).all()
    x, state, prev = x_init, sampler.init_state(x_init), x_init
    for i in range(plan.num_evals):
        model_input = np.asarray(sampler.scale_model_input(x, i, plan))
        out = synthetic_model(model_input, float(plan.timesteps[i]), phase, prediction_type)
        noise = ref("step_noise")[i] if sampler.needs_noise else None
        x, state = sampler.step(out, i, x, state, plan, noise=noise)
        x = np.asarray(x)
        # Latents of the sigma-ladder samplers carry the sigma scale (up to ~15 |noise| for SD), so the
        # bound scales with the larger of this step's input and output.
        scale = max(1.0, np.abs(prev).max(), np.abs(traj[i]).max())
        err = np.abs(x - traj[i]).max()
        assert err <= rtol * scale, f"step {i}: max abs error {err:.3g} > {rtol * scale:.3g}"
        prev = traj[i]


def test_unknown_sampler_lists_allowed_names():
    with pytest.raises(
        ValueError, match="unknown sampler 'k_dpm_9'.*dpmpp_2m_karras.*EulerDiscreteScheduler"
    ):
        get_sampler("k_dpm_9")


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, 1001])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        get_sampler("euler").plan(num_steps)


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan"), "0.5"])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        get_sampler("ddim").plan(10, strength)


def test_strength_leaving_no_step():
    with pytest.raises(ValueError, match="leaves no denoising step"):
        get_sampler("dpmpp_2m").plan(10, 0.05)
    assert get_sampler("dpmpp_2m").plan(10, 0.1).num_evals == 1


def test_unsupported_options():
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported by euler_a"):
        get_sampler("euler_a", SchedulerConfig(prediction_type="sample"))
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported by pndm"):
        get_sampler("pndm", SchedulerConfig(prediction_type="sample"))
    with pytest.raises(ValueError, match="skip_prk_steps"):
        get_sampler("PNDMScheduler", SchedulerConfig(skip_prk_steps=False))
    with pytest.raises(ValueError, match="does not take options"):
        get_sampler("euler", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        get_sampler("ddim", eta=-1.0)
    with pytest.raises(ValueError, match="timestep_spacing"):
        SchedulerConfig(timestep_spacing="even")
    with pytest.raises(ValueError, match="trained_betas"):
        config_from_diffusers({"trained_betas": [0.1, 0.2]})
    with pytest.raises(ValueError, match="thresholding"):
        config_from_diffusers({"thresholding": True})
    with pytest.raises(ValueError, match="algorithm_type"):
        config_from_diffusers({"algorithm_type": "dpmsolver"})


def test_stochastic_step_requires_noise():
    sampler = get_sampler("euler_a")
    plan = sampler.plan(4)
    x = np.ones((1, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(x, 0, x, sampler.init_state(x), plan)


def test_registry_names_equal_diffusers_class_with_options():
    cfg = SchedulerConfig(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")
    by_class = get_sampler("DPMSolverMultistepScheduler", cfg).plan(12, 0.7)
    by_name = get_sampler("dpmpp_2m_sde_karras").plan(12, 0.7)
    np.testing.assert_array_equal(by_class.timesteps, by_name.timesteps)
    assert by_class.tables.keys() == by_name.tables.keys()
    for key in by_name.tables:
        np.testing.assert_array_equal(by_class.tables[key], by_name.tables[key])


def test_step_is_float32_under_mixed_precision():
    sampler = get_sampler("dpmpp_2m_karras")
    plan = sampler.plan(5)
    x = tf.random.stateless_normal((1, 4, 4, 4), seed=(1, 2))
    x_next, state = sampler.step(tf.cast(x, "float16"), 0, x, sampler.init_state(x), plan)
    assert x_next.dtype == tf.float32 and all(s.dtype == tf.float32 for s in state)


def _ops_model(x_in, t, phase):
    # The synthetic model's epsilon branch in keras.ops, so it can run inside a compiled loop.
    ab = ops.square(ops.cos((t / 1000.0 + 0.008) / 1.008 * (np.pi / 2)))
    a, s = ops.sqrt(ab), ops.sqrt(ops.maximum(1.0 - ab, 1e-4))
    target = 0.5 * ops.sin(phase)
    return 0.9 * (x_in - a * target) / s + 0.1 * ops.tanh(x_in) + 0.05 * ops.sin(t / 97.0 + phase)


def _run_loop(sampler, plan, x, noise, phase):
    def body(i, carry):
        x, state = carry
        t = ops.take(ops.convert_to_tensor(plan.timesteps), i)
        out = _ops_model(sampler.scale_model_input(x, i, plan), t, phase)
        step_noise = ops.take(noise, i, axis=0) if sampler.needs_noise else None
        return sampler.step(out, i, x, state, plan, noise=step_noise)

    return ops.fori_loop(0, plan.num_evals, body, (x, sampler.init_state(x)))[0]


def _eager_loop(sampler, plan, x, noise, phase):
    state = sampler.init_state(x)
    for i in range(plan.num_evals):
        t = ops.convert_to_tensor(plan.timesteps[i])
        out = _ops_model(sampler.scale_model_input(x, i, plan), t, phase)
        x, state = sampler.step(out, i, x, state, plan, noise=noise[i] if sampler.needs_noise else None)
    return x


def _loop_inputs(sampler, plan):
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((2, 4, 4, 3), dtype=np.float32) * plan.init_noise_sigma)
    noise = tf.constant(rng.standard_normal((plan.num_evals, 2, 4, 4, 3), dtype=np.float32))
    phase = tf.constant(np.arange(48, dtype=np.float32).reshape(1, 4, 4, 3) * 0.37)
    return x, noise, phase


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_compiled_loop_matches_eager(name):
    sampler = get_sampler(name)
    plan = sampler.plan(6, 0.9)
    x, noise, phase = _loop_inputs(sampler, plan)
    eager = _eager_loop(sampler, plan, x, noise, phase).numpy()
    compiled = tf.function(lambda x, n: _run_loop(sampler, plan, x, n, phase), jit_compile=False)
    got = compiled(x, noise).numpy()
    assert np.isfinite(eager).all()
    np.testing.assert_allclose(got, eager, rtol=0, atol=RTOL * max(1.0, np.abs(eager).max()))


@pytest.mark.parametrize("name", ["unipc", "heun"])
def test_xla_compiled_loop_matches_eager(name):
    sampler = get_sampler(name)
    plan = sampler.plan(5)
    x, noise, phase = _loop_inputs(sampler, plan)
    eager = _eager_loop(sampler, plan, x, noise, phase).numpy()
    compiled = tf.function(lambda x, n: _run_loop(sampler, plan, x, n, phase), jit_compile=True)
    np.testing.assert_allclose(
        compiled(x, noise).numpy(), eager, rtol=0, atol=1e-4 * max(1.0, np.abs(eager).max())
    )
