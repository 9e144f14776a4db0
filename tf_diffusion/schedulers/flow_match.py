"""Flow-matching samplers (SD3, Flux): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity.

``FlowMatchEuler`` is diffusers' ``FlowMatchEulerDiscreteScheduler``: sigmas spaced linearly in timestep
from the training ladder's largest to its smallest, shifted by ``shift`` (``shift * s / (1 + (shift - 1) * s)``)
or, with ``use_dynamic_shifting``, by ``exp(mu) / (exp(mu) + 1 / s - 1)`` with ``mu`` from the image's
token count (``flow_shift_mu``); the model sees ``sigma * num_train_timesteps``; each step is
``x + (sigma_next - sigma) * v``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from tf_diffusion.config import SchedulerConfig
from tf_diffusion.schedulers.base import Sampler, as_f32, row

F32 = np.float32


def flow_shift_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """diffusers' ``calculate_shift``: ``mu`` linear in the image's token count between the config's bounds."""
    cfg = config
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


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

    def __init__(
        self, config: SchedulerConfig | None = None, name: str | None = None, mu: float | None = None
    ):
        super().__init__(config, name)
        if self.config.use_karras_sigmas:
            raise ValueError(
                "use_karras_sigmas=True is not supported by FlowMatchEulerDiscreteScheduler here; allowed: False"
            )
        dynamic = self.config.use_dynamic_shifting
        if mu is not None and (
            isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu)
        ):
            raise ValueError(f"mu={mu!r} must be a finite number")
        if dynamic and mu is None:
            raise ValueError(
                "use_dynamic_shifting needs mu (flow_shift_mu of the image's token count); pass mu="
            )
        if not dynamic and mu is not None:
            raise ValueError(f"mu={mu!r} is only read with use_dynamic_shifting=True; leave it None")
        self.mu = None if mu is None else float(mu)

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
            # add_noise (diffusers' scale_noise): sigma * noise + (1 - sigma) * x0.
            "noise_scales": np.stack([F32(1) - s[:-1], s[:-1]], axis=1),
        }
        return ts, 1.0, {k: v[begin:] for k, v in tables.items()}

    def step(self, model_output, i, x, state, plan, noise=None):
        return as_f32(x) + row(plan, "dt", i) * as_f32(model_output), state
