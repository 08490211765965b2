"""One validation layer: every command and ``LeFusionTrainer`` check their inputs here before any work starts.

Each problem is raised as :class:`~lefusion_nnunet.errors.LeFusionInputError` with one sentence saying what is
wrong, which file, and how to fix it (the ``lefusion`` command prints it and exits with status 2). Nothing is
written by a check, so a command that fails validation leaves no output behind.

What is checked (see ``docs/errors.md`` for every message and the test that covers it):

- ``dataset.json`` and the nnU-Net env vars (:func:`lefusion_nnunet.data.dataset.load_raw_dataset`);
- the lesion / region labels: declared in ``dataset.json``, distinct, and present in at least one case;
- a lesion-free case exists when one is needed (``enlarge``, ``trainer-config``);
- the file ending is one LeFusion can read *and write* with SimpleITK's geometry;
- per case, from file headers only (``ImageFileReader.ReadImageInformation``): every channel file and the label
  are readable 3D single-component volumes sharing size, spacing, origin and direction (tolerance
  :data:`GEOMETRY_TOLERANCE`), and the requested channel exists;
- per case, label maps are read in full: integer values, all declared in ``dataset.json``;
- the image files of the cases a command will actually use are read in full: truncated files and NaN/Inf
  voxels are reported before any output exists;
- optional region masks: one per case, same grid, not empty.

A model ROI larger than an image is not an error: extraction pads by repeating the image's edge voxels and
paste-back only writes voxels inside the image (a warning is logged once).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.io import Header, nifti_file_complete, read_header, read_volume, truncated_error
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError

log = logging.getLogger(__name__)

#: Absolute and relative tolerance for spacing, origin and direction agreement (as ``check_same_grid``).
GEOMETRY_TOLERANCE = 1e-3
#: File endings LeFusion reads and writes (nnU-Net's SimpleITK reader/writer): geometry survives a round trip.
SUPPORTED_ENDINGS = (".nii.gz", ".nrrd", ".mha", ".gipl")


def check_3d(header: Header, what: str = "image") -> None:
    """A 3D volume with one component per voxel (nnU-Net keeps channels in separate files)."""
    if header.dimension == 3 and header.components == 1:
        return
    if header.dimension == 3:
        raise LeFusionInputError(f"{what} file {header.file} holds {header.components} values per voxel (a vector "
                                 f"or RGB image) but one channel per file is required; split it into one file per "
                                 f"channel (CASE_0000, CASE_0001, ...) and list them in dataset.json channel_names.")
    if header.dimension == 4:
        raise LeFusionInputError(f"{what} file {header.file} is a 4D image (size {list(header.size_xyz)}) but a 3D "
                                 f"volume is required; split it into one 3D file per channel (CASE_0000, CASE_0001, "
                                 f"...) and list them in dataset.json channel_names.")
    raise LeFusionInputError(f"{what} file {header.file} is a {header.dimension}D image but LeFusion needs 3D "
                             f"volumes; use a 3D dataset (2D datasets are not supported).")


def check_same_geometry(reference: Header, other: Header, fix: str, tol: float = GEOMETRY_TOLERANCE) -> None:
    """Raise naming the first of size, spacing, origin, direction in which ``other`` differs from ``reference``."""
    if tuple(reference.size_xyz) != tuple(other.size_xyz):
        raise LeFusionInputError(f"{other.file} has size {list(other.size_xyz)} (x, y, z) but {reference.file} has "
                                 f"{list(reference.size_xyz)}; {fix}")
    for key, a, b in (("spacing", reference.spacing_xyz, other.spacing_xyz),
                      ("origin", reference.origin_xyz, other.origin_xyz),
                      ("direction", reference.direction, other.direction)):
        if not np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol):
            fmt = [round(float(v), 6) for v in b], [round(float(v), 6) for v in a]
            raise LeFusionInputError(f"{other.file} and {reference.file} differ in {key} ({fmt[0]} vs {fmt[1]}, "
                                     f"tolerance {tol:g}); {fix}")


_LABEL_FIX = "resample the label onto the image grid (same size, spacing, origin and direction)."
_CHANNEL_FIX = "all channel files of a case must share one grid; resample them onto channel 0."
_MASK_FIX = "resample the mask onto the image grid (same size, spacing, origin and direction)."


def check_finite_voxels(path: Path | str, what: str = "image") -> Header:
    """Read every voxel of ``path``: truncated files and NaN/Inf voxels are reported here."""
    array, header = read_volume(path, what)
    if not nifti_file_complete(header.file):
        raise truncated_error(header.file, what)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise LeFusionInputError(f"{what} file {header.file} contains {bad} NaN or infinite voxel(s); replace them "
                                 f"(e.g. by the background value) before using LeFusion.")
    return header


def _label_values(path: Path, image_header: Header, known: set[int], dataset_json: Path) -> frozenset[int]:
    array, header = read_volume(path, "label")
    if not nifti_file_complete(path):
        raise truncated_error(path, "label")
    check_3d(header, "label")
    check_same_geometry(image_header, header, _LABEL_FIX)
    values = np.unique(array)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or not np.all(values == np.round(values)):
            raise LeFusionInputError(f"label file {path} holds non-integer values; labels must be whole numbers "
                                     f"declared in {dataset_json}.")
    present = frozenset(int(v) for v in values)
    unknown = sorted(present - known)
    if unknown:
        raise LeFusionInputError(f"label file {path} holds value(s) {unknown} that {dataset_json} does not declare "
                                 f"(labels: {sorted(known)}); add them to dataset.json labels or fix the label map.")
    return present


@dataclass
class DatasetCheck:
    """What :func:`validate_dataset` found.

    Attributes:
        dataset: the checked dataset.
        label_values: case id -> label values present in its label map (checked cases only).
        lesion_cases: checked cases holding at least one lesion label.
        lesion_free_cases: checked cases holding none.
        image_headers: case id -> header of its channel-0 image.
        warnings: notes that are not errors (e.g. a model ROI larger than an image).
    """

    dataset: RawDataset
    label_values: dict[str, frozenset[int]] = field(default_factory=dict)
    lesion_cases: list[str] = field(default_factory=list)
    lesion_free_cases: list[str] = field(default_factory=list)
    image_headers: dict[str, Header] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_labels_declared(dataset: RawDataset, lesion_labels: Sequence[int], region_label: int | None,
                          lesion_flag: str = "--lesion-label", region_flag: str = "--region-label") -> None:
    """Lesion and region labels are foreground labels of ``dataset.json`` and do not overlap."""
    if not lesion_labels:
        raise LeFusionInputError(f"no lesion label was given; pass {lesion_flag} with a label value from "
                                 f"{dataset.folder / 'dataset.json'} (labels: {dataset.labels}).")
    if len(set(lesion_labels)) != len(lesion_labels):
        raise LeFusionInputError(f"{lesion_flag} {list(lesion_labels)} repeats a label; pass each lesion label once.")
    dataset.check_labels([int(v) for v in lesion_labels], lesion_flag)
    if region_label is not None:
        dataset.check_labels([int(region_label)], region_flag)
        if int(region_label) in {int(v) for v in lesion_labels}:
            raise LeFusionInputError(f"{region_flag} {region_label} is also a lesion label; the region must be the "
                                     f"tissue lesions lie in (e.g. the lung label), not the lesion itself.")


def check_channel(dataset: RawDataset, channel: int, flag: str = "--channel") -> None:
    n = len(dataset.channel_names)
    if not 0 <= int(channel) < n:
        names = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.channel_names.items()))
        allowed = f"{flag} 0" if n == 1 else f"{flag} between 0 and {n - 1}"
        raise LeFusionInputError(f"{flag} {channel} was requested but {dataset.folder / 'dataset.json'} declares "
                                 f"{n} channel(s) ({names}); pass {allowed}.")


def validate_dataset(dataset: RawDataset, lesion_labels: Sequence[int], region_label: int | None = None,
                     channel: int = 0, *, need_lesions: bool = False, need_lesion_free: bool = False,
                     cases: Iterable[str] | None = None, read_voxels: str = "used",
                     region_masks_dir: Path | str | None = None, roi=None,
                     lesion_flag: str = "--lesion-label", region_flag: str = "--region-label",
                     channel_flag: str = "--channel",
                     lesion_free_hint: str = "add cases without lesions") -> DatasetCheck:
    """Check a raw dataset for a LeFusion job before any work starts; raises the first problem found.

    Args:
        lesion_labels: label values of the lesion classes.
        region_label: host-region label (must occur in at least one checked case), or None.
        channel: image channel the job reads (must exist).
        need_lesions: every lesion label must occur in at least one checked case (training, real masks).
        need_lesion_free: at least one checked case must hold no lesion label (enlargement, trainer).
        cases: case ids to check (default: all cases of the dataset).
        read_voxels: whose image files are read in full (truncation, NaN/Inf): ``"used"`` = the cases the job
            reads (lesion cases with ``need_lesions``, lesion-free cases with ``need_lesion_free``, else all),
            ``"all"`` or ``"none"`` (headers and labels only).
        region_masks_dir: folder with one region mask per case (``CASE + file_ending``), checked for the
            cases that receive lesions.
        roi: the model :class:`~lefusion_nnunet.data.roi.RoiGeometry`; a warning is recorded when it is larger
            than an image (padding, not an error).
        lesion_flag / region_flag / channel_flag: how the user named these values (for messages).
        lesion_free_hint: how to fix a dataset without lesion-free case (for the message).
    """
    djson = dataset.folder / "dataset.json"
    ending = dataset.file_ending
    if ending not in SUPPORTED_ENDINGS:
        raise LeFusionInputError(f"{djson} has file_ending {ending!r} but LeFusion reads and writes "
                                 f"{', '.join(SUPPORTED_ENDINGS)} (SimpleITK keeps their geometry); convert the "
                                 f"dataset, e.g. to .nii.gz.")
    lesion_labels = [int(v) for v in lesion_labels]
    check_labels_declared(dataset, lesion_labels, region_label, lesion_flag, region_flag)
    check_channel(dataset, channel, channel_flag)
    if read_voxels not in ("used", "all", "none"):
        raise ValueError(f"read_voxels={read_voxels!r}")
    wanted = None if cases is None else [str(c) for c in cases]
    selected = dataset.cases if wanted is None else [dataset.case(c) for c in wanted]
    if not selected:
        raise LeFusionInputError(f"no case of {djson} was selected to check; check the case list.")
    known = set(dataset.labels.values())
    result = DatasetCheck(dataset=dataset)

    for case in selected:
        headers = [read_header(f, "image") for f in case.images]
        for h in headers:
            check_3d(h, "image")
        for h in headers[1:]:
            check_same_geometry(headers[0], h, _CHANNEL_FIX)
        result.image_headers[case.case_id] = headers[0]
        if case.label is None:
            raise LeFusionInputError(f"case {case.case_id} of {djson} has no label file; add labelsTr/"
                                     f"{case.case_id}{ending}.")
        values = _label_values(Path(case.label), headers[0], known, djson)
        result.label_values[case.case_id] = values
        (result.lesion_cases if values & set(lesion_labels) else result.lesion_free_cases).append(case.case_id)

    where = f"the {len(selected)} checked case(s)" if wanted is not None else str(dataset.folder)
    if need_lesions:
        for v in lesion_labels:
            if not any(v in vals for vals in result.label_values.values()):
                raise LeFusionInputError(f"lesion label {v} is declared in {djson} but occurs in no label map of "
                                         f"{where}; check {lesion_flag} or the label files.")
    if region_label is not None and not any(int(region_label) in vals for vals in result.label_values.values()):
        raise LeFusionInputError(f"region label {region_label} is declared in {djson} but occurs in no label map of "
                                 f"{where}; check {region_flag} or drop it to use the body.")
    if need_lesion_free and not result.lesion_free_cases:
        raise LeFusionInputError(f"no lesion-free case in {where}: every label map holds lesion label(s) "
                                 f"{lesion_labels}; {lesion_free_hint}.")

    if read_voxels == "all":
        voxel_cases = [c.case_id for c in selected]
    elif read_voxels == "used":
        voxel_cases = (result.lesion_cases if need_lesions and not need_lesion_free
                       else result.lesion_free_cases if need_lesion_free and not need_lesions
                       else [c.case_id for c in selected])
    else:
        voxel_cases = []
    for cid in voxel_cases:
        for f in dataset.case(cid).images:
            check_finite_voxels(f, "image")

    if region_masks_dir is not None:
        folder = Path(region_masks_dir)
        if not folder.is_dir():
            raise LeFusionInputError(f"region mask folder {folder} does not exist; pass a folder with one mask per "
                                     f"case (CASE{ending}).")
        targets = result.lesion_free_cases if need_lesion_free else [c.case_id for c in selected]
        for cid in targets:
            mfile = folder / f"{cid}{ending}"
            if not mfile.is_file():
                raise LeFusionInputError(f"region mask {mfile} is missing; add one mask per case to {folder} or drop "
                                         f"--region-masks.")
            array, header = read_volume(mfile, "region mask")
            check_3d(header, "region mask")
            check_same_geometry(result.image_headers[cid], header, _MASK_FIX)
            if not np.any(array):
                raise LeFusionInputError(f"region mask {mfile} is empty; mark where lesions may go with non-zero "
                                         f"voxels or drop --region-masks.")

    if roi is not None:
        note_roi_larger_than_images(result, roi)
    return result


def note_roi_larger_than_images(check: DatasetCheck, roi) -> list[str]:
    """Record (and log once) that the model ROI is larger than an image: not an error, the ROI is padded."""
    extent = np.asarray(roi.extent_mm, np.float64)
    for h in check.image_headers.values():
        if (extent > h.extent_mm_zyx + 1e-6).any():
            msg = (f"the model ROI ({extent.round(1).tolist()} mm, z, y, x) is larger than image {h.file} "
                   f"({h.extent_mm_zyx.round(1).tolist()} mm); ROIs are padded by repeating the image's edge "
                   f"voxels and only voxels inside the image are written")
            check.warnings.append(msg)
            log.warning("%s", msg)
            break
    return check.warnings


def median_spacing_zyx(check: DatasetCheck) -> tuple[float, float, float]:
    """Median (z, y, x) spacing of the checked cases' images (from the headers already read)."""
    spacings = np.array([h.spacing_xyz[::-1] for h in check.image_headers.values()], np.float64)
    return tuple(float(v) for v in np.median(spacings, 0))  # type: ignore[return-value]


