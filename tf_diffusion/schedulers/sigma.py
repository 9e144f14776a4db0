"""Samplers on a sigma ladder (k-diffusion style, x = x0 + sigma * eps): Euler, Euler ancestral, Heun, LMS."""

from __future__ import annotations

import numpy as np
from keras import ops

from tf_diffusion.schedulers import schedule
from tf_diffusion.schedulers.base import Sampler, as_f32, flag, row, to_x0_eps

F32 = np.float32


class _SigmaSampler(Sampler):
    """Shared plan pieces: diffusers' sigma ladder, input scaling and add_noise."""

    rescale = False  # whether the diffusers class takes rescale_betas_zero_snr
    karras = True  # whether it takes use_karras_sigmas
    karras_bounds = True  # whether its Karras ladder reads sigma_min / sigma_max from the config

    def _ladder(self, n: int):
        """(n,) float32 timesteps, float64 sigmas before the final one, and the (T,) float32 train sigmas."""
        cfg = self.config
        ac = schedule.alphas_cumprod(cfg, rescale=self.rescale, terminal_fix=True)
        train = schedule.train_sigmas(ac)
        ts = schedule.float_timesteps(self.spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        sigmas = self._interpolate(ts, train, n)
        if self.karras and cfg.use_karras_sigmas:
            lo = cfg.sigma_min if self.karras_bounds and cfg.sigma_min is not None else sigmas[-1]
            hi = cfg.sigma_max if self.karras_bounds and cfg.sigma_max is not None else sigmas[0]
            sigmas = schedule.karras_sigmas(float(lo), float(hi), n)
            ts = schedule.sigma_to_t(sigmas, np.log(train)).astype(F32)
        return ts, sigmas, train

    def _interpolate(self, ts: np.ndarray, train: np.ndarray, n: int) -> np.ndarray:
        """float64 sigmas at the (fractional) timesteps."""
        return np.interp(ts, np.arange(len(train)), train)

    def _init_sigma(self, sigmas32: np.ndarray) -> float:
        top = sigmas32.max()
        if self.spacing in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + F32(1)))

    def scale_model_input(self, x, i, plan):
        return as_f32(x) / row(plan, "input_div", i)

    def _x0(self, model_output, x, sigma):
        x0, _ = to_x0_eps(as_f32(model_output), x, 1.0, sigma, self.config.prediction_type)
        return x0


def _input_div(sigmas32: np.ndarray) -> np.ndarray:
    return np.sqrt(sigmas32 * sigmas32 + F32(1))


def _noise_scales(sigmas32: np.ndarray) -> np.ndarray:
    # (E, 2): add_noise is x0 + sigma * noise at the scheduler's current step index.
    return np.stack([np.ones_like(sigmas32), sigmas32], axis=1)


class Euler(_SigmaSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022), diffusers' EulerDiscreteScheduler."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    rescale = True

    def _interpolate(self, ts, train, n):
        if self.config.interpolation_type == "linear":
            return super()._interpolate(ts, train, n)
        # diffusers' log-linear ladder has n + 1 points (float32, from torch.linspace); the last step ends
        # on its smallest one rather than on the final sigma.
        logs = np.linspace(np.log(train[-1]), np.log(train[0]), n + 1).astype(F32)
        return np.exp(logs).astype(np.float64)

    def _schedule(self, n, begin):
        ts, sigmas, train = self._ladder(n)
        final = train[0] if self.config.final_sigmas_type == "sigma_min" else 0.0
        s = np.concatenate([sigmas, [final]]).astype(F32)
        e = len(ts)
        tables = {
            "sigma": s[:e],
            "dt": s[1 : e + 1] - s[:e],
            "input_div": _input_div(s[:e]),
            "noise_scales": _noise_scales(s[:e]),
        }
        tables = {k: v[begin:] for k, v in tables.items()}
        return ts, self._init_sigma(s), tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        sigma = row(plan, "sigma", i)
        x0 = self._x0(model_output, x, sigma)
        return x + (x - x0) / sigma * row(plan, "dt", i), state


