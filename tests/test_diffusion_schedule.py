"""Noise schedule: pure math checks against independent float64 formulas."""
import json
import math

import pytest
import torch

from lefusion_nnunet.diffusion.schedule import NoiseSchedule, ScheduleConfig, cosine_betas, extract


@pytest.mark.parametrize("beta_schedule", ["cosine", "linear"])
@pytest.mark.parametrize("T", [10, 50, 300])
def test_alphas_cumprod_monotone_in_unit_interval(beta_schedule, T):
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=T, beta_schedule=beta_schedule))
    ab = s.alphas_cumprod
    assert ab.shape == (T,) and ab.dtype == torch.float32 and ab.device.type == "cpu"
    assert bool((ab > 0).all()) and bool((ab < 1).all())
    assert bool((ab[1:] < ab[:-1]).all())
    assert float(s.betas.max()) <= 0.999 + 1e-7


def test_cosine_matches_closed_form():
    # alpha_bar_t = f(t) / f(0) with f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2, 1-based t;
    # equal to the cumulative product of the clipped betas wherever no clipping happened.
    T, s = 50, 0.008
    f = [math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T - 1)], dtype=torch.float64)
    got = NoiseSchedule(ScheduleConfig(T, "cosine")).alphas_cumprod[: T - 1].double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert float(cosine_betas(T)[-1]) == pytest.approx(0.999)          # clipped at the end


def test_add_noise_then_predict_x0_recovers_x0():
    g = torch.Generator().manual_seed(0)
    s = NoiseSchedule(ScheduleConfig(50))
    x0 = torch.rand(4, 2, 8, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 7, 25, 40])
    x_t = s.add_noise(x0, eps, t)
    assert not torch.allclose(x_t, x0, atol=1e-2)
    torch.testing.assert_close(s.predict_x0(x_t, eps, t), x0, atol=1e-3, rtol=0)
    torch.testing.assert_close(s.predict_eps(x_t, x0, t), eps, atol=1e-3, rtol=0)


def test_posterior_matches_gaussian_product():
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}):
    # precision = a_t / b_t + 1 / (1 - abar_{t-1}),
    # mean = (sqrt(a_t) x_t / b_t + sqrt(abar_{t-1}) x_0 / (1 - abar_{t-1})) / precision
    T = 20
    s = NoiseSchedule(ScheduleConfig(T))
    betas = cosine_betas(T)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(3, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 9, 18])
    mean, var = s.posterior_mean_variance(x0.float(), x_t.float(), t)
    assert var.shape == (3, 1, 1, 1, 1)
    for i, ti in enumerate(t.tolist()):
        a, b, abp = 1 - betas[ti], betas[ti], abar[ti - 1]
        precision = a / b + 1 / (1 - abp)
        exp_mean = (a.sqrt() * x_t[i] / b + abp.sqrt() * x0[i] / (1 - abp)) / precision
        torch.testing.assert_close(mean[i].double(), exp_mean, rtol=1e-4, atol=1e-5)
        assert float(var[i]) == pytest.approx(float(1 / precision), rel=1e-4)
    # t = 0: the posterior collapses onto x0.
    mean0, var0 = s.posterior_mean_variance(x0.float(), x_t.float(), torch.zeros(3, dtype=torch.long))
    assert float(var0.abs().max()) == 0.0
    torch.testing.assert_close(mean0, x0.float(), atol=1e-6, rtol=0)


def test_forward_step_composes_to_marginal():
    s = NoiseSchedule(ScheduleConfig(30))
    # sqrt(a_t) * sqrt(abar_{t-1}) = sqrt(abar_t) and a_t (1 - abar_{t-1}) + b_t = 1 - abar_t
    torch.testing.assert_close(s.sqrt_alphas[1:] * s.sqrt_alphas_cumprod[:-1], s.sqrt_alphas_cumprod[1:])
    torch.testing.assert_close(s.alphas[1:] * (1 - s.alphas_cumprod[:-1]) + s.betas[1:], 1 - s.alphas_cumprod[1:])
    x = torch.ones(2, 1, 2, 2, 2)
    out = s.forward_step(x, torch.tensor([3, 3]), torch.zeros_like(x))
    torch.testing.assert_close(out, x * s.sqrt_alphas[3])


def test_to_returns_new_object_and_leaves_original():
    s = NoiseSchedule(ScheduleConfig(10))
    m = s.to("meta")
    assert m is not s and m.config == s.config
    assert m.betas.device.type == "meta" and s.betas.device.type == "cpu"
    c = s.to("cpu")
    assert c is not s and torch.equal(c.alphas_cumprod, s.alphas_cumprod)


def test_extract_and_alpha_bar():
    a = torch.arange(5, dtype=torch.float32)
    out = extract(a, torch.tensor([4, 0, 2]), ndim=5)
    assert out.shape == (3, 1, 1, 1, 1) and out.flatten().tolist() == [4.0, 0.0, 2.0]
    s = NoiseSchedule(ScheduleConfig(10))
    ab = s.alpha_bar(torch.tensor([-1, 0, 9]), ndim=2).flatten()
    assert ab[0] == 1.0 and ab[1] == s.alphas_cumprod[0] and ab[2] == s.alphas_cumprod[9]


def test_config_round_trip_and_validation():
    cfg = ScheduleConfig(num_train_timesteps=123, beta_schedule="linear")
    assert ScheduleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="cosine, linear"):
        ScheduleConfig(beta_schedule="quadratic")
    with pytest.raises(ValueError):
        ScheduleConfig(num_train_timesteps=0)
