"""Host-side schedule math in NumPy: training tables, timestep spacings and sigma ladders as diffusers builds them.

diffusers keeps its training tables (betas, alphas_cumprod, sigmas) in float32 tensors, and those rounded
values define the reference. We reproduce that rounding for the tables only, then derive every per-step
coefficient from them in float64 and cast the results to float32 once.
"""

from __future__ import annotations

import math

import numpy as np

from tf_diffusion.config import SchedulerConfig

F32 = np.float32


def train_betas(cfg: SchedulerConfig) -> np.ndarray:
    """The (T,) float32 training betas."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n).astype(F32)
    if cfg.beta_schedule == "scaled_linear":
        return np.square(np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n).astype(F32))

    # squaredcos_cap_v2 (Nichol & Dhariwal): Python floats, as diffusers builds the list.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], F32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates in float64 and stores float32.
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023, Algorithm 1, in float32 as diffusers computes it.
    sqrt_ab = np.sqrt(_cumprod(F32(1) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = np.square(sqrt_ab)
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return F32(1) - alphas


def alphas_cumprod(cfg: SchedulerConfig, rescale: bool = False, terminal_fix: bool = False) -> np.ndarray:
    """The (T,) float32 cumulative alpha products.

    Args:
        cfg: the schedule.
        rescale: apply ``cfg.rescale_betas_zero_snr`` (only classes that take the option do).
        terminal_fix: with zero terminal SNR, set the last entry to 2**-24 so sigmas stay finite, as
            diffusers' sigma-based schedulers do.
    """
    betas = train_betas(cfg)
    zero_snr = rescale and cfg.rescale_betas_zero_snr
    if zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    ac = _cumprod(F32(1) - betas)
    if zero_snr and terminal_fix:
        ac[-1] = 2.0**-24
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """(T,) float32 sigma = sqrt((1 - alpha_bar) / alpha_bar), ascending with t."""
    return np.sqrt((F32(1) - ac) / ac)


def integer_timesteps(spacing: str, num_train: int, n: int, offset: int) -> np.ndarray:
    """(n,) int64 descending timesteps of DDIM/DDPM/PNDM."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.int64) + offset
    return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1


def float_timesteps(spacing: str, num_train: int, n: int, offset: int) -> np.ndarray:
    """(n,) float32 descending timesteps of the Euler/Heun/LMS family (linspace ones are fractional)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n, dtype=F32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, n) * (num_train // n)).round()[::-1].astype(F32)
        return ts + F32(offset)
    return np.arange(num_train, 0, -num_train / n).round().astype(F32) - F32(1)


def multistep_timesteps(spacing: str, num_train: int, n: int, offset: int, last: int) -> np.ndarray:
    """(n,) int64 descending timesteps of DPM-Solver/UniPC: n + 1 points with the final one dropped."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64)
        return ts + offset
    return np.arange(last, 0, -num_train / n).round().astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """(n,) float64 sigmas of Karras et al. 2022 (eq. 5), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas`` by interpolating log-sigma (float32 table, as diffusers)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def vp_coefficients(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (alpha_t, sigma_t) of the variance-preserving process at VE sigmas."""
    sigma = np.asarray(sigma, np.float64)
    alpha = 1 / np.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def log_snr(sigma: np.ndarray) -> np.ndarray:
    """float64 lambda = log(alpha_t / sigma_t) = -log(sigma); +inf at sigma 0."""
    alpha, sig = vp_coefficients(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sig)
