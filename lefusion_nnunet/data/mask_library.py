"""Real lesion masks (``--mask-source real``): every connected lesion of a labelled dataset, sampled with random
flips, rotations and rescaling onto a target grid.

Conventions: class stacks are bool ``(C, Z, Y, X)`` in the order of the lesion labels, spacings ``(z, y, x)``
in mm. Randomness comes only from the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from lefusion_nnunet.data.io import read_label
from lefusion_nnunet.data.masks import (REAL_MAX_ANGLE_DEG, REAL_SCALE_LIMITS, Spacing, _check_spacing, crop_to_mask,
                                        lesion_components, mask_equivalent_diameter)
from lefusion_nnunet.errors import LeFusionInputError

__all__ = ["RealMask", "MaskLibrary"]


@dataclass
class RealMask:
    """One real lesion: bool ``masks`` (C, z, y, x) cropped to the lesion, with its native spacing."""

    masks: np.ndarray
    spacing: Spacing
    case_id: str
    component: int

    @property
    def equivalent_diameter(self) -> float:
        return mask_equivalent_diameter(self.masks, self.spacing)


class MaskLibrary:
    """Real lesion masks of a labelled dataset, sampled with random flips, rotations and rescaling.

    Each connected component of the union of ``lesion_labels`` (26-connectivity) of each labelled case is
    one entry; its class masks stay together, in the order of ``lesion_labels``.
    """

    def __init__(self, entries: list[RealMask], lesion_labels: Sequence[int]):
        if not entries:
            raise LeFusionInputError("the mask library is empty; the dataset has no lesion of the given label(s), "
                                     "use --mask-source ellipsoid.")
        self.entries = entries
        self.lesion_labels = tuple(int(v) for v in lesion_labels)
        self._diameters = np.array([e.equivalent_diameter for e in entries])

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_dataset(cls, dataset, lesion_labels: Sequence[int], progress: bool = False) -> "MaskLibrary":
        """Collect every lesion of every labelled case of a :class:`~lefusion_nnunet.data.dataset.RawDataset`.

        Only label files are read. Raises :class:`LeFusionInputError` when no case holds a lesion.
        """
        from tqdm.auto import tqdm


        lesion_labels = [int(v) for v in lesion_labels]
        dataset.check_labels(lesion_labels, "lesion label")
        entries: list[RealMask] = []
        for case in tqdm(dataset.cases, desc="reading lesion masks", disable=not progress, leave=False):
            if case.label is None:
                continue
            label, props = read_label(case.label)
            spacing = tuple(float(s) for s in props["spacing"])
            for comp, _, stack in lesion_components(label, lesion_labels):
                entries.append(RealMask(stack, spacing, str(case.case_id), comp))  # type: ignore[arg-type]
        if not entries:
            raise LeFusionInputError(f"{dataset.folder} has no lesion with label(s) {lesion_labels} to take real "
                                     f"masks from; use --mask-source ellipsoid.")
        return cls(entries, lesion_labels)

    def sample(self, rng: np.random.Generator, diameter_mm: float | None, target_spacing: Spacing,
               scale_limits: tuple[float, float] = REAL_SCALE_LIMITS,
               max_angle_deg: float = REAL_MAX_ANGLE_DEG) -> np.ndarray:
        """A randomly transformed copy of one library lesion: bool ``(C, z, y, x)`` on ``target_spacing``.

        See :meth:`sample_with_info`, which also says which lesion and transform were used.
        """
        return self.sample_with_info(rng, diameter_mm, target_spacing, scale_limits, max_angle_deg)[0]

    def sample_with_info(self, rng: np.random.Generator, diameter_mm: float | None, target_spacing: Spacing,
                         scale_limits: tuple[float, float] = REAL_SCALE_LIMITS,
                         max_angle_deg: float = REAL_MAX_ANGLE_DEG) -> tuple[np.ndarray, dict]:
        """A randomly transformed copy of one library lesion on a ``target_spacing`` grid.

        An entry whose size can reach ``diameter_mm`` within ``scale_limits`` is preferred. The copy is
        flipped along random axes, rotated by a random multiple of 90 degrees in-plane (y-x) and by a small
        random in-plane angle (up to ``max_angle_deg``), and scaled towards ``diameter_mm`` (clipped to
        ``scale_limits`` of its own equivalent diameter; ``None`` keeps its size).

        Returns:
            ``(masks, info)``: bool ``(C, z, y, x)`` tight mask, and a dict naming the source lesion and the
            transform (JSON-safe, for provenance).
        """
        tsp = _check_spacing(target_spacing)
        if diameter_mm is not None:
            reachable = np.flatnonzero((diameter_mm >= self._diameters * scale_limits[0])
                                       & (diameter_mm <= self._diameters * scale_limits[1]))
            pool = reachable if len(reachable) else np.arange(len(self.entries))
        else:
            pool = np.arange(len(self.entries))
        entry = self.entries[int(pool[rng.integers(len(pool))])]
        arr = entry.masks
        spacing = np.asarray(entry.spacing, np.float64)
        flips = [bool(f) for f in rng.integers(0, 2, size=3)]
        for axis, flip in enumerate(flips):
            if flip:
                arr = np.flip(arr, axis=axis + 1)
        k90 = int(rng.integers(4))
        arr = np.rot90(arr, k=k90, axes=(2, 3))
        if k90 % 2:
            spacing = spacing[[0, 2, 1]]
        angle = float(rng.uniform(-max_angle_deg, max_angle_deg))
        own = entry.equivalent_diameter
        scale = 1.0 if diameter_mm is None else float(np.clip(diameter_mm / own, *scale_limits))
        out = _resample_masks(np.ascontiguousarray(arr), spacing, tsp, scale, np.deg2rad(angle))
        info = {"case": entry.case_id, "component": entry.component, "flips_zyx": flips, "rot90": k90,
                "angle_deg": round(angle, 4), "scale": round(scale, 6), "own_diameter_mm": round(own, 4)}
        return out, info


def _resample_masks(masks: np.ndarray, src_spacing: np.ndarray, dst_spacing: np.ndarray, scale: float,
                    angle_rad: float) -> np.ndarray:
    """Resample class masks (C, z, y, x) with an in-plane rotation and isotropic scale onto a new spacing.

    Classes stay disjoint: a voxel is lesion where the interpolated union is >= 0.5 and takes the class
    with the largest interpolated value.
    """
    c, *shape = masks.shape
    shape = np.asarray(shape)
    center_src = (shape - 1) / 2.0 * src_spacing                       # mm
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])   # acts on (z, y, x) mm
    # output extent: transformed corners of the source box
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])), np.float64)
    corners = corners * src_spacing - center_src
    out_mm = (corners @ rot.T) * scale
    half = np.abs(out_mm).max(0) + dst_spacing
    n_half = np.ceil(half / dst_spacing).astype(int)
    axes = [np.arange(-n, n + 1) * s for n, s in zip(n_half, dst_spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)             # output mm, centred
    src_mm = (grid / scale) @ rot                                       # inverse rotation (rot orthonormal)
    src_vox = (src_mm + center_src) / src_spacing
    coords = np.moveaxis(src_vox, -1, 0)
    values = np.stack([ndimage.map_coordinates(masks[i].astype(np.float32), coords, order=1, mode="constant",
                                               cval=0.0) for i in range(c)])
    union_val = ndimage.map_coordinates(masks.any(0).astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    union = union_val >= 0.5
    if not union.any():  # tiny lesion shrunk below one voxel: keep the voxel nearest the centre
        union = union_val == union_val.max()
    best = np.argmax(values, axis=0)
    out = np.stack([union & (best == i) for i in range(c)])
    return crop_to_mask(out)
