"""The real lesions the copy-paste baseline copies: read once from a raw dataset's labelled cases.

Each :class:`SourceLesion` holds a lesion's voxels (cropped to its bounding box, model intensity space), its class
masks and histogram; :mod:`lefusion_nnunet.synthesis.copy_paste` stretches one over a requested mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.histogram import Prototypes
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.io import check_same_grid, read_image, read_label
from lefusion_nnunet.data.masks import lesion_components


@dataclass
class SourceLesion:
    """One real lesion: native values and class masks in its bounding box.

    Attributes:
        case_id / component: where it comes from (component number of the case's lesion union).
        spacing: ``(z, y, x)`` mm of its case.
        values: float32 ``(z, y, x)`` native intensities of the bounding box (model channel).
        masks: bool ``(C, z, y, x)`` class masks in the bounding box.
        value_range: the case's native range mapped to [-1, 1] by the intensity space.
        histogram: ``(C * 16,)`` class histograms in model space (as LeFusion's condition).
    """

    case_id: str
    component: int
    spacing: tuple[float, float, float]
    values: np.ndarray
    masks: np.ndarray
    value_range: tuple[float, float]
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def union(self) -> np.ndarray:
        return self.masks.any(0)


@dataclass
class CopyPasteSource:
    """Stands in for a loaded checkpoint (what ``make_variants`` and ``enlarge`` read of one)."""

    data: DataConfig
    file_sha256: str
    prototypes: list[Prototypes]
    training_histograms: np.ndarray
    training_summary: dict
    path: Path | None = None
    sampler_defaults: dict = field(default_factory=dict)


def collect_source_lesions(dataset, lesion_labels: Sequence[int], channel: int = 0,
                           case_ids: Sequence[str] | None = None,
                           intensity: IntensitySpace | None = None) -> list[SourceLesion]:
    """Every lesion (connected component of the lesion-label union) of the labelled cases of a raw dataset.

    ``case_ids`` limits the cases read (default: all). Each lesion's ``value_range`` is its case's range in
    ``intensity`` (per-case percentiles for MR, also when ``intensity`` is None on a non-CT channel; for a CT
    window it is the window, filled in by :meth:`CopyPasteSynthesizer.from_dataset` once the window is known).
    Histograms are filled in by :meth:`CopyPasteSynthesizer.from_dataset`.
    """

    labels = [int(v) for v in lesion_labels]
    dataset.check_labels(labels, "lesion label")
    if intensity is None and dataset.modality(int(channel)) != "CT":
        intensity = IntensitySpace("percentile")
    wanted = None if case_ids is None else {str(c) for c in case_ids}
    out: list[SourceLesion] = []
    for case in dataset.cases:
        if case.label is None or (wanted is not None and str(case.case_id) not in wanted):
            continue
        label, lprops = read_label(case.label)
        union = np.isin(label, labels)
        if not union.any():
            continue
        vol = read_image(case.images)
        check_same_grid(vol.properties, lprops, case.images[0], case.label, vol.shape_zyx, label.shape)
        image = vol.channel(int(channel))
        value_range = intensity.value_range_for(image) if intensity is not None else (0.0, 1.0)
        for comp, sl, masks in lesion_components(label, labels):
            out.append(SourceLesion(str(case.case_id), comp, tuple(float(s) for s in vol.spacing),
                                    np.array(image[sl], np.float32), masks, value_range))
    return out
