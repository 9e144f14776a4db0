"""Flow-matching samplers (SD3, Flux): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity.

``FlowMatchEuler`` is diffusers' ``FlowMatchEulerDiscreteScheduler``: sigmas spaced linearly in timestep
from the training ladder's largest to its smallest, shifted by ``shift`` (``shift * s / (1 + (shift - 1) * s)``)
or, with ``use_dynamic_shifting``, by ``exp(mu) / (exp(mu) + 1 / s - 1)`` with ``mu`` from the image's
token count (``flow_shift_mu``); the model sees ``sigma * num_train_timesteps``; each step is
``x + (sigma_next - sigma) * v``. ``FlowMatchHeun`` (``FlowMatchHeunDiscreteScheduler``) walks the same
ladder with Heun's two evaluations per step. ``FlowDPMSolverMultistep`` is ``DPMSolverMultistepScheduler``
with ``use_flow_sigmas`` and ``prediction_type="flow_prediction"``: DPM-Solver++ on the flow pair
``(alpha_t, sigma_t) = (1 - sigma, sigma)`` over its own shifted ladder.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.schedulers import schedule
from tf_diffusion.schedulers.base import Sampler, as_f32, row, to_x0_eps
from tf_diffusion.schedulers.multistep import DPMSolverMultistep
from tf_diffusion.schedulers.sigma import heun_step, heun_tables

F32 = np.float32


def flow_shift_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """diffusers' ``calculate_shift``: ``mu`` linear in the image's token count between the config's bounds."""
    cfg = config
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def _check_mu(mu, config: SchedulerConfig, diffusers_class: str, dynamic: bool) -> float | None:
    """``mu`` as a float, or None; it is given exactly when the config shifts dynamically."""
    if not dynamic and config.use_dynamic_shifting:
        raise ValueError(
            f"use_dynamic_shifting=True is not supported by {diffusers_class} (diffusers' class has no "
            "dynamic shift); allowed: False"
        )
    if mu is not None and (isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu)):
        raise ValueError(f"mu={mu!r} must be a finite number")
    if config.use_dynamic_shifting and mu is None:
        raise ValueError("use_dynamic_shifting needs mu (flow_shift_mu of the image's token count); pass mu=")
    if not config.use_dynamic_shifting and mu is not None:
        raise ValueError(f"mu={mu!r} is only read with use_dynamic_shifting=True; leave it None")
    return None if mu is None else float(mu)


def _flow_noise_scales(sigmas32: np.ndarray) -> np.ndarray:
    # (E, 2): diffusers' scale_noise is sigma * noise + (1 - sigma) * x0 at the current step index.
    return np.stack([F32(1) - sigmas32, sigmas32], axis=1)


class FlowMatchEuler(Sampler):
    """Euler's method on the flow ODE, diffusers' FlowMatchEulerDiscreteScheduler.

    Args:
        config: ``num_train_timesteps``, ``shift``, ``use_dynamic_shifting``; ``prediction_type`` is not
            read (the model's output is the flow velocity, as the diffusers class assumes).
        name: registry name.
        mu: the dynamic shift (``flow_shift_mu`` of the image's token count); required exactly when
            ``config.use_dynamic_shifting``.

    Raises:
        ValueError: for ``mu`` given without dynamic shifting, missing with it, or not a finite number;
            for Karras sigmas (diffusers' option, not reproduced).
    """

    name = "flow_euler"
    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    dynamic = True  # whether the diffusers class takes use_dynamic_shifting

    def __init__(
        self, config: SchedulerConfig | None = None, name: str | None = None, mu: float | None = None
    ):
        super().__init__(config, name)
        if self.config.use_karras_sigmas:
            raise ValueError(
                f"use_karras_sigmas=True is not supported by {self.diffusers_class} here; allowed: False"
            )
        self.mu = _check_mu(mu, self.config, self.diffusers_class, dynamic=self.dynamic)

    def options(self) -> dict:
        return {} if self.mu is None else {"mu": self.mu}

    def _shifted(self, sigmas):
        """Static shift in the sigmas' own precision (float32 at init, float64 in set_timesteps)."""
        shift = self.config.shift
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def sigmas(self, n: int) -> np.ndarray:
        """(n + 1,) float32 sigmas of diffusers' ``set_timesteps(n)``, ending with 0."""
        cfg = self.config
        train = cfg.num_train_timesteps
        # __init__: the float32 training ladder, shifted in float32 unless shifting is dynamic.
        ladder = np.linspace(1, train, train, dtype=F32)[::-1] / F32(train)
        if not cfg.use_dynamic_shifting:
            ladder = self._shifted(ladder).astype(F32)
        sigma_max, sigma_min = float(ladder[0]), float(ladder[-1])
        s = np.linspace(sigma_max * train, sigma_min * train, n) / train  # float64, as diffusers
        if cfg.use_dynamic_shifting:
            s = math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1) ** 1.0)
        else:
            s = self._shifted(s)
        return np.concatenate([s.astype(F32), np.zeros(1, F32)])

    def _schedule(self, n, begin):
        s = self.sigmas(n)
        ts = s[:-1] * F32(self.config.num_train_timesteps)
        tables = {
            "sigma": s[:-1],
            "dt": s[1:] - s[:-1],
            "noise_scales": _flow_noise_scales(s[:-1]),
        }
        return ts, 1.0, {k: v[begin:] for k, v in tables.items()}

    def step(self, model_output, i, x, state, plan, noise=None):
        return as_f32(x) + row(plan, "dt", i) * as_f32(model_output), state


