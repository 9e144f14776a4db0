"""Samplers on the discrete alphas_cumprod table: DDIM, DDPM, PNDM (PLMS), LCM and TCD."""

from __future__ import annotations

import numbers

import numpy as np
from keras import ops

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.schedulers import schedule
from tf_diffusion.schedulers.base import Sampler, as_f32, flag, row, to_x0_eps


def _vp_noise_scales(ac: np.ndarray, ts: np.ndarray) -> np.ndarray:
    # (E, 2): add_noise looks alpha_bar up at the timestep it is given.
    return np.stack([np.sqrt(ac[ts]), np.sqrt(1 - ac[ts])], axis=1)


class DDIM(Sampler):
    """DDIM (Song et al. 2020), diffusers' DDIMScheduler; ``eta > 0`` adds DDPM-like noise."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    default_spacing = "leading"

    def __init__(self, config: SchedulerConfig | None = None, name: str | None = None, eta: float = 0.0):
        super().__init__(config, name)
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or eta < 0:
            raise ValueError(f"eta must be a non-negative number, got {eta!r}")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0

    def options(self) -> dict:
        return {"eta": self.eta}

    def _schedule(self, n, begin):
        cfg = self.config
        ac = schedule.alphas_cumprod(cfg, rescale=True).astype(np.float64)
        ts = schedule.integer_timesteps(self.spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        # diffusers steps to t - T // n whatever the spacing; below 0 it uses the "final" alpha.
        prev = ts - cfg.num_train_timesteps // n
        final = 1.0 if cfg.set_alpha_to_one else ac[0]
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * np.sqrt(variance)
        tables = {
            "alpha": np.sqrt(a_t),
            "sigma": np.sqrt(1 - a_t),
            "alpha_prev": np.sqrt(a_prev),
            "direction": np.sqrt(1 - a_prev - std**2),
            "noise_std": std,
            "noise_scales": _vp_noise_scales(ac, ts),
        }
        tables = {k: v[begin:] for k, v in tables.items()}
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        x0, eps = _clipped_x0_eps(self.config, model_output, x, plan, i)
        x = row(plan, "alpha_prev", i) * x0 + row(plan, "direction", i) * eps
        if self.needs_noise:
            x = x + row(plan, "noise_std", i) * self._noise(noise)
        return x, state


class DDPM(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020), diffusers' DDPMScheduler."""

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    default_spacing = "leading"
    needs_noise = True

    def _schedule(self, n, begin):
        cfg = self.config
        ac = schedule.alphas_cumprod(cfg, rescale=True).astype(np.float64)
        ts = schedule.integer_timesteps(self.spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        # The previous timestep is the next one in the list; after the last one alpha_bar is 1.
        a_t = ac[ts]
        a_prev = np.concatenate([ac[ts[1:]], [1.0]])
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        variance = np.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
        variance_type = cfg.variance_type or "fixed_small"
        std = np.sqrt(beta_t) if variance_type == "fixed_large" else np.sqrt(variance)
        tables = {
            "alpha": np.sqrt(a_t),
            "sigma": np.sqrt(1 - a_t),
            "coef_x0": np.sqrt(a_prev) * beta_t / (1 - a_t),
            "coef_x": np.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t),
            # diffusers adds no noise at t = 0.
            "noise_std": np.where(ts > 0, std, 0.0),
            "noise_scales": _vp_noise_scales(ac, ts),
        }
        tables = {k: v[begin:] for k, v in tables.items()}
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        x0, _ = _clipped_x0_eps(self.config, model_output, x, plan, i)
        x = row(plan, "coef_x0", i) * x0 + row(plan, "coef_x", i) * x
        return x + row(plan, "noise_std", i) * self._noise(noise), state


