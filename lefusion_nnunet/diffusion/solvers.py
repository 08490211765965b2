"""DPM-Solver++ (2M) updates for the diffusion ODE and the level grids of few-step samplers: pure math,
no model, no loop.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv:2211.01095), data-prediction (x0) form. For a variance-preserving process with
``alpha_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t)`` and half log-SNR
``lambda_t = log(alpha_t / sigma_t)``, one step from level ``s`` to the less noisy level ``t`` with
``h = lambda_t - lambda_s`` is

* first order (DPM-Solver++ 1, Eq. 9 = DDIM with eta = 0):
  ``x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) x0_s``;
* second-order multistep (DPM-Solver++ 2M, Alg. 2), reusing the x0 estimate made one step earlier at
  level ``u`` (``r = h_prev / h``, ``h_prev = lambda_s - lambda_u``):
  ``D = (1 + 1 / (2 r)) x0_s - 1 / (2 r) x0_u`` in place of ``x0_s``;
* with stochasticity ``eta`` in (0, 1] (SDE-DPM-Solver++ 2M, Lu et al. 2022 App.; eta = 1 is their SDE
  solver, eta scales the injected noise as k-diffusion's ``sample_dpmpp_2m_sde`` does):
  ``x_t = (sigma_t / sigma_s) exp(-eta h) x_s + alpha_t (1 - exp(-(1 + eta) h)) D
  + sigma_t sqrt(1 - exp(-2 eta h)) z``.

The step to the clean image (level -1, ``sigma = 0``, ``lambda = +inf``) is always first order and gives
``x0_s`` itself ("lower order final", as the paper advises for few steps). Coefficients are computed in
float64 from the schedule's ``alphas_cumprod`` and applied as Python scalars: every batch element uses
the same numbers, so a result never depends on what else shares the batch. Levels follow the noise
schedule's convention: 0 .. T-1 trained timesteps, -1 the clean image. Tensors are ``(B, C, *spatial)``.

Why DPM-Solver++ 2M for the few-step sampler (rather than UniPC or a 3rd-order solver): it works in the
data-prediction (x0) form, so the x0 clipping to [-1, 1] the other samplers use applies unchanged, and its
authors recommend 2M for guided sampling (classifier-free guidance enlarges the model output, where
high-order solvers become unstable). It is multistep: the second-order correction reuses the previous
evaluation's x0 estimate, so every step costs exactly one evaluation (10 steps = 10 evaluations), and
the update is elementwise with scalar weights, so merging a freshly noised background before every
evaluation leaves the lesion's ODE state intact. UniPC adds a corrector that rewrites x_t after the model
has seen it, which the background merge would have to undo; its gain over 2M is reported mostly below
8 steps. Its default levels are quadratic in t (dense near the clean end): with the cosine schedule the
evenly spaced grid leaves one step from t = 33 to t = 0 across the noise levels where lesion texture
forms, and on an analytic Gaussian denoiser (tests/test_solver.py, three data distributions) 10 quadratic
2M steps land 4-16x closer to the exact ODE solution than DDIM at 10 evenly spaced steps, and 1.5-10x
closer than DDIM at 25 (10 evenly spaced 2M steps are only about as close as DDIM at 25).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from lefusion_nnunet.errors import LeFusionInputError


@dataclass(frozen=True)
class SolverCoefficients:
    """Scalar weights of one update ``x_t = a * x_s + b * x0_s + c * x0_u + noise * z`` (``c = 0`` at first
    order, ``noise = 0`` for the ODE solver, z ~ N(0, I))."""

    a: float
    b: float
    c: float
    order: int
    noise: float = 0.0


def timestep_levels(num_steps: int, num_train_timesteps: int, spacing: str = "uniform",
                    sampler: str = "ddim") -> list[int]:
    """``num_steps`` distinct descending levels from T - 1 to 0 (all of them when num_steps == T).

    ``"uniform"``: evenly spaced in t. ``"quadratic"``: (T - 1) (1 - i / (n - 1))^2 rounded, nudged apart where
    rounding would repeat a level (DDIM App. D.2; DPM-Solver's "time_quadratic"). ``sampler`` names the
    sampler in the error message.
    """
    n, T = num_steps, num_train_timesteps
    if n > T:
        raise LeFusionInputError(f"{sampler} num_steps ({n}) cannot exceed the model's {T} training timesteps.")
    if n == 1:
        return [T - 1]
    if spacing == "uniform":
        return [round(T - 1 - i * (T - 1) / (n - 1)) for i in range(n)]
    if spacing != "quadratic":
        raise LeFusionInputError(f"unknown timestep spacing {spacing!r}; valid options are uniform, quadratic.")
    levels = [round((T - 1) * (1 - i / (n - 1)) ** 2) for i in range(n)]
    for i in range(n - 2, -1, -1):        # strictly decreasing towards 0 ...
        levels[i] = max(levels[i], levels[i + 1] + 1)
    for i in range(1, n):                 # ... and never above T - 1 - i
        levels[i] = min(levels[i], levels[i - 1] - 1)
    return levels


def half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 * log(alpha_bar / (1 - alpha_bar)); +inf for the clean image."""
    if alpha_bar >= 1.0:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpmpp_2m_coefficients(alpha_bar_s: float, alpha_bar_t: float, alpha_bar_u: Optional[float] = None,
                          eta: float = 0.0) -> SolverCoefficients:
    """Weights of the DPM-Solver++ step from level s to level t (alpha_bar_t > alpha_bar_s).

    Args:
        alpha_bar_s: alpha_bar at the current level s (where x_s and x0_s live).
        alpha_bar_t: alpha_bar at the target level t; 1.0 means the clean image (then first order,
            ``x_t = x0_s``).
        alpha_bar_u: alpha_bar at the previous evaluation's level u (> s in noise), or None for the
            first step (first order).
        eta: 0 = the ODE solver (DPM-Solver++ 2M), 1 = SDE-DPM-Solver++ 2M; in between, less noise.
    """
    if not 0.0 < alpha_bar_s < 1.0 or not alpha_bar_s < alpha_bar_t <= 1.0:
        raise LeFusionInputError(f"DPM-Solver++ step needs 0 < alpha_bar_s ({alpha_bar_s}) < alpha_bar_t "
                                 f"({alpha_bar_t}) <= 1.")
    if alpha_bar_t >= 1.0:
        return SolverCoefficients(a=0.0, b=1.0, c=0.0, order=1)
    lam_s, lam_t = half_log_snr(alpha_bar_s), half_log_snr(alpha_bar_t)
    h = lam_t - lam_s
    if not 0.0 <= eta <= 1.0:
        raise LeFusionInputError(f"DPM-Solver++ eta must be in [0, 1], got {eta!r}.")
    a = math.sqrt((1.0 - alpha_bar_t) / (1.0 - alpha_bar_s)) * math.exp(-eta * h)   # sigma_t / sigma_s e^(-eta h)
    b = -math.sqrt(alpha_bar_t) * math.expm1(-(1.0 + eta) * h)    # -alpha_t (exp(-(1 + eta) h) - 1)
    noise = math.sqrt(1.0 - alpha_bar_t) * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta > 0 else 0.0
    if alpha_bar_u is None:
        return SolverCoefficients(a=a, b=b, c=0.0, order=1, noise=noise)
    if not 0.0 < alpha_bar_u < alpha_bar_s:
        raise LeFusionInputError(f"the previous level's alpha_bar ({alpha_bar_u}) must lie in (0, {alpha_bar_s}).")
    r = (lam_s - half_log_snr(alpha_bar_u)) / h
    return SolverCoefficients(a=a, b=b * (1.0 + 0.5 / r), c=-b * 0.5 / r, order=2, noise=noise)


def dpmpp_2m_update(x_s: Tensor, x0_s: Tensor, coefficients: SolverCoefficients,
                    x0_u: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
    """Apply :func:`dpmpp_2m_coefficients`: ``a * x_s + b * x0_s (+ c * x0_u) (+ noise_coef * noise)``,
    shapes of ``x_s``; ``noise`` (standard normal) is required when the coefficients inject noise."""
    if coefficients.noise > 0 and noise is None:
        raise ValueError("a stochastic (eta > 0) DPM-Solver++ step needs standard normal noise")
    if coefficients.order == 2:
        if x0_u is None:
            raise ValueError("a second-order DPM-Solver++ step needs the previous x0 estimate")
        out = coefficients.a * x_s + coefficients.b * x0_s + coefficients.c * x0_u
    elif coefficients.a == 0.0:
        return x0_s.clone()
    else:
        out = coefficients.a * x_s + coefficients.b * x0_s
    return out + coefficients.noise * noise if coefficients.noise > 0 else out
