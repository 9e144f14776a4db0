"""Sampler parity fixtures: full latent trajectories of diffusers' schedulers under a synthetic model.

Every case runs a diffusers scheduler the way StableDiffusionPipeline (text-to-image) or
StableDiffusionImg2ImgPipeline (strength < 1) drives it, with the UNet replaced by ``synthetic_model`` below
(a deterministic NumPy function of the model input, the timestep and a fixed phase field, which the test
re-evaluates on our latents) and with every random draw replaced by NumPy arrays stored in the fixture.
Arrays are stored NHWC. Writes tests/fixtures/schedulers/{cases.json, trajectories.npz}.

``--lcm`` writes only tests/fixtures/schedulers/{lcm_tcd_cases.json, lcm_tcd.npz}: diffusers' LCMScheduler and
TCDScheduler the same way (SD 1.5's and SDXL's scheduler configs as LCM-LoRA / TCD-LoRA users load them with
``from_config``, steps 1, 2, 4 and 8, img2img, v-prediction, ``original_inference_steps`` /
``timestep_scaling``, TCD's eta 0, 0.3 and 1).

Usage (dev only; diffusers' LMSDiscreteScheduler needs scipy): python tools/make_fixtures_schedulers.py [--lcm]
"""

from __future__ import annotations

import json
import pathlib

import diffusers
import numpy as np
import torch
from diffusers.schedulers import (
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
    scheduling_tcd,
)

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "schedulers"
SHAPE = (1, 4, 4, 4)  # NCHW, as diffusers holds latents

# scheduler_config.json of runwayml/stable-diffusion-v1-5 and of stabilityai/stable-diffusion-2-1 (no
# timestep_spacing key in either: each diffusers class then uses its own default).
SD15 = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2V = {**SD15, "prediction_type": "v_prediction"}

