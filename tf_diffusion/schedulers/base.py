"""The sampler contract: a host-built plan of float32 tables and a step function over keras.ops tensors."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
from keras import ops

from tf_diffusion.config import SchedulerConfig


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Everything a sampling loop needs for one (sampler, num_steps, strength), computed once on the host.

    Attributes:
        sampler: registry name of the sampler that made the plan.
        num_steps: the requested number of inference steps.
        strength: img2img strength (1.0 for text-to-image).
        timesteps: (E,) float32 UNet timestep of each model evaluation, in the order diffusers feeds them;
            E can differ from ``num_steps`` (Heun evaluates twice per step, PLMS once more, img2img fewer).
        init_noise_sigma: text-to-image latents are ``noise * init_noise_sigma``.
        tables: float32 arrays whose first axis is the evaluation index; step ``i`` reads row ``i``.
            ``tables["noise_scales"][i]`` is ``(a, b)`` of diffusers' ``add_noise`` at evaluation ``i``.
    """

    sampler: str
    num_steps: int
    strength: float
    timesteps: np.ndarray
    init_noise_sigma: float
    tables: dict[str, np.ndarray]

    @property
    def num_evals(self) -> int:
        """E, the number of model evaluations (loop iterations)."""
        return int(self.timesteps.shape[0])


def to_x0_eps(model_output, x, alpha, sigma, prediction_type: str):
    """Denoised sample and noise from a model output: the one prediction-type converter.

    Args:
        model_output: the model's prediction: eps ("epsilon"), v ("v_prediction"), x0 ("sample") or the
            flow velocity eps - x0 ("flow_prediction").
        x: the latents the sampler holds, ``x = alpha * x0 + sigma * eps``; alpha = 1 for the
            sigma-ladder samplers (Euler, Heun, LMS), alpha = 1 - sigma for flow matching (SD3, Flux),
            alpha^2 + sigma^2 = 1 for the others.
        alpha: scalar tensor or float.
        sigma: scalar tensor or float.
        prediction_type: "epsilon", "v_prediction", "sample" or "flow_prediction".

    Returns:
        ``(x0, eps)``. v is defined on the variance-preserving rescaling of x, as in diffusers.
    """
    if prediction_type == "flow_prediction":
        # x = (1 - sigma) * x0 + sigma * eps and v = eps - x0, so x0 = x - sigma * v (diffusers' form).
        return x - sigma * model_output, x + alpha * model_output
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x - alpha * model_output) / sigma
    norm = alpha * alpha + sigma * sigma
    root = ops.sqrt(norm)
    x0 = x * (alpha / norm) - model_output * (sigma / root)
    eps = x * (sigma / norm) + model_output * (alpha / root)
    return x0, eps


def row(plan: SamplerPlan, name: str, i):
    """Row ``i`` of a plan table as a float32 tensor (a scalar for 1-D tables)."""
    return ops.take(ops.convert_to_tensor(plan.tables[name]), i, axis=0)


def flag(plan: SamplerPlan, name: str, i):
    """Row ``i`` of a 0/1 plan table as a boolean scalar, for ops.where."""
    return ops.greater(row(plan, name, i), 0.5)


def as_f32(x):
    """Sampler arithmetic stays float32 under mixed precision."""
    return ops.cast(x, "float32")


def check_num_steps(num_steps, cfg: SchedulerConfig) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > cfg.num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} exceeds num_train_timesteps={cfg.num_train_timesteps}; "
            f"allowed: 1..{cfg.num_train_timesteps}"
        )
    return int(num_steps)


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


