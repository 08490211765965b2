"""Lesion masks for synthesis: where the lesion goes (shape) and where it may go (placement).

Two mask sources feed :mod:`lefusion_nnunet.variants`:

* :func:`ellipsoid_mask` - a smooth random ellipsoid of a requested equivalent-sphere diameter, its surface
  optionally roughened by low-frequency noise (``boundary`` 0 = smooth ... 1 = irregular);
* :class:`~lefusion_nnunet.data.mask_library.MaskLibrary` - real lesion masks (each connected lesion of a labelled dataset, lesion classes kept
  together) that are flipped, rotated and rescaled on demand.

Placement (:func:`place_mask`) picks an offset at which *all* lesion voxels fall inside an allowed region
(:func:`allowed_region`: a host-organ label, a user mask, or the body): uniformly among the valid ones (by
rejection sampling, falling back to finding *every* valid offset by an FFT correlation of the forbidden region with
the mask), or the one nearest a requested centre.

A third source, masks sampled from a lesion mask model (:mod:`lefusion_nnunet.synthesis.masks`), is generated in
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

from lefusion_nnunet.errors import LeFusionInputError

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]

#: Longest / shortest semi-axis of a random ellipsoid is at most this.
#: One lesion = one 26-connected component (faces, edges and corners touch), everywhere in the package.
LESION_CONNECTIVITY = np.ones((3, 3, 3), bool)
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


def mask_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lo, hi)``: the bounding box (voxels, z y x; ``hi`` exclusive) of the true voxels of a ``(Z, Y, X)`` mask
    or of the union of a ``(C, Z, Y, X)`` one; None when it has none."""
    m = np.asarray(mask, bool)
    union = m.any(0) if m.ndim == 4 else m
    found = ndimage.find_objects(union.view(np.uint8))
    if not found or found[0] is None:
        return None
    return np.array([b.start for b in found[0]]), np.array([b.stop for b in found[0]])


def crop_to_mask(mask: np.ndarray) -> np.ndarray:
    """Crop a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` mask to the bounding box of its (union) true voxels."""
    m = np.asarray(mask, bool)
    bounds = mask_bounds(m)
    if bounds is None:
        return m
    sl = tuple(slice(int(a), int(b)) for a, b in zip(*bounds))
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
    labels, n = ndimage.label(mask, structure=LESION_CONNECTIVITY)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_fill_holes(mask)
    return crop_to_mask(mask)


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
    components, _ = ndimage.label(union, structure=LESION_CONNECTIVITY)
    for comp, sl in enumerate(ndimage.find_objects(components), start=1):
        if sl is None:
            continue
        region = components[sl] == comp
        yield comp, sl, np.stack([region & (label_zyx[sl] == v) for v in lesion_labels])


def keep_largest_component(mask_zyx: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool mask (the mask itself if it has at most one)."""
    mask = np.asarray(mask_zyx, bool)
    labels, n = ndimage.label(mask, structure=LESION_CONNECTIVITY)
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


def nested_class_masks(shape_zyx: np.ndarray, spacing_zyx: Spacing, frequencies: Sequence[float],
                       rng: np.random.Generator, depth_range: tuple[float, float] = (0.35, 0.65)
                       ) -> tuple[np.ndarray, list[float | None]]:
    """Split one lesion shape into nested classes, outer class first (a ground-glass rim around a solid core; an
    infarct around its microvascular obstruction).

    Class ``i >= 1`` is a core: the voxels deeper (mm to the lesion surface) than a fraction of the shape's largest
    depth, each core inside the previous one; it is present with probability ``frequencies[i]`` (how often the
    training lesions hold that class). Returns disjoint bool masks ``(C, Z, Y, X)``, each voxel in the innermost
    class it lies in, and the depth fraction of each inner class (None: absent).
    """
    # padded: where the shape touches its bounding box, depth is measured to the background just outside it
    depth = ndimage.distance_transform_edt(np.pad(shape_zyx, 1), sampling=_check_spacing(spacing_zyx))[1:-1, 1:-1, 1:-1]
    top = float(depth.max())
    masks = np.zeros((len(frequencies), *shape_zyx.shape), bool)
    masks[0] = shape_zyx
    fractions: list[float | None] = []
    level = 0.0
    for i in range(1, len(frequencies)):
        present, fraction = rng.random() < float(frequencies[i]), rng.uniform(*depth_range)
        if not present:
            fractions.append(None)
            continue
        level += (1.0 - level) * fraction
        core = depth >= level * top
        masks[i] = core if core.any() else depth == top
        fractions.append(round(level, 4))
    for i in range(len(frequencies) - 1):
        masks[i] &= ~masks[i + 1:].any(0)
    return masks, fractions
