"""Exponential-integrator multistep samplers on data predictions: DPM-Solver++ (2M, 2M SDE) and UniPC.

Both work on x0 predictions in the variance-preserving parameterisation (``flow_match.FlowDPMSolverMultistep``
swaps in the flow-matching pair and ladder). Every per-step coefficient, including which order each step
runs at, is computed on the host; the step is a fixed linear combination of the sample, the current x0
prediction and the stored previous ones.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from tf_diffusion.schedulers import schedule
from tf_diffusion.schedulers.base import Sampler, as_f32, flag, row, to_x0_eps

F32 = np.float32


class _MultistepSampler(Sampler):
    """Shared sigma ladder (int timesteps, optionally Karras), VP conversion and add_noise."""

    round_karras_timesteps_always = False

    def _ladder(self, n: int, last: int):
        cfg = self.config
        ac = schedule.alphas_cumprod(cfg, rescale=True, terminal_fix=True)
        train = schedule.train_sigmas(ac)
        ts = schedule.multistep_timesteps(self.spacing, cfg.num_train_timesteps, n, cfg.steps_offset, last)
        if cfg.use_karras_sigmas:
            lo = cfg.sigma_min if cfg.sigma_min is not None else train[0]
            hi = cfg.sigma_max if cfg.sigma_max is not None else train[-1]
            sigmas = schedule.karras_sigmas(float(lo), float(hi), n)
            t = schedule.sigma_to_t(sigmas, np.log(train))
            if self.round_karras_timesteps_always or cfg.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
            ts = np.trunc(t).astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
        return ts, sigmas, train

    def _alpha_sigma(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 (alpha_t, sigma_t) at the ladder's sigmas: the variance-preserving pair."""
        return schedule.vp_coefficients(s)

    def _alpha_sigma_tables(self, s: np.ndarray, e: int, begin: int) -> dict:
        # The x0 conversion and add_noise both use the (alpha_t, sigma_t) pair at the current step index.
        alpha, sigma = self._alpha_sigma(s[begin:e])
        return {"alpha": alpha, "sigma": sigma, "noise_scales": np.stack([alpha, sigma], axis=1)}

    def _x0(self, model_output, x, plan, i):
        x0, _ = to_x0_eps(
            as_f32(model_output), x, row(plan, "alpha", i), row(plan, "sigma", i), self.config.prediction_type
        )
        return x0


