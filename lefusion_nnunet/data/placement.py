"""Where a lesion may go: the allowed region of a case (host organ, region mask or body, off existing lesions)
and placing a mask fully inside it.

Arrays are ``(Z, Y, X)`` (class stacks ``(C, Z, Y, X)``), spacings ``(z, y, x)`` in mm, mask ``True`` = lesion.
Randomness comes only from the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from lefusion_nnunet.data.masks import _FLOAT32_MAX_VOXELS, _SLAB_VOXELS, Spacing, _check_spacing, mask_bounds
from lefusion_nnunet.errors import LeFusionInputError


# --------------------------------------------------------------------------------------------------------
# where a lesion may go
def body_mask(image_zyx: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The body (foreground): image above ``threshold`` (default: Otsu), largest component, holes filled
    in 3D and slice by slice (axial), so enclosed air such as the lungs is part of the body."""
    img = np.asarray(image_zyx, np.float32)
    if threshold is None:
        from skimage.filters import threshold_otsu

        sub = img[::2, ::2, ::2]
        threshold = float(threshold_otsu(sub)) if sub.max() > sub.min() else float(sub.min()) - 1.0
    fg = img > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    if n > 1:
        sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
        fg = labels == (int(np.argmax(sizes)) + 1)
    fg = ndimage.binary_fill_holes(fg)
    for z in range(fg.shape[0]):
        fg[z] = ndimage.binary_fill_holes(fg[z])
    return fg


def allowed_region(label: np.ndarray | None, region_label: int | None = None, region_mask: np.ndarray | None = None,
                   image: np.ndarray | None = None, lesion_labels: Sequence[int] | None = None,
                   margin_vox: int = 1, threshold: float | None = None) -> np.ndarray:
    """Where new lesion voxels may lie, bool ``(Z, Y, X)``.

    Priority: ``region_mask`` (any non-zero voxel) > ``region_label`` (``label == region_label``) > the body
    of ``image`` (:func:`body_mask`) > the whole volume. Existing lesion voxels (``label`` values in
    ``lesion_labels``; default: every non-zero label except ``region_label``) dilated by ``margin_vox``
    voxels (26-neighbourhood) are excluded.
    """
    shape = None
    for a in (label, region_mask, image):
        if a is not None:
            shape = np.shape(a)
            break
    if shape is None:
        raise ValueError("allowed_region needs a label, a region mask or an image")
    for name, a in (("region mask", region_mask), ("image", image)):
        if a is not None and label is not None and np.shape(a) != np.shape(label):
            raise LeFusionInputError(f"the {name} has shape {np.shape(a)} (z, y, x) but the label map has "
                                     f"{np.shape(label)}; resample it onto the image grid.")
    if region_mask is not None:
        allowed = np.asarray(region_mask) != 0
    elif region_label is not None:
        if label is None:
            raise ValueError("region_label needs a label map")
        allowed = np.asarray(label) == int(region_label)
    elif image is not None:
        allowed = body_mask(image, threshold)
    else:
        allowed = np.ones(shape, bool)
    if label is not None:
        lab = np.asarray(label)
        if lesion_labels is None:
            lesions = (lab != 0) & (lab != (region_label if region_label is not None else 0))
        else:
            lesions = np.isin(lab, list(lesion_labels))
        if lesions.any():
            if margin_vox > 0:
                lesions = ndimage.binary_dilation(lesions, structure=np.ones((3, 3, 3), bool), iterations=margin_vox)
            allowed = allowed & ~lesions
    return np.ascontiguousarray(allowed)