class FlowMatchHeun(FlowMatchEuler):
    """Heun's second-order method on the flow ODE, diffusers' FlowMatchHeunDiscreteScheduler.

    The ladder is FlowMatchEuler's with a static shift (the diffusers class has no dynamic shifting and
    no churn by default). Two model evaluations per step except the last, as ``Heun``: even
    evaluations take an Euler step and remember (derivative, sample); odd ones, at the next sigma,
    redo that step with the averaged derivative.

    Args:
        config: ``num_train_timesteps`` and ``shift``.
        name: registry name.
        mu: must stay None (no dynamic shifting).

    Raises:
        ValueError: for ``use_dynamic_shifting``, ``use_karras_sigmas`` or a ``mu``.
    """

    name = "flow_heun"
    diffusers_class = "FlowMatchHeunDiscreteScheduler"
    order = 2
    state_size = 2
    dynamic = False

    def _schedule(self, n, begin):
        s = self.sigmas(n)
        ts, tables = heun_tables(s[:-1] * F32(self.config.num_train_timesteps), s)
        tables["noise_scales"] = _flow_noise_scales(tables["sigma"])
        return ts, 1.0, {key: v[begin:] for key, v in tables.items()}

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        sigma = row(plan, "sigma", i)
        x0, _ = to_x0_eps(as_f32(model_output), x, 1.0 - sigma, sigma, "flow_prediction")
        return heun_step(x, x0, sigma, i, state, plan)


class FlowDPMSolverMultistep(DPMSolverMultistep):
    """DPM-Solver++ on flow sigmas, diffusers' DPMSolverMultistepScheduler with ``use_flow_sigmas=True``.

    diffusers' ``prediction_type="flow_prediction"`` is implied: the model output is the velocity and
    ``x0 = x - sigma * v``. The ladder is ``1 - linspace(1, 1 / T, n + 1)`` shifted by ``shift`` (diffusers'
    ``flow_shift``; ``exp(mu)`` with ``use_dynamic_shifting``), without its final 0; the model sees the
    integer part of ``sigma * T``. The solver (orders 1 to 3, ``algorithm_type`` "dpmsolver++" or
    "sde-dpmsolver++", ``solver_type``, ``lower_order_final``, ``euler_at_final``, ``final_sigmas_type``)
    is ``DPMSolverMultistep``'s with the flow pair ``(alpha_t, sigma_t) = (1 - sigma, sigma)``.

    Args:
        config: the DPM-Solver options plus ``shift`` and ``use_dynamic_shifting``.
        name: registry name.
        mu: the dynamic shift; required exactly when ``config.use_dynamic_shifting``.

    Raises:
        ValueError: for ``use_karras_sigmas`` (diffusers would then ignore the flow ladder), or a ``mu``
            given without dynamic shifting or missing with it.
    """

    name = "flow_dpmpp_2m"

    def __init__(
        self, config: SchedulerConfig | None = None, name: str | None = None, mu: float | None = None
    ):
        super().__init__(config, name)
        if self.config.use_karras_sigmas:
            raise ValueError(
                "use_karras_sigmas=True is not supported with flow sigmas (diffusers' Karras ladder replaces "
                "them); allowed: False"
            )
        self.mu = _check_mu(mu, self.config, self.diffusers_class, dynamic=True)

    def options(self) -> dict:
        return {} if self.mu is None else {"mu": self.mu}

    def _sigmas(self, n):
        cfg = self.config
        train = cfg.num_train_timesteps
        shift = math.exp(self.mu) if self.mu is not None else cfg.shift
        s = 1.0 - np.linspace(1, 1 / train, n + 1)  # float64, ascending from 0
        s = (shift * s / (1 + (shift - 1) * s))[::-1][:-1]
        ts = (s * train).astype(np.int64)  # torch's int64 cast truncates
        final = 0.0
        if cfg.final_sigmas_type == "sigma_min":
            final = self._final_sigma(schedule.train_sigmas(schedule.alphas_cumprod(cfg, rescale=True)))
        return ts, np.concatenate([s, [final]]).astype(F32)

    def _alpha_sigma(self, s):
        s = np.asarray(s, np.float64)
        return 1.0 - s, s

    def _x0(self, model_output, x, plan, i):
        x0, _ = to_x0_eps(
            as_f32(model_output), x, row(plan, "alpha", i), row(plan, "sigma", i), "flow_prediction"
        )
        return x0
