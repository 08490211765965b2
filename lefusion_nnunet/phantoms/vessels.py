"""The chest phantom's vessel tree and lung-side helpers (used by :mod:`lefusion_nnunet.phantoms.chest`).

Arrays are ``(Z, Y, X)``, spacings ``(z, y, x)`` in mm; randomness only from the generator passed in.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from lefusion_nnunet.phantoms.common import Spacing


# =================================================================================================
# rendering
# =================================================================================================
def _vessel_tree(rng: np.random.Generator, lung: np.ndarray, spacing: Spacing, hilum_zyx: np.ndarray,
                 n_terminals: int = 48, r_tip_mm: float = 0.55) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points (voxel coordinates, float) and radii (mm) of a branching tree in ``lung``.

    Terminals are random lung voxels; the tree recursively splits the terminal set along its widest
    axis, so branches fan out from the hilum and thin toward the periphery (Murray: r^3 ~ #terminals).
    """
    idx = np.flatnonzero(lung)
    if idx.size == 0:
        return np.zeros((0, 3)), np.zeros(0)
    pick = rng.choice(idx, size=min(n_terminals, idx.size), replace=False)
    terminals = np.stack(np.unravel_index(pick, lung.shape), axis=1).astype(np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    pts: list[np.ndarray] = []
    rads: list[np.ndarray] = []

    def segment(a: np.ndarray, b: np.ndarray, radius: float) -> None:
        # gently curved (quadratic Bezier) polyline sampled every ~0.4 voxel
        length_mm = float(np.linalg.norm((b - a) * sp))
        mid = (a + b) / 2.0 + rng.normal(scale=0.12 * length_mm, size=3) / sp
        n = max(int(np.max(np.abs(b - a)) * 2.5) + 2, 2)
        t = np.linspace(0.0, 1.0, n)[:, None]
        pts.append((1 - t) ** 2 * a + 2 * (1 - t) * t * mid + t ** 2 * b)
        rads.append(np.full(n, radius))

    def grow(start: np.ndarray, term: np.ndarray) -> None:
        radius = r_tip_mm * len(term) ** (1.0 / 3.0)
        if len(term) == 1:
            segment(start, term[0], radius)
            return
        spread = (term - term.mean(axis=0)) * sp
        axis = int(np.argmax(spread.var(axis=0)))
        order = np.argsort(spread[:, axis], kind="stable")
        target = term.mean(axis=0)
        branch = start + rng.uniform(0.3, 0.5) * (target - start)
        segment(start, branch, radius)
        half = len(term) // 2
        grow(branch, term[order[:half]])
        grow(branch, term[order[half:]])

    grow(hilum_zyx.astype(np.float64), terminals)
    return np.concatenate(pts), np.concatenate(rads)


def _rasterize_vessels(points: np.ndarray, radii: np.ndarray, region: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Soft vessel occupancy in [0, 1] over ``region``'s bounding box (float32 full-size array)."""
    out = np.zeros(region.shape, dtype=np.float32)
    if points.size == 0:
        return out
    bb = ndimage.find_objects(region.astype(np.uint8))[0]
    lo = np.array([s.start for s in bb])
    hi = np.array([s.stop for s in bb])
    box_shape = tuple(hi - lo)
    vox = np.rint(points).astype(np.int64) - lo
    keep = np.all((vox >= 0) & (vox < np.array(box_shape)), axis=1)
    vox, r = vox[keep], radii[keep]
    if vox.size == 0:
        return out
    # thickest branch wins where centre lines share a voxel
    rad_img = np.zeros(box_shape, dtype=np.float32)
    flat = np.ravel_multi_index(vox.T, box_shape)
    np.maximum.at(rad_img.reshape(-1), flat, r.astype(np.float32))
    dist, inds = ndimage.distance_transform_edt(rad_img == 0, sampling=spacing, return_indices=True)
    nearest_r = rad_img[tuple(inds)]
    occ = np.clip(nearest_r - dist + 0.5, 0.0, 1.0).astype(np.float32)
    out[bb] = occ * region[bb]
    return out


def _largest_per_side(lung: np.ndarray, X: int) -> np.ndarray:
    out = np.zeros_like(lung)
    mid = X // 2
    for sl in (np.s_[:, :, :mid], np.s_[:, :, mid:]):
        part = lung[sl]
        lab, n = ndimage.label(part)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[sl] = lab == int(np.argmax(sizes))
    return out
