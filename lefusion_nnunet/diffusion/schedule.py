"""Noise schedules of the Gaussian diffusion process: pure math, no model inside.

Notation follows Ho et al. 2020 ("DDPM", arXiv:2006.11239) with 0-based timesteps
``t = 0 .. T-1``: ``x_t`` is the image after ``t + 1`` noising steps, ``alphas_cumprod[t]`` is
``alpha_bar_t`` and ``x_{-1}`` is the clean image ``x_0`` of the paper. Coefficients are computed
in float64 and stored as float32 CPU tensors; :meth:`NoiseSchedule.to` returns a new schedule on
another device and never mutates the original. Tensors are ``(B, C, *spatial)``; timesteps ``t``
are ``(B,)`` long tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.errors import LeFusionInputError

BETA_SCHEDULES = ("cosine", "linear")
_COSINE_S = 0.008
_MAX_BETA = 0.999
# Stored per-timestep coefficients, all (T,) float32.
_TENSOR_FIELDS = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas", "sqrt_betas",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2",
)


@dataclass(frozen=True)
class ScheduleConfig(JsonConfig):
    """Configuration of the forward process.

    Args:
        num_train_timesteps: T, the number of noising steps (default 300, as in LeFusion).
        beta_schedule: ``"cosine"`` (Nichol & Dhariwal 2021, s = 0.008) or ``"linear"`` (Ho et al.
            2020, 1e-4 .. 0.02 scaled by 1000 / T). Betas are clipped at 0.999 in both.
    """

    num_train_timesteps: int = 300
    beta_schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise LeFusionInputError(f"unknown beta_schedule {self.beta_schedule!r}; valid options are "
                                     f"{', '.join(BETA_SCHEDULES)}.")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 1:
            raise LeFusionInputError(f"num_train_timesteps must be a positive integer, got "
                                     f"{self.num_train_timesteps!r}.")


def cosine_betas(num_timesteps: int, s: float = _COSINE_S) -> Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), float64, clipped at 0.999."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, _MAX_BETA)


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM linear schedule 1e-4 .. 0.02 for T = 1000, rescaled to T steps, float64, clipped at 0.999."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(0.0, _MAX_BETA)


def extract(a: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather per-sample coefficients ``a[t]`` and shape them ``(B, 1, ..., 1)`` with ``ndim`` dims.

    ``a`` is a (T,) table, ``t`` a (B,) integer tensor; the result lives on ``t``'s device.
    """
    t = torch.as_tensor(t)
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a (B,) tensor, got shape {tuple(t.shape)}")
    out = a.gather(0, t.to(device=a.device, dtype=torch.long))
    return out.reshape(t.shape[0], *([1] * (ndim - 1))).to(t.device)


class NoiseSchedule:
    """The forward process q and its closed-form posteriors for one :class:`ScheduleConfig`.

    Attributes (all (T,) float32 tensors on :attr:`device`): ``betas``, ``alphas``,
    ``alphas_cumprod`` (alpha_bar_t), ``alphas_cumprod_prev`` (alpha_bar_{t-1}, 1 at t = 0) and the
    derived square roots / posterior coefficients used by the methods below.
    """

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        T = self.config.num_train_timesteps
        betas = cosine_betas(T) if self.config.beta_schedule == "cosine" else linear_betas(T)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        table = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas": alphas.sqrt(),
            "sqrt_betas": betas.sqrt(),
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            # DDPM Eq. 7: beta_tilde_t and the two weights of mu_tilde_t(x_t, x_0).
            "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        for name in _TENSOR_FIELDS:
            setattr(self, name, table[name].to(torch.float32))

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A new schedule whose tensors live on ``device`` (``self`` is left unchanged)."""
        new = object.__new__(NoiseSchedule)
        new.config = self.config
        for name in _TENSOR_FIELDS:
            setattr(new, name, getattr(self, name).to(device))
        return new

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_train_timesteps}, beta_schedule={self.config.beta_schedule!r}, "
                f"device={self.device})")

    def alpha_bar(self, t: Tensor, ndim: int) -> Tensor:
        """alpha_bar_t broadcast to ``ndim`` dims, with alpha_bar_{-1} = 1 (the clean image)."""
        t = torch.as_tensor(t)
        ab = extract(self.alphas_cumprod, t.clamp(min=0), ndim)
        clean = (t < 0).reshape(ab.shape).to(ab.device)
        return torch.where(clean, torch.ones_like(ab), ab)

    # -- forward process ---------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0) (DDPM Eq. 4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    q_sample = add_noise

    def forward_step(self, x_prev: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One forward step q(x_t | x_{t-1}) (DDPM Eq. 2): sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps.

        Used by RePaint to "undo" a reverse step (jump back to a noisier level).
        """
        return extract(self.sqrt_alphas, t, x_prev.ndim) * x_prev + extract(self.sqrt_betas, t, x_prev.ndim) * noise

    # -- inversions and posteriors -------------------------------------------------------------
    def predict_x0(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_0 from x_t and predicted noise (DDPM Eq. 15): (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    predict_start_from_noise = predict_x0

    def predict_eps(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise consistent with x_t and x_0 (DDPM Eq. 4 solved for eps); inverse of :meth:`predict_x0`."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM Eqs. 6-7).

        Returns ``mu_tilde`` (shape of ``x_t``) and ``beta_tilde`` shaped ``(B, 1, ..., 1)``; the
        variance is exactly 0 at t = 0, where the mean equals ``x0``.
        """
        mean = (extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return mean, extract(self.posterior_variance, t, x_t.ndim)

    q_posterior = posterior_mean_variance
