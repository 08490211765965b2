"""Lesion ROIs: cut around a point, resample to the model grid, and paste a generated ROI back.

The model grid is axis-aligned with the image's voxel axes (the image's direction matrix rotates both
alike, so it never enters the computation) and has ``geometry.size_zyx`` voxels of
``geometry.spacing_zyx`` mm. Its voxel ``k`` (per axis) sits at native voxel coordinate
``origin + k * model_spacing / native_spacing``. ``origin`` is rounded to whole native voxels so that,
when the native and model spacings agree, extraction and paste-back are exact copies (no interpolation).

Outside the image, extraction replicates the nearest edge voxel (documented padding); paste-back writes
only voxels of the native paste mask, so every other voxel stays bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.errors import LeFusionInputError

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class RoiGeometry(JsonConfig):
    """The model grid: ``size_zyx`` voxels (user says 64 x 64 x 32 for x, y, z) of ``spacing_zyx`` mm."""

    size_zyx: tuple[int, int, int] = (32, 64, 64)
    spacing_zyx: Vec3 = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.size_zyx) != 3 or min(self.size_zyx) < 4:
            raise LeFusionInputError(f"ROI size {self.size_zyx} must be three sizes of at least 4 voxels.")
        if len(self.spacing_zyx) != 3 or min(self.spacing_zyx) <= 0:
            raise LeFusionInputError(f"model spacing {self.spacing_zyx} must be three positive numbers (mm).")

    @property
    def extent_mm(self) -> np.ndarray:
        """Physical ROI size per axis (z, y, x) in mm."""
        return np.asarray(self.size_zyx) * np.asarray(self.spacing_zyx)


def _scale(native_spacing: Vec3, geometry: RoiGeometry) -> np.ndarray:
    """Native voxels per model voxel, per axis (z, y, x)."""
    return np.asarray(geometry.spacing_zyx, np.float64) / np.asarray(native_spacing, np.float64)


def plan_roi_origin(union_zyx: np.ndarray, native_spacing: Vec3, geometry: RoiGeometry,
                    offset_zyx=(0, 0, 0)) -> np.ndarray:
    """Where the model ROI of a lesion goes: native voxel index (z, y, x) of ROI voxel 0, the ROI centred on the
    bounding box of ``union_zyx`` (bool, native grid; a block whose voxel 0 is image voxel ``offset_zyx``). Planned
    once per lesion; extraction and paste-back use it."""
    center = roi_center_for_mask(union_zyx) + np.asarray(offset_zyx, np.float64)  # rounded in image coordinates
    return roi_origin_for_center(center, native_spacing, geometry)


def roi_origin_for_center(center_zyx, native_spacing: Vec3, geometry: RoiGeometry) -> np.ndarray:
    """Native voxel coordinate (z, y, x) of model voxel 0 for an ROI centred on ``center_zyx`` (voxels)."""
    half = (np.asarray(geometry.size_zyx, np.float64) - 1) / 2 * _scale(native_spacing, geometry)
    return np.round(np.asarray(center_zyx, np.float64) - half)


def roi_center_for_mask(mask_zyx: np.ndarray) -> np.ndarray:
    """Centre (z, y, x, voxels) of a mask's bounding box."""
    idx = np.argwhere(mask_zyx)
    if len(idx) == 0:
        raise LeFusionInputError("the lesion mask is empty; it must contain at least one voxel.")
    return (idx.min(0) + idx.max(0)) / 2.0