class PNDM(Sampler):
    """PLMS, the linear multistep half of PNDM (Liu et al. 2022), diffusers' PNDMScheduler with skip_prk_steps.

    State: the last three model outputs kept for the multistep formula, and the sample of the first step,
    which diffusers' second evaluation steps from again (a Heun-like warm-up).
    """

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    default_spacing = "leading"
    prediction_types = ("epsilon", "v_prediction")
    state_size = 4

    def __init__(self, config: SchedulerConfig | None = None, name: str | None = None):
        super().__init__(config, name)
        if not self.config.skip_prk_steps:
            raise ValueError(
                "skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is not supported; allowed: skip_prk_steps=True"
            )

    def _schedule(self, n, begin):
        cfg = self.config
        ac = schedule.alphas_cumprod(cfg).astype(np.float64)
        asc = schedule.integer_timesteps(self.spacing, cfg.num_train_timesteps, n, cfg.steps_offset)[::-1]
        # diffusers' plms_timesteps: every timestep once, the second-to-last (in time) twice, descending.
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1]
        ratio = cfg.num_train_timesteps // n
        final = 1.0 if cfg.set_alpha_to_one else ac[0]
        # Multistep weights on (current, last, second-last, third-last stored outputs); the second
        # evaluation is not stored, it only averages with the first.
        weights = {
            0: (1, 0, 0, 0),
            1: (0.5, 0.5, 0, 0),
            2: (1.5, -0.5, 0, 0),
            3: (23 / 12, -16 / 12, 5 / 12, 0),
        }
        names = ("alpha", "sigma", "coef_x", "coef_eps", "save_sample", "use_saved", "store", "weights")
        cols = {name: [] for name in names}
        for c in range(len(ts) - begin):  # diffusers' counter restarts at 0 in img2img runs
            t = int(ts[begin + c])
            # The second evaluation redoes the first step (t + ratio -> t) from the saved sample.
            t_from, t_to = (t + ratio, t) if c == 1 else (t, t - ratio)
            a_t = ac[t_from]
            a_prev = ac[t_to] if t_to >= 0 else final
            denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
            cols["alpha"].append(np.sqrt(a_t))
            cols["sigma"].append(np.sqrt(1 - a_t))
            cols["coef_x"].append(np.sqrt(a_prev / a_t))
            cols["coef_eps"].append((a_prev - a_t) / denom)
            cols["save_sample"].append(c == 0)
            cols["use_saved"].append(c == 1)
            cols["store"].append(c != 1)
            cols["weights"].append(weights.get(c, (55 / 24, -59 / 24, 37 / 24, -9 / 24)))
        tables = {name: np.array(v, np.float64) for name, v in cols.items()}
        tables["noise_scales"] = _vp_noise_scales(ac, ts[begin:])
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        out = as_f32(model_output)
        last1, last2, last3, saved = state
        w = row(plan, "weights", i)
        combined = w[0] * out + w[1] * last1 + w[2] * last2 + w[3] * last3
        base = ops.where(flag(plan, "use_saved", i), saved, x)
        _, eps = to_x0_eps(
            combined, base, row(plan, "alpha", i), row(plan, "sigma", i), self.config.prediction_type
        )
        x_next = row(plan, "coef_x", i) * base - row(plan, "coef_eps", i) * eps
        store = flag(plan, "store", i)
        state = (
            ops.where(store, out, last1),
            ops.where(store, last1, last2),
            ops.where(store, last2, last3),
            ops.where(flag(plan, "save_sample", i), x, saved),
        )
        return x_next, state


class LCM(Sampler):
    """Latent consistency sampling (Luo et al. 2023), diffusers' LCMScheduler.

    The timesteps are ``num_steps`` evenly spaced picks from the distillation schedule
    ``k * (1 .. original_inference_steps) - 1`` (k = T // original_inference_steps), ``timestep_spacing``
    and ``steps_offset`` unused, as in diffusers. Each step denoises with the consistency boundary
    condition ``c_skip * x + c_out * x0`` (scalings of ``t * timestep_scaling`` with sigma_data 0.5) and,
    before every step but the last, re-noises to the next timestep with fresh noise. For LCM-distilled
    UNets and LCM-LoRAs; guidance is usually off or low (1 to 2).
    """

    name = "lcm"
    diffusers_class = "LCMScheduler"
    default_spacing = "leading"
    needs_noise = True

    def _schedule(self, n, begin):
        cfg = self.config
        ts = _lcm_timesteps(cfg, n)
        ac = schedule.alphas_cumprod(cfg, rescale=True).astype(np.float64)
        a_t = ac[ts]
        last = np.arange(n) == n - 1
        a_prev = np.where(last, 1.0, ac[np.concatenate([ts[1:], ts[-1:]])])  # no noise after the last step
        scaled = ts.astype(np.float64) * cfg.timestep_scaling
        sigma_data = 0.5
        tables = {
            "alpha": np.sqrt(a_t),
            "sigma": np.sqrt(1 - a_t),
            "c_skip": sigma_data**2 / (scaled**2 + sigma_data**2),
            "c_out": scaled / np.sqrt(scaled**2 + sigma_data**2),
            "alpha_prev": np.sqrt(a_prev),
            "noise_std": np.sqrt(1 - a_prev),
            "noise_scales": _vp_noise_scales(ac, ts),
        }
        tables = {k: v[begin:] for k, v in tables.items()}
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        x0, _ = _clipped_x0_eps(self.config, model_output, x, plan, i)
        denoised = row(plan, "c_out", i) * x0 + row(plan, "c_skip", i) * x
        x = row(plan, "alpha_prev", i) * denoised + row(plan, "noise_std", i) * self._noise(noise)
        return x, state