# Registry name -> (diffusers class, options the name fixes).
REGISTRY = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# Class-name cases for options off the SD defaults: (class, base, options, steps, strength).
ZERO_SNR_V = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
VARIANTS = [
    ("DDIMScheduler", SD2V, ZERO_SNR_V, 10, 1.0),
    (
        "DDIMScheduler",
        SD15,
        {"timestep_spacing": "linspace", "clip_sample": True, "set_alpha_to_one": True},
        10,
        1.0,
    ),
    ("DDIMScheduler", SD15, {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 10, 1.0),
    ("DDPMScheduler", SD15, {"variance_type": "fixed_large", "timestep_spacing": "trailing"}, 10, 1.0),
    ("DDPMScheduler", SD15, {"variance_type": "fixed_small_log", "beta_schedule": "linear"}, 10, 0.6),
    ("DDPMScheduler", SD15, {"prediction_type": "sample", "clip_sample": True}, 10, 1.0),
    ("PNDMScheduler", SD15, {"timestep_spacing": "linspace"}, 10, 1.0),
    ("PNDMScheduler", SD2V, {"timestep_spacing": "trailing"}, 12, 1.0),
    ("PNDMScheduler", SD15, {}, 2, 1.0),
    ("EulerDiscreteScheduler", SD15, {"timestep_spacing": "leading"}, 10, 1.0),
    ("EulerDiscreteScheduler", SD2V, ZERO_SNR_V, 10, 1.0),
    ("EulerDiscreteScheduler", SD15, {"use_karras_sigmas": True}, 10, 0.6),
    (
        "EulerDiscreteScheduler",
        SD15,
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        10,
        1.0,
    ),
    (
        "EulerDiscreteScheduler",
        SD15,
        {"final_sigmas_type": "sigma_min", "prediction_type": "sample"},
        10,
        1.0,
    ),
    ("EulerDiscreteScheduler", SD15, {"interpolation_type": "log_linear"}, 10, 1.0),
    ("EulerAncestralDiscreteScheduler", SD15, {"timestep_spacing": "leading"}, 10, 0.6),
    ("EulerAncestralDiscreteScheduler", SD2V, ZERO_SNR_V, 10, 1.0),
    ("HeunDiscreteScheduler", SD15, {"use_karras_sigmas": True}, 10, 1.0),
    (
        "HeunDiscreteScheduler",
        SD15,
        {"timestep_spacing": "leading", "beta_schedule": "squaredcos_cap_v2"},
        10,
        1.0,
    ),
    ("HeunDiscreteScheduler", SD15, {"prediction_type": "sample", "clip_sample": True}, 10, 1.0),
    ("LMSDiscreteScheduler", SD15, {"use_karras_sigmas": True}, 10, 1.0),
    ("LMSDiscreteScheduler", SD2V, {"timestep_spacing": "leading"}, 10, 1.0),
    ("LMSDiscreteScheduler", SD15, {"prediction_type": "sample"}, 10, 1.0),
    ("DPMSolverMultistepScheduler", SD15, {"solver_order": 3}, 10, 1.0),
    ("DPMSolverMultistepScheduler", SD15, {"solver_order": 3}, 20, 0.6),
    ("DPMSolverMultistepScheduler", SD15, {"solver_type": "heun", "timestep_spacing": "leading"}, 10, 1.0),
    (
        "DPMSolverMultistepScheduler",
        SD15,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        10,
        1.0,
    ),
    ("DPMSolverMultistepScheduler", SD15, {"euler_at_final": True, "timestep_spacing": "trailing"}, 20, 1.0),
    (
        "DPMSolverMultistepScheduler",
        SD15,
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
        10,
        1.0,
    ),
    ("DPMSolverMultistepScheduler", SD2V, {**ZERO_SNR_V, "algorithm_type": "sde-dpmsolver++"}, 10, 1.0),
    (
        "DPMSolverMultistepScheduler",
        SD15,
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        10,
        1.0,
    ),
    ("DPMSolverMultistepScheduler", SD15, {"prediction_type": "sample", "solver_order": 3}, 25, 1.0),
    ("UniPCMultistepScheduler", SD15, {"solver_order": 3}, 10, 1.0),
    ("UniPCMultistepScheduler", SD15, {"solver_order": 3}, 25, 0.6),
    (
        "UniPCMultistepScheduler",
        SD15,
        {"solver_type": "bh1", "timestep_spacing": "leading", "final_sigmas_type": "sigma_min"},
        10,
        1.0,
    ),
    ("UniPCMultistepScheduler", SD15, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 10, 1.0),
    ("UniPCMultistepScheduler", SD15, {"disable_corrector": [0, 2]}, 10, 1.0),
    (
        "UniPCMultistepScheduler",
        SD15,
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        10,
        1.0,
    ),
    ("UniPCMultistepScheduler", SD2V, ZERO_SNR_V, 10, 1.0),
    ("UniPCMultistepScheduler", SD15, {"prediction_type": "sample", "solver_order": 1}, 10, 1.0),
]


def phase_field() -> np.ndarray:
    """(1, H, W, C) fixed phases so that each latent element sees a different signal."""
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 0.37).transpose(0, 2, 3, 1)


def synthetic_model(x_in: np.ndarray, t: float, phase: np.ndarray, prediction_type: str) -> np.ndarray:
    """A smooth stand-in for the UNet: a near-denoiser for data at 0.5 * sin(phase), plus a wobble.

    It uses its own cosine alpha-bar (not any sampler's), so it is not an exact denoiser and the samplers'
    trajectories stay non-trivial. float64 inside, float32 out, as the UNet's output would be.
    """
    x_in = x_in.astype(np.float64)
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


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def nhwc(a: torch.Tensor) -> np.ndarray:
    return a.detach().numpy().transpose(0, 2, 3, 1).astype(np.float32)


class InjectedNoise:
    """Stands in for diffusers' randn_tensor inside the schedulers that draw noise themselves."""

    def __init__(self):
        self.current = None

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == self.current.shape, (shape, self.current.shape)
        return self.current.to(dtype or torch.float32)


