"""Automatic lung region for chest CT without a host-organ label (threshold + morphology).

:func:`lung_region` returns where lung lesions may be placed when a dataset has no lung label: the lung
parenchyma together with the vessels, airways and nodules it encloses, without chest wall, mediastinum,
bone or the air outside the body. Every size is given in millimetres and converted with the voxel spacing,
so the same call works on 5 mm slices and on 0.7 mm isotropic scans.

Conventions: ``image_hu`` is ``(Z, Y, X)`` in Hounsfield units (axial slices along Z); ``spacing_zyx`` is
``(z, y, x)`` in mm (SimpleITK reports ``(x, y, z)``: reverse it). Only numpy and scipy are used.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from lefusion_nnunet.errors import LeFusionInputError

__all__ = ["lung_region"]

# 2D 8-connectivity inside an axial slice, no connection across slices (labels every slice at once)
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = True


def lung_region(image_hu: np.ndarray, spacing_zyx: tuple[float, float, float], *,
                air_threshold_hu: float = -400.0, closing_radius_mm: float = 5.0, min_lung_ml: float = 20.0,
                second_lung_fraction: float = 0.2, airway_max_area_mm2: float = 600.0,
                airway_midline_fraction: float = 0.15) -> np.ndarray:
    """Boolean lung mask of a chest CT, ``(Z, Y, X)``, True = lung (parenchyma, vessels, airways, nodules).

    Steps:

    1. Air-like voxels: ``image_hu < air_threshold_hu``.
    2. Outside air removed: in every axial slice, air connected to the slice's border (outside the body,
       table, the area outside the reconstruction circle) is dropped. Per slice rather than in 3D because
       the lungs usually touch the first or last slice of a chest scan.
    3. The largest 3D component (26-connected) is the lung, or both lungs when they are joined; the second
       largest is kept as the other lung if its volume is at least ``second_lung_fraction`` of the largest.
       Bowel and stomach gas, and the trachea when it is not joined to a lung, are smaller and dropped.
    4. Each kept lung is closed morphologically with a ball of ``closing_radius_mm`` (mm, made with distance
       transforms, so it is a true ball on anisotropic grids) and its holes are filled slice by slice: vessels,
       bronchial walls and nodules inside the lung, and vessels denting its surface by less than the ball, are
       inside the region. The lungs are closed separately, so the mediastinum between them is never bridged.
    5. Trachea above the carina: 2D pieces of an axial slice smaller than ``airway_max_area_mm2`` whose
       centre lies within ``airway_midline_fraction`` of the region's left-right width from its centre
       are removed (lung apices are small too, but lateral).

    Args:
        image_hu: CT image in HU, ``(Z, Y, X)``, any real dtype.
        spacing_zyx: voxel spacing ``(z, y, x)`` in mm.
        air_threshold_hu: HU below which a voxel is air-like (lung parenchyma is about -850 HU).
        closing_radius_mm: radius of the closing ball in mm; surface dents narrower than twice this are filled.
        min_lung_ml: the largest inside-air component must be at least this many millilitres (an adult lung
            holds 1-3 L; the project's chest phantom lungs about 80 mL each).
        second_lung_fraction: the second component is a lung if its volume is at least this fraction of
            the largest one.
        airway_max_area_mm2: largest in-plane area (mm^2) of a midline piece treated as trachea.
        airway_midline_fraction: half-width of the midline band, as a fraction of the lungs' left-right width.

    Returns:
        ``bool`` array of ``image_hu.shape``.

    Raises:
        LeFusionInputError: the input is not a 3D array with a valid spacing, or no air-filled structure of
            at least ``min_lung_ml`` lies inside the body.

    Limits (this is thresholding, not a trained segmenter):

    * CT in HU only: MR, or CT rescaled away from HU, has no air threshold and raises the error above.
    * Collapsed lung (atelectasis), consolidation, a large pleural effusion and large tumours touching the
      pleura are soft-tissue dense: they are left out when they dent the lung by more than the closing ball
      and are not enclosed in an axial slice. Pleural air (pneumothorax) is counted as lung.
    * Severe emphysema, bullae or a giant hiatal hernia with gas can be taken as lung; so can bowel gas in
      an abdominal scan that holds no lung (when it exceeds ``min_lung_ml``).
    * A lung cut by the in-plane field of view (touching the slice border) is taken for outside air.
    * Main bronchi below the carina that join the lungs stay inside the region.
    """
    image = np.asarray(image_hu)
    if image.ndim != 3:
        raise LeFusionInputError(f"lung_region needs a 3D (Z, Y, X) image, got an array of shape {image.shape}.")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise LeFusionInputError(f"spacing {tuple(spacing_zyx)} must be three positive (z, y, x) spacings in mm.")
    voxel_ml = float(np.prod(spacing)) / 1000.0

    air = image < air_threshold_hu
    inside = _drop_border_air(air)
    labels, n = ndimage.label(inside, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, np.int64)
    if n == 0 or sizes.max() * voxel_ml < min_lung_ml:
        largest = 0.0 if n == 0 else float(sizes.max() * voxel_ml)
        raise LeFusionInputError(
            f"no lung found: the largest air-filled (< {air_threshold_hu:g} HU) structure inside the body holds "
            f"{largest:.1f} mL, less than {min_lung_ml:g} mL; the image must be a chest CT in HU (else pass "
            f"region masks from a segmentation tool).")
    order = np.argsort(sizes)[::-1]
    keep = [int(order[0]) + 1]
    if n > 1 and sizes[order[1]] >= second_lung_fraction * sizes[order[0]]:
        keep.append(int(order[1]) + 1)

    out = np.zeros(image.shape, bool)
    objects = ndimage.find_objects(labels)
    for lab in keep:
        out |= _close_and_fill(labels, lab, objects[lab - 1], spacing, closing_radius_mm)
    _drop_trachea(out, spacing, airway_max_area_mm2, airway_midline_fraction)
    return out


def _drop_border_air(air: np.ndarray) -> np.ndarray:
    """``air`` without the 2D pieces (per axial slice) that touch the slice's in-plane border."""
    labels, n = ndimage.label(air, structure=_IN_PLANE)
    if n == 0:
        return air.copy()
    border = np.zeros(n + 1, bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(face)] = True
    border[0] = True
    return ~border[labels]


def _close_and_fill(labels: np.ndarray, lab: int, bbox: tuple[slice, ...], spacing: tuple[float, float, float],
                    radius_mm: float) -> np.ndarray:
    """Component ``lab`` closed with a ball of ``radius_mm`` and hole-filled per axial slice (full-size bool)."""
    shape = labels.shape
    pad = [int(math.ceil(radius_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(sl.start - p, 0), min(sl.stop + p, n)) for sl, p, n in zip(bbox, pad, shape))
    mask = labels[box] == lab
    if radius_mm > 0:
        # closing = erosion of the dilation, both by a ball of radius_mm, from Euclidean distances in mm;
        # the box is padded by the radius, so the dilation is never cut by the box (only by the volume)
        grown = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
        padded = np.pad(grown, [(0, 0)] + [(1, 1)] * 2, constant_values=False)   # in-plane outside = empty
        eroded = ndimage.distance_transform_edt(padded, sampling=spacing)[:, 1:-1, 1:-1] > radius_mm
        mask = mask | eroded
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    out = np.zeros(shape, bool)
    out[box] = mask
    return out


def _drop_trachea(region: np.ndarray, spacing: tuple[float, float, float], max_area_mm2: float,
                  midline_fraction: float) -> None:
    """Remove small midline 2D pieces (the trachea) from ``region`` in place."""
    if max_area_mm2 <= 0:
        return
    pixel_mm2 = spacing[1] * spacing[2]
    span_x = np.flatnonzero(region.any(axis=(0, 1)))
    if span_x.size == 0:
        return
    center_x = 0.5 * (span_x[0] + span_x[-1])
    band = midline_fraction * (span_x[-1] - span_x[0] + 1)
    labels, n = ndimage.label(region, structure=_IN_PLANE)
    if n == 0:
        return
    areas = np.bincount(labels.ravel(), minlength=n + 1) * pixel_mm2
    xs = ndimage.mean(np.broadcast_to(np.arange(region.shape[2]), region.shape), labels, np.arange(1, n + 1))
    drop = np.zeros(n + 1, bool)
    drop[1:] = (areas[1:] < max_area_mm2) & (np.abs(np.asarray(xs) - center_x) < band)
    region[drop[labels]] = False
