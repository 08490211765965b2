"""nnU-Net raw datasets: find them the way nnU-Net does, list their cases, and check them.

A dataset is named as nnU-Net names it (``501`` or ``Dataset501_Name``) and lives under
``$nnUNet_raw``. Cases are listed with nnU-Net's own helper, so datasets that use the ``"dataset"`` key
of ``dataset.json`` (files referenced elsewhere) work too.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lefusion_nnunet.data.io import read_label
from lefusion_nnunet.errors import LeFusionInputError

_ENV_HELP = ("set it to a folder, e.g. `export {var}=/data/nnUNet_{short}` (see nnU-Net's "
             "documentation/setting_up_paths.md).")


def env_folder(var: str, must_exist: bool = False) -> Path:
    """The folder named by one of nnU-Net's env vars (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``).

    With ``must_exist`` (input folders) the folder must exist; output folders are created when needed.
    """
    value = os.environ.get(var)
    if not value or not value.strip():
        raise LeFusionInputError(f"environment variable {var} is not set; "
                                 + _ENV_HELP.format(var=var, short=var.split("_", 1)[1]))
    path = Path(value).expanduser()
    if must_exist and not path.is_dir():
        raise LeFusionInputError(f"environment variable {var}={value} does not name an existing folder; "
                                 + _ENV_HELP.format(var=var, short=var.split("_", 1)[1]))
    return path


def dataset_folder_name(name_or_id: str | int, raw_root: Path | None = None) -> str:
    """``"501"`` / ``501`` / ``"Dataset501_X"`` -> ``"Dataset501_X"`` (looked up in raw, preprocessed, results)."""
    text = str(name_or_id).strip()
    if text.startswith("Dataset"):
        if not re.fullmatch(r"Dataset\d{3}_\w+", text):
            raise LeFusionInputError(f"{text!r} is not an nnU-Net dataset name; use DatasetXXX_Name or an id.")
        return text
    if not text.isdigit():
        raise LeFusionInputError(f"{text!r} is neither a dataset id (e.g. 501) nor a name (Dataset501_Name).")
    dataset_id = int(text)
    roots = [raw_root] if raw_root is not None else [
        Path(p) for p in (os.environ.get(v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")) if p]
    if not roots:
        env_folder("nnUNet_raw")
    found = sorted({d.name for r in roots if r.is_dir() for d in r.iterdir()
                    if d.is_dir() and d.name.startswith(f"Dataset{dataset_id:03d}_")})
    if not found:
        raise LeFusionInputError(f"no dataset with id {dataset_id} under {', '.join(map(str, roots))}; check "
                                 f"the id or run `lefusion phantom` to create a demo dataset.")
    if len(found) > 1:
        raise LeFusionInputError(f"dataset id {dataset_id} is ambiguous ({', '.join(found)}); pass the full name.")
    return found[0]


@dataclass(frozen=True)
class CaseFiles:
    """One training case: its channel image files (in channel order) and its label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class RawDataset:
    """An nnU-Net raw dataset folder and its parsed ``dataset.json``."""

    folder: Path
    dataset_json: dict
    cases: list[CaseFiles]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> integer value (region-based label lists are not supported)."""
        return {k: int(v) for k, v in self.dataset_json["labels"].items()}

    @property
    def channel_names(self) -> dict[str, str]:
        return dict(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    def modality(self, channel: int = 0) -> str:
        """``"CT"`` for CT channels (fixed HU window), anything else is treated like MR (per-case scaling)."""
        name = self.channel_names.get(str(channel), "")
        return "CT" if name.upper() == "CT" else "MR"

    def case(self, case_id: str) -> CaseFiles:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise LeFusionInputError(f"case {case_id!r} is not in {self.folder}/dataset.json.")

    def check_labels(self, values: list[int], what: str) -> None:
        known = set(self.labels.values())
        for v in values:
            if v not in known or v == 0:
                raise LeFusionInputError(f"{what} {v} is not a foreground label of {self.folder / 'dataset.json'} "
                                         f"(labels: {self.labels}); pass one of those values.")


def load_raw_dataset(name_or_path: str | int | Path, raw_root: Path | None = None) -> RawDataset:
    """Load a raw dataset from a folder path, or from an id/name under ``$nnUNet_raw``."""
    candidate = Path(str(name_or_path))
    if candidate.is_dir() and (candidate / "dataset.json").exists():
        folder = candidate
    else:
        root = raw_root or env_folder("nnUNet_raw", must_exist=True)
        folder = root / dataset_folder_name(name_or_path, root)
    if not folder.is_dir():
        raise LeFusionInputError(f"dataset folder {folder} does not exist; check the id/name and $nnUNet_raw.")
    djson_path = folder / "dataset.json"
    if not djson_path.is_file():
        raise LeFusionInputError(f"{djson_path} is missing; every nnU-Net raw dataset needs a dataset.json.")
    try:
        djson = json.loads(djson_path.read_text())
    except json.JSONDecodeError as exc:
        raise LeFusionInputError(f"{djson_path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                                 f"fix the file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LeFusionInputError(f"{djson_path} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                                 f"fix its permissions or content.") from None
    if not isinstance(djson, dict):
        raise LeFusionInputError(f"{djson_path} must hold a JSON object with channel_names, labels, numTraining "
                                 f"and file_ending; fix the file.")
    for key in ("labels", "file_ending"):
        if key not in djson:
            raise LeFusionInputError(f"{djson_path} has no {key!r} entry; add it as nnU-Net requires.")
    if "channel_names" not in djson and "modality" not in djson:
        raise LeFusionInputError(f"{djson_path} has no 'channel_names' entry; add it as nnU-Net requires.")
    channels = djson.get("channel_names", djson.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise LeFusionInputError(f"'channel_names' in {djson_path} must map channel numbers to names, e.g. "
                                 f'{{"0": "CT"}}; fix the file.')
    if not isinstance(djson["labels"], dict) or not djson["labels"]:
        raise LeFusionInputError(f"'labels' in {djson_path} must map label names to integers, e.g. "
                                 f'{{"background": 0, "lesion": 1}}; fix the file.')
    if not isinstance(djson["file_ending"], str) or not djson["file_ending"].startswith("."):
        raise LeFusionInputError(f"'file_ending' in {djson_path} is {djson['file_ending']!r}; set it to the "
                                 f"image files' ending, e.g. \".nii.gz\".")
    for name, value in djson["labels"].items():
        if isinstance(value, (list, tuple)):
            raise LeFusionInputError(f"label {name!r} in {djson_path} is {value!r}; region-based label lists are "
                                     f"not supported by LeFusion, use integer labels.")
        if not isinstance(value, int) or isinstance(value, bool):
            raise LeFusionInputError(f"label {name!r} in {djson_path} is {value!r}, not an integer; labels must map "
                                     f"names to integer values.")
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if "dataset" not in djson and not (folder / "imagesTr").is_dir():
        raise LeFusionInputError(f"{folder} has no imagesTr folder; it is not an nnU-Net raw dataset.")
    try:
        listing = get_filenames_of_train_images_and_targets(str(folder), json.loads(json.dumps(djson)))
    except Exception as exc:  # nnU-Net raises KeyError/TypeError for malformed "dataset" entries
        raise LeFusionInputError(f"the case list of {djson_path} cannot be read ({type(exc).__name__}: {exc}); "
                                 f"check its 'dataset' entries and the imagesTr folder.") from exc
    cases = [CaseFiles(str(k), tuple(Path(p) for p in v["images"]), Path(v["label"]) if v.get("label") else None)
             for k, v in sorted(listing.items())]
    if not cases:
        raise LeFusionInputError(f"{folder} lists no training cases; check imagesTr and the file ending "
                                 f"{djson['file_ending']!r} in dataset.json.")
    n_channels = len(djson.get("channel_names", djson.get("modality", {})))
    for c in cases:
        if len(c.images) != n_channels:
            fix = ("add the missing CASE_000N files" if len(c.images) < n_channels
                   else "declare every channel in channel_names or remove the extra files")
            raise LeFusionInputError(f"case {c.case_id} has {len(c.images)} image file(s) in {folder / 'imagesTr'} "
                                     f"but {djson_path} declares {n_channels} channel(s); {fix}.")
    return RawDataset(folder=folder, dataset_json=djson, cases=cases)


def label_presence(dataset: RawDataset, values: list[int]) -> dict[str, bool]:
    """Case id -> whether any of ``values`` occurs in its label map (reads every label file)."""

    present = {}
    for c in dataset.cases:
        if c.label is None:
            present[c.case_id] = False
            continue
        lab, _ = read_label(c.label)
        present[c.case_id] = bool(np.isin(lab, values).any())
    return present
