"""Inpainting samplers: generate the lesion, keep the background.

A sampler holds only its :class:`SamplerConfig`; the loop takes the model (as ``eps_fn(x_t, t)``)
and the :class:`~lefusion_nnunet.diffusion.schedule.NoiseSchedule` as arguments. Before every
network evaluation the background of ``x_t`` is a fresh sample of q(x_t | known) (forward-diffused
real ROI); the lesion comes from the model. The returned x0 equals ``known`` outside the mask bit for
bit. Tensors are ``(B, C, Z, Y, X)`` in model units [-1, 1]; ``lesion_mask`` is ``(B, 1 or C, Z, Y,
X)`` with 1 = lesion = region to generate (diffusers' RePaint uses the opposite polarity).

* :class:`RePaintSampler`: Lugmayr et al. 2022 (RePaint, Alg. 1) with the "jump" resampling
  schedule; ancestral DDPM steps over all T levels. Paper-faithful, slow.
* :class:`DDIMInpaintSampler`: Song et al. 2021 (DDIM, Eq. 12) over ``num_steps`` evenly spaced
  levels with the same background merge, optional light resampling. Fast default.
* :class:`DPMSolverInpaintSampler`: DPM-Solver++ (2M) (Lu et al. 2022, Alg. 2; the update math is in
  :mod:`lefusion_nnunet.diffusion.solvers`) over ``num_steps`` levels (default 10, quadratic spacing),
  the same background merge, one network evaluation per step.

Why DPM-Solver++ 2M, and why quadratic levels: see :mod:`lefusion_nnunet.diffusion.solvers`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from lefusion_nnunet.diffusion.sampler_config import SamplerConfig
from lefusion_nnunet.diffusion.schedule import NoiseSchedule
from lefusion_nnunet.diffusion.solvers import dpmpp_2m_coefficients, dpmpp_2m_update, timestep_levels
from lefusion_nnunet.errors import LeFusionInputError

EpsFn = Callable[[Tensor, Tensor], Tensor]
# One generator for the batch, one per batch element, or None (global RNG).
Generators = Optional[torch.Generator | list[torch.Generator]]


@dataclass
class SamplerStepOutput:
    """Result of one reverse step: ``prev_sample`` (x at the next, less noisy level, background
    merged) and ``pred_original_sample`` (the clipped x0 estimate the step used)."""

    prev_sample: Tensor
    pred_original_sample: Tensor


StepCallback = Callable[[SamplerStepOutput, int], None]


class InpaintingSampler(Protocol):
    config: SamplerConfig

    def sample(self, eps_fn: EpsFn, schedule: NoiseSchedule, known: Tensor, lesion_mask: Tensor,
               generator: Generators = None, progress: bool = False,
               callback: Optional[StepCallback] = None) -> Tensor: ...

    def num_network_evaluations(self, num_train_timesteps: int) -> int: ...


def repaint_jump_schedule(num_timesteps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Levels visited by RePaint's jump resampling (Lugmayr et al. 2022, Sec. 4.2).

    The walk starts at ``num_timesteps`` (T, the N(0, I) prior, one level above the trained range
    0 .. T-1) and descends one level at a time to -1 (the clean image). On arriving at an anchor
    level ``a`` in ``0, j, 2j, ... < T - j`` for the first ``r - 1`` times, it climbs back ``j``
    levels and descends again. Every descent is one network evaluation: T = 300 gives 301 + (r - 1)
    * j * (number of anchors), i.e. 599 for j = r = 2, 1,481 for j = r = 5 and 2,911 for j = r = 10,
    the counts of the reference release.
    """
    for name, value in (("num_timesteps", num_timesteps), ("jump_length", jump_length),
                        ("jump_n_sample", jump_n_sample)):
        if int(value) != value or value < 1:
            raise LeFusionInputError(f"{name} must be a positive integer, got {value!r}.")
    budget = {a: jump_n_sample - 1 for a in range(0, num_timesteps - jump_length, jump_length)}
    level = num_timesteps
    visited = [level]
    while level >= 0:
        level -= 1
        visited.append(level)
        if budget.get(level, 0) > 0:
            budget[level] -= 1
            visited.extend(range(level + 1, level + jump_length + 1))
            level += jump_length
    return visited