def check_fraction(value, name: str) -> float | None:
    """None, or a fraction strictly inside (0, 1) (``denoising_start`` / ``denoising_end``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be a fraction strictly between 0 and 1, or None")
    return float(value)


class Sampler:
    """Base class: a diffusers scheduler as a plan builder plus a pure step function.

    Subclasses set the class attributes and implement ``_schedule`` and ``step``. A driver runs
    ``plan.num_evals`` iterations of: ``model_input = scale_model_input(x, i, plan)``, the UNet at
    ``plan.timesteps[i]``, then ``x, state = step(output, i, x, state, plan, noise)``.

    Attributes:
        name: registry name.
        diffusers_class: the diffusers scheduler class it reproduces.
        order: diffusers' ``scheduler.order``; img2img skips ``t_start * order`` evaluations.
        needs_noise: whether ``step`` takes fresh standard-normal noise.
        prediction_types: model parameterisations the diffusers class accepts.
        default_spacing: the class's default ``timestep_spacing``.
    """

    name = ""
    diffusers_class = ""
    order = 1
    needs_noise = False
    prediction_types = ("epsilon", "v_prediction", "sample")
    default_spacing = "linspace"
    state_size = 0  # tensors shaped like the latents in the step state

    def __init__(self, config: SchedulerConfig | None = None, name: str | None = None):
        self.config = config if config is not None else SchedulerConfig()
        if name is not None:
            self.name = name
        if self.config.prediction_type not in self.prediction_types:
            raise ValueError(
                f"prediction_type={self.config.prediction_type!r} is not supported by {self.name} "
                f"({self.diffusers_class}); allowed: {list(self.prediction_types)}"
            )

    @property
    def spacing(self) -> str:
        return self.config.timestep_spacing or self.default_spacing

    def options(self) -> dict:
        """Call options beyond the config that change the computation (DDIM's ``eta``); {} by default."""
        return {}

    def plan(
        self,
        num_steps: int,
        strength: float = 1.0,
        *,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> SamplerPlan:
        """Timesteps and float32 tables for ``num_steps`` inference steps.

        Args:
            num_steps: inference steps, 1..num_train_timesteps.
            strength: img2img strength in [0, 1]; like diffusers' img2img ``get_timesteps``, the plan keeps
                the last ``min(int(num_steps * strength), num_steps)`` steps.
            denoising_start: a fraction in (0, 1) of the schedule already done (the refiner of diffusers'
                "ensemble of experts"): instead of ``strength``, the plan keeps the evaluations whose
                timestep is below ``round(T - denoising_start * T)`` (one more for a second-order
                sampler whose count is even), as diffusers' SDXL img2img ``get_timesteps``.
            denoising_end: a fraction in (0, 1) of the schedule to run (the base model of the hand-off):
                the plan stops before the first evaluation whose timestep is below
                ``round(T - denoising_end * T)``, as diffusers' SDXL pipelines cut it.

        Returns:
            The SamplerPlan.

        Raises:
            ValueError: if num_steps, strength or a fraction is out of range, or nothing is left to run.
        """
        n = check_num_steps(num_steps, self.config)
        strength = check_strength(strength)
        start = check_fraction(denoising_start, "denoising_start")
        end = check_fraction(denoising_end, "denoising_end")
        if start is not None and end is not None and start >= end:
            raise ValueError(
                f"denoising_start={start} must be below denoising_end={end} (the part of the schedule to run)"
            )
        train = self.config.num_train_timesteps
        if start is None:
            init_timestep = min(int(n * strength), n)
            begin = max(n - init_timestep, 0) * self.order
            timesteps, init_sigma, tables = self._schedule(n, begin)
        else:
            all_timesteps = self._schedule(n, 0)[0]
            cutoff = int(round(train - start * train))
            count = int((np.asarray(all_timesteps) < cutoff).sum())
            if self.order == 2 and count % 2 == 0:
                count += 1  # diffusers: a second-order step must not be split
            begin = len(all_timesteps) - min(count, len(all_timesteps))
            timesteps, init_sigma, tables = self._schedule(n, begin)
        if begin >= len(timesteps):
            if start is not None:
                raise ValueError(
                    f"denoising_start={start} with num_steps={n} leaves no denoising step; use a smaller "
                    f"fraction or more steps"
                )
            raise ValueError(
                f"strength={strength} with num_steps={n} leaves no denoising step; "
                f"use strength >= {1 / n:.4g}"
            )
        timesteps = np.asarray(timesteps[begin:], np.float32)
        if end is not None:
            cutoff = int(round(train - end * train))
            count = int((timesteps >= cutoff).sum())
            if count == 0:
                raise ValueError(
                    f"denoising_end={end} with num_steps={n} leaves no denoising step; use a larger "
                    f"fraction or more steps"
                )
            # The evaluations keep their full-schedule tables: the cut-off only stops the loop early.
            timesteps = timesteps[:count]
            tables = {k: v[:count] for k, v in tables.items()}
        return SamplerPlan(
            sampler=self.name,
            num_steps=n,
            strength=strength,
            timesteps=timesteps,
            init_noise_sigma=float(np.float32(init_sigma)),
            tables={k: np.ascontiguousarray(v, np.float32) for k, v in tables.items()},
        )

    def _schedule(self, n: int, begin: int):
        """(all timesteps, init_noise_sigma, tables for evaluations begin.. including "noise_scales")."""
        raise NotImplementedError

    def init_state(self, x) -> tuple:
        """The multistep history for latents shaped like ``x``: a tuple of fixed-shape float32 tensors."""
        return tuple(ops.zeros(ops.shape(x), "float32") for _ in range(self.state_size))

    def scale_model_input(self, x, i, plan: SamplerPlan):
        """The UNet input for evaluation ``i`` (the sigma-ladder samplers divide by sqrt(sigma^2 + 1))."""
        del i, plan
        return x

    def step(self, model_output, i, x, state: tuple, plan: SamplerPlan, noise=None):
        """One model evaluation's update.

        Args:
            model_output: the UNet output for ``scale_model_input(x, i, plan)`` at ``plan.timesteps[i]``.
            i: evaluation index (Python int or int32 scalar tensor; no Python branching on it).
            x: current latents, float32.
            state: the tuple from ``init_state`` or the previous step.
            plan: this run's plan.
            noise: standard-normal tensor shaped like ``x``; required when ``needs_noise``.

        Returns:
            ``(x, state)`` after this evaluation.
        """
        raise NotImplementedError

    def noise_scales_at(self, plan: SamplerPlan, i: int) -> tuple[float, float]:
        """``(a, b)`` such that diffusers' ``add_noise`` at evaluation ``i`` of the plan is ``a * x0 + b * noise``.

        (The inpainting pipeline re-noises the known region to the next evaluation's level.)
        """
        a, b = plan.tables["noise_scales"][i]
        return float(a), float(b)

    def add_noise(self, x0, noise, plan: SamplerPlan):
        """Img2img start latents: ``x0`` noised to the plan's first timestep, as the diffusers class does."""
        a, b = self.noise_scales_at(plan, 0)
        return as_f32(x0) * a + as_f32(noise) * b

    def _noise(self, noise):
        if noise is None:
            raise ValueError(f"sampler {self.name!r} draws fresh noise every step; pass noise=")
        return as_f32(noise)
