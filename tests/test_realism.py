"""Realism statistics on hand-built lesions whose answer is known, and the discriminator's AUC."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.evaluation.realism import (CHEST_WINDOW_HU, FEATURES, LesionStats, discriminator_auc,
                                                lesion_statistics, realism_summary, split_lesions)

BACKGROUND, LESION = -850.0, 0.0


def _ball(shape=(24, 48, 48), spacing=(2.0, 0.8, 0.8), radius_mm=8.0, center=None):
    c = np.array(center if center is not None else [(n - 1) / 2 for n in shape])
    grids = np.meshgrid(*[(np.arange(n) - ci) * s for n, ci, s in zip(shape, c, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2


def _lesion_image(mask, blur_mm=0.0, spacing=(2.0, 0.8, 0.8), noise=0.0, seed=0):
    img = np.where(mask, LESION, BACKGROUND)
    if blur_mm > 0:
        img = ndimage.gaussian_filter(img, [blur_mm / s for s in spacing], mode="nearest")
    if noise > 0:
        img = img + np.random.default_rng(seed).normal(0.0, noise, img.shape)
    return img


def test_blurred_ball_has_a_smaller_border_step_than_a_hard_ball():
    spacing = (2.0, 0.8, 0.8)
    mask = _ball(spacing=spacing)
    hard = lesion_statistics(_lesion_image(mask), mask, spacing)
    soft = lesion_statistics(_lesion_image(mask, blur_mm=1.5, spacing=spacing), mask, spacing)
    # a hard edge keeps the whole contrast across the border
    assert hard.border_step_hu == pytest.approx(LESION - BACKGROUND)
    # a flat lesion has no grain: its contrast to the surroundings is not grain
    assert hard.grain_hu == pytest.approx(0.0, abs=1e-6) and hard.sd_hu == pytest.approx(0.0, abs=1e-9)
    assert 0 < soft.border_step_hu < 0.8 * hard.border_step_hu
    # the shells are in mm: the same physical ball on another grid gives about the same step
    spacing2 = (1.0, 0.5, 0.5)
    mask2 = _ball(shape=(48, 80, 80), spacing=spacing2)
    soft2 = lesion_statistics(_lesion_image(mask2, blur_mm=1.5, spacing=spacing2), mask2, spacing2, shell_mm=1.2)
    soft1 = lesion_statistics(_lesion_image(mask, blur_mm=1.5, spacing=spacing), mask, spacing, shell_mm=1.2)
    assert soft2.border_step_hu == pytest.approx(soft1.border_step_hu, rel=0.25)


def test_border_step_is_symmetric_in_the_sign_of_the_contrast():
    spacing = (2.0, 0.8, 0.8)
    mask = _ball(spacing=spacing)
    bright = _lesion_image(mask, blur_mm=1.0, spacing=spacing)
    dark = -bright - 700.0                      # mirror the intensities, keep them inside the window
    a = lesion_statistics(bright, mask, spacing)
    b = lesion_statistics(dark, mask, spacing)
    assert b.border_step_hu == pytest.approx(-a.border_step_hu)
    assert b.sd_hu == pytest.approx(a.sd_hu) and b.grain_hu == pytest.approx(a.grain_hu)


def test_white_noise_texture_has_more_grain_than_smooth_texture():
    spacing = (2.0, 0.8, 0.8)
    mask = _ball(spacing=spacing)
    rng = np.random.default_rng(0)
    white = rng.normal(0.0, 60.0, mask.shape)
    smooth = ndimage.gaussian_filter(rng.normal(0.0, 60.0, mask.shape), 2.0)
    smooth *= 60.0 / smooth.std()                          # same sd, correlated over a few voxels
    s_white = lesion_statistics(np.where(mask, white, BACKGROUND), mask, spacing)
    s_smooth = lesion_statistics(np.where(mask, smooth, BACKGROUND), mask, spacing)
    assert s_white.sd_hu == pytest.approx(s_smooth.sd_hu, rel=0.25)   # a correlated field varies less in a small ball
    assert s_white.grain_hu > 3.0 * s_smooth.grain_hu
    # white noise keeps most of its variance above the 1-voxel blur
    assert s_white.grain_hu > 0.6 * s_white.sd_hu


def test_mean_sd_and_clipped_fraction():
    spacing = (1.0, 1.0, 1.0)
    mask = _ball(shape=(20, 20, 20), spacing=spacing, radius_mm=6.0)
    img = np.full(mask.shape, BACKGROUND)
    vals = np.linspace(-200.0, 200.0, int(mask.sum()))
    img[mask] = vals
    s = lesion_statistics(img, mask, spacing)
    assert s.mean_hu == pytest.approx(vals.mean()) and s.sd_hu == pytest.approx(vals.std())
    assert s.clipped_fraction == 0.0
    assert s.num_voxels == mask.sum() and s.volume_ml == pytest.approx(mask.sum() / 1000.0)
    # a quarter of the lesion at or beyond the window limits; statistics use the clipped values
    lo, hi = CHEST_WINDOW_HU
    idx = np.flatnonzero(mask.ravel())
    img.ravel()[idx[: len(idx) // 8]] = lo - 500.0
    img.ravel()[idx[len(idx) // 8: len(idx) // 4]] = hi
    s = lesion_statistics(img, mask, spacing)
    assert s.clipped_fraction == pytest.approx((len(idx) // 4) / len(idx))
    assert img[mask].min() < lo and s.mean_hu > img[mask].mean()


def test_bad_inputs_raise():
    mask = _ball(shape=(12, 12, 12), spacing=(1, 1, 1), radius_mm=3)
    img = np.zeros(mask.shape)
    with pytest.raises(LeFusionInputError, match="empty"):
        lesion_statistics(img, np.zeros_like(mask), (1, 1, 1))
    with pytest.raises(LeFusionInputError):
        lesion_statistics(img[:-1], mask, (1, 1, 1))
    with pytest.raises(LeFusionInputError):
        lesion_statistics(img, mask, (1, 0, 1))
    with pytest.raises(LeFusionInputError):
        lesion_statistics(img, mask, (1, 1, 1), window_hu=(400, -1000))


def test_split_lesions_largest_first():
    spacing = (1.0, 1.0, 1.0)
    a = _ball((20, 40, 40), spacing, 5.0, center=(10, 10, 10))
    b = _ball((20, 40, 40), spacing, 3.0, center=(10, 30, 30))
    parts = split_lesions(a | b)
    assert len(parts) == 2 and (parts[0] == a).all() and (parts[1] == b).all()
    assert len(split_lesions(a | b, min_voxels=int(b.sum()) + 1)) == 1
    assert split_lesions(np.zeros((4, 4, 4), bool)) == []


def _stats(features: np.ndarray) -> list[LesionStats]:
    return [LesionStats(*map(float, row), num_voxels=100, volume_ml=0.1) for row in features]


def test_discriminator_identical_distributions_auc_near_half():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, len(FEATURES)))
    res = discriminator_auc(_stats(feats[:200]), _stats(feats[200:]), seed=0)
    assert abs(res.auc - 0.5) < 0.1 and abs(res.pooled_auc - 0.5) < 0.1
    assert res.n_splits == 5 and len(res.fold_aucs) == 5 and res.auc_sd > 0
    # seeded: the same folds and numbers again
    assert discriminator_auc(_stats(feats[:200]), _stats(feats[200:]), seed=0) == res


def test_discriminator_separable_distributions_auc_near_one():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(30, len(FEATURES)))
    synth = rng.normal(size=(30, len(FEATURES)))
    synth[:, 2] += 6.0                    # more grain, far beyond the spread
    res = discriminator_auc(_stats(real), _stats(synth), seed=3)
    assert res.auc > 0.97 and min(res.fold_aucs) > 0.9
    # arrays work too; few samples reduce the folds
    few = discriminator_auc(real[:3], synth[:2], seed=0)
    assert few.n_splits == 2
    with pytest.raises(LeFusionInputError, match="at least 2"):
        discriminator_auc(real[:1], synth, seed=0)


def test_realism_summary_ratios():
    real = _stats(np.tile([-600.0, 100.0, 20.0, 0.0, 300.0], (4, 1)))
    synth = _stats(np.tile([-600.0, 200.0, 30.0, 0.02, 600.0], (4, 1)))
    out = realism_summary(real, synth)
    assert out["sd_ratio"] == pytest.approx(2.0) and out["grain_ratio"] == pytest.approx(1.5)
    assert out["border_step_ratio"] == pytest.approx(2.0)
    assert out["synthetic_lesions_over_1pct_clipped"] == 4
    assert out["discriminator"]["n_real"] == 4
    assert realism_summary(real[:1], synth)["discriminator"] is None