class TCD(Sampler):
    """Trajectory consistency distillation sampling (Zheng et al. 2024), diffusers' TCDScheduler.

    The timesteps are LCM's. Each step predicts x0 and eps, noises them to the intermediate timestep
    ``s = floor((1 - eta) * t_next)`` (0 after the last step) and, with ``eta > 0``, before every step but
    the last, moves from ``s`` to ``t_next`` with fresh noise. ``eta`` (the paper's gamma) defaults to 0.3,
    TCDScheduler.step's default; 0 makes it deterministic.
    """

    name = "tcd"
    diffusers_class = "TCDScheduler"
    default_spacing = "leading"

    def __init__(self, config: SchedulerConfig | None = None, name: str | None = None, eta: float = 0.3):
        super().__init__(config, name)
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.needs_noise = self.eta > 0

    def options(self) -> dict:
        return {"eta": self.eta}

    def _schedule(self, n, begin):
        ts = _lcm_timesteps(self.config, n)
        ac = schedule.alphas_cumprod(self.config, rescale=True).astype(np.float64)
        last = np.arange(n) == n - 1
        t_next = np.where(last, 0, np.concatenate([ts[1:], ts[-1:]]))
        # torch computes (1 - eta) * t_next in float32 before the floor.
        s = np.floor(np.float32(1 - self.eta) * t_next.astype(np.float32)).astype(np.int64)
        a_s, a_next = ac[s], ac[t_next]
        moves = (~last) & (self.eta > 0)
        tables = {
            "alpha": np.sqrt(ac[ts]),
            "sigma": np.sqrt(1 - ac[ts]),
            "alpha_s": np.sqrt(a_s),
            "sigma_s": np.sqrt(1 - a_s),
            "ratio": np.where(moves, np.sqrt(a_next / a_s), 1.0),
            "noise_std": np.where(moves, np.sqrt(np.maximum(1 - a_next / a_s, 0.0)), 0.0),
            "noise_scales": _vp_noise_scales(ac, ts),
        }
        tables = {k: v[begin:] for k, v in tables.items()}
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        x0, eps = to_x0_eps(
            as_f32(model_output), x, row(plan, "alpha", i), row(plan, "sigma", i), self.config.prediction_type
        )
        x = row(plan, "ratio", i) * (row(plan, "alpha_s", i) * x0 + row(plan, "sigma_s", i) * eps)
        if self.needs_noise:
            x = x + row(plan, "noise_std", i) * self._noise(noise)
        return x, state


def _clipped_x0_eps(cfg: SchedulerConfig, model_output, x, plan, i):
    """The model's x0 and eps at step ``i`` (tables ``alpha`` / ``sigma``), x0 clipped when the config
    says ``clip_sample``, as diffusers' DDIM, DDPM and LCM schedulers clip it."""
    x0, eps = to_x0_eps(
        as_f32(model_output), x, row(plan, "alpha", i), row(plan, "sigma", i), cfg.prediction_type
    )
    if cfg.clip_sample:
        x0 = ops.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    return x0, eps


def _lcm_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """LCMScheduler's / TCDScheduler's timesteps: n evenly spaced picks from k * (1 .. original) - 1."""
    original = cfg.original_inference_steps
    if original > cfg.num_train_timesteps:
        raise ValueError(
            f"original_inference_steps={original} exceeds num_train_timesteps={cfg.num_train_timesteps}"
        )
    if n > original:
        raise ValueError(
            f"num_steps={n} exceeds original_inference_steps={original} (the steps are picked from the "
            f"distillation schedule); allowed: 1..{original}"
        )
    k = cfg.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
