"""Lesion masks for synthesis: where the lesion goes (shape) and where it may go (placement).

Two mask sources feed :mod:`lefusion_nnunet.variants`:

* :func:`ellipsoid_mask` - a smooth random ellipsoid of a requested equivalent-sphere diameter, its surface
  optionally roughened by low-frequency noise (``boundary`` 0 = smooth ... 1 = irregular);
* :class:`~lefusion_nnunet.data.mask_library.MaskLibrary` - real lesion masks (each connected lesion of a labelled dataset, lesion classes kept
  together) that are flipped, rotated and rescaled on demand.

Placement (:func:`place_mask`) finds *every* offset at which *all* lesion voxels fall inside an allowed
region (:func:`allowed_region`: a host-organ label, a user mask, or the body) by an FFT correlation of the
forbidden region with the mask, and picks one at random or the one nearest a requested centre.

A third source, masks sampled from a lesion mask model (:mod:`lefusion_nnunet.mask_diffusion`), is generated in
place instead: :func:`choose_center` / :func:`nearest_allowed_voxel` pick the centre, the mask is made on the
model grid around it and mapped back with :func:`roi_mask_to_native`. :func:`surface_to_volume` and
:func:`sphericity` measure boundary roughness.

Conventions: arrays are ``(Z, Y, X)`` (class stacks ``(C, Z, Y, X)``), spacings ``(z, y, x)`` in mm,
mask ``True`` = lesion. Randomness comes only from the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from lefusion_nnunet.errors import LeFusionInputError

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]

#: Longest / shortest semi-axis of a random ellipsoid is at most this.
MAX_AXIS_RATIO = 1.6
#: Relative radius perturbation (std of the noise field) at ``boundary=1``.
BOUNDARY_AMPLITUDE = 0.3
#: Real masks are rescaled by at most these factors (of their own equivalent diameter).
REAL_SCALE_LIMITS = (0.7, 1.4)
#: Largest small-angle in-plane rotation of real masks, degrees.
REAL_MAX_ANGLE_DEG = 15.0
# Correlation is computed in z-slabs of at most this many voxels (bounds FFT memory).
_SLAB_VOXELS = 1 << 24
_FLOAT32_MAX_VOXELS = 50_000


# --------------------------------------------------------------------------------------------------------
# sizes
def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter of the sphere of the same volume: ``d = (6 V / pi) ** (1/3)`` (``V`` in mm^3)."""
    return float((6.0 * max(float(volume_mm3), 0.0) / math.pi) ** (1.0 / 3.0))


def sphere_volume_mm3(diameter_mm: float) -> float:
    """Volume of a sphere of diameter ``d`` mm: ``pi d^3 / 6``."""
    return float(math.pi * float(diameter_mm) ** 3 / 6.0)


def mask_volume_mm3(mask: np.ndarray, spacing_zyx: Spacing) -> float:
    """Volume in mm^3 of the true voxels of a mask (any leading class axis is unioned)."""
    m = np.asarray(mask, bool)
    if m.ndim == 4:
        m = m.any(0)
    return float(m.sum() * float(np.prod(spacing_zyx)))


def mask_equivalent_diameter(mask: np.ndarray, spacing_zyx: Spacing) -> float:
    """Equivalent-sphere diameter (mm) of a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` mask."""
    return equivalent_diameter_mm(mask_volume_mm3(mask, spacing_zyx))


def crop_to_mask(mask: np.ndarray) -> np.ndarray:
    """Crop a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` mask to the bounding box of its (union) true voxels."""
    m = np.asarray(mask, bool)
    union = m.any(0) if m.ndim == 4 else m
    idx = np.argwhere(union)
    if len(idx) == 0:
        return m
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return m[(slice(None),) + sl] if m.ndim == 4 else m[sl]


def _check_spacing(spacing_zyx) -> np.ndarray:
    sp = np.asarray(spacing_zyx, np.float64)
    if sp.shape != (3,) or not np.all(sp > 0) or not np.all(np.isfinite(sp)):
        raise LeFusionInputError(f"spacing {tuple(spacing_zyx)} must be three positive numbers (z, y, x mm).")
    return sp


# --------------------------------------------------------------------------------------------------------
# ellipsoids
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a Gaussian matrix, sign-fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise field (Gaussian-filtered white noise), clipped to +-2.5."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_vox, mode="wrap")
    std = field.std()
    field = (field - field.mean()) / (std if std > 0 else 1.0)
    return np.clip(field, -2.5, 2.5)


