"""Lesion-mask encodings and post-processing for the mask model (:mod:`lefusion_nnunet.synthesis.masks`).

Pure NumPy: arrays are ``(C, Z, Y, X)`` or ``(Z, Y, X)``, spacings ``(z, y, x)`` in mm, centres voxel
coordinates ``(z, y, x)``.

Sampled channels are post-processed by :func:`postprocess_masks`:

1. size-dependent smoothing of the outer channel: Gaussian, sigma = ``(0.1 + 0.2 * (1 - boundary)) * r`` mm (``r``
   the requested equivalent radius); the component (>= 0.5) overlapping the requested sphere most is the base
   shape (the sphere itself if none does);
2. the shape becomes a signed distance map (mm) plus a weak pull toward the requested sphere (0.2 x the
   distance beyond it), perturbed by smooth noise (correlation length 0.3 r) of amplitude ``boundary * 0.25 * r``
   mm (like the ellipsoid masks of :mod:`lefusion_nnunet.data.masks`). Larger amplitudes are counter-productive:
   the mask then breaks up and its largest piece is a compact noise blob;
3. **threshold**: from the lowest point near the centre the mask grows through increasing level values (an
   ordered flood: a threshold on the level restricted to one connected piece) until it has the requested volume
   (equivalent-sphere diameter) inside the allowed region; holes filled. The requested size is therefore
   enforced by post-processing, not by the network alone (with small training budgets the network gives the
   shape and the location, the threshold gives the size);
4. inner channels: the top voxels of each inner channel inside the outer mask, as many as the reference
   training lesion's volume fraction, largest component, nested.

``boundary`` (0 = smooth ... 1 = irregular) thus steers the post-processing (smoothing vs. perturbation) and the
network's irregularity condition (the ``boundary`` quantile of the training lesions' irregularity)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from lefusion_nnunet.data.masks import (LESION_CONNECTIVITY, _smooth_noise, equivalent_diameter_mm,
                                        keep_largest_component, mask_volume_mm3, sphericity)
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.errors import LeFusionInputError

__all__ = ["MASK_FEATURES", "VOLUME_TOLERANCE", "cumulative_channels", "decode_cumulative", "sphere_channel",
           "center_distance_mm", "mask_features", "reference_mm", "check_boundary", "postprocess_masks",
           "component_on_ball"]

#: Condition features per mask channel: relative diameter, irregularity, present, volume fraction.
MASK_FEATURES = 4
#: Post-processing constants (see the module docstring).
SMOOTH_MIN, SMOOTH_FRACTION = 0.1, 0.2          # smoothing sigma = (SMOOTH_MIN + (1 - b) SMOOTH_FRACTION) r
BOUNDARY_AMPLITUDE, NOISE_CORRELATION = 0.25, 0.3   # perturbation b * 0.25 r, correlation length 0.3 r
SPHERE_PULL = 0.2
#: The generated volume is accepted when within this relative error of the request (native grid).
VOLUME_TOLERANCE = 0.05


# ------------------------------------------------------------------------------------------------------------
# encodings
def cumulative_channels(class_masks: np.ndarray) -> np.ndarray:
    """Disjoint class masks ``(C, ...)`` -> cumulative channels: channel c = classes c..C-1 (bool)."""
    m = np.asarray(class_masks, bool)
    return np.flip(np.logical_or.accumulate(np.flip(m, 0), axis=0), 0).copy()


def decode_cumulative(channels: np.ndarray) -> np.ndarray:
    """Cumulative channels ``(C, ...)`` -> disjoint class masks (class c = channel c minus channel c + 1)."""
    m = np.asarray(channels, bool).copy()
    for c in range(1, len(m)):                       # enforce nesting first
        m[c] &= m[c - 1]
    out = m.copy()
    out[:-1] &= ~m[1:]
    return out


def sphere_channel(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], center_zyx: Sequence[float],
                   radius_mm: float) -> np.ndarray:
    """float32 ``clip((r - d) / r, -1, 1)`` with ``d`` the distance (mm) of each voxel to ``center_zyx`` (voxels)."""
    r = max(float(radius_mm), 1e-3)
    return np.clip((r - center_distance_mm(shape_zyx, spacing_zyx, center_zyx)) / r, -1.0, 1.0).astype(np.float32)


def center_distance_mm(shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                       center_zyx: Sequence[float]) -> np.ndarray:
    """float64 ``(Z, Y, X)`` distance in mm of every voxel to ``center_zyx`` (voxel coordinates)."""
    sp = np.asarray(spacing_zyx, np.float64)
    axes = [((np.arange(n) - c) * s) ** 2 for n, c, s in zip(shape_zyx, center_zyx, sp)]
    return np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])


def mask_features(cumulative: np.ndarray, spacing_zyx: Sequence[float], reference_mm: float) -> np.ndarray:
    """``(C * 4,)`` condition of cumulative channels: per channel (equivalent diameter / ``reference_mm``,
    1 - sphericity, present 0/1, volume / outer volume)."""
    outer = max(mask_volume_mm3(cumulative[0], spacing_zyx), 1e-6)
    rows = []
    for ch in cumulative:
        v = mask_volume_mm3(ch, spacing_zyx)
        if v == 0:
            rows.append([0.0, 0.0, 0.0, 0.0])
            continue
        rows.append([equivalent_diameter_mm(v) / reference_mm, float(np.clip(1.0 - sphericity(ch, spacing_zyx), 0, 1)),
                     1.0, v / outer])
    return np.asarray(rows, np.float32).ravel()


def reference_mm(roi: RoiGeometry) -> float:
    return float(np.mean(roi.extent_mm))


# ------------------------------------------------------------------------------------------------------------
# post-processing
def check_boundary(boundary: float) -> float:
    if not 0.0 <= float(boundary) <= 1.0:
        raise LeFusionInputError(f"--boundary {boundary} must lie between 0 (smooth) and 1 (irregular).")
    return float(boundary)


def postprocess_masks(soft: np.ndarray, spacing_zyx: Sequence[float], target_voxels: float, boundary: float,
                      center_zyx: Sequence[float], radius_mm: float, rng: np.random.Generator,
                      allowed: np.ndarray | None = None, inner_fractions: Sequence[float] = ()) -> np.ndarray:
    """Turn sampled mask channels into cumulative bool masks of a requested size (see the module docstring).

    Args:
        soft: ``(C, Z, Y, X)`` sampled channels in [-1, 1] (cumulative encoding).
        target_voxels: requested outer-mask voxel count on this grid.
        boundary: 0 smooth ... 1 irregular.
        center_zyx, radius_mm: the requested sphere (voxels, mm).
        allowed: bool ``(Z, Y, X)``: lesion voxels only here (None = everywhere).
        inner_fractions: for channels 1..C-1, the volume fraction of the outer mask they should fill
            (0 = absent).
    Returns:
        bool ``(C, Z, Y, X)`` cumulative (nested) masks; the outer one has ``round(target_voxels)`` voxels when
        the allowed region permits (fewer after the largest-component step only if the region is fragmented).
    """
    b = check_boundary(boundary)
    soft = np.asarray(soft, np.float32)
    C, shape = soft.shape[0], soft.shape[1:]
    sp = np.asarray(spacing_zyx, np.float64)
    allowed = np.ones(shape, bool) if allowed is None else np.asarray(allowed, bool)
    r = max(float(radius_mm), float(sp.min()))
    p = (soft[0] + 1.0) / 2.0
    sigma = (SMOOTH_MIN + (1.0 - b) * SMOOTH_FRACTION) * r / sp
    if sigma.max() > 0.05:
        p = ndimage.gaussian_filter(p, sigma, mode="constant")
    sphere_d = center_distance_mm(shape, sp, center_zyx)
    ball = sphere_d <= r
    base = component_on_ball((p >= 0.5) & allowed, ball)
    if not base.any():
        base = ball
    level = ndimage.distance_transform_edt(~base, sampling=sp) - ndimage.distance_transform_edt(base, sampling=sp)
    level = level + SPHERE_PULL * np.maximum(sphere_d - r, 0.0)
    if b > 0:
        noise = _smooth_noise(rng, shape, np.maximum(NOISE_CORRELATION * r / sp, 0.5))
        level = level - b * BOUNDARY_AMPLITUDE * r * noise
    level = np.where(allowed, level + 1e-3 * sphere_d, np.inf)     # ties go to voxels nearer the centre
    outer = np.zeros(shape, bool)
    if allowed.any():
        near = ball & allowed
        pool = np.where(near if near.any() else allowed, level, np.inf)
        seed = np.unravel_index(int(np.argmin(pool)), shape)
        outer = select_volume(level, allowed, max(1, int(round(target_voxels))), seed)
    out = np.zeros((C, *shape), bool)
    out[0] = outer
    for c in range(1, C):
        frac = float(inner_fractions[c - 1]) if c - 1 < len(inner_fractions) else 0.0
        n_in = int(round(frac * out[c - 1].sum()))
        if n_in < 1:
            break
        q = (soft[c] + 1.0) / 2.0
        q = ndimage.gaussian_filter(q, np.maximum(sigma, 0.5))
        depth = ndimage.distance_transform_edt(out[c - 1], sampling=sp)
        score = np.where(out[c - 1], q + 0.05 * depth / max(depth.max(), 1e-6), -np.inf).ravel()
        thresh = np.partition(score, score.size - n_in)[score.size - n_in]
        out[c] = keep_largest_component(score.reshape(shape) >= thresh) & out[c - 1]
    return out


_OFFSETS26 = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)])


def _grow(level: np.ndarray, allowed: np.ndarray, seed: Sequence[int], k: int) -> np.ndarray:
    """Ordered region growing: from ``seed``, repeatedly add the 26-neighbour of lowest ``level`` inside
    ``allowed`` until the region has ``k`` voxels (or no allowed neighbour is left). Always one component."""
    import heapq

    shape = np.asarray(level.shape)
    out = np.zeros(level.shape, bool)
    seen = np.zeros(level.shape, bool)
    heap = [(float(level[tuple(seed)]), tuple(int(v) for v in seed))]
    seen[tuple(seed)] = True
    n = 0
    while heap and n < k:
        _, idx = heapq.heappop(heap)
        out[idx] = True
        n += 1
        nb = np.asarray(idx) + _OFFSETS26
        nb = nb[((nb >= 0) & (nb < shape)).all(1)]
        for z, y, x in nb:
            if not seen[z, y, x] and allowed[z, y, x]:
                seen[z, y, x] = True
                heapq.heappush(heap, (float(level[z, y, x]), (int(z), int(y), int(x))))
    return out


def select_volume(level: np.ndarray, allowed: np.ndarray, want: int, seed: Sequence[int],
                   max_rounds: int = 4) -> np.ndarray:
    """One component of about ``want`` voxels grown from ``seed`` through the lowest ``level`` of ``allowed``,
    holes filled (filling adds voxels, so the growth target is lowered by what it added, a few rounds)."""
    k, best, best_err = want, np.zeros(level.shape, bool), None
    for _ in range(max_rounds):
        outer = ndimage.binary_fill_holes(_grow(level, allowed, seed, max(1, k))) & allowed
        got = int(outer.sum())
        if best_err is None or abs(got - want) < best_err:
            best, best_err = outer, abs(got - want)
        if best_err <= max(1, 0.01 * want) or got < k:         # close enough, or the region is exhausted
            break
        k = max(1, k - (got - want))
    return best


def component_on_ball(mask: np.ndarray, ball: np.ndarray) -> np.ndarray:
    """The 26-connected component of ``mask`` overlapping ``ball`` most (empty when none overlaps)."""
    labels, n = ndimage.label(mask, structure=LESION_CONNECTIVITY)
    if n == 0:
        return np.zeros_like(mask)
    overlap = np.bincount(labels[ball], minlength=n + 1)
    overlap[0] = 0
    return labels == int(np.argmax(overlap)) if overlap.max() > 0 else np.zeros_like(mask)