def valid_offsets(mask_zyx: np.ndarray, allowed_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every placement of a mask that keeps all its voxels inside ``allowed``.

    Offsets ``o`` (the volume index of mask voxel ``(0, 0, 0)``) are valid where the correlation of the
    forbidden region with the mask is zero. Computed by FFT (``scipy.signal.fftconvolve`` in z-slabs;
    float32 for masks of up to 50,000 voxels, else float64) over the bounding box of ``allowed`` only.

    Returns:
        ``(valid, base)``: bool array of valid offsets relative to ``base`` (volume index of ``valid[0, 0, 0]``),
        or None when ``allowed`` is empty or smaller than the mask.
    """
    mask = np.asarray(mask_zyx, bool)
    allowed = np.asarray(allowed_zyx, bool)
    idx = np.argwhere(allowed)
    if len(idx) == 0 or not mask.any():
        return None
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = allowed[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    ks = np.asarray(mask.shape)
    out_shape = np.asarray(crop.shape) - ks + 1
    if (out_shape < 1).any():
        return None
    forbidden = ~crop
    if not forbidden.any():
        return np.ones(tuple(out_shape), bool), lo
    # float32 FFTs are ~3x faster; their error (~1e-7 x the mask's voxel count) stays far below the 0.5
    # threshold for masks up to _FLOAT32_MAX_VOXELS; place_mask re-checks the chosen offset exactly anyway.
    dtype = np.float32 if int(mask.sum()) <= _FLOAT32_MAX_VOXELS else np.float64
    kernel = mask[::-1, ::-1, ::-1].astype(dtype)
    plane = int(crop.shape[1] * crop.shape[2])
    slab = max(1, _SLAB_VOXELS // max(plane, 1) - int(ks[0]) + 1)
    valid = np.empty(tuple(out_shape), bool)
    for z0 in range(0, int(out_shape[0]), slab):
        z1 = min(int(out_shape[0]), z0 + slab)
        block = forbidden[z0:z1 + int(ks[0]) - 1].astype(dtype)
        counts = fftconvolve(block, kernel, mode="valid")
        valid[z0:z1] = counts < 0.5
    return valid, lo


#: Random offsets :func:`place_mask` tries before it computes every valid offset (by FFT).
PLACEMENT_TRIES = 256


def _random_offset(union: np.ndarray, pts: np.ndarray, allowed: np.ndarray, rng: np.random.Generator,
                   tries: int, box: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    """An offset drawn uniformly from those that keep the mask inside ``allowed`` (rejection sampling over the
    offsets that keep its box inside the allowed region's ``box``), or None after ``tries`` misses."""
    if box is None:
        return None
    lo, hi = box
    span = hi - lo - np.asarray(union.shape) + 1
    if (span < 1).any():
        return None
    for _ in range(int(tries)):
        offset = lo + rng.integers(0, span)
        if allowed[tuple((pts + offset).T)].all():
            return offset.astype(np.int64)
    return None


def place_mask(mask_czyx: np.ndarray, allowed_zyx: np.ndarray, rng: np.random.Generator,
               center_zyx: Sequence[float] | None = None,
               allowed_bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """Choose where a lesion goes so that every lesion voxel lies inside ``allowed_zyx``.

    ``allowed_zyx`` should already exclude existing lesions (see :func:`allowed_region`). Without ``center_zyx``
    the offset is drawn uniformly from the valid ones: first by rejection sampling (:data:`PLACEMENT_TRIES` random
    offsets, each checked exactly; cheap on a whole CT), then, for regions too thin for that to hit, from every
    valid offset (:func:`valid_offsets`). With ``center_zyx`` (voxels) it is the valid offset whose mask
    bounding-box centre is nearest to it (ties drawn at random).

    Args:
        mask_czyx: bool ``(C, z, y, x)`` or ``(z, y, x)`` lesion mask (tight).
        allowed_zyx: bool ``(Z, Y, X)``.
        allowed_bounds: :func:`~lefusion_nnunet.data.masks.mask_bounds` of ``allowed_zyx`` when the caller has it (one per case, not per
            lesion); computed here otherwise.

    Returns:
        int64 ``(3,)`` volume index of mask voxel ``(0, 0, 0)``, or None when no position is valid.
    """
    mask = np.asarray(mask_czyx, bool)
    union = mask.any(0) if mask.ndim == 4 else mask
    allowed = np.asarray(allowed_zyx, bool)
    pts = np.argwhere(union)
    if center_zyx is None and len(pts):
        bounds = allowed_bounds if allowed_bounds is not None else mask_bounds(allowed)
        offset = _random_offset(union, pts, allowed, rng, PLACEMENT_TRIES, bounds)
        if offset is not None:
            return offset
    found = valid_offsets(union, allowed)
    if found is None:
        return None
    valid, base = found
    cand = np.flatnonzero(valid)
    while len(cand):
        if center_zyx is None:
            pick = int(rng.integers(len(cand)))
        else:
            rel = np.asarray(np.unravel_index(cand, valid.shape)).T + base + (np.asarray(union.shape) - 1) / 2.0
            dist = ((rel - np.asarray(center_zyx, np.float64)) ** 2).sum(1)
            near = np.flatnonzero(dist <= dist.min() + 1e-9)
            pick = int(near[rng.integers(len(near))])
        offset = np.asarray(np.unravel_index(cand[pick], valid.shape), np.int64) + base
        if allowed[tuple((pts + offset).T)].all():   # exact check (guards FFT rounding)
            return offset
        cand = np.delete(cand, pick)
    return None


def paste_mask(mask_czyx: np.ndarray, offset_zyx: Sequence[int], shape_zyx: Sequence[int]) -> np.ndarray:
    """Put a tight ``(C, z, y, x)`` mask at ``offset_zyx`` into an all-false ``(C, Z, Y, X)`` volume."""
    mask = np.asarray(mask_czyx, bool)
    if mask.ndim == 3:
        mask = mask[None]
    out = np.zeros((mask.shape[0], *[int(s) for s in shape_zyx]), bool)
    o = [int(v) for v in offset_zyx]
    sl = tuple(slice(o[a], o[a] + mask.shape[a + 1]) for a in range(3))
    if any(s.start < 0 or s.stop > n for s, n in zip(sl, shape_zyx)):
        raise ValueError(f"mask of shape {mask.shape[1:]} at offset {o} leaves the volume {tuple(shape_zyx)}")
    out[(slice(None),) + sl] = mask
    return out


# --------------------------------------------------------------------------------------------------------
# location control and the model grid <-> native grid for generated masks
def nearest_allowed_voxel(allowed_zyx: np.ndarray, center_zyx: Sequence[float],
                          spacing_zyx: Spacing) -> np.ndarray | None:
    """The voxel of ``allowed`` nearest (in mm) to ``center_zyx`` (voxel coordinates, may lie outside the
    volume); None when ``allowed`` is empty."""
    allowed = np.asarray(allowed_zyx, bool)
    idx = np.argwhere(allowed)
    if len(idx) == 0:
        return None
    sp = _check_spacing(spacing_zyx)
    d = (((idx - np.asarray(center_zyx, np.float64)) * sp) ** 2).sum(1)
    return idx[int(np.argmin(d))].astype(np.int64)


def choose_center(allowed_zyx: np.ndarray, spacing_zyx: Spacing, radius_mm: float,
                  rng: np.random.Generator) -> np.ndarray | None:
    """A random lesion centre (voxel index) inside ``allowed``: uniform over the allowed voxels at least
    ``min(radius_mm, 0.6 * deepest)`` mm from the region's border (``deepest`` = largest such distance), so
    a lesion fits where the region is thick enough, and thin regions (a myocardial wall) use their middle.
    None when ``allowed`` is empty."""
    allowed = np.asarray(allowed_zyx, bool)
    if not allowed.any():
        return None
    depth = ndimage.distance_transform_edt(allowed, sampling=_check_spacing(spacing_zyx))
    need = min(float(radius_mm), 0.6 * float(depth.max()))
    cand = np.flatnonzero(depth.ravel() >= need)
    return np.asarray(np.unravel_index(int(cand[rng.integers(len(cand))]), allowed.shape), np.int64)
