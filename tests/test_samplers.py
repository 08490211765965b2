"""Inpainting samplers with dummy eps functions: schedule, exact background, statistics, determinism."""
import json

import pytest
import torch

from lefusion_nnunet.diffusion import (DDIMInpaintSampler, DPMSolverInpaintSampler, NoiseSchedule, RePaintSampler,
                                       SamplerConfig, ScheduleConfig, make_sampler, repaint_jump_schedule)

S = (16, 16, 16)


def _ball(radius=4.0, center=(8, 8, 8)):
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in S], indexing="ij")
    return ((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2) <= radius ** 2


def _recording(fn):
    calls = []

    def eps_fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        calls.append((x.clone(), int(t[0])))
        return fn(x, t)
    return eps_fn, calls


SAMPLERS = {
    "repaint": SamplerConfig(name="repaint", jump_length=2, jump_n_sample=2),
    "ddim": SamplerConfig(name="ddim", num_steps=5, eta=0.5, resample_steps=1),
    "dpmpp2m": SamplerConfig(name="dpmpp2m", num_steps=5),
}


# -- jump schedule --------------------------------------------------------------------------------
@pytest.mark.parametrize("jr, expected", [(2, 599), (5, 1481), (10, 2911)])
def test_jump_schedule_counts(jr, expected):
    levels = repaint_jump_schedule(300, jr, jr)
    descents = sum(1 for a, b in zip(levels[:-1], levels[1:]) if b < a)
    assert descents == expected
    sampler = RePaintSampler(SamplerConfig(name="repaint", jump_length=jr, jump_n_sample=jr))
    assert sampler.num_network_evaluations(300) == expected
    assert levels[0] == 300 and levels[-1] == -1 and min(levels) == -1 and max(levels) == 300
    assert all(abs(a - b) == 1 for a, b in zip(levels[:-1], levels[1:]))
    assert levels.count(300) == 1  # the prior level is never revisited


def test_jump_schedule_without_jumps_is_a_plain_descent():
    assert repaint_jump_schedule(10, 1, 1) == list(range(10, -2, -1))
    assert repaint_jump_schedule(10, 3, 1) == list(range(10, -2, -1))


def test_ddim_timesteps_and_evaluation_count():
    T = 50
    assert DDIMInpaintSampler(SamplerConfig(num_steps=T)).timesteps(T) == list(range(T - 1, -1, -1))
    ts = DDIMInpaintSampler(SamplerConfig(num_steps=5)).timesteps(T)
    assert ts[0] == T - 1 and ts[-1] == 0 and len(set(ts)) == 5 and ts == sorted(ts, reverse=True)
    assert DDIMInpaintSampler(SamplerConfig(num_steps=5, resample_steps=2)).num_network_evaluations(T) == 15
    with pytest.raises(ValueError, match="cannot exceed"):
        DDIMInpaintSampler(SamplerConfig(num_steps=51)).timesteps(T)


def test_config_round_trip_validation_and_factory():
    cfg = SamplerConfig(name="repaint", jump_length=5, jump_n_sample=5)
    assert SamplerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert isinstance(make_sampler(cfg), RePaintSampler)
    assert isinstance(make_sampler(SamplerConfig()), DDIMInpaintSampler)
    assert isinstance(make_sampler(SamplerConfig(name="dpmpp2m")), DPMSolverInpaintSampler)
    with pytest.raises(ValueError, match="ddim, repaint, dpmpp2m"):
        SamplerConfig(name="euler")
    with pytest.raises(ValueError):
        SamplerConfig(num_steps=0)


# -- exact background ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_returned_background_is_known_bit_for_bit(name, mask_dtype):
    g = torch.Generator().manual_seed(0)
    known = torch.rand(2, 2, *S, generator=g) * 2 - 1
    mask = torch.stack([_ball(4), _ball(3, (5, 6, 7))])[:, None].to(mask_dtype)      # (B, 1, ...) broadcast over C
    schedule = NoiseSchedule(ScheduleConfig(20))
    out = make_sampler(SAMPLERS[name]).sample(lambda x, t: 0.7 * x, schedule, known, mask,
                                              generator=torch.Generator().manual_seed(1))
    inside = torch.broadcast_to(mask.bool(), known.shape)
    assert out.shape == known.shape and out.dtype == known.dtype
    assert torch.equal(out[~inside], known[~inside])
    assert not torch.equal(out[inside], known[inside])
    assert float(out[inside].abs().max()) <= 1.0


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_background_merged_fresh_at_every_step(name):
    T = 10
    schedule = NoiseSchedule(ScheduleConfig(T))
    sampler = make_sampler(SAMPLERS[name])
    known = torch.full((2, 1, *S), 0.9)
    mask = _ball(4)[None, None].expand(2, 1, *S)
    inside = mask.expand_as(known)
    runs = []
    for fn in (lambda x, t: torch.zeros_like(x), lambda x, t: torch.sin(3 * x) + 0.5):
        eps_fn, calls = _recording(fn)
        seen = []
        sampler.sample(eps_fn, schedule, known, mask, generator=torch.Generator().manual_seed(3),
                       callback=lambda out, t: seen.append(out))
        assert len(calls) == len(seen) == sampler.num_network_evaluations(T)
        assert all(float(o.pred_original_sample.abs().max()) <= 1.0 for o in seen)
        runs.append(calls)
    # The background never depends on the model: bit-identical across two different eps functions ...
    lesion_differs = False
    for (xa, ta), (xb, tb) in zip(*runs):
        assert ta == tb
        assert torch.equal(xa[~inside], xb[~inside])
        lesion_differs |= not torch.equal(xa[inside], xb[inside])
    assert lesion_differs
    # ... and is add_noise(known, fresh N(0, 1) noise, t) at the level the model is evaluated at.
    previous = None
    for x, t in runs[0]:
        ab = schedule.alphas_cumprod[t]
        noise = (x[~inside] - ab.sqrt() * 0.9) / (1 - ab).sqrt()
        assert abs(float(noise.mean())) < 0.06 and abs(float(noise.std()) - 1) < 0.06, t
        if previous is not None:
            assert abs(float(torch.corrcoef(torch.stack([noise, previous]))[0, 1])) < 0.1
        previous = noise


# -- statistics with an analytic denoiser ---------------------------------------------------------------
def _gaussian_eps_fn(schedule, mu, sd):
    """Optimal eps predictor E[eps | x_t] for data x0 ~ N(mu, sd^2) per voxel."""
    def eps_fn(x, t):
        ab = schedule.alpha_bar(t, x.ndim)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sd ** 2 + 1 - ab)
    return eps_fn