# -- shared helpers --------------------------------------------------------------------------------
def _randn(like: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device (so a CPU
    generator gives the same numbers for CPU and CUDA runs) and moved to ``like``'s device.

    ``generator`` may be a list with one generator per batch element: each sample's noise then depends
    only on its own generator, not on which other samples share the batch."""
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        return torch.cat([_randn(like[i:i + 1], g) for i, g in enumerate(generator)])
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


def _batch_t(level: int, batch: int, device: torch.device) -> Tensor:
    return torch.full((batch,), level, dtype=torch.long, device=device)


def _prepare(known: Tensor, lesion_mask: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor, NoiseSchedule]:
    if known.ndim < 3:
        raise ValueError(f"known must be (B, C, *spatial), got shape {tuple(known.shape)}")
    if lesion_mask.ndim != known.ndim or lesion_mask.shape[0] != known.shape[0] \
            or lesion_mask.shape[1] not in (1, known.shape[1]) or lesion_mask.shape[2:] != known.shape[2:]:
        raise ValueError(f"lesion_mask must be (B, 1 or C, *spatial) matching known {tuple(known.shape)}, "
                         f"got {tuple(lesion_mask.shape)}")
    if not known.is_floating_point():
        known = known.float()
    mask = torch.broadcast_to(lesion_mask.to(known.device) > 0.5, known.shape)
    return known, mask, schedule.to(known.device)


def _known_at(schedule: NoiseSchedule, known: Tensor, level: int, generator: Generators) -> Tensor:
    """The background at ``level``: a fresh sample of q(x_level | known); ``known`` itself at -1."""
    noise = _randn(known, generator)
    if level < 0:
        return known
    return schedule.add_noise(known, noise, _batch_t(level, known.shape[0], known.device))


def _merge(lesion: Tensor, background: Tensor, lesion_mask: Tensor) -> Tensor:
    """Lesion voxels from ``lesion``, the rest from ``background``, bit-exact (no arithmetic blend)."""
    mask = lesion_mask if lesion_mask.dtype == torch.bool else lesion_mask > 0.5
    return torch.where(mask.to(lesion.device), lesion, background)


def _eps(eps_fn: EpsFn, x: Tensor, level: int) -> Tensor:
    eps = eps_fn(x, _batch_t(level, x.shape[0], x.device))
    if eps.shape != x.shape:
        raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    return eps.to(x.dtype)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="eval", leave=False)


# -- RePaint ---------------------------------------------------------------------------------------
class RePaintSampler:
    """Ancestral RePaint sampler with jump resampling (uses ``jump_length``, ``jump_n_sample``).

    Walks :func:`repaint_jump_schedule`. Its first evaluation maps the N(0, I) prior (level T) onto
    level T-1 through q(x_{T-1} | x0_hat); with the cosine schedule alpha_bar_{T-1} ~ 0 so this is
    nearly a no-op, and it makes the evaluation count equal the reference release's (599 at T = 300,
    j = r = 2). After that each descent is a DDPM ancestral step and each climb a forward step.
    """

    def __init__(self, config: SamplerConfig | None = None):
        self.config = config or SamplerConfig(name="repaint")

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        return repaint_jump_schedule(num_train_timesteps, self.config.jump_length, self.config.jump_n_sample)

    def num_network_evaluations(self, num_train_timesteps: int) -> int:
        levels = self.timesteps(num_train_timesteps)
        return sum(1 for a, b in zip(levels[:-1], levels[1:]) if b < a)

    def step(self, eps: Tensor, level: int, x: Tensor, known: Tensor, lesion_mask: Tensor, schedule: NoiseSchedule,
             generator: Generators = None) -> SamplerStepOutput:
        """Reverse step from ``level`` to ``level - 1`` (RePaint Alg. 1, lines 4-8).

        ``eps`` was predicted at timestep min(level, T - 1). Lesion: x0 estimate clipped to [-1, 1],
        then a draw from q(x_{t-1} | x_t, x0_hat) (DDPM Eqs. 6-7); from the prior level T it is a
        draw from q(x_{T-1} | x0_hat). Background: fresh q(x_{t-1} | known), or known at level 0.
        """
        T = schedule.num_train_timesteps
        t = _batch_t(min(level, T - 1), x.shape[0], x.device)
        x0_hat = schedule.predict_x0(x, eps, t).clamp(-1.0, 1.0)
        noise = _randn(x, generator)
        if level >= T:
            lesion = schedule.add_noise(x0_hat, noise, t)
        else:
            mean, var = schedule.posterior_mean_variance(x0_hat, x, t)
            lesion = mean + var.sqrt() * noise
        prev = _merge(lesion, _known_at(schedule, known, level - 1, generator), lesion_mask)
        return SamplerStepOutput(prev_sample=prev, pred_original_sample=x0_hat)

    def undo_step(self, x: Tensor, level: int, known: Tensor, lesion_mask: Tensor, schedule: NoiseSchedule,
                  generator: Generators = None) -> Tensor:
        """Jump back from ``level - 1`` to ``level`` with q(x_t | x_{t-1}) (RePaint Alg. 1, line 10);
        the background is then replaced by a fresh q(x_t | known)."""
        lesion = schedule.forward_step(x, _batch_t(level, x.shape[0], x.device), _randn(x, generator))
        return _merge(lesion, _known_at(schedule, known, level, generator), lesion_mask)

    @torch.inference_mode()
    def sample(self, eps_fn: EpsFn, schedule: NoiseSchedule, known: Tensor, lesion_mask: Tensor,
               generator: Generators = None, progress: bool = False,
               callback: Optional[StepCallback] = None) -> Tensor:
        """Inpaint ``lesion_mask`` voxels of ``known``; see the module docstring.

        ``eps_fn(x_t, t)`` gets (B, C, *spatial) and (B,) long timesteps; ``callback(step_output,
        level)`` is called after every reverse step. Returns x0 with ``known`` pasted exactly outside
        the mask.
        """
        known, mask, schedule = _prepare(known, lesion_mask, schedule)
        T = schedule.num_train_timesteps
        levels = self.timesteps(T)
        bar = _progress_bar(self.num_network_evaluations(T), progress, "repaint")
        x = _merge(_randn(known, generator), _known_at(schedule, known, T - 1, generator), mask)
        for current, nxt in zip(levels[:-1], levels[1:]):
            if nxt < current:
                out = self.step(_eps(eps_fn, x, min(current, T - 1)), current, x, known, mask, schedule, generator)
                x = out.prev_sample
                if callback is not None:
                    callback(out, current)
                if bar is not None:
                    bar.update(1)
            else:
                x = self.undo_step(x, nxt, known, mask, schedule, generator)
        if bar is not None:
            bar.close()
        return torch.where(mask, x, known)


class _SteppedSampler:
    """Samplers that evaluate the network at ``config.num_steps`` levels spaced by ``config.timestep_spacing``."""

    config: SamplerConfig

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        """Descending levels from T - 1 to 0 (all of them when num_steps == T)."""
        c = self.config
        return timestep_levels(c.num_steps, num_train_timesteps, c.timestep_spacing, c.name)


# -- DDIM ------------------------------------------------------------------------------------------
class DDIMInpaintSampler(_SteppedSampler):
    """DDIM over ``num_steps`` evenly spaced levels with background merge (uses ``num_steps``,
    ``eta``, ``resample_steps``)."""

    def __init__(self, config: SamplerConfig | None = None):
        self.config = config or SamplerConfig(name="ddim")

    def num_network_evaluations(self, num_train_timesteps: int) -> int:
        return len(self.timesteps(num_train_timesteps)) * (1 + self.config.resample_steps)

    def step(self, eps: Tensor, level: int, prev_level: int, x: Tensor, known: Tensor, lesion_mask: Tensor,
             schedule: NoiseSchedule, generator: Generators = None) -> SamplerStepOutput:
        """DDIM step from ``level`` to ``prev_level`` (< level; -1 = clean), DDIM Eqs. 12 and 16.

        x0_hat is clipped to [-1, 1] and eps re-derived from it, so eta = 1 with consecutive levels
        is exactly the DDPM ancestral step. The background is a fresh q(x_prev | known).
        """
        b, ndim = x.shape[0], x.ndim
        t = _batch_t(level, b, x.device)
        x0_hat = schedule.predict_x0(x, eps, t).clamp(-1.0, 1.0)
        eps_hat = schedule.predict_eps(x, x0_hat, t)
        ab_t = schedule.alpha_bar(t, ndim)
        ab_prev = schedule.alpha_bar(_batch_t(prev_level, b, x.device), ndim)
        sigma = self.config.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        direction = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt()
        lesion = ab_prev.sqrt() * x0_hat + direction * eps_hat + sigma * _randn(x, generator)
        prev = _merge(lesion, _known_at(schedule, known, prev_level, generator), lesion_mask)
        return SamplerStepOutput(prev_sample=prev, pred_original_sample=x0_hat)

    def renoise(self, x_prev: Tensor, prev_level: int, level: int, known: Tensor, lesion_mask: Tensor,
                schedule: NoiseSchedule, generator: Generators = None) -> Tensor:
        """Back from ``prev_level`` to ``level`` with q(x_t | x_prev) (multi-step DDPM Eq. 2)."""
        b, ndim = x_prev.shape[0], x_prev.ndim
        ratio = schedule.alpha_bar(_batch_t(level, b, x_prev.device), ndim) \
            / schedule.alpha_bar(_batch_t(prev_level, b, x_prev.device), ndim)
        lesion = ratio.sqrt() * x_prev + (1 - ratio).clamp(min=0).sqrt() * _randn(x_prev, generator)
        return _merge(lesion, _known_at(schedule, known, level, generator), lesion_mask)

    @torch.inference_mode()
    def sample(self, eps_fn: EpsFn, schedule: NoiseSchedule, known: Tensor, lesion_mask: Tensor,
               generator: Generators = None, progress: bool = False,
               callback: Optional[StepCallback] = None) -> Tensor:
        """Inpaint ``lesion_mask`` voxels of ``known``; same arguments as :meth:`RePaintSampler.sample`."""
        known, mask, schedule = _prepare(known, lesion_mask, schedule)
        levels = self.timesteps(schedule.num_train_timesteps)
        bar = _progress_bar(self.num_network_evaluations(schedule.num_train_timesteps), progress, "ddim")
        x = _merge(_randn(known, generator), _known_at(schedule, known, levels[0], generator), mask)
        for level, prev_level in zip(levels, levels[1:] + [-1]):
            for r in range(self.config.resample_steps + 1):
                out = self.step(_eps(eps_fn, x, level), level, prev_level, x, known, mask, schedule, generator)
                if callback is not None:
                    callback(out, level)
                if bar is not None:
                    bar.update(1)
                if r < self.config.resample_steps:
                    x = self.renoise(out.prev_sample, prev_level, level, known, mask, schedule, generator)
            x = out.prev_sample
        if bar is not None:
            bar.close()
        return torch.where(mask, x, known)


# -- DPM-Solver++ 2M ------------------------------------------------------------------------------
class DPMSolverInpaintSampler(_SteppedSampler):
    """DPM-Solver++ 2M over ``num_steps`` levels (``timestep_spacing``, default quadratic) with background
    merge before every evaluation (uses ``num_steps``, ``timestep_spacing``, ``eta``): one network evaluation
    per step; with eta = 0 deterministic given the initial noise and the background noise drawn from
    ``generator``."""

    def __init__(self, config: SamplerConfig | None = None):
        self.config = config or SamplerConfig(name="dpmpp2m")

    def num_network_evaluations(self, num_train_timesteps: int) -> int:
        return len(self.timesteps(num_train_timesteps))

    def step(self, eps: Tensor, level: int, prev_level: int, x: Tensor, known: Tensor, lesion_mask: Tensor,
             schedule: NoiseSchedule, generator: Generators = None,
             previous: Optional[tuple[int, Tensor]] = None) -> SamplerStepOutput:
        """DPM-Solver++ step from ``level`` to ``prev_level`` (< level; -1 = clean).

        ``previous`` is ``(level_u, x0_u)`` of the evaluation before this one (None at the first step:
        first order, which is DDIM with eta = 0); the step to -1 is first order and returns x0_hat. x0_hat is
        clipped to [-1, 1]. The background is a fresh q(x_prev | known).
        """
        t = _batch_t(level, x.shape[0], x.device)
        x0_hat = schedule.predict_x0(x, eps, t).clamp(-1.0, 1.0)
        abar = schedule.alphas_cumprod

        def at(lv: int) -> float:
            return 1.0 if lv < 0 else float(abar[lv])
        coefficients = dpmpp_2m_coefficients(at(level), at(prev_level),
                                             None if previous is None else at(previous[0]), float(self.config.eta))
        noise = _randn(x, generator) if coefficients.noise > 0 else None
        lesion = dpmpp_2m_update(x, x0_hat, coefficients, None if previous is None else previous[1], noise)
        prev = _merge(lesion, _known_at(schedule, known, prev_level, generator), lesion_mask)
        return SamplerStepOutput(prev_sample=prev, pred_original_sample=x0_hat)

    @torch.inference_mode()
    def sample(self, eps_fn: EpsFn, schedule: NoiseSchedule, known: Tensor, lesion_mask: Tensor,
               generator: Generators = None, progress: bool = False,
               callback: Optional[StepCallback] = None) -> Tensor:
        """Inpaint ``lesion_mask`` voxels of ``known``; same arguments as :meth:`RePaintSampler.sample`."""
        known, mask, schedule = _prepare(known, lesion_mask, schedule)
        levels = self.timesteps(schedule.num_train_timesteps)
        bar = _progress_bar(len(levels), progress, "dpmpp2m")
        x = _merge(_randn(known, generator), _known_at(schedule, known, levels[0], generator), mask)
        previous: Optional[tuple[int, Tensor]] = None
        for level, prev_level in zip(levels, levels[1:] + [-1]):
            out = self.step(_eps(eps_fn, x, level), level, prev_level, x, known, mask, schedule, generator, previous)
            previous, x = (level, out.pred_original_sample), out.prev_sample
            if callback is not None:
                callback(out, level)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return torch.where(mask, x, known)


_SAMPLERS = {"ddim": DDIMInpaintSampler, "repaint": RePaintSampler, "dpmpp2m": DPMSolverInpaintSampler}


def make_sampler(config: SamplerConfig | None = None) -> InpaintingSampler:
    """The sampler named by ``config.name`` (default: DDIM, 10 steps)."""
    config = config or SamplerConfig()
    return _SAMPLERS[config.name](config)