def ellipsoid_mask(diameter_mm: float, spacing_zyx: Spacing, boundary: float = 0.3,
                   rng: np.random.Generator | None = None, max_axis_ratio: float = MAX_AXIS_RATIO) -> np.ndarray:
    """A random smooth ellipsoid lesion on a tight native-voxel grid.

    The semi-axes are random (longest / shortest <= ``max_axis_ratio``), the orientation is uniformly
    random, and the radius is perturbed by a low-frequency noise field of relative std
    ``BOUNDARY_AMPLITUDE * boundary``. The iso-level is then chosen so that the voxel count matches the
    volume of a sphere of ``diameter_mm`` (the largest connected component is kept and holes are filled,
    so the final volume agrees within a few percent for lesions of more than a few voxels).

    Args:
        diameter_mm: equivalent-sphere diameter in mm (> 0).
        spacing_zyx: native voxel spacing ``(z, y, x)`` in mm.
        boundary: 0 = smooth ellipsoid ... 1 = irregular surface.
        rng: randomness (axes, orientation, surface noise).

    Returns:
        bool ``(z, y, x)`` array cropped to the lesion's bounding box (at least one voxel true).
    """
    if rng is None:
        raise ValueError("ellipsoid_mask needs a numpy Generator (rng=np.random.default_rng(seed))")
    sp = _check_spacing(spacing_zyx)
    if not (np.isfinite(diameter_mm) and diameter_mm > 0):
        raise LeFusionInputError(f"lesion diameter {diameter_mm} mm must be a positive number.")
    if not 0.0 <= boundary <= 1.0:
        raise LeFusionInputError(f"--boundary {boundary} must lie between 0 (smooth) and 1 (irregular).")
    r = diameter_mm / 2.0
    m = rng.uniform(1.0, max_axis_ratio, size=3)
    semi = r * m / np.cbrt(np.prod(m))                       # product of semi-axes = r^3 (sphere volume)
    rot = random_rotation(rng)
    amp = BOUNDARY_AMPLITUDE * float(boundary)
    target = max(1, int(round(sphere_volume_mm3(diameter_mm) / float(np.prod(sp)))))
    grow = 1.0
    for _ in range(6):
        half_mm = semi.max() * (1.0 + 2.5 * amp) * 1.1 * grow + sp
        n_half = np.ceil(half_mm / sp).astype(int)
        axes = [np.arange(-n, n + 1) * s for n, s in zip(n_half, sp)]
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        pts = np.stack([zz, yy, xx], -1) @ rot                # coordinates in the ellipsoid frame
        rho = np.sqrt(((pts / semi) ** 2).sum(-1))            # 1 on the unperturbed surface
        if amp > 0:
            noise = _smooth_noise(rng, rho.shape, np.maximum(0.35 * r / sp, 0.5))
            level = rho / (1.0 + amp * noise)
        else:
            level = rho
        flat = level.ravel()
        k = min(target, flat.size) - 1
        thresh = np.partition(flat, k)[k]
        mask = level <= thresh
        touches = mask[[0, -1]].any() or mask[:, [0, -1]].any() or mask[:, :, [0, -1]].any()
        if not touches or target > flat.size:
            break
        grow *= 1.5
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_fill_holes(mask)
    return crop_to_mask(mask)


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


def place_mask(mask_czyx: np.ndarray, allowed_zyx: np.ndarray, rng: np.random.Generator,
               center_zyx: Sequence[float] | None = None) -> np.ndarray | None:
    """Choose where a lesion goes so that every lesion voxel lies inside ``allowed_zyx``.

    ``allowed_zyx`` should already exclude existing lesions (see :func:`allowed_region`). All valid offsets
    are found (:func:`valid_offsets`); one is drawn uniformly, or, with ``center_zyx`` (voxels), the one
    whose mask bounding-box centre is nearest to it (ties drawn at random).

    Args:
        mask_czyx: bool ``(C, z, y, x)`` or ``(z, y, x)`` lesion mask (tight).
        allowed_zyx: bool ``(Z, Y, X)``.

    Returns:
        int64 ``(3,)`` volume index of mask voxel ``(0, 0, 0)``, or None when no position is valid.
    """
    mask = np.asarray(mask_czyx, bool)
    union = mask.any(0) if mask.ndim == 4 else mask
    allowed = np.asarray(allowed_zyx, bool)
    found = valid_offsets(union, allowed)
    if found is None:
        return None
    valid, base = found
    cand = np.flatnonzero(valid)
    pts = np.argwhere(union)
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