class DPMSolverMultistep(_MultistepSampler):
    """DPM-Solver++ multistep (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler.

    ``algorithm_type`` "dpmsolver++" is DPM++ 2M (with ``solver_order=2``); "sde-dpmsolver++" is DPM++ 2M SDE,
    which takes fresh noise every step. State: the previous two x0 predictions.
    """

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    state_size = 2

    def __init__(self, config=None, name=None):
        super().__init__(config, name)
        self.needs_noise = self.config.algorithm_type == "sde-dpmsolver++"

    def _sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n,) integer timesteps and the (n + 1,) float32 sigmas of diffusers' ``set_timesteps(n)``."""
        cfg = self.config
        ac = schedule.alphas_cumprod(cfg, rescale=True, terminal_fix=True)
        # lambda_min_clipped trims the noisiest end of the linspace/leading range.
        lam = np.log(np.sqrt(ac.astype(np.float64))) - np.log(np.sqrt(1 - ac.astype(np.float64)))
        last = cfg.num_train_timesteps - int(np.searchsorted(lam[::-1], cfg.lambda_min_clipped))
        ts, sigmas, train = self._ladder(n, last)
        return ts, np.concatenate([sigmas, [self._final_sigma(train)]]).astype(F32)

    def _final_sigma(self, train: np.ndarray) -> float:
        return float(train[0]) if self.config.final_sigmas_type == "sigma_min" else 0.0

    def _schedule(self, n, begin):
        cfg = self.config
        ts, s = self._sigmas(n)
        e = len(ts)
        alpha_all, sigma_all = self._alpha_sigma(s)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha_all) - np.log(sigma_all)  # +inf at a final sigma of 0
        order_max = cfg.solver_order
        heun = cfg.solver_type == "heun"
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        # Columns: coefficients on x, x0, (x0 - m1), (m1 - m2), noise.
        coefs = np.zeros((e - begin, 5))
        for i in range(e - begin):
            k = begin + i
            lower_final = k == e - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and e < 15) or cfg.final_sigmas_type == "zero"
            )
            lower_second = k == e - 2 and cfg.lower_order_final and e < 15
            done = min(i, order_max)  # diffusers' lower_order_nums: steps taken so far in this run
            if order_max == 1 or done < 1 or lower_final:
                order = 1
            elif order_max == 2 or done < 2 or lower_second:
                order = 2
            else:
                order = 3
            a_t, s_t, s_s0 = alpha_all[k + 1], sigma_all[k + 1], sigma_all[k]
            with np.errstate(invalid="ignore"):
                h = lam[k + 1] - lam[k]
                r0 = (lam[k] - lam[k - 1]) / h if order > 1 else 1.0
                r1 = (lam[k - 1] - lam[k - 2]) / h if order > 2 else 1.0
            if sde:
                em = -np.expm1(-2.0 * h)  # 1 - exp(-2h)
                cx, c0 = s_t / s_s0 * np.exp(-h), a_t * em
                b = a_t * (em / (-2.0 * h) + 1.0) if order > 1 else 0.0
                c = a_t * ((em - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if order > 2 else 0.0
                b_mid = 0.5 * a_t * em
                cn = s_t * np.sqrt(em)
            else:
                em = np.expm1(-h)  # exp(-h) - 1
                cx, c0 = s_t / s_s0, -a_t * em
                b = a_t * (em / h + 1.0) if order > 1 else 0.0
                c = -a_t * ((em + h) / h**2 - 0.5) if order > 2 else 0.0
                b_mid = -0.5 * a_t * em
                cn = 0.0
            # Second order: x += B * D1 with D1 = (m0 - m1) / r0 (midpoint uses its own B).
            # Third order: x += B * D1 + C * D2 with D1, D2 from both differences.
            d01 = d12 = 0.0
            if order == 2:
                d01 = (b if heun else b_mid) / r0
            elif order == 3:
                d01 = b * (1 + r0 / (r0 + r1)) / r0 + c / ((r0 + r1) * r0)
                d12 = -b * r0 / (r0 + r1) / r1 - c / ((r0 + r1) * r1)
            coefs[i] = (cx, c0, d01, d12, cn)
        tables = self._alpha_sigma_tables(s, e, begin)
        tables["coefs"] = coefs
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        m1, m2 = state
        x0 = self._x0(model_output, x, plan, i)
        c = row(plan, "coefs", i)
        x_next = c[0] * x + c[1] * x0 + c[2] * (x0 - m1) + c[3] * (m1 - m2)
        if self.needs_noise:
            x_next = x_next + c[4] * self._noise(noise)
        return x_next, (x0, m1)


def _unipc_rhos(h: float, rks: list[float], order: int, bh1: bool, corrector: bool):
    """UniPC's B(h) and the solution weights rho (Zhao et al. 2023, predict-x0 form)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if bh1 else np.expm1(hh)
    r = np.array(list(rks) + [1.0])
    rows, b, factorial = [], [], 1
    for j in range(1, order + 1):
        rows.append(r ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = np.array(rows), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
    elif order == 1:
        rhos = np.zeros(0)
    elif order == 2:
        rhos = np.array([0.5])
    else:
        rhos = np.linalg.solve(big_r[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rhos


class UniPC(_MultistepSampler):
    """UniPC (Zhao et al. 2023): UniP predictor plus UniC corrector, diffusers' UniPCMultistepScheduler.

    State: the corrected sample of the previous step and the previous ``solver_order`` x0 predictions.
    """

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    round_karras_timesteps_always = True

    @property
    def state_size(self) -> int:
        return 1 + self.config.solver_order

    def _schedule(self, n, begin):
        cfg = self.config
        ts, sigmas, train = self._ladder(n, cfg.num_train_timesteps)
        if cfg.final_sigmas_type == "zero":
            final = 0.0
        else:
            final = sigmas[-1] if cfg.use_karras_sigmas else train[0]
        s = np.concatenate([sigmas, [final]]).astype(F32)
        e = len(ts)
        lam = schedule.log_snr(s)
        alpha_all, sigma_all = schedule.vp_coefficients(s)
        p = cfg.solver_order
        bh1 = cfg.solver_type == "bh1"
        width = max(p - 1, 1)
        # Corrector: x_c = cx * x_prev + cm * m1 + sum_j cd_j * (m_{j+2} - m1) + ct * (x0 - m1).
        # Predictor: x_next = px * x_c + pm * x0 + sum_j pd_j * (m_{j+1} - x0)   (m_j: j-th previous x0).
        corr = np.zeros((e - begin, 4))
        corr_d = np.zeros((e - begin, width))
        pred = np.zeros((e - begin, 2))
        pred_d = np.zeros((e - begin, width))
        prev_order = 0
        for i in range(e - begin):
            k = begin + i
            if i > 0 and (k - 1) not in cfg.disable_corrector:
                h = lam[k] - lam[k - 1]
                rks = [(lam[k - 2 - j] - lam[k - 1]) / h for j in range(prev_order - 1)]
                h_phi_1, b_h, rhos = _unipc_rhos(h, rks, prev_order, bh1, corrector=True)
                a_t = alpha_all[k]
                corr[i] = (1.0, sigma_all[k] / sigma_all[k - 1], -a_t * h_phi_1, -a_t * b_h * rhos[-1])
                for j, rk in enumerate(rks):
                    corr_d[i, j] = -a_t * b_h * rhos[j] / rk
            order = min(p, e - k) if cfg.lower_order_final else p
            order = min(order, min(i, p) + 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                h = lam[k + 1] - lam[k]
                rks = [(lam[k - 1 - j] - lam[k]) / h for j in range(order - 1)]
                h_phi_1, b_h, rhos = _unipc_rhos(h, rks, order, bh1, corrector=False)
            a_t = alpha_all[k + 1]
            pred[i] = (sigma_all[k + 1] / sigma_all[k], -a_t * h_phi_1)
            for j, rk in enumerate(rks):
                pred_d[i, j] = -a_t * b_h * rhos[j] / rk
            prev_order = order
        tables = self._alpha_sigma_tables(s, e, begin)
        tables.update(use_corrector=corr[:, 0], corr=corr[:, 1:], corr_d=corr_d, pred=pred, pred_d=pred_d)
        return ts, 1.0, tables

    def step(self, model_output, i, x, state, plan, noise=None):
        x = as_f32(x)
        x_prev, *history = state  # history[j]: the x0 prediction j + 1 steps back
        x0 = self._x0(model_output, x, plan, i)
        p = self.config.solver_order
        c, cd = row(plan, "corr", i), row(plan, "corr_d", i)
        m1 = history[0]
        corrected = c[0] * x_prev + c[1] * m1 + c[2] * (x0 - m1)
        for j in range(p - 1):
            corrected = corrected + cd[j] * (history[j + 1] - m1)
        x = ops.where(flag(plan, "use_corrector", i), corrected, x)
        q, qd = row(plan, "pred", i), row(plan, "pred_d", i)
        x_next = q[0] * x + q[1] * x0
        for j in range(p - 1):
            x_next = x_next + qd[j] * (history[j] - x0)
        return x_next, (x, x0, *history[:-1])