class EulerAncestral(_SigmaSampler):
    """Euler ancestral sampling (k-diffusion), diffusers' EulerAncestralDiscreteScheduler."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")
    needs_noise = True
    rescale = True
    karras = False

    def _schedule(self, n, begin):
        ts, sigmas, _ = self._ladder(n)
        s = np.concatenate([sigmas, [0.0]]).astype(F32)
        e = len(ts)
        s_from, s_to = s[:e].astype(np.float64), s[1 : e + 1].astype(np.float64)
        up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = np.sqrt(np.maximum(s_to**2 - up**2, 0.0))
        tables = {
            "sigma": s[:e],
            "dt": down.astype(F32) - s[:e],
            "sigma_up": up,
            "input_div": _input_div(s[:e]),
            "noise_scales": _noise_scales(s[:e]),
        }
        tables = {k: v[begin:] for k, v in tables.items()}
        return ts, self._init_sigma(s), tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        sigma = row(plan, "sigma", i)
        x0 = self._x0(model_output, x, sigma)
        x = x + (x - x0) / sigma * row(plan, "dt", i)
        return x + self._noise(noise) * row(plan, "sigma_up", i), state


def heun_tables(timesteps: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, dict]:
    """diffusers' Heun interleaving of an (n,) timestep and (n + 1,) float32 sigma ladder ending in 0.

    Returns the (E,) timesteps ``t0, t1, t1, ..., t_{n-1}, t_{n-1}`` (E = 2n - 1) and the tables ``sigma``
    (each evaluation's sigma), ``first`` (whether it starts a step) and ``dt`` (the step it takes; the
    second evaluation, at the next sigma, redoes the first's step).
    """
    s = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    ts = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
    e = len(ts)
    k = np.arange(e)
    first = k % 2 == 0
    dt = np.where(first, s[np.minimum(k + 1, e)] - s[k], s[k] - s[np.maximum(k - 1, 0)])
    return ts, {"sigma": s[:e], "dt": dt, "first": first}


def heun_step(x, x0, sigma, i, state, plan):
    """One Heun evaluation from the denoised ``x0``: an Euler step when it starts a step, else the mean slope.

    ``state`` is the (derivative, sample) the step's first evaluation remembered; ``plan`` holds
    ``heun_tables``' ``first`` and ``dt``. Returns the next sample and the new state.
    """
    prev_derivative, prev_x = state
    derivative = (x - x0) / sigma
    first = flag(plan, "first", i)
    slope = ops.where(first, derivative, (prev_derivative + derivative) / 2)
    base = ops.where(first, x, prev_x)
    return base + slope * row(plan, "dt", i), (derivative, x)


class Heun(_SigmaSampler):
    """Heun's second-order method (Karras et al. 2022), diffusers' HeunDiscreteScheduler.

    Two model evaluations per step except the last: even evaluations take an Euler step and remember
    (derivative, sample); odd ones redo that step with the averaged derivative.
    """

    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    order = 2
    state_size = 2
    karras_bounds = False

    def _schedule(self, n, begin):
        ts, sigmas, _ = self._ladder(n)
        s = np.concatenate([sigmas, [0.0]]).astype(F32)
        ts, tables = heun_tables(ts, s)
        tables["input_div"] = _input_div(tables["sigma"])
        tables["noise_scales"] = _noise_scales(tables["sigma"])
        tables = {name: v[begin:] for name, v in tables.items()}
        return ts, self._init_sigma(s), tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        # The first evaluation of a step is at sigma; the second at the next sigma, where it also converts.
        sigma = row(plan, "sigma", i)
        x0 = self._x0(model_output, x, sigma)
        if self.config.clip_sample:
            x0 = ops.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        return heun_step(x, x0, sigma, i, state, plan)


def _lms_coefficients(s: np.ndarray, k: int, order: int) -> list[float]:
    # Integral over [s_k, s_{k+1}] of each Lagrange basis polynomial through s_k, ..., s_{k-order+1}.
    nodes = [float(s[k - j]) for j in range(order)]
    coeffs = []
    for j in range(order):
        poly = np.array([1.0])
        for m in range(order):
            if m != j:
                poly = np.polymul(poly, np.array([1.0, -nodes[m]]) / (nodes[j] - nodes[m]))
        integral = np.polyint(poly)
        coeffs.append(float(np.polyval(integral, float(s[k + 1])) - np.polyval(integral, float(s[k]))))
    return coeffs


class LMS(_SigmaSampler):
    """Linear multistep (order 4, k-diffusion), diffusers' LMSDiscreteScheduler.

    The history is the last three derivatives; the coefficient table already drops the terms diffusers
    cannot use yet (the first steps of a run, including img2img runs that start mid-ladder).
    """

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    state_size = 3
    karras_bounds = False

    def _schedule(self, n, begin):
        ts, sigmas, _ = self._ladder(n)
        s = np.concatenate([sigmas, [0.0]]).astype(F32)
        e = len(ts)
        coeffs = np.zeros((e - begin, 4))
        for i in range(e - begin):
            k = begin + i
            # diffusers picks the order from the absolute step index but only has i + 1 derivatives.
            c = _lms_coefficients(s, k, min(k + 1, 4))
            used = min(i + 1, 4, len(c))
            coeffs[i, :used] = c[:used]
        tables = {
            "sigma": s[begin:e],
            "coeffs": coeffs,
            "input_div": _input_div(s[begin:e]),
            "noise_scales": _noise_scales(s[begin:e]),
        }
        return ts, self._init_sigma(s), tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        d1, d2, d3 = state
        sigma = row(plan, "sigma", i)
        x0 = self._x0(model_output, x, sigma)
        derivative = (x - x0) / sigma
        c = row(plan, "coeffs", i)
        return x + (c[0] * derivative + c[1] * d1 + c[2] * d2 + c[3] * d3), (derivative, d1, d2)