def run_case(cls_name: str, config: dict, steps: int, strength: float, eta: float, seed: int) -> dict:
    sched = getattr(diffusers, cls_name).from_config(config)
    sched.set_timesteps(steps)
    prediction_type = sched.config.prediction_type
    rng = np.random.default_rng(seed)
    hw = (SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[1])
    noise0 = rng.standard_normal(hw, dtype=np.float32)
    clean = (0.8 * rng.standard_normal(hw)).astype(np.float32)
    phase = phase_field()

    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    # The img2img and inpainting pipelines set the begin index (txt2img finds the same one itself).
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    if strength < 1.0:
        x = sched.add_noise(nchw(clean), nchw(noise0), timesteps[:1])
    else:
        x = nchw(noise0) * sched.init_noise_sigma
    x_init = nhwc(x)
    step_noise = rng.standard_normal((len(timesteps), *hw), dtype=np.float32)

    injected = InjectedNoise()
    scheduling_ddpm.randn_tensor = injected
    scheduling_euler_ancestral_discrete.randn_tensor = injected
    scheduling_lcm.randn_tensor = injected
    scheduling_tcd.randn_tensor = injected
    traj, next_scales = [], []
    for i, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)
        out = nchw(synthetic_model(nhwc(x_in), float(t), phase, prediction_type))
        injected.current = nchw(step_noise[i][None][0])
        kwargs = {}
        if cls_name == "DDIMScheduler":
            kwargs = {"eta": eta, "variance_noise": injected.current if eta > 0 else None}
        elif cls_name == "TCDScheduler":
            kwargs = {"eta": eta}
        elif cls_name == "DPMSolverMultistepScheduler" and "sde" in sched.config.algorithm_type:
            kwargs = {"variance_noise": injected.current}
        x = sched.step(out, t, x, **kwargs).prev_sample
        traj.append(nhwc(x))
        if i + 1 < len(timesteps):
            # What the inpainting pipeline's add_noise(x0, noise, timesteps[i + 1]) scales by, after step i.
            ones, zeros = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
            t_next = timesteps[i + 1 : i + 2]
            a = sched.add_noise(ones, zeros, t_next).item()
            b = sched.add_noise(zeros, ones, t_next).item()
            next_scales.append((a, b))
    return {
        "timesteps": timesteps.numpy().astype(np.float64),
        "init_noise_sigma": np.float64(float(sched.init_noise_sigma)),
        "noise0": noise0,
        "clean": clean,
        "x_init": x_init,
        "step_noise": step_noise,
        "traj": np.stack(traj),
        "next_noise_scales": np.array(next_scales, np.float64).reshape(-1, 2),
    }


