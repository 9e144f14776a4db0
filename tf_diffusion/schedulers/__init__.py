"""Samplers reproducing diffusers' schedulers: host-built float32 plans and compile-friendly step functions.

Example:
    >>> sampler = get_sampler("dpmpp_2m_karras", SchedulerConfig())
    >>> plan = sampler.plan(25)
    >>> x = noise * plan.init_noise_sigma
    >>> state = sampler.init_state(x)
    >>> for i in range(plan.num_evals):
    ...     out = unet(sampler.scale_model_input(x, i, plan), plan.timesteps[i], context)
    ...     x, state = sampler.step(out, i, x, state, plan, noise=draw() if sampler.needs_noise else None)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.schedulers.base import Sampler, SamplerPlan, to_x0_eps
from tf_diffusion.schedulers.discrete import DDIM, DDPM, LCM, PNDM, TCD
from tf_diffusion.schedulers.flow_match import (
    FlowDPMSolverMultistep,
    FlowMatchEuler,
    FlowMatchHeun,
    flow_shift_mu,
)
from tf_diffusion.schedulers.multistep import DPMSolverMultistep, UniPC
from tf_diffusion.schedulers.sigma import LMS, Euler, EulerAncestral, Heun

__all__ = [
    "SAMPLERS",
    "Sampler",
    "SamplerPlan",
    "config_from_diffusers",
    "flow_shift_mu",
    "get_sampler",
    "to_x0_eps",
]

# Registry name -> (sampler class, config options the name fixes).
SAMPLERS: dict[str, tuple[type[Sampler], dict]] = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "ddpm": (DDPM, {}),
    "euler": (Euler, {}),
    "euler_a": (EulerAncestral, {}),
    "heun": (Heun, {}),
    "lms": (LMS, {}),
    "dpmpp_2m": (
        DPMSolverMultistep,
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": False,
            "use_karras_sigmas": False,
        },
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistep,
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": False,
            "use_karras_sigmas": True,
        },
    ),
    "dpmpp_2m_sde": (
        DPMSolverMultistep,
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": False,
            "use_karras_sigmas": False,
        },
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistep,
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": False,
            "use_karras_sigmas": True,
        },
    ),
    "unipc": (UniPC, {}),
    "lcm": (LCM, {}),
    "tcd": (TCD, {}),
    # Flow matching (SD3, Flux): the model predicts the velocity; ``shift`` is diffusers' shift / flow_shift.
    "flow_euler": (FlowMatchEuler, {}),
    "flow_heun": (FlowMatchHeun, {}),
    "flow_dpmpp_2m": (
        FlowDPMSolverMultistep,
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": True,
            "use_karras_sigmas": False,
        },
    ),
    "flow_dpmpp_2m_sde": (
        FlowDPMSolverMultistep,
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": True,
            "use_karras_sigmas": False,
        },
    ),
}
# diffusers class name -> sampler class; these take every option from the config. The flow form of
# DPMSolverMultistepScheduler (use_flow_sigmas) shares its class name, so it is reached by registry name.
_DIFFUSERS_CLASSES = {
    cls.diffusers_class: cls
    for cls in (
        DDIM, PNDM, DDPM, Euler, EulerAncestral, Heun, LMS, DPMSolverMultistep, UniPC, LCM, TCD, FlowMatchEuler,
        FlowMatchHeun,
    )
}  # fmt: skip


def get_sampler(name: str, config: SchedulerConfig | None = None, **options) -> Sampler:
    """A sampler by registry name or diffusers scheduler class name.

    Args:
        name: one of ``SAMPLERS`` ("ddim", "euler_a", "dpmpp_2m_karras", ...) or a diffusers class name
            ("DDIMScheduler", "EulerAncestralDiscreteScheduler", ...). Registry names fix the options in
            their name (e.g. "dpmpp_2m_karras" sets ``use_karras_sigmas=True``); class names read every
            option from ``config``.
        config: training schedule and scheduler options; defaults to SD 1.5's.
        **options: sampler-specific call options (``eta`` for "ddim" and "tcd").

    Returns:
        The Sampler.

    Raises:
        ValueError: for an unknown name, or options the sampler does not support.

    Example:
        >>> sampler = get_sampler("EulerDiscreteScheduler", SchedulerConfig(use_karras_sigmas=True))
    """
    config = config if config is not None else SchedulerConfig()
    if name in SAMPLERS:
        cls, fixed = SAMPLERS[name]
        config = dataclasses.replace(config, **fixed)
    elif name in _DIFFUSERS_CLASSES:
        cls = _DIFFUSERS_CLASSES[name]
        if cls is DPMSolverMultistep and config.use_flow_sigmas:
            cls = FlowDPMSolverMultistep  # the same diffusers class in its flow form
    else:
        raise ValueError(
            f"unknown sampler {name!r}; allowed: {sorted(SAMPLERS)} or diffusers classes "
            f"{sorted(_DIFFUSERS_CLASSES)}"
        )
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "config", "name"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"sampler {name!r} does not take options {unknown}; allowed: {sorted(allowed)}")
    return cls(config, name=name, **options)


# Options of diffusers' scheduler_config.json that change results but are not reproduced, with the
# value under which they are harmless.
_UNSUPPORTED = {
    "trained_betas": None,
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "timestep_type": "discrete",
    "predict_x0": True,
    "solver_p": None,
}


def config_from_diffusers(data: Mapping) -> SchedulerConfig:
    """A SchedulerConfig from a diffusers scheduler_config.json dict.

    Keys our samplers read become fields; keys missing from the file keep SchedulerConfig's defaults
    (None fields then take each sampler's diffusers class default, as diffusers does). Keys no sampler
    reads (``_class_name``, ``skip_prk_steps`` of other classes, ...) are ignored, like diffusers ignores
    the options of other classes.

    DPMSolverMultistepScheduler's flow form (``use_flow_sigmas: true``, ``prediction_type:
    "flow_prediction"``) reads its ``flow_shift`` as ``shift``; it runs as the registry's
    "flow_dpmpp_2m" / "flow_dpmpp_2m_sde" (``SAMPLERS``), since the class name alone means the
    variance-preserving form.

    Raises:
        ValueError: for options set to a value these samplers do not reproduce (``trained_betas``,
            ``thresholding``, exponential/beta sigmas, ...), flow sigmas without flow prediction or the
            other way round, or invalid field values.
    """
    for key, harmless in _UNSUPPORTED.items():
        if key in data and data[key] != harmless:
            raise ValueError(f"scheduler option {key}={data[key]!r} is not supported; allowed: {harmless!r}")
    flow = bool(data.get("use_flow_sigmas", False))
    if flow != (data.get("prediction_type") == "flow_prediction"):
        raise ValueError(
            f"use_flow_sigmas={data.get('use_flow_sigmas')!r} with prediction_type="
            f"{data.get('prediction_type')!r} is not supported; allowed: use_flow_sigmas=True together "
            "with prediction_type='flow_prediction' (the flow samplers), or neither"
        )
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    kwargs = {}
    if flow:
        # DPMSolverMultistepScheduler's flow_shift is our shift (FlowMatch*'s name); its default is 1.0.
        data = {k: v for k, v in data.items() if k not in ("prediction_type", "shift")}
        kwargs["shift"] = data.get("flow_shift", 1.0)
    else:
        data = {k: v for k, v in data.items() if k != "use_flow_sigmas"}
    for key, value in data.items():
        if key not in fields:
            continue
        if key == "variance_type" and value in ("learned", "learned_range"):
            raise ValueError(f"variance_type={value!r} is not supported; SD's UNet predicts no variance")
        if isinstance(value, list):
            value = tuple(value)
        if key == "lambda_min_clipped" and value is None:
            value = -math.inf
        kwargs[key] = value
    return SchedulerConfig(**kwargs)