def check_checkpoint_fits(data, dataset: RawDataset, what: str | None = None) -> None:
    """A checkpoint's :class:`~lefusion_nnunet.data.config.DataConfig` fits ``dataset`` (labels, modality, channel)."""
    what = what or str(dataset.folder / "dataset.json")
    n = len(dataset.channel_names)
    if not 0 <= int(data.channel) < n:
        raise LeFusionCheckpointError(f"the checkpoint was trained on image channel {data.channel} but {what} "
                                      f"declares {n} channel(s); use a checkpoint trained on this dataset's channels.")
    data.check_compatible(dataset.labels, dataset.modality(int(data.channel)), what)


def check_output_absent(path: Path | str, overwrite: bool, what: str = "output") -> None:
    """An existing output is only replaced with ``--overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LeFusionInputError(f"{what} {path} already exists; pass --overwrite to replace it or choose another "
                                 f"output.")


def validate_case_files(image_files: Sequence[Path | str], channel: int, mask_file: Path | str | None = None,
                        label_file: Path | str | None = None, roi=None) -> list[Header]:
    """Files of one case given on the command line (``synthesize``): readable 3D volumes on one grid, finite,
    a non-empty mask; with ``roi`` a warning is logged when the model ROI is larger than the image."""
    files = [Path(f) for f in image_files]
    if not 0 <= int(channel) < len(files):
        raise LeFusionInputError(f"the checkpoint was trained on image channel {channel} but {len(files)} image "
                                 f"file(s) were given; pass one -i file per channel (CASE_0000, CASE_0001, ...).")
    for f in files:
        check_3d(read_header(f, "image"), "image")
    headers = [check_finite_voxels(f, "image") for f in files]
    for h in headers[1:]:
        check_same_geometry(headers[0], h, _CHANNEL_FIX)
    for path, what, fix in ((label_file, "label", _LABEL_FIX), (mask_file, "mask", _MASK_FIX)):
        if path is None:
            continue
        check_3d(read_header(path, what), what)
        array, h = read_volume(path, what)
        if not nifti_file_complete(h.file):
            raise truncated_error(h.file, what)
        check_same_geometry(headers[0], h, fix)
        if what == "mask" and not np.any(array):
            raise LeFusionInputError(f"mask {h.file} is empty; mark the lesion region with non-zero voxels.")
    if roi is not None:
        single = DatasetCheck(dataset=None, image_headers={"case": headers[0]})  # type: ignore[arg-type]
        note_roi_larger_than_images(single, roi)
    return headers





def resolve_region_label(settings, data) -> int | None:
    """The host-region label synthetic lesions must lie in: none with per-case ``--region-masks``, else the
    ``--region-label`` setting, else the checkpoint's region label (None: the body)."""
    if settings.region_masks_dir or settings.auto_region:
        return None
    return settings.region_label if settings.region_label is not None else data.region_label


