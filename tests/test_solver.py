"""DPM-Solver++ 2M inpainting sampler: exact background, seeds, batch independence, evaluation count,
convergence on an analytic denoiser, and the pure update math of ``diffusion.solvers``."""
import json
import math

import pytest
import torch

from lefusion_nnunet.diffusion import (DDIMInpaintSampler, DPMSolverInpaintSampler, NoiseSchedule, SamplerConfig,
                                       ScheduleConfig, make_sampler)
from lefusion_nnunet.diffusion.solvers import dpmpp_2m_coefficients, dpmpp_2m_update, half_log_snr
from lefusion_nnunet.errors import LeFusionInputError

S = (16, 16, 16)
DPM = SamplerConfig(name="dpmpp2m", num_steps=10)


def _ball(radius=4.0, center=(8, 8, 8)):
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in S], indexing="ij")
    return ((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2) <= radius ** 2


def _toy_eps(x, t):
    """A per-voxel (hence batch-independent) nonlinear eps; needs no schedule."""
    return 0.6 * torch.tanh(3 * x) + 0.1 * (t.float() / 10).reshape(-1, *[1] * (x.ndim - 1))


def _gaussian_eps_fn(schedule, mu, sd):
    """Exact eps = E[eps | x_t] for data x0 ~ N(mu, sd^2) independently per voxel."""
    def eps_fn(x, t):
        ab = schedule.alpha_bar(t, x.ndim)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sd ** 2 + 1 - ab)
    return eps_fn


