"""Writing nnU-Net raw datasets: ``DatasetXXX_Name`` naming, dataset-id clashes, and the atomic folder build.

One place for what every writer of a raw dataset (the phantoms, ``lefusion enlarge``, the benchmarks) must get
right: a valid ``Dataset{id:03d}_{name}`` name, an id no other dataset under ``$nnUNet_raw`` /
``$nnUNet_preprocessed`` / ``$nnUNet_results`` uses, and a folder that appears complete or not at all
(built in a hidden sibling by :func:`lefusion_nnunet.utils.atomic_directory`, then renamed into place).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.utils import atomic_directory

DATASET_NAME_RE = re.compile(r"Dataset(\d{3})_(\w+)")
_NAME_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
NNUNET_ROOT_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def dataset_name(dataset_id: int, name: str) -> str:
    """``(501, "Chest")`` -> ``"Dataset501_Chest"``, validated for nnU-Net (id 1..999, a file-name-safe name)."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise LeFusionInputError(f"dataset id {dataset_id!r} is invalid; nnU-Net dataset ids are integers "
                                 f"between 1 and 999.")
    if not _NAME_PART_RE.fullmatch(name or ""):
        raise LeFusionInputError(f"dataset name {name!r} is invalid; use letters, digits, '_' and '-' only "
                                 f"(it becomes the folder name Dataset{int(dataset_id):03d}_<name>).")
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_id_of(name: str) -> int | None:
    """The id of a ``DatasetXXX_Name`` folder name, or None for any other name."""
    m = DATASET_NAME_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def derived_dataset_name(destination: str | int, source_name: str, suffix: str = "LeFusion") -> str:
    """A new dataset's name from a user's id or name: ``502`` -> ``Dataset502_<SourceName><suffix>``;
    a full ``Dataset502_Name`` is kept as given."""
    text = str(destination).strip()
    if text.isdigit():
        if not 1 <= int(text) <= 999:
            raise LeFusionInputError(f"destination id {text} must be between 1 and 999.")
        m = DATASET_NAME_RE.fullmatch(source_name)
        base = m.group(2) if m else re.sub(r"\W", "", source_name)
        return f"Dataset{int(text):03d}_{base}{suffix}"
    if not DATASET_NAME_RE.fullmatch(text):
        raise LeFusionInputError(f"destination {text!r} is neither a dataset id (e.g. 502) nor a name "
                                 f"(Dataset502_Name).")
    return text


def check_dataset_id_free(name: str, roots: list[Path], hint: str = "choose another dataset id") -> None:
    """Refuse ``name`` when another folder in ``roots`` uses its dataset id (nnU-Net finds datasets by id)."""
    dataset_id = dataset_id_of(name)
    if dataset_id is None:
        return
    for root in roots:
        if not root.is_dir():
            continue
        clash = sorted(d.name for d in root.glob(f"Dataset{dataset_id:03d}_*") if d.is_dir() and d.name != name)
        if clash:
            raise LeFusionInputError(f"dataset id {dataset_id} is already used by {root / clash[0]}; {hint} "
                                     f"(nnU-Net needs unique ids).")


def nnunet_roots(raw_root: Path) -> list[Path]:
    """``raw_root`` and the preprocessed / results folders from the environment (where dataset ids must be unique)."""
    env = [os.environ.get(v) for v in NNUNET_ROOT_VARS[1:]]
    return [Path(raw_root)] + [Path(p) for p in env if p]


@contextlib.contextmanager
def raw_dataset_folder(final: Path, overwrite: bool = False, keep_partial: bool = False) -> Iterator[Path]:
    """Build a raw dataset folder atomically: yields a hidden partial folder with ``imagesTr/`` and ``labelsTr/``
    that replaces ``final`` when the block ends without error (see :func:`~lefusion_nnunet.utils.atomic_directory`).

    With ``keep_partial`` (resumable builds) an interruption keeps the partial folder for a resume; without it,
    SimpleITK's write errors become one sentence and nothing is left behind."""
    with atomic_directory(final, overwrite=overwrite, keep_partial=keep_partial) as partial:
        (partial / "imagesTr").mkdir(exist_ok=True)
        (partial / "labelsTr").mkdir(exist_ok=True)
        try:
            yield partial
        except RuntimeError as exc:  # SimpleITK wraps I/O errors in RuntimeError
            if keep_partial:
                raise
            text = str(exc).strip()
            raise LeFusionInputError(f"could not write the dataset {final}: "
                                     f"{text.splitlines()[-1] if text else exc}; choose a writable raw folder "
                                     f"with free space.") from exc