@dataclass(frozen=True)
class NativeWindow:
    """The box of a native image that one lesion's model ROI reads and writes: ``[start, stop)`` voxels per axis
    (z, y, x) of an image of ``image_shape`` voxels.

    :meth:`around_roi` makes it hold everything :func:`extract_roi`, :func:`extract_roi_mask`,
    :func:`paste_roi` and :func:`lefusion_nnunet.data.masks.roi_mask_to_native` touch for that ROI, so running
    them on the window (origin made local by :meth:`local`) gives the same values as on the whole image: the
    synthesis path works on a few hundred thousand voxels instead of a whole 512 x 512 x 300 scan.
    """

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    image_shape: tuple[int, int, int]

    @classmethod
    def around_roi(cls, origin_zyx, native_spacing: Vec3, geometry: RoiGeometry, image_shape_zyx) -> "NativeWindow":
        """The window of the ROI whose voxel 0 is native voxel ``origin_zyx`` (clipped to the image)."""
        origin = np.asarray(origin_zyx, np.float64)
        scale = _scale(native_spacing, geometry)
        last = origin + (np.asarray(geometry.size_zyx) - 1) * scale
        lo = np.minimum(np.floor(origin) - 1, np.floor(origin - 0.5 * scale))           # interpolation / ring reach
        hi = np.maximum(np.ceil(last) + 2, np.ceil(origin + (np.asarray(geometry.size_zyx) - 0.5) * scale) + 1)
        shape = np.asarray(image_shape_zyx, np.int64)
        lo = np.clip(lo, 0, shape - 1).astype(np.int64)
        hi = np.maximum(np.clip(hi, 0, shape).astype(np.int64), lo + 1)
        return cls(tuple(int(v) for v in lo), tuple(int(v) for v in hi), tuple(int(v) for v in shape))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def box(self) -> np.ndarray:
        """``(3, 2)`` int64 ``[start, stop)`` per axis (z, y, x)."""
        return np.stack([self.start, self.stop], axis=1).astype(np.int64)

    def local(self, zyx) -> np.ndarray:
        """A native voxel coordinate of the image as a coordinate of the window."""
        return np.asarray(zyx, np.float64) - np.asarray(self.start, np.float64)


@dataclass
class LesionEdit:
    """What synthesis changes in a native image: the image inside ``window`` after synthesis.

    Attributes:
        window: the :class:`~lefusion_nnunet.data.roi.NativeWindow` of the lesion's model ROI.
        values: ``window.shape`` (z, y, x), the image's dtype: the synthesised image there (equal to the input
            outside ``region``).
        region: bool ``window.shape``: the generation region (:func:`lefusion_nnunet.synthesis.lesion.generation_region`), the only voxels that may
            differ from the input.
        class_masks: bool ``(C, *window.shape)``: the request's lesion masks inside the window.
    """

    window: NativeWindow
    values: np.ndarray
    region: np.ndarray
    class_masks: np.ndarray

    def apply(self, image_zyx: np.ndarray) -> np.ndarray:
        """A copy of the whole native image with the edit pasted (bit-identical outside ``region``)."""
        out = np.array(image_zyx, copy=True)
        out[self.window.slices] = self.values
        return out


def mask_block_offset(class_masks: np.ndarray, mask_offset_zyx, image_shape_zyx, num_classes: int) -> np.ndarray:
    """Where a lesion request's masks lie in its image: the image voxel (z, y, x) of ``class_masks[:, 0, 0, 0]``,
    i.e. ``mask_offset_zyx``, or 0 for whole-image masks (``mask_offset_zyx`` None). One sentence when the masks
    are not ``num_classes`` blocks inside the image (or, without an offset, of the image's shape)."""
    masks, shape = np.asarray(class_masks), tuple(int(v) for v in image_shape_zyx)
    offset = np.zeros(3, np.int64) if mask_offset_zyx is None else np.asarray(mask_offset_zyx, np.int64)
    inside = masks.ndim == 4 and (offset >= 0).all() and (offset + masks.shape[1:] <= np.asarray(shape)).all()
    if not inside or masks.shape[0] != num_classes or (mask_offset_zyx is None and masks.shape[1:] != shape):
        raise LeFusionInputError(f"lesion masks of shape {masks.shape} do not match {num_classes} class(es) "
                                 f"on an image of shape {shape} (z, y, x).")
    return offset


def _axis_coords(origin_zyx, native_spacing: Vec3, geometry: RoiGeometry) -> list[np.ndarray]:
    s = _scale(native_spacing, geometry)
    return [origin_zyx[a] + np.arange(geometry.size_zyx[a]) * s[a] for a in range(3)]


