"""Realism statistics of lesions, and a real-vs-synthetic discriminator on them.

Per lesion (:func:`lesion_statistics`), from the native image in HU, the lesion's mask, the voxel spacing and
the intensity window the lesion model works in (e.g. ``(-1000, 400)`` HU for chest CT):

* ``mean_hu``, ``sd_hu``: mean and standard deviation of the lesion voxels, after clipping the image to the
  window (what a model in window space can represent);
* ``grain_hu``: high-frequency grain, the standard deviation over the lesion voxels of the window-clipped
  image minus its Gaussian blur (sigma 1 voxel) taken over the lesion voxels only (normalised convolution:
  ``G*(m*img) / G*m``), so the contrast to the surroundings does not count as grain; salt-and-pepper noise
  scores high, smooth texture and CT noise correlated over a few voxels score low;
* ``clipped_fraction``: fraction of lesion voxels at or beyond a window limit (unclipped image ``<= lo`` or
  ``>= hi``);
* ``border_step_hu``: mean intensity of the inner shell minus that of the outer shell. The inner shell is the
  lesion voxels whose centre is within ``shell_mm`` of the nearest voxel outside the lesion, the outer shell the
  voxels outside within ``shell_mm`` of the nearest lesion voxel (Euclidean distances between voxel centres in
  mm, so both shells are equally thick on any grid; a shell thinner than the slice spacing holds only in-plane
  neighbours). A hard edge keeps the full lesion-to-background contrast across the border; a partial-volume
  border, whose blur the label cuts through, has a lower inner and a higher outer shell, hence a smaller step.

:func:`discriminator_auc` trains a logistic regression (scikit-learn, standardised features) to tell real from
synthetic lesions on those statistics and reports the stratified, seeded, cross-validated ROC AUC with its
per-fold spread: about 0.5 means the statistics cannot tell them apart, 1.0 that they separate perfectly.
:func:`realism_summary` puts the synthetic/real ratios and the discriminator together.

Conventions: arrays ``(Z, Y, X)``; spacing ``(z, y, x)`` in mm; intensities in HU. numpy, scipy, scikit-learn.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from lefusion_nnunet.errors import LeFusionInputError

__all__ = ["CHEST_WINDOW_HU", "FEATURES", "LesionStats", "DiscriminatorResult", "lesion_statistics", "split_lesions",
           "discriminator_auc", "realism_summary"]

#: The chest CT window of the LeFusion release (HU clamped to [-1000, 400] -> [-1, 1]).
CHEST_WINDOW_HU: tuple[float, float] = (-1000.0, 400.0)
#: The statistics the discriminator sees, in this order.
FEATURES: tuple[str, ...] = ("mean_hu", "sd_hu", "grain_hu", "clipped_fraction", "border_step_hu")


@dataclass(frozen=True)
class LesionStats:
    """Realism statistics of one lesion (see the module docstring for the definitions).

    Attributes:
        mean_hu, sd_hu: mean and sd (HU) of the window-clipped lesion voxels.
        grain_hu: sd (HU) over the lesion of the image minus its 1-voxel Gaussian blur inside the lesion.
        clipped_fraction: fraction of lesion voxels at or beyond the window limits, in [0, 1].
        border_step_hu: inner-shell mean minus outer-shell mean (HU), shells ``shell_mm`` thick.
        num_voxels: lesion voxels.
        volume_ml: lesion volume in millilitres.
    """

    mean_hu: float
    sd_hu: float
    grain_hu: float
    clipped_fraction: float
    border_step_hu: float
    num_voxels: int
    volume_ml: float

    def features(self) -> np.ndarray:
        """The :data:`FEATURES` as a float64 vector."""
        return np.array([getattr(self, name) for name in FEATURES], np.float64)

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class DiscriminatorResult:
    """Cross-validated ROC AUC of a real-vs-synthetic logistic regression.

    Attributes:
        auc: mean of the per-fold AUCs.
        auc_sd: sample standard deviation of the per-fold AUCs (0 with one fold).
        fold_aucs: AUC of each fold's held-out part.
        pooled_auc: AUC of all out-of-fold probabilities together.
        n_real, n_synthetic: samples of each class.
        n_splits: folds used (at most the size of the smaller class).
        seed: the fold shuffling seed.
    """

    auc: float
    auc_sd: float
    fold_aucs: tuple[float, ...]
    pooled_auc: float
    n_real: int
    n_synthetic: int
    n_splits: int
    seed: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fold_aucs"] = [round(v, 4) for v in self.fold_aucs]
        for k in ("auc", "auc_sd", "pooled_auc"):
            d[k] = round(d[k], 4)
        return d


def _check_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise LeFusionInputError(f"spacing {tuple(spacing_zyx)} must be three positive (z, y, x) spacings in mm.")
    return spacing  # type: ignore[return-value]


def lesion_statistics(image_hu: np.ndarray, lesion_mask: np.ndarray, spacing_zyx: Sequence[float],
                      window_hu: tuple[float, float] = CHEST_WINDOW_HU, shell_mm: float | None = None) -> LesionStats:
    """Realism statistics of one lesion.

    Args:
        image_hu: native image in HU, ``(Z, Y, X)``.
        lesion_mask: bool ``(Z, Y, X)``, True = lesion (one lesion; see :func:`split_lesions`).
        spacing_zyx: voxel spacing ``(z, y, x)`` in mm.
        window_hu: ``(lo, hi)`` window limits in HU.
        shell_mm: thickness of the inner and outer border shells in mm (default: 1.5 x the largest
            in-plane spacing, i.e. one to two in-plane voxels).

    Returns:
        :class:`LesionStats`.

    Raises:
        LeFusionInputError: shapes differ, the mask is empty, the mask covers the whole image, or the window
            or spacing is invalid.
    """
    image = np.asarray(image_hu)
    mask = np.asarray(lesion_mask, bool)
    if image.ndim != 3 or image.shape != mask.shape:
        raise LeFusionInputError(f"image {image.shape} and lesion mask {mask.shape} must be 3D (Z, Y, X) arrays of "
                                 f"the same shape.")
    spacing = _check_spacing(spacing_zyx)
    lo, hi = (float(v) for v in window_hu)
    if not lo < hi:
        raise LeFusionInputError(f"window {tuple(window_hu)} must be (lo, hi) in HU with lo < hi.")
    if not mask.any():
        raise LeFusionInputError("the lesion mask is empty; pass a mask with at least one lesion voxel.")
    if mask.all():
        raise LeFusionInputError("the lesion mask covers the whole image, so it has no border to measure.")
    shell = float(shell_mm) if shell_mm is not None else 1.5 * max(spacing[1], spacing[2])

    # crop: lesion bounding box + enough margin for the shell and the blur (4 sigma = 4 voxels)
    bbox = ndimage.find_objects(mask.astype(np.uint8))[0]
    margin = [max(int(math.ceil(shell / s)), 4) + 1 for s in spacing]
    box = tuple(slice(max(sl.start - m, 0), min(sl.stop + m, n)) for sl, m, n in zip(bbox, margin, image.shape))
    raw = image[box].astype(np.float64)
    m = mask[box]
    img = np.clip(raw, lo, hi)

    values = img[m]
    # masked (normalised) blur: only lesion voxels enter it, so the lesion's contrast to its surroundings is
    # the border step's business and not counted as grain
    weight = ndimage.gaussian_filter(m.astype(np.float64), sigma=1.0, mode="constant")
    blur = ndimage.gaussian_filter(np.where(m, img, 0.0), sigma=1.0, mode="constant") / np.maximum(weight, 1e-12)
    grain = (img - blur)[m]
    clipped = float(np.mean((raw[m] <= lo) | (raw[m] >= hi)))

    d_in = ndimage.distance_transform_edt(m, sampling=spacing)      # lesion voxels: mm to nearest outside voxel
    d_out = ndimage.distance_transform_edt(~m, sampling=spacing)    # outside voxels: mm to nearest lesion voxel
    inner = m & (d_in <= shell + 1e-6)
    outer = ~m & (d_out <= shell + 1e-6)
    if not inner.any() or not outer.any():   # shell thinner than every spacing: fall back to the nearest voxels
        inner = m & (d_in <= d_in[m].min() + 1e-6)
        outer = ~m & (d_out <= d_out[~m].min() + 1e-6)
    step = float(img[inner].mean() - img[outer].mean())
    n = int(m.sum())
    return LesionStats(mean_hu=float(values.mean()), sd_hu=float(values.std()), grain_hu=float(grain.std()),
                       clipped_fraction=clipped, border_step_hu=step, num_voxels=n,
                       volume_ml=n * float(np.prod(spacing)) / 1000.0)


def split_lesions(mask: np.ndarray, min_voxels: int = 1) -> list[np.ndarray]:
    """The 26-connected components of a bool ``(Z, Y, X)`` mask, largest first, each as a full-size bool mask.

    Components smaller than ``min_voxels`` are left out.
    """
    labels, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = [int(i) + 1 for i in np.argsort(sizes, kind="stable")[::-1] if sizes[i] >= min_voxels]
    return [labels == lab for lab in order]


def discriminator_auc(real: Sequence[LesionStats] | np.ndarray, synthetic: Sequence[LesionStats] | np.ndarray,
                      n_splits: int = 5, seed: int = 0) -> DiscriminatorResult:
    """Cross-validated ROC AUC of a logistic regression telling ``synthetic`` (positive) from ``real`` lesions.

    Args:
        real, synthetic: :class:`LesionStats` lists, or feature arrays ``(N, F)``.
        n_splits: stratified folds (reduced to the size of the smaller class when that is smaller).
        seed: seed of the fold shuffling (the regression itself is deterministic).

    Raises:
        LeFusionInputError: fewer than 2 lesions in a class, or feature arrays of different widths.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def as_array(items) -> np.ndarray:
        if isinstance(items, np.ndarray):
            return np.asarray(items, np.float64).reshape(len(items), -1)
        return np.array([s.features() for s in items], np.float64).reshape(len(items), -1)

    xr, xs = as_array(real), as_array(synthetic)
    if len(xr) < 2 or len(xs) < 2:
        raise LeFusionInputError(f"the discriminator needs at least 2 real and 2 synthetic lesions, got {len(xr)} "
                                 f"real and {len(xs)} synthetic.")
    if xr.shape[1] != xs.shape[1]:
        raise LeFusionInputError(f"real ({xr.shape[1]}) and synthetic ({xs.shape[1]}) feature widths differ.")
    x = np.concatenate([xr, xs])
    y = np.concatenate([np.zeros(len(xr), int), np.ones(len(xs), int)])
    k = int(min(n_splits, len(xr), len(xs)))
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    oof = np.zeros(len(y))
    aucs = []
    for train, test in folds.split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x[train], y[train])
        p = model.predict_proba(x[test])[:, 1]
        oof[test] = p
        aucs.append(float(roc_auc_score(y[test], p)))
    return DiscriminatorResult(auc=float(np.mean(aucs)), auc_sd=float(np.std(aucs, ddof=1)) if k > 1 else 0.0,
                               fold_aucs=tuple(aucs), pooled_auc=float(roc_auc_score(y, oof)), n_real=len(xr),
                               n_synthetic=len(xs), n_splits=k, seed=int(seed))