def _draw(config, schedule, eps_fn, seed):
    known, mask = torch.zeros(4, 1, *S), torch.ones(4, 1, *S)
    return make_sampler(config).sample(eps_fn, schedule, known, mask, generator=torch.Generator().manual_seed(seed))


def test_ddim_eta1_all_steps_matches_ancestral_marginals():
    # T = 50 is coarse enough for eta to matter (eta = 0 gives a visibly larger std than eta = 1).
    T, mu, sd = 50, 0.2, 0.15
    schedule = NoiseSchedule(ScheduleConfig(T))
    eps_fn = _gaussian_eps_fn(schedule, mu, sd)
    ancestral = _draw(SamplerConfig(name="repaint", jump_length=1, jump_n_sample=1), schedule, eps_fn, 0)
    ddim1 = _draw(SamplerConfig(num_steps=T, eta=1.0), schedule, eps_fn, 1)
    ddim0 = _draw(SamplerConfig(num_steps=T, eta=0.0), schedule, eps_fn, 2)
    assert abs(float(ddim1.mean() - ancestral.mean())) < 0.004
    assert abs(float(ddim1.std() - ancestral.std())) < 0.003
    assert float(ddim0.std() - ancestral.std()) > 0.006


@pytest.mark.parametrize("level", [0, 4, 17])
def test_ddim_eta1_step_equals_ancestral_step(level):
    # One step with the same random draws; eps is chosen so that x0 clipping is active.
    schedule = NoiseSchedule(ScheduleConfig(20))
    g = torch.Generator().manual_seed(0)
    x, known = torch.randn(2, 1, *S, generator=g), torch.rand(2, 1, *S, generator=g)
    eps, mask = 3 * torch.randn(2, 1, *S, generator=g), _ball(5)[None, None].expand(2, 1, *S)
    a = RePaintSampler().step(eps, level, x, known, mask, schedule, torch.Generator().manual_seed(1))
    b = DDIMInpaintSampler(SamplerConfig(eta=1.0)).step(eps, level, level - 1, x, known, mask, schedule,
                                                        torch.Generator().manual_seed(1))
    assert float(a.pred_original_sample.abs().max()) == 1.0
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [SamplerConfig(name="repaint", jump_length=1, jump_n_sample=1),
                                    SamplerConfig(name="repaint", jump_length=2, jump_n_sample=2),
                                    SamplerConfig(num_steps=300, eta=1.0)], ids=["ancestral", "repaint", "ddim"])
def test_samplers_reproduce_data_distribution(config):
    mu, sd = 0.2, 0.15
    schedule = NoiseSchedule(ScheduleConfig(300))
    out = _draw(config, schedule, _gaussian_eps_fn(schedule, mu, sd), 0)
    assert abs(float(out.mean()) - mu) < 0.005
    assert abs(float(out.std()) - sd) < 0.012


# -- determinism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_output_different_seed_differs_inside(name):
    schedule = NoiseSchedule(ScheduleConfig(10))
    known = torch.rand(1, 1, *S, generator=torch.Generator().manual_seed(5)) * 2 - 1
    mask = _ball(3)[None, None]
    sampler = make_sampler(SAMPLERS[name])

    def run(seed, progress=False):
        return sampler.sample(lambda x, t: 0.5 * x, schedule, known, mask,
                              generator=torch.Generator().manual_seed(seed), progress=progress)

    a, b, c = run(0), run(0, progress=True), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a[mask.expand_as(a)], c[mask.expand_as(c)])
    assert torch.equal(a[~mask.expand_as(a)], c[~mask.expand_as(c)])


def test_bad_mask_shape_raises():
    schedule = NoiseSchedule(ScheduleConfig(10))
    with pytest.raises(ValueError, match="lesion_mask"):
        make_sampler().sample(lambda x, t: x, schedule, torch.zeros(1, 2, *S), torch.ones(1, 3, *S))