def _resample_separable(volume: np.ndarray, origin_zyx: np.ndarray, steps: list[np.ndarray], order: int) -> np.ndarray:
    """Sample ``volume`` (Z, Y, X) at ``origin + steps`` per axis, on their outer product (edge-replicate
    padding). Positions are formed relative to the cropped block as ``(origin - block start) + steps``, so a whole
    (integer) origin gives the same bits wherever the volume is cut from (a :class:`NativeWindow` or the image)."""
    coords = [origin_zyx[a] + steps[a] for a in range(3)]
    # Crop the needed native block first so interpolation touches only nearby voxels.
    lo = [max(0, int(np.floor(c.min())) - 1) for c in coords]
    hi = [min(volume.shape[a], int(np.ceil(c.max())) + 2) for a, c in enumerate(coords)]
    lo = [min(lo[a], volume.shape[a] - 1) for a in range(3)]
    hi = [max(hi[a], lo[a] + 1) for a in range(3)]
    block = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    local = [(origin_zyx[a] - lo[a]) + steps[a] for a in range(3)]
    if all(np.allclose(c, np.round(c)) for c in local):
        # Integer grid steps: exact copies with edge replication (no interpolation at all).
        idx = [np.clip(np.round(c).astype(int), 0, block.shape[a] - 1) for a, c in enumerate(local)]
        return block[np.ix_(*idx)].astype(np.float32)
    grid = np.meshgrid(*local, indexing="ij")
    return ndimage.map_coordinates(block.astype(np.float32), grid, order=order, mode="nearest").astype(np.float32)


def extract_roi(image_zyx: np.ndarray, native_spacing: Vec3, origin_zyx, geometry: RoiGeometry,
                order: int = 1) -> np.ndarray:
    """Resample a native ``(Z, Y, X)`` image onto the model grid; returns float32 ``geometry.size_zyx``."""
    s = _scale(native_spacing, geometry)
    steps = [np.arange(geometry.size_zyx[a]) * s[a] for a in range(3)]
    return _resample_separable(image_zyx, np.asarray(origin_zyx, np.float64), steps, order)


def inside_image_roi(image_shape_zyx, native_spacing: Vec3, origin_zyx, geometry: RoiGeometry,
                     image_start_zyx=(0, 0, 0)) -> np.ndarray:
    """Which model voxels lie inside the native image (their centres within half a voxel of it): bool
    ``geometry.size_zyx``. The others are padding (edge-replicated in :func:`extract_roi`).

    ``origin_zyx`` and ``image_start_zyx`` (where the image's voxel 0 lies) are in the same voxel coordinates:
    a :class:`NativeWindow` passes its local origin and ``-window.start``."""
    coords = _axis_coords(np.asarray(origin_zyx, np.float64), native_spacing, geometry)
    inside = [(c >= s - 0.5) & (c <= s + n - 0.5) for c, n, s in zip(coords, image_shape_zyx, image_start_zyx)]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


def extract_roi_mask(mask_zyx: np.ndarray, native_spacing: Vec3, origin_zyx, geometry: RoiGeometry,
                     window: "NativeWindow | None" = None) -> np.ndarray:
    """Resample a native boolean mask onto the model grid (linear, >= 0.5), bool ``geometry.size_zyx``.

    Padding outside the image is never mask (a lesion touching the scan border does not continue into it). A
    non-empty mask that no model voxel covers by half (a lesion smaller than a model voxel) keeps the model voxel
    nearest to its centre, so every lesion inside the ROI has something to generate. With ``window``, the mask is
    that window of the image and ``origin_zyx`` is local to it (same result as on the whole image).
    """
    weight = extract_roi(mask_zyx.astype(np.float32), native_spacing, origin_zyx, geometry, order=1)
    if window is None:
        inside = inside_image_roi(mask_zyx.shape, native_spacing, origin_zyx, geometry)
    else:
        inside = inside_image_roi(window.image_shape, native_spacing, origin_zyx, geometry,
                                  tuple(-v for v in window.start))
    out = (weight >= 0.5) & inside
    if not out.any() and mask_zyx.any():
        centre = (np.argwhere(mask_zyx).mean(0) - np.asarray(origin_zyx)) / _scale(native_spacing, geometry)
        voxel = np.round(centre).astype(int)
        if (voxel >= 0).all() and (voxel < np.asarray(geometry.size_zyx)).all():
            out[tuple(voxel)] = True
    return out


