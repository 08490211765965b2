"""Downstream evaluation: lesion Dice, per-lesion detection, aggregation over cases and seeds, held-out splits.

Used by ``benchmarks/downstream.py`` (does synthetic data help a segmenter?) and usable on any prediction:

* :func:`lesion_dice` - Dice of two binary lesion masks (NaN when both are empty, as nnU-Net reports it);
* :func:`lesion_detection` - per-lesion detection by connected components (26-connectivity): a ground-truth
  lesion is *detected* (true positive) when any predicted lesion voxel overlaps it, else it is a false
  negative; a predicted component that touches no ground-truth lesion voxel is a false positive;
* :func:`evaluate_case` / :func:`aggregate` - per-case numbers and their summary over a test set
  (Dice averaged over cases that hold a lesion, pooled Dice, sensitivity pooled over lesions, false
  positives per case over all cases);
* :func:`summarize_seeds` - mean +- sample standard deviation over training seeds;
* :func:`held_out_split` / :func:`check_no_leakage` - a test set of real lesion cases (optionally plus
  lesion-free cases) that nothing trained on, directly or through a synthetic case made from it.

Arrays are ``(Z, Y, X)``; spacings ``(z, y, x)`` mm. Nothing here draws randomness except
:func:`held_out_split`, from its own seeded generator.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from lefusion_nnunet.errors import LeFusionInputError

#: Full 3x3x3 neighbourhood: voxels touching by a face, an edge or a corner belong to one lesion.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------------------
# per case
def _binary(a: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != bool:
        arr = arr != 0
    if arr.ndim != 3:
        raise LeFusionInputError(f"{name} must be a (Z, Y, X) volume, got shape {arr.shape}.")
    return arr


def lesion_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice ``2 |P & G| / (|P| + |G|)`` of two binary masks (non-zero = lesion).

    Returns NaN when both are empty (nothing to segment and nothing predicted; nnU-Net's convention), 0 when
    exactly one is empty.
    """
    p, g = _binary(pred, "prediction"), _binary(gt, "ground truth")
    if p.shape != g.shape:
        raise LeFusionInputError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}.")
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


@dataclass(frozen=True)
class DetectionCounts:
    """Per-lesion detection counts of one case (or summed over cases)."""

    true_positives: int = 0
    false_negatives: int = 0
    false_positives: int = 0

    def __add__(self, other: "DetectionCounts") -> "DetectionCounts":
        return DetectionCounts(self.true_positives + other.true_positives,
                               self.false_negatives + other.false_negatives,
                               self.false_positives + other.false_positives)

    def __iter__(self):  # allows ``tp, fn, fp = lesion_detection(...)``
        return iter((self.true_positives, self.false_negatives, self.false_positives))