def realism_summary(real: Sequence[LesionStats], synthetic: Sequence[LesionStats], seed: int = 0,
                    n_splits: int = 5) -> dict:
    """Synthetic vs real: means of each statistic, synthetic/real ratios, worst clipping, discriminator.

    Ratios are of the means over lesions (``sd_ratio = mean synthetic sd_hu / mean real sd_hu``; likewise
    ``grain_ratio`` and ``border_step_ratio``, the latter of the signed steps). ``discriminator`` is
    :func:`discriminator_auc`'s result as a dict, or None when a class has fewer than 2 lesions.
    """
    def mean(items: Sequence[LesionStats], name: str) -> float | None:
        return float(np.mean([getattr(s, name) for s in items])) if items else None

    def ratio(name: str) -> float | None:
        a, b = mean(synthetic, name), mean(real, name)
        return None if a is None or b is None or b == 0 else round(a / b, 4)

    out: dict = {"n_real": len(real), "n_synthetic": len(synthetic)}
    for who, items in (("real", real), ("synthetic", synthetic)):
        out[who] = {name: (None if mean(items, name) is None else round(mean(items, name), 4))
                    for name in FEATURES}
        out[who]["max_clipped_fraction"] = (round(max(s.clipped_fraction for s in items), 6) if items else None)
    out["sd_ratio"] = ratio("sd_hu")
    out["grain_ratio"] = ratio("grain_hu")
    out["border_step_ratio"] = ratio("border_step_hu")
    out["synthetic_lesions_over_1pct_clipped"] = sum(s.clipped_fraction > 0.01 for s in synthetic)
    out["discriminator"] = (discriminator_auc(real, synthetic, n_splits=n_splits, seed=seed).to_dict()
                            if len(real) >= 2 and len(synthetic) >= 2 else None)
    return out