def validate_variant_inputs(dataset: RawDataset, data, settings, cases: Sequence[str] | None = None, *,
                            lesion_free_hint: str = "add cases without lesions") -> list[str]:
    """Everything a run that makes synthetic variants needs (``enlarge``, ``trainer-config``, ``LeFusionTrainer``),
    checked before any work: the checkpoint fits the dataset, labels / region / region masks, the cases that
    receive lesions hold the region label, and their images are complete and finite.

    Args:
        data: the lesion checkpoint's :class:`~lefusion_nnunet.data.config.DataConfig`.
        settings: the run's :class:`~lefusion_nnunet.variants.VariantSettings`.
        cases: the case ids that receive lesions; None = the dataset's lesion-free cases (at least one needed).

    Returns:
        The sorted case ids that receive lesions.
    """
    check_checkpoint_fits(data, dataset)
    if settings.auto_region == "lung" and data.modality != "CT":
        raise LeFusionInputError(f"--auto-region lung finds the lungs in CT, but the model's channel is "
                                 f"{data.modality!r}; pass --region-label or --region-masks instead.")
    region = resolve_region_label(settings, data)
    region_flag = "--region-label" if settings.region_label is not None else "the checkpoint's region label"
    real = settings.mask_source == "real"
    check = validate_dataset(dataset, data.lesion_labels, region, data.channel, need_lesions=real,
                             need_lesion_free=cases is None, cases=None if real or cases is None else cases,
                             read_voxels="none", region_masks_dir=settings.region_masks_dir, roi=data.roi,
                             lesion_flag="the checkpoint's lesion label", region_flag=region_flag,
                             channel_flag="the checkpoint's channel", lesion_free_hint=lesion_free_hint)
    case_ids = sorted(str(c) for c in (check.lesion_free_cases if cases is None else cases))
    if region is not None and not any(int(region) in check.label_values[c] for c in case_ids):
        raise LeFusionInputError(f"{region_flag} {region} occurs in none of the {len(case_ids)} case(s) that would "
                                 f"receive lesions; pick a label present in them, or --region-masks.")
    for c in case_ids:  # the images that will be read: truncated files and NaN/Inf voxels
        for f in dataset.case(c).images:
            check_finite_voxels(f, "image")
    return case_ids


__all__ = ["DatasetCheck", "validate_dataset", "validate_case_files", "validate_variant_inputs",
           "resolve_region_label", "check_checkpoint_fits", "check_output_absent", "check_labels_declared",
           "check_channel", "check_3d", "check_same_geometry", "check_finite_voxels", "note_roi_larger_than_images",
           "median_spacing_zyx", "SUPPORTED_ENDINGS", "GEOMETRY_TOLERANCE"]
