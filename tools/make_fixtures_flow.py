"""Flow-matching sampler fixtures: diffusers' flow schedulers on a toy velocity, and the tiny SD3 folder.

For every case of tests/test_flow_samplers.py this sets up diffusers' FlowMatchEulerDiscreteScheduler,
FlowMatchHeunDiscreteScheduler or DPMSolverMultistepScheduler (``use_flow_sigmas=True``,
``prediction_type="flow_prediction"``) and stores

* the scheduler's own config (``scheduler.config``, what ``save_pretrained`` writes to scheduler_config.json),
  which the test feeds to our ``config_from_diffusers``;
* its timesteps, sigmas and ``init_noise_sigma``;
* a text-to-image trajectory under ``tf_diffusion.testing.toy_velocity`` (a NumPy function of the latents,
  the timestep and the fixed ``toy_phase`` field, which the test re-evaluates on its own latents): the start
  latents, the noise handed to the SDE solvers through ``step(variance_noise=...)`` and the latents after
  every step;
* for img2img, the 10-step timesteps and sigmas the test slices at ``t_start * order``.

It also runs diffusers' ``StableDiffusion3Pipeline`` on the tiny folder tests/fixtures/sd3/sd3-diffusers
(without T5) with FlowMatchHeun and flow DPM++ 2M (with and without dynamic shifting) from given latents and
stores the float images. Arrays are NCHW as diffusers holds them. Writes tests/fixtures/flow/{cases.json,
trajectories.npz, sd3_images.npz}.

Usage (dev only; needs torch, diffusers, transformers): python tools/make_fixtures_flow.py
"""

from __future__ import annotations

import json
import pathlib
import sys

import diffusers
import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tf_diffusion.testing import toy_phase, toy_velocity  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "flow"
SD3_FOLDER = ROOT / "tests" / "fixtures" / "sd3" / "sd3-diffusers"
SHAPE = (1, 4, 3, 3)  # NCHW


# (registry name, diffusers options, steps, mu)
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
IMG2IMG = ["flow_euler", "flow_heun", "flow_dpmpp_2m"]
SD3_CASES = ["flow_heun", "flow_dpmpp_2m", "flow_dpmpp_2m_dynamic"]


def scheduler(name, options):
    """The diffusers scheduler a registry name stands for, built from ``options``."""
    if name == "flow_euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(**options)
    if name == "flow_heun":
        return diffusers.FlowMatchHeunDiscreteScheduler(**options)
    return diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", **options
    )


def saved_config(sched) -> dict:
    """The scheduler_config.json diffusers would write for ``sched``."""
    return json.loads(sched.to_json_string())


def trajectory(index, case, arrays):
    name, options, steps, mu = case
    sched = scheduler(name, options)
    config = saved_config(sched)
    sched.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    key = f"{index}-{name}"
    arrays[f"{key}/timesteps"] = sched.timesteps.numpy().astype(np.float32)
    arrays[f"{key}/sigmas"] = sched.sigmas.numpy().astype(np.float32)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    phase = toy_phase(SHAPE)
    step_noise = rng.standard_normal((len(sched.timesteps), *SHAPE)).astype(np.float32)
    sde = options.get("algorithm_type", "").startswith("sde")
    arrays[f"{key}/x0"] = x
    if sde:
        arrays[f"{key}/step_noise"] = step_noise
    steps_out = []
    for i, t in enumerate(sched.timesteps):
        out = toy_velocity(x, float(t), phase)
        kwargs = {"variance_noise": torch.from_numpy(step_noise[i])} if sde else {}
        x = sched.step(torch.from_numpy(out), t, torch.from_numpy(x), return_dict=False, **kwargs)[0].numpy()
        steps_out.append(x)
    arrays[f"{key}/latents"] = np.stack(steps_out)
    return {
        "id": key,
        "sampler": name,
        "options": options,
        "config": config,
        "steps": steps,
        "mu": mu,
        "init_noise_sigma": float(getattr(sched, "init_noise_sigma", 1.0)),
        "sde": sde,
    }


def img2img(name, arrays):
    options = {"shift": 3.0} if name != "flow_dpmpp_2m" else {"flow_shift": 3.0}
    sched = scheduler(name, options)
    config = saved_config(sched)
    sched.set_timesteps(10)
    arrays[f"img2img-{name}/timesteps"] = sched.timesteps.numpy().astype(np.float32)
    arrays[f"img2img-{name}/sigmas"] = sched.sigmas.numpy().astype(np.float32)
    return {"sampler": name, "options": options, "config": config, "steps": 10}


def sd3_images(arrays):
    """StableDiffusion3Pipeline on the tiny folder with each case's scheduler, from fixed latents."""
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(
        SD3_FOLDER, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    shift = json.loads((SD3_FOLDER / "scheduler" / "scheduler_config.json").read_text()).get("shift", 3.0)
    latents = np.random.default_rng(5).standard_normal((1, 16, 6, 4)).astype(np.float32)  # 12x8 pixels
    arrays["latents"] = latents
    meta = []
    for name in SD3_CASES:
        if name == "flow_heun":
            sched = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        else:
            sched = diffusers.DPMSolverMultistepScheduler(
                use_flow_sigmas=True,
                prediction_type="flow_prediction",
                flow_shift=shift,
                use_dynamic_shifting=name.endswith("_dynamic"),
            )
        pipe = diffusers.StableDiffusion3Pipeline(**{**ref.components, "scheduler": sched})
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            arrays[name] = pipe(
                "a red circle",
                negative_prompt="blurry",
                num_inference_steps=4,
                guidance_scale=4.0,
                height=12,
                width=8,
                latents=torch.from_numpy(latents),
                max_sequence_length=12,
                output_type="np",
            ).images.astype(np.float32)
        meta.append({"name": name, "config": saved_config(sched)})
    return meta


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    arrays, images = {}, {}
    meta = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "shape": list(SHAPE),
        "cases": [trajectory(i, case, arrays) for i, case in enumerate(CASES)],
        "img2img": [img2img(name, arrays) for name in IMG2IMG],
    }
    meta["sd3"] = sd3_images(images)
    meta["sd3_prompt"] = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "guidance": 4.0}
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(OUT / "trajectories.npz", **arrays)
    np.savez_compressed(OUT / "sd3_images.npz", **images)
    print(f"wrote {len(meta['cases'])} trajectories, {len(meta['sd3'])} SD3 images to {OUT}")


if __name__ == "__main__":
    main()
