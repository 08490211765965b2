"""Intensity spaces: native units (HU for CT) <-> the model's [-1, 1].

CT uses one fixed HU window for the whole dataset (chosen from the training lesions unless given), so
histograms are comparable across cases (1 of 16 bins = (hi - lo) / 16 HU). MR has no absolute scale:
each case is mapped with robust percentiles of its own foreground, which removes scanner gain but keeps
lesion-vs-tissue contrast comparable across cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.errors import LeFusionInputError

INTENSITY_KINDS = ("window", "percentile")


@dataclass(frozen=True)
class IntensitySpace(JsonConfig):
    """How native voxel values map to the model's [-1, 1].

    Args:
        kind: ``"window"`` (fixed native window, CT) or ``"percentile"`` (per-case percentiles, MR).
        window: ``(lo, hi)`` in native units for ``"window"``; ``lo`` -> -1, ``hi`` -> +1.
        percentiles: ``(p_lo, p_hi)`` in percent for ``"percentile"``.
    """

    kind: str = "window"
    window: tuple[float, float] = (-1000.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.kind not in INTENSITY_KINDS:
            raise ValueError(f"intensity kind {self.kind!r} is not one of {INTENSITY_KINDS}")
        if not self.window[0] < self.window[1]:
            raise LeFusionInputError(f"intensity window {self.window} must satisfy LO < HI; pass --window LO HI.")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= lo < hi <= 100")

    def case_range(self, image: np.ndarray, foreground: np.ndarray | None = None) -> tuple[float, float]:
        """The native ``(lo, hi)`` mapped to [-1, 1] for one case (``image`` any shape, e.g. (Z, Y, X))."""
        if self.kind == "window":
            return float(self.window[0]), float(self.window[1])
        values = image[foreground] if foreground is not None and foreground.any() else image
        lo, hi = np.percentile(values, self.percentiles)
        if not hi > lo:
            hi = lo + 1.0
        return float(lo), float(hi)

    def value_range_for(self, image_zyx: np.ndarray) -> tuple[float, float]:
        """The native ``(lo, hi)`` of one case as training and inference both use it: the window (CT), or this
        case's percentiles over its foreground (voxels above the image minimum) for a percentile space."""
        if self.kind == "window":
            return self.case_range(image_zyx)
        return self.case_range(image_zyx, image_zyx > image_zyx.min())

    @staticmethod
    def to_model(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
        """Native -> model space [-1, 1] (float32, clipped)."""
        lo, hi = value_range
        out = (np.asarray(values, dtype=np.float32) - lo) / (hi - lo) * 2.0 - 1.0
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    @staticmethod
    def to_native(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
        """Model space [-1, 1] -> native units (float32)."""
        lo, hi = value_range
        return ((np.asarray(values, dtype=np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)


def derive_ct_window(lesion_values: np.ndarray, context_values: np.ndarray, step: float = 50.0) -> tuple[float, float]:
    """A CT window from data: covers the training lesions and their surroundings.

    ``lo``/``hi`` are the 0.5 / 99.5 percentiles of lesion and context voxels together (native HU),
    widened to multiples of ``step`` HU, and never narrower than 400 HU.
    """
    values = np.concatenate([np.ravel(lesion_values), np.ravel(context_values)])
    lo, hi = np.percentile(values, [0.5, 99.5])
    lo, hi = np.floor(lo / step) * step, np.ceil(hi / step) * step
    if hi - lo < 400:
        mid = (hi + lo) / 2
        lo, hi = mid - 200, mid + 200
    return float(lo), float(hi)
