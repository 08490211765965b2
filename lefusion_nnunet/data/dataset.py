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
        """Name -> value of every integer the label maps may hold (0 = background included).

        For plain datasets this is ``dataset.json``'s ``labels``. For region-based datasets (nnU-Net's
        ``"lung": [1, 2], "nodule": 2`` with ``regions_class_order``) the label maps still hold integers; each gets
        the name of the entry that is exactly that value (``2`` or ``[2]``), else of the smallest region holding it
        (here 1 -> ``"lung"``), suffixed ``" (value N)"`` where that name is taken.
        """
        return label_values(self.dataset_json["labels"])

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """``dataset.json``'s labels as nnU-Net's regions: name -> the label-map values it covers."""
        return {k: _as_values(v) for k, v in self.dataset_json["labels"].items()}

    @property
    def region_based(self) -> bool:
        """True when a label lists several values (nnU-Net then trains on regions, ``regions_class_order``)."""
        return any(len(set(v)) > 1 for v in self.regions.values())

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
    check_label_entries(djson, djson_path)
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_values(value) -> tuple[int, ...]:
    """A ``dataset.json`` label entry (``2`` or a region ``[1, 2]``) as the label-map values it covers."""
    return (int(value),) if _is_int(value) else tuple(int(v) for v in value)


def check_label_entries(djson: dict, djson_path: Path) -> None:
    """``labels`` maps names to integers or, for nnU-Net's region-based training, to non-empty lists of integers
    together with a ``regions_class_order`` of one value per foreground region."""
    regions = 0
    for name, value in djson["labels"].items():
        if isinstance(value, (list, tuple)):
            if not value or not all(_is_int(v) and v >= 0 for v in value):
                raise LeFusionInputError(f"label {name!r} in {djson_path} is {value!r}; a region must list one or "
                                         f"more integer label values, e.g. [1, 2].")
            regions += any(int(v) != 0 for v in value)
        elif not _is_int(value) or value < 0:
            raise LeFusionInputError(f"label {name!r} in {djson_path} is {value!r}, not an integer; labels must map "
                                     f"names to integer values (or, region-based, to lists of them).")
        else:
            regions += int(value) != 0 and name != "ignore"
    if any(isinstance(v, (list, tuple)) and len(set(v)) > 1 for v in djson["labels"].values()):
        order = djson.get("regions_class_order")
        if not isinstance(order, list) or len(order) != regions:
            raise LeFusionInputError(f"{djson_path} declares region-based labels (lists) but its "
                                     f"regions_class_order is {order!r}; add one integer per foreground region "
                                     f"({regions}) as nnU-Net requires.")


def label_values(labels: dict) -> dict[str, int]:
    """Name -> label-map value for ``dataset.json``'s ``labels`` (see :attr:`RawDataset.labels`)."""
    entries = {k: _as_values(v) for k, v in labels.items()}
    out: dict[str, int] = {}
    for name, values in entries.items():  # exact entries first: "nodule": 2 or "nodule": [2]
        if len(set(values)) == 1 and values[0] not in out.values():
            out[name] = values[0]
    for v in sorted({v for values in entries.values() for v in values} - set(out.values())):
        holders = sorted((len(set(vals)), i, k) for i, (k, vals) in enumerate(entries.items()) if v in vals)
        name = holders[0][2]
        out[name if name not in out else f"{name} (value {v})"] = v
    return out


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