def roi_mask_to_native(masks_czyx: np.ndarray, origin_zyx, native_spacing: Spacing, geometry,
                       shape_zyx: Sequence[int]) -> np.ndarray:
    """Resample masks made on a model grid (``geometry``, voxel 0 at native voxel ``origin_zyx``; see
    :mod:`lefusion_nnunet.data.roi`) onto the native grid: bool ``(C, Z, Y, X)`` of ``shape_zyx``.

    Each native voxel inside the ROI takes the linearly interpolated mask value at its model-grid position
    (>= 0.5 = true); voxels outside the ROI are false. The inverse of ``roi.extract_roi_mask``.
    """
    masks = np.asarray(masks_czyx, bool)
    if masks.ndim == 3:
        masks = masks[None]
    scale = np.asarray(geometry.spacing_zyx, np.float64) / _check_spacing(native_spacing)
    origin = np.asarray(origin_zyx, np.float64)
    size = np.asarray(geometry.size_zyx)
    lo = np.maximum(np.floor(origin - 0.5 * scale).astype(int), 0)
    hi = np.minimum(np.ceil(origin + (size - 0.5) * scale).astype(int) + 1, np.asarray(shape_zyx))
    out = np.zeros((masks.shape[0], *[int(s) for s in shape_zyx]), bool)
    if (hi <= lo).any():
        return out
    axes = [(np.arange(lo[a], hi[a]) - origin[a]) / scale[a] for a in range(3)]
    grid = np.meshgrid(*axes, indexing="ij")
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    for c in range(masks.shape[0]):
        if masks[c].any():
            out[c][box] = ndimage.map_coordinates(masks[c].astype(np.float32), grid, order=1, mode="constant",
                                                  cval=0.0) >= 0.5
    return out


def lesion_components(label_zyx: np.ndarray, lesion_labels: Sequence[int]
                      ) -> Iterator[tuple[int, tuple[slice, slice, slice], np.ndarray]]:
    """Each 26-connected lesion of a label map: the components of the union of ``lesion_labels``.

    Yields ``(component number from 1, bounding-box slices (z, y, x), bool class stack (C, z, y, x) cropped to
    the box)``; channel c holds the component's voxels of ``lesion_labels[c]``, so the classes of one lesion stay
    together.
    """
    union = np.isin(label_zyx, lesion_labels)
    components, _ = ndimage.label(union, structure=np.ones((3, 3, 3)))
    for comp, sl in enumerate(ndimage.find_objects(components), start=1):
        if sl is None:
            continue
        region = components[sl] == comp
        yield comp, sl, np.stack([region & (label_zyx[sl] == v) for v in lesion_labels])


def keep_largest_component(mask_zyx: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool mask (the mask itself if it has at most one)."""
    mask = np.asarray(mask_zyx, bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask.copy()
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


# --------------------------------------------------------------------------------------------------------
# shape measures
def surface_area_mm2(mask_zyx: np.ndarray, spacing_zyx: Spacing) -> float:
    """Surface area (mm^2) of a bool mask: marching cubes at 0.5 on the zero-padded mask."""
    from skimage.measure import marching_cubes, mesh_surface_area

    m = np.asarray(mask_zyx, bool)
    if m.ndim == 4:
        m = m.any(0)
    if not m.any():
        return 0.0
    m = crop_to_mask(m)
    verts, faces, _, _ = marching_cubes(np.pad(m, 1).astype(np.float32), 0.5,
                                        spacing=tuple(float(s) for s in _check_spacing(spacing_zyx)))
    return float(mesh_surface_area(verts, faces))


def surface_to_volume(mask_zyx: np.ndarray, spacing_zyx: Spacing) -> float:
    """Surface area / volume in 1/mm (a sphere of radius r: 3 / r); 0 for an empty mask."""
    v = mask_volume_mm3(mask_zyx, spacing_zyx)
    return surface_area_mm2(mask_zyx, spacing_zyx) / v if v > 0 else 0.0


def sphericity(mask_zyx: np.ndarray, spacing_zyx: Spacing) -> float:
    """``pi^(1/3) (6 V)^(2/3) / A``: 1 for a ball, smaller for elongated or irregular shapes."""
    v = mask_volume_mm3(mask_zyx, spacing_zyx)
    a = surface_area_mm2(mask_zyx, spacing_zyx)
    return float(math.pi ** (1 / 3) * (6 * v) ** (2 / 3) / a) if a > 0 else 0.0