def _known_and_mask(batch=2, seed=0):
    known = torch.rand(batch, 1, *S, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    mask = torch.stack([_ball(4), _ball(3, (5, 6, 7)), _ball(5, (9, 8, 8))][:batch])[:, None]
    return known, mask


# -- config -------------------------------------------------------------------------------------------
def test_config_defaults_validation_and_round_trip():
    assert SamplerConfig(name="dpmpp2m") == SamplerConfig(name="dpmpp2m", num_steps=10, timestep_spacing="quadratic")
    assert SamplerConfig() == SamplerConfig(name="ddim", num_steps=10, timestep_spacing="uniform")
    cfg = SamplerConfig(name="dpmpp2m", num_steps=7, timestep_spacing="uniform")
    assert SamplerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert isinstance(make_sampler(cfg), DPMSolverInpaintSampler)
    # a checkpoint's sampler_defaults written before timestep_spacing existed still loads, as before
    assert SamplerConfig.from_dict({"name": "ddim", "num_steps": 25, "eta": 0.0, "jump_length": 2,
                                    "jump_n_sample": 2, "resample_steps": 0}) == SamplerConfig(num_steps=25, eta=0.0)
    for bad in (dict(eta=1.5), dict(resample_steps=1), dict(timestep_spacing="karras"), dict(num_steps=0)):
        with pytest.raises(LeFusionInputError):
            SamplerConfig(name="dpmpp2m", **bad)
    with pytest.raises(LeFusionInputError, match="cannot exceed"):
        DPMSolverInpaintSampler(SamplerConfig(name="dpmpp2m", num_steps=11)).timesteps(10)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("n", [2, 3, 10, 25, 150, 299, 300])
def test_levels_distinct_descending_from_T_minus_1_to_0(spacing, n):
    config = SamplerConfig(name="dpmpp2m", num_steps=n, timestep_spacing=spacing)
    levels = DPMSolverInpaintSampler(config).timesteps(300)
    assert len(levels) == n and levels[0] == 299 and levels[-1] == 0
    assert all(a > b for a, b in zip(levels, levels[1:]))
    if spacing == "quadratic" and n == 10:
        assert levels == [299, 236, 181, 133, 92, 59, 33, 15, 4, 0]


# -- the interface contract -----------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ten_steps_are_ten_evaluations_at_the_listed_levels(eta):
    T = 300
    schedule = NoiseSchedule(ScheduleConfig(T))
    sampler = make_sampler(SamplerConfig(name="dpmpp2m", eta=eta))
    known, mask = _known_and_mask()
    calls, seen = [], []

    def eps_fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        calls.append(int(t[0]))
        return _toy_eps(x, t)
    sampler.sample(eps_fn, schedule, known, mask, generator=torch.Generator().manual_seed(0),
                   callback=lambda out, level: seen.append(level))
    assert sampler.num_network_evaluations(T) == 10
    assert calls == seen == sampler.timesteps(T)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_background_is_known_bit_for_bit(mask_dtype, eta):
    known, mask = _known_and_mask()
    sampler = make_sampler(SamplerConfig(name="dpmpp2m", eta=eta))
    out = sampler.sample(_toy_eps, NoiseSchedule(ScheduleConfig(20)), known, mask.to(mask_dtype),
                         generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    inside = mask.expand_as(known)
    assert out.shape == known.shape and out.dtype == known.dtype
    assert torch.equal(out[~inside], known[~inside])
    assert not torch.equal(out[inside], known[inside])
    assert float(out[inside].abs().max()) <= 1.0


def test_background_merged_fresh_before_every_evaluation():
    schedule = NoiseSchedule(ScheduleConfig(20))
    known = torch.full((2, 1, *S), 0.9)
    mask = _ball(4)[None, None].expand(2, 1, *S)
    inside = mask.expand_as(known)
    runs = []
    for fn in (lambda x, t: torch.zeros_like(x), _toy_eps):
        calls = []
        make_sampler(DPM).sample(lambda x, t: calls.append((x.clone(), int(t[0]))) or fn(x, t), schedule, known, mask,
                                 generator=torch.Generator().manual_seed(3))
        runs.append(calls)
    previous = None
    for (xa, ta), (xb, tb) in zip(*runs):
        assert ta == tb and torch.equal(xa[~inside], xb[~inside])     # the background never sees the model
        ab = schedule.alphas_cumprod[ta]
        noise = (xa[~inside] - ab.sqrt() * 0.9) / (1 - ab).sqrt()     # ... and is q(x_t | known), fresh noise
        assert abs(float(noise.mean())) < 0.06 and abs(float(noise.std()) - 1) < 0.06
        if previous is not None:
            assert abs(float(torch.corrcoef(torch.stack([noise, previous]))[0, 1])) < 0.1
        previous = noise


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_same_seed_same_output_other_seed_differs_only_inside(eta):
    known, mask = _known_and_mask(1)
    schedule = NoiseSchedule(ScheduleConfig(30))

    def run(seed, progress=False):
        sampler = make_sampler(SamplerConfig(name="dpmpp2m", eta=eta))
        return sampler.sample(_toy_eps, schedule, known, mask, generator=torch.Generator().manual_seed(seed),
                              progress=progress)
    a, b, c = run(0), run(0, progress=True), run(1)
    inside = mask.expand_as(a)
    assert torch.equal(a, b)
    assert not torch.equal(a[inside], c[inside]) and torch.equal(a[~inside], c[~inside])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_result_does_not_depend_on_the_rest_of_the_batch(eta):
    known, mask = _known_and_mask(3)
    schedule = NoiseSchedule(ScheduleConfig(30))
    sampler = make_sampler(SamplerConfig(name="dpmpp2m", eta=eta))

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    batch = sampler.sample(_toy_eps, schedule, known, mask, generator=gens(10, 11, 12))
    for i, seed in enumerate((10, 11, 12)):
        alone = sampler.sample(_toy_eps, schedule, known[i:i + 1], mask[i:i + 1], generator=gens(seed))
        assert torch.equal(alone[0], batch[i])
    swapped = sampler.sample(_toy_eps, schedule, known[[2, 0]], mask[[2, 0]], generator=gens(12, 10))
    assert torch.equal(swapped[1], batch[0]) and torch.equal(swapped[0], batch[2])


# -- accuracy -----------------------------------------------------------------------------------------
def _ode_error(config, schedule, mu, sd, seed=0):
    """Mean |x0 - exact probability-flow ODE solution| over the lesion voxels for Gaussian data.

    For x0 ~ N(mu, sd^2) the flow keeps z = (x_t - sqrt(ab_t) mu) / sqrt(ab_t sd^2 + 1 - ab_t) constant, so
    the exact endpoint of the trajectory that starts at the sampler's first x is mu + sd * z."""
    known, mask = _known_and_mask(2)
    eps_fn, first = _gaussian_eps_fn(schedule, mu, sd), []

    def recording(x, t):
        if not first:
            first.append((x.clone(), int(t[0])))
        return eps_fn(x, t)
    out = make_sampler(config).sample(recording, schedule, known, mask, generator=torch.Generator().manual_seed(seed))
    x, level = first[0]
    ab = float(schedule.alphas_cumprod[level])
    exact = mu + sd * (x - math.sqrt(ab) * mu) / math.sqrt(ab * sd ** 2 + 1 - ab)
    inside = mask.expand_as(out)
    return float((out[inside] - exact[inside]).abs().mean())


@pytest.mark.parametrize("mu, sd", [(0.2, 0.15), (0.0, 0.05), (-0.3, 0.3)])
def test_ten_solver_steps_beat_ddim_on_an_analytic_denoiser(mu, sd):
    schedule = NoiseSchedule(ScheduleConfig(300))
    dpm10 = _ode_error(DPM, schedule, mu, sd)
    ddim10 = _ode_error(SamplerConfig(num_steps=10), schedule, mu, sd)
    ddim10_same_levels = _ode_error(SamplerConfig(num_steps=10, timestep_spacing="quadratic"), schedule, mu, sd)
    ddim25 = _ode_error(SamplerConfig(num_steps=25), schedule, mu, sd)
    assert dpm10 < 0.5 * ddim10 and dpm10 < 0.8 * ddim10_same_levels and dpm10 < ddim25
    assert _ode_error(SamplerConfig(name="dpmpp2m", num_steps=40), schedule, mu, sd) < dpm10  # converges (to a
    # float32 floor of ~1e-3: x0 = (x - sigma eps) / alpha with alpha ~ 1.6e-4 at t = T - 1)


def test_sde_variant_reproduces_the_data_distribution():
    # eta = 1 forgets the start: compare marginals (mean, std) with the data, not a trajectory
    mu, sd = 0.2, 0.15
    schedule = NoiseSchedule(ScheduleConfig(300))
    known, mask = torch.zeros(4, 1, *S), torch.ones(4, 1, *S)
    out = make_sampler(SamplerConfig(name="dpmpp2m", num_steps=25, eta=1.0)).sample(
        _gaussian_eps_fn(schedule, mu, sd), schedule, known, mask, generator=torch.Generator().manual_seed(0))
    assert abs(float(out.mean()) - mu) < 0.005
    assert abs(float(out.std()) - sd) < 0.012


# -- the update math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("level, prev_level", [(299, 236), (33, 15), (4, 0), (0, -1)])
def test_first_order_step_is_ddim_eta0(level, prev_level):
    schedule = NoiseSchedule(ScheduleConfig(300))
    g = torch.Generator().manual_seed(0)
    x, known = torch.randn(2, 1, *S, generator=g), torch.rand(2, 1, *S, generator=g)
    eps, mask = 3 * torch.randn(2, 1, *S, generator=g), _ball(5)[None, None].expand(2, 1, *S)
    a = DPMSolverInpaintSampler(DPM).step(eps, level, prev_level, x, known, mask, schedule,
                                          torch.Generator().manual_seed(1))
    b = DDIMInpaintSampler(SamplerConfig(name="ddim", eta=0.0)).step(eps, level, prev_level, x, known, mask, schedule,
                                                                     torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample)
    inside = mask.expand_as(x)   # DDIM draws its (eta = 0) step noise first, so the backgrounds' noise differs
    torch.testing.assert_close(a.prev_sample[inside], b.prev_sample[inside], atol=1e-4, rtol=1e-4)


def test_coefficients_against_closed_forms():
    assert half_log_snr(0.5) == 0.0 and half_log_snr(1.0) == math.inf
    first = dpmpp_2m_coefficients(0.3, 0.6)
    assert first.order == 1 and first.c == 0.0
    assert first.a == pytest.approx(math.sqrt(0.4 / 0.7))
    assert first.b == pytest.approx(math.sqrt(0.6) - first.a * math.sqrt(0.3))   # DDIM: sqrt(ab_t) - a sqrt(ab_s)
    second = dpmpp_2m_coefficients(0.3, 0.6, 0.1)
    assert second.order == 2 and second.a == first.a
    assert second.b + second.c == pytest.approx(first.b)        # weights of x0 sum as at first order
    assert second.c < 0 < second.b
    final = dpmpp_2m_coefficients(0.99, 1.0, 0.9)               # to the clean image: x0_s itself
    x, x0 = torch.randn(4), torch.randn(4)
    assert torch.equal(dpmpp_2m_update(x, x0, final, torch.randn(4)), x0)
    with pytest.raises(LeFusionInputError):
        dpmpp_2m_coefficients(0.6, 0.3)
    with pytest.raises(LeFusionInputError):
        dpmpp_2m_coefficients(0.3, 0.6, 0.5)
    with pytest.raises(ValueError, match="previous x0"):
        dpmpp_2m_update(x, x0, second)
    # eta: 0 gives the ODE weights exactly; 1 is SDE-DPM-Solver++ (a = sigma_t / sigma_s e^-h, noise variance
    # sigma_t^2 (1 - e^-2h)); the injected noise keeps the marginal variance of a Gaussian path
    assert dpmpp_2m_coefficients(0.3, 0.6, 0.1, eta=0.0) == second
    sde = dpmpp_2m_coefficients(0.3, 0.6, eta=1.0)
    h = half_log_snr(0.6) - half_log_snr(0.3)
    assert sde.a == pytest.approx(first.a * math.exp(-h))
    assert sde.noise == pytest.approx(math.sqrt(0.4 * (1 - math.exp(-2 * h))))
    assert sde.a ** 2 * 0.7 + sde.noise ** 2 == pytest.approx(0.4)         # pure-noise data: var sigma_s^2 -> sigma_t^2
    assert (sde.a * math.sqrt(0.3) + sde.b) == pytest.approx(math.sqrt(0.6))  # a constant x0 is kept
    with pytest.raises(ValueError, match="normal noise"):
        dpmpp_2m_update(x, x0, sde)
    with pytest.raises(LeFusionInputError):
        dpmpp_2m_coefficients(0.3, 0.6, eta=2.0)
