"""The one place that draws noise: NumPy, so any framework (diffusers included) can be handed the same arrays."""

from __future__ import annotations

import numpy as np


class NoiseSource:
    """Standard-normal float32 draws from ``np.random.default_rng(seed)``, in call order.

    Args:
        seed: a non-negative integer; None draws a fresh seed (kept in ``.seed``
            so a run can be repeated).
    """

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Draw a float32 standard-normal array of ``shape``."""
        return self._rng.standard_normal(tuple(int(s) for s in shape), dtype=np.float32)
