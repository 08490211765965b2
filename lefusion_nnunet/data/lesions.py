"""Training lesions: find each lesion of a raw dataset and cut its ROI on the model grid.

Each connected component of the union of the lesion labels is one lesion. Its ROI (model grid, see
:mod:`lefusion_nnunet.data.roi`) is cut around the component's bounding-box centre, converted to model
space, and kept with one mask per lesion class, so training never re-reads image files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm.auto import tqdm

from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.histogram import HIST_BINS, lesion_histogram
from lefusion_nnunet.data.intensity import IntensitySpace, derive_ct_window
from lefusion_nnunet.data.io import check_same_grid, read_image, read_label
from lefusion_nnunet.data.masks import LESION_CONNECTIVITY
from lefusion_nnunet.data.roi import (RoiGeometry, extract_roi, extract_roi_mask, mask_fits_roi, roi_center_for_mask,
                                      roi_origin_for_center)
from lefusion_nnunet.errors import LeFusionInputError

log = logging.getLogger(__name__)


def header_spacing_zyx(file) -> tuple[float, float, float]:
    """Spacing (z, y, x) in mm read from a file header only."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(file))
    try:
        r.ReadImageInformation()
    except RuntimeError as exc:
        raise LeFusionInputError(f"{file} is not a readable image (truncated or corrupt?); re-export it.") from exc
    return tuple(float(s) for s in r.GetSpacing()[::-1])  # type: ignore[return-value]


def median_spacing(files) -> tuple[float, float, float]:
    """Median (z, y, x) spacing over files: the default model spacing."""
    spacings = np.array([header_spacing_zyx(f) for f in files])
    return tuple(float(s) for s in np.median(spacings, 0))  # type: ignore[return-value]


@dataclass
class LesionRoiSet:
    """All training lesions on the model grid.

    Attributes:
        images: float32 ``(N, Z, Y, X)`` ROIs in model space [-1, 1].
        class_masks: bool ``(N, C, Z, Y, X)``, one mask per lesion class (label order of ``lesion_labels``).
        histograms: float32 ``(N, C * 16)`` class histograms concatenated (empty class -> uniform).
        case_ids: source case of each ROI.
        intensity: the intensity space used (CT window fixed here when derived from data).
        skipped: reasons for lesions that were not used (e.g. larger than the ROI).
    """

    images: np.ndarray
    class_masks: np.ndarray
    histograms: np.ndarray
    case_ids: list[str]
    intensity: IntensitySpace
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def collect_lesion_rois(dataset: RawDataset, lesion_labels: list[int], geometry: RoiGeometry,
                        intensity: IntensitySpace | None, channel: int = 0, progress: bool = True) -> LesionRoiSet:
    """Cut the ROI of every lesion of ``dataset``.

    Args:
        lesion_labels: label values of the lesion classes (C = len).
        geometry: the model grid.
        intensity: the intensity space; ``None`` derives one from the data (CT: HU window covering the
            lesions and their surroundings; MR: per-case percentiles).
        channel: which image channel the model learns.
    """
    dataset.check_labels(lesion_labels, "lesion label")
    native_rois, masks, case_ids, ranges, skipped = [], [], [], [], []
    modality = dataset.modality(channel)
    # the space ends up a percentile space (given as one, or derived for a channel other than CT): each ROI then
    # uses its whole case's range, as inference computes it; a CT window needs no per-case range
    percentile_space = (intensity if intensity is not None and intensity.kind == "percentile"
                        else IntensitySpace("percentile") if intensity is None and modality != "CT" else None)
    cases = [c for c in dataset.cases if c.label is not None]
    for case in tqdm(cases, desc="reading lesions", disable=not progress, leave=False):
        label, lprops = read_label(case.label)
        if not np.isin(label, lesion_labels).any():
            continue
        vol = read_image(case.images)
        check_same_grid(vol.properties, lprops, case.images[0], case.label, vol.shape_zyx, label.shape)
        image = vol.channel(channel)
        value_range = percentile_space.value_range_for(image) if percentile_space is not None else None
        components, n = ndimage.label(np.isin(label, lesion_labels), structure=LESION_CONNECTIVITY)
        for comp in range(1, n + 1):
            region = components == comp
            origin = roi_origin_for_center(roi_center_for_mask(region), vol.spacing, geometry)
            if not mask_fits_roi(region, vol.spacing, origin, geometry, margin=0.0):
                skipped.append(f"{case.case_id}: lesion {comp} is larger than the ROI "
                               f"({geometry.extent_mm.round(1).tolist()} mm)")
                continue
            native_rois.append(extract_roi(image, vol.spacing, origin, geometry))
            masks.append(np.stack([extract_roi_mask(region & (label == v), vol.spacing, origin, geometry)
                                   for v in lesion_labels]))
            case_ids.append(case.case_id)
            ranges.append(value_range)
    if not native_rois:
        raise LeFusionInputError(f"no usable lesion with label(s) {lesion_labels} in {dataset.folder}; check "
                                 f"--lesion-label against dataset.json labels {dataset.labels}"
                                 + (f" ({len(skipped)} lesion(s) were larger than the ROI)" if skipped else "") + ".")
    masks_arr = np.stack(masks)
    if intensity is None:
        if modality == "CT":
            union = masks_arr.any(1)
            stack = np.stack(native_rois)
            intensity = IntensitySpace("window", window=derive_ct_window(stack[union], stack[~union]))
        else:
            intensity = IntensitySpace("percentile")
    images = np.stack([intensity.to_model(roi, r if intensity.kind == "percentile" else intensity.case_range(roi))
                       for roi, r in zip(native_rois, ranges)])
    hists = np.stack([np.concatenate([lesion_histogram(img[m], HIST_BINS) for m in ms])
                      for img, ms in zip(images, masks_arr)])
    for reason in skipped:
        log.warning("skipped %s", reason)
    return LesionRoiSet(images=images, class_masks=masks_arr, histograms=hists, case_ids=case_ids,
                        intensity=intensity, skipped=skipped)


def lesion_extents_mm(dataset: RawDataset, lesion_labels: list[int]) -> np.ndarray:
    """Bounding-box extents ``(N, 3)`` (z, y, x, mm) of every lesion (26-connected component of the lesion
    labels) of the dataset's labelled cases: what the default model ROI is planned from."""
    extents = []
    for case in dataset.cases:
        if case.label is None:
            continue
        label, props = read_label(case.label)
        lesion = np.isin(label, lesion_labels)
        if not lesion.any():
            continue
        spacing = np.asarray(props["spacing"], np.float64)
        components, _ = ndimage.label(lesion, structure=LESION_CONNECTIVITY)
        for box in ndimage.find_objects(components):
            extents.append([(s.stop - s.start) * sp for s, sp in zip(box, spacing)])
    return np.asarray(extents, np.float64).reshape(-1, 3)