def all_cases() -> list[dict]:
    cases = []
    for name, (cls_name, fixed) in REGISTRY.items():
        for base in (SD15, SD2V):
            for steps in (10, 25, 7):
                cases.append(
                    dict(sampler=name, cls=cls_name, config={**base, **fixed}, steps=steps, strength=1.0)
                )
        cases.append(dict(sampler=name, cls=cls_name, config={**SD15, **fixed}, steps=10, strength=0.6))
        cases.append(dict(sampler=name, cls=cls_name, config={**SD2V, **fixed}, steps=7, strength=0.6))
    for cls_name, base, options, steps, strength in VARIANTS:
        cases.append(
            dict(sampler=cls_name, cls=cls_name, config={**base, **options}, steps=steps, strength=strength)
        )
    for name in ("ddim", "pndm", "heun", "lms", "dpmpp_2m_karras", "unipc"):
        cls_name, fixed = REGISTRY[name]
        cases.append(dict(sampler=name, cls=cls_name, config={**SD15, **fixed}, steps=1, strength=1.0))
    cases.append(dict(sampler="ddim", cls="DDIMScheduler", config=SD15, steps=10, strength=1.0, eta=1.0))
    cases.append(dict(sampler="ddim", cls="DDIMScheduler", config=SD2V, steps=7, strength=0.6, eta=0.5))
    for index, case in enumerate(cases):
        case.setdefault("eta", 0.0)
        case["id"] = f"{index:03d}_{case['sampler']}_{case['steps']}"
        case["seed"] = 1000 + index
    return cases


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = {"phase": phase_field().astype(np.float32)}
    meta = []
    for case in all_cases():
        result = run_case(
            case["cls"], case["config"], case["steps"], case["strength"], case["eta"], case["seed"]
        )
        stochastic = case["sampler"] in (
            "ddpm",
            "euler_a",
            "DDPMScheduler",
            "EulerAncestralDiscreteScheduler",
        )
        stochastic |= case["eta"] > 0 or case["config"].get("algorithm_type") == "sde-dpmsolver++"
        for key, value in result.items():
            if key == "step_noise" and not stochastic:
                continue
            if key == "clean" and case["strength"] == 1.0:
                continue
            arrays[f"{case['id']}/{key}"] = value
        meta.append(case)
    np.savez_compressed(OUT / "trajectories.npz", **arrays)
    (OUT / "cases.json").write_text(json.dumps({"diffusers": diffusers.__version__, "cases": meta}, indent=1))
    print(f"wrote {len(meta)} cases to {OUT}")


# SDXL base's scheduler_config.json (EulerDiscreteScheduler's, read by LCMScheduler.from_config).
SDXL = {**SD15, "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}
LCM_CASES = [
    (SD15, {}, 4, 1.0),
    (SD15, {}, 1, 1.0),
    (SD15, {}, 2, 1.0),
    (SD15, {}, 8, 1.0),
    (SDXL, {}, 4, 1.0),
    (SD15, {}, 8, 0.5),
    (SD2V, {}, 4, 1.0),
    (SD15, {"original_inference_steps": 30, "timestep_scaling": 5.0}, 6, 1.0),
    (SD15, {"prediction_type": "sample", "clip_sample": True}, 4, 1.0),
]
# TCD: (base, options, steps, strength, eta).
TCD_CASES = [
    (SD15, {}, 4, 1.0, 0.3),
    (SDXL, {}, 4, 1.0, 0.3),
    (SD15, {}, 1, 1.0, 0.3),
    (SD15, {}, 8, 1.0, 0.0),
    (SD15, {}, 6, 1.0, 1.0),
    (SD15, {}, 8, 0.5, 0.5),
    (SD2V, {}, 4, 1.0, 0.3),
    (SD15, {"original_inference_steps": 30, "prediction_type": "sample"}, 5, 1.0, 0.3),
]


def lcm() -> None:
    """LCMScheduler and TCDScheduler trajectories."""
    arrays = {"phase": phase_field().astype(np.float32)}
    meta = []
    runs = [("lcm", "LCMScheduler", *c, 0.0) for c in LCM_CASES]
    runs += [("tcd", "TCDScheduler", *c) for c in TCD_CASES]
    for index, (name, cls_name, base, options, steps, strength, eta) in enumerate(runs):
        case = dict(sampler=name, cls=cls_name, config={**base, **options}, steps=steps, strength=strength)
        case.update(eta=eta, id=f"{name}{index:02d}_{steps}", seed=2000 + index)
        result = run_case(case["cls"], case["config"], steps, strength, eta, case["seed"])
        for key, value in result.items():
            if key == "clean" and strength == 1.0:
                continue
            arrays[f"{case['id']}/{key}"] = value
        meta.append(case)
    np.savez_compressed(OUT / "lcm_tcd.npz", **arrays)
    (OUT / "lcm_tcd_cases.json").write_text(
        json.dumps({"diffusers": diffusers.__version__, "cases": meta}, indent=1)
    )
    print(f"wrote {len(meta)} LCM / TCD cases to {OUT}")


if __name__ == "__main__":
    import sys

    if "--lcm" in sys.argv[1:]:
        lcm()
    else:
        main()