def connected_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the connected components (26-connectivity) of a binary mask: ``(labels, count)``."""
    labels, n = ndimage.label(_binary(mask, "mask"), structure=CONNECTIVITY_26)
    return labels, int(n)


def lesion_detection(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
                     min_volume_mm3: float = 0.0) -> DetectionCounts:
    """Per-lesion detection of one case: ``(true positives, false negatives, false positives)``.

    A ground-truth lesion (connected component of ``gt``) counts as detected when at least one voxel of it is
    predicted; each predicted component that overlaps no ground-truth lesion voxel is one false positive.
    Predicted components smaller than ``min_volume_mm3`` (needs ``spacing``, (z, y, x) mm) are ignored
    entirely (default 0: every component counts).
    """
    p, g = _binary(pred, "prediction"), _binary(gt, "ground truth")
    if p.shape != g.shape:
        raise LeFusionInputError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}.")
    pred_labels, n_pred = connected_lesions(p)
    if min_volume_mm3 > 0 and n_pred:
        if spacing is None:
            raise LeFusionInputError("min_volume_mm3 needs the voxel spacing (z, y, x mm).")
        voxel_mm3 = float(np.prod(np.asarray(spacing, np.float64)))
        sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        small = np.flatnonzero(sizes * voxel_mm3 < min_volume_mm3)
        small = small[small > 0]
        if len(small):
            p = p & ~np.isin(pred_labels, small)
            pred_labels, n_pred = connected_lesions(p)
    gt_labels, n_gt = connected_lesions(g)
    if n_gt:
        hit = np.unique(gt_labels[p & (gt_labels > 0)])
        tp = int(len(hit))
    else:
        tp = 0
    if n_pred:
        touching = np.unique(pred_labels[g & (pred_labels > 0)])
        fp = n_pred - int(len(touching))
    else:
        fp = 0
    return DetectionCounts(tp, n_gt - tp, fp)


@dataclass(frozen=True)
class CaseMetrics:
    """The numbers of one test case (``dice`` NaN when neither prediction nor ground truth has a lesion)."""

    case_id: str
    dice: float
    true_positives: int
    false_negatives: int
    false_positives: int
    gt_voxels: int
    pred_voxels: int
    overlap_voxels: int

    @property
    def has_lesion(self) -> bool:
        return self.gt_voxels > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dice"] = None if math.isnan(self.dice) else round(float(self.dice), 6)
        return d


def lesion_union(label: np.ndarray, lesion_labels: Iterable[int]) -> np.ndarray:
    """Binary lesion mask of a label map: voxels holding any of ``lesion_labels``."""
    return np.isin(np.asarray(label), [int(v) for v in lesion_labels])


def evaluate_case(case_id: str, pred_label: np.ndarray, gt_label: np.ndarray, lesion_labels: Iterable[int],
                  spacing: Sequence[float] | None = None, min_volume_mm3: float = 0.0) -> CaseMetrics:
    """Metrics of one case from two label maps; all ``lesion_labels`` together form "the lesion"."""
    lesion_labels = list(lesion_labels)
    p, g = lesion_union(pred_label, lesion_labels), lesion_union(gt_label, lesion_labels)
    counts = lesion_detection(p, g, spacing, min_volume_mm3)
    return CaseMetrics(str(case_id), lesion_dice(p, g), counts.true_positives, counts.false_negatives,
                       counts.false_positives, int(g.sum()), int(p.sum()), int((p & g).sum()))


# --------------------------------------------------------------------------------------------------------
# over cases, over seeds
#: The summary numbers :func:`aggregate` returns, in table order (name, higher is better).
METRICS: tuple[tuple[str, bool], ...] = (("dice", True), ("dice_pooled", True), ("sensitivity", True),
                                         ("fp_per_case", False))


def aggregate(cases: Sequence[CaseMetrics]) -> dict:
    """Summary of a test set.

    Returns:
        ``dice``: mean per-case Dice over cases with a ground-truth lesion; ``dice_pooled``: Dice of all test
        voxels together; ``sensitivity``: detected / all ground-truth lesions; ``fp_per_case``: false-positive
        components / number of cases (all cases, lesion-free ones included); plus the counts behind them.
        Numbers that are undefined (no lesion case, no lesion) are NaN.
    """
    if not cases:
        raise LeFusionInputError("no test cases to aggregate.")
    lesion_cases = [c for c in cases if c.has_lesion]
    tp = sum(c.true_positives for c in cases)
    fn = sum(c.false_negatives for c in cases)
    fp = sum(c.false_positives for c in cases)
    overlap = sum(c.overlap_voxels for c in cases)
    total = sum(c.gt_voxels + c.pred_voxels for c in cases)
    dice_values = [c.dice if not math.isnan(c.dice) else 0.0 for c in lesion_cases]
    return {
        "dice": float(np.mean(dice_values)) if dice_values else float("nan"),
        "dice_pooled": 2.0 * overlap / total if total else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "fp_per_case": fp / len(cases),
        "n_cases": len(cases), "n_lesion_cases": len(lesion_cases), "n_lesions": tp + fn,
        "true_positives": tp, "false_negatives": fn, "false_positives": fp,
    }


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of the finite values (NaN if none)."""
    v = np.asarray([float(x) for x in values], np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize_seeds(per_seed: Sequence[Mapping[str, float]],
                    metrics: Iterable[str] = tuple(m for m, _ in METRICS)) -> dict[str, dict]:
    """``{metric: {"mean", "std", "values"}}`` over the per-seed summaries of :func:`aggregate`."""
    out = {}
    for m in metrics:
        values = [float(s[m]) for s in per_seed]
        mean, std = mean_std(values)
        out[m] = {"mean": mean, "std": std, "values": values}
    return out


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.712 ± 0.031"`` (``"n/a"`` for NaN)."""
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------------------------------------
# held-out split
@dataclass(frozen=True)
class HeldOutSplit:
    """Which real cases train and which test.

    Attributes:
        train_lesion: labelled lesion cases the segmenter (and every lesion model, mask library and
            normalisation) may use.
        train_free: lesion-free cases that may be used for training and may receive synthetic lesions.
        test: held-out cases (``test_lesion`` + ``test_free``); nothing derived from them may be trained on.
        unused: cases left out of both (lesion cases beyond ``n_train_lesion``, lesion-free ones beyond
            ``n_train_free``); they are not tested on either.
    """

    train_lesion: tuple[str, ...]
    train_free: tuple[str, ...]
    test_lesion: tuple[str, ...]
    test_free: tuple[str, ...]
    unused: tuple[str, ...] = field(default=())

    @property
    def train(self) -> tuple[str, ...]:
        return tuple(sorted(self.train_lesion + self.train_free))

    @property
    def test(self) -> tuple[str, ...]:
        return tuple(sorted(self.test_lesion + self.test_free))

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def held_out_split(lesion_cases: Iterable[str], lesion_free_cases: Iterable[str], n_test: int, seed: int = 0,
                   n_test_free: int = 0, n_train_lesion: int | None = None,
                   n_train_free: int | None = None) -> HeldOutSplit:
    """Hold out ``n_test`` real lesion cases (and ``n_test_free`` lesion-free ones) for testing.

    The choice is a seeded permutation of the sorted ids (the same ids and seed give the same split). The
    remaining lesion cases train, limited to the first ``n_train_lesion`` of the permutation when given (to
    simulate a dataset with few labelled lesion cases); likewise ``n_train_free``. A case is in exactly one of
    train, test or unused.

    Raises:
        LeFusionInputError: duplicate ids, an id in both lists, or too few cases for the request.
    """
    les = sorted(str(c) for c in lesion_cases)
    free = sorted(str(c) for c in lesion_free_cases)
    for name, ids in (("lesion", les), ("lesion-free", free)):
        if len(set(ids)) != len(ids):
            raise LeFusionInputError(f"the {name} case list has duplicate ids.")
    both = sorted(set(les) & set(free))
    if both:
        raise LeFusionInputError(f"case {both[0]} is listed both as a lesion case and as lesion-free.")
    if n_test < 1 or n_test >= len(les):
        raise LeFusionInputError(f"cannot hold out {n_test} of {len(les)} lesion case(s): at least one must be "
                                 f"tested and one must remain for training.")
    if not 0 <= n_test_free <= len(free):
        raise LeFusionInputError(f"cannot hold out {n_test_free} of {len(free)} lesion-free case(s).")
    rng = np.random.default_rng([int(seed), 0xD0_57])
    les_perm = [les[i] for i in rng.permutation(len(les))]
    free_perm = [free[i] for i in rng.permutation(len(free))]
    test_lesion, rest_lesion = les_perm[:n_test], les_perm[n_test:]
    test_free, rest_free = free_perm[:n_test_free], free_perm[n_test_free:]
    k = len(rest_lesion) if n_train_lesion is None else int(n_train_lesion)
    if not 1 <= k <= len(rest_lesion):
        raise LeFusionInputError(f"{k} training lesion case(s) requested but {len(rest_lesion)} remain after holding "
                                 f"out {n_test}.")
    m = len(rest_free) if n_train_free is None else int(n_train_free)
    if not 0 <= m <= len(rest_free):
        raise LeFusionInputError(f"{m} training lesion-free case(s) requested but {len(rest_free)} remain.")
    split = HeldOutSplit(tuple(sorted(rest_lesion[:k])), tuple(sorted(rest_free[:m])), tuple(sorted(test_lesion)),
                         tuple(sorted(test_free)), tuple(sorted(rest_lesion[k:] + rest_free[m:])))
    check_no_leakage(split.train, split.test)
    return split


def check_no_leakage(train_ids: Iterable[str], test_ids: Iterable[str],
                     derived_from: Mapping[str, str] | None = None) -> None:
    """Raise unless no test case is trained on, directly or through a derived (synthetic) training case.

    Args:
        train_ids: every case id a model trains on (real and synthetic).
        test_ids: held-out case ids.
        derived_from: synthetic case id -> the real case it was made from (e.g. an enlarged dataset's
            provenance ``source_case``); each source must be a training case.
    """
    train, test = {str(c) for c in train_ids}, {str(c) for c in test_ids}
    clash = sorted(train & test)
    if clash:
        raise LeFusionInputError(f"test case {clash[0]} is also a training case.")
    for synthetic, source in sorted((derived_from or {}).items()):
        if str(source) in test:
            raise LeFusionInputError(f"training case {synthetic} was made from test case {source}.")
        if str(synthetic) in test:
            raise LeFusionInputError(f"synthetic case {synthetic} is in the test set.")


__all__ = ["lesion_dice", "lesion_detection", "DetectionCounts", "connected_lesions", "CaseMetrics",
           "evaluate_case", "lesion_union", "aggregate", "METRICS", "mean_std", "summarize_seeds",
           "format_mean_std", "HeldOutSplit", "held_out_split", "check_no_leakage"]