def mask_fits_roi(mask_zyx: np.ndarray, native_spacing: Vec3, origin_zyx, geometry: RoiGeometry,
                  margin: float = 1.0) -> bool:
    """Whether every voxel of the native mask maps inside the ROI with ``margin`` model voxels to spare."""
    idx = np.argwhere(mask_zyx)
    coords = (idx - np.asarray(origin_zyx)) / _scale(native_spacing, geometry)
    return bool((coords.min(0) >= margin).all() and (coords.max(0) <= np.asarray(geometry.size_zyx) - 1 - margin).all())


def paste_roi(image_zyx: np.ndarray, native_spacing: Vec3, origin_zyx, geometry: RoiGeometry,
              roi_native_values: np.ndarray, paste_mask_zyx: np.ndarray) -> np.ndarray:
    """Paste a generated ROI (model grid, native units) into a copy of ``image_zyx``.

    Only voxels where ``paste_mask_zyx`` is true change; each gets the ROI value interpolated (linear) at
    its position on the model grid. Every other voxel of the returned array is bit-identical to the input.
    Raises :class:`LeFusionInputError` if part of the mask lies outside the ROI.
    """
    out = np.array(image_zyx, copy=True)
    idx = np.argwhere(paste_mask_zyx)
    if len(idx) == 0:
        return out
    coords = (idx - np.asarray(origin_zyx, np.float64)) / _scale(native_spacing, geometry)
    size = np.asarray(geometry.size_zyx)
    if (coords.min(0) < -0.5).any() or (coords.max(0) > size - 0.5).any():
        raise LeFusionInputError(
            f"the lesion mask extends beyond the model ROI ({geometry.extent_mm.round(1).tolist()} mm, z, y, x); "
            f"use a smaller lesion or train with a larger --roi-size.")
    values = ndimage.map_coordinates(np.asarray(roi_native_values, np.float32), coords.T, order=1, mode="nearest")
    out[tuple(idx.T)] = values.astype(out.dtype)
    return out


#: Default ROI planning: every training lesion fits with this factor of its extent around it.
ROI_LESION_MARGIN = 1.5
#: Largest default ROI in voxels (z, y, x): the CPU-friendly size the presets are tuned for.
ROI_MAX_SIZE_ZYX = (32, 64, 64)


def choose_roi_geometry(lesion_extents_mm: np.ndarray, median_spacing_zyx: Vec3, multiple: int = 8,
                        margin: float = ROI_LESION_MARGIN,
                        max_size_zyx: tuple[int, int, int] = ROI_MAX_SIZE_ZYX) -> RoiGeometry:
    """The default model grid, planned in millimetres from the training lesions.

    The ROI's physical extent is ``margin`` x the largest lesion extent per axis (square in-plane), so every
    lesion fits with context around it. The spacing is the dataset's median spacing, coarsened only where the
    extent would need more than ``max_size_zyx`` voxels; slices are never made thinner than the scans' (a 5 mm
    CT keeps 5 mm model slices). Sizes are multiples of ``multiple`` (the denoiser's spatial divisor).

    Args:
        lesion_extents_mm: ``(N, 3)`` bounding-box extents (z, y, x) of the training lesions in mm.
        median_spacing_zyx: the dataset's median voxel spacing (z, y, x) in mm.
    """
    extents = np.asarray(lesion_extents_mm, np.float64).reshape(-1, 3)
    if len(extents) == 0:
        raise LeFusionInputError("no training lesion to plan the model ROI from; check --lesion-label.")
    target = extents.max(0) * margin
    target[1:] = target[1:].max()  # square in-plane
    spacing = np.asarray(median_spacing_zyx, np.float64).copy()
    spacing[1:] = spacing[1:].min()
    cap = np.asarray(max_size_zyx, np.float64)
    spacing = np.maximum(spacing, target / (cap - 1))
    size = np.maximum(multiple, np.ceil(target / spacing / multiple) * multiple).astype(int)
    size = np.minimum(size, (cap // multiple * multiple).astype(int))
    return RoiGeometry(tuple(int(v) for v in size), tuple(round(float(v), 4) for v in spacing))
