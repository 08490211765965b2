"""Writing an enlarged dataset's files: synthetic cases, ``dataset.json``, provenance and the montage.

Used by :func:`lefusion_nnunet.enlargement.run.enlarge`; every file is written atomically (temporary name, then
``os.replace``) into the dataset's hidden partial folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.io import read_image, read_label, write_image_channel, write_label
from lefusion_nnunet.enlargement.montage import MontageRow, render_montage, row_from_volumes
from lefusion_nnunet.synthetic_case import SyntheticCase
from lefusion_nnunet.utils import _friendly_os_error

PROVENANCE_NAME = "lefusion_provenance.json"
MONTAGE_NAME = "lefusion_montage.png"
MONTAGE_ROWS = 24


def copy_file(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _friendly_os_error(exc, dst) from exc


def write_case(folder: Path, case: SyntheticCase, src: RawDataset, model_channel: int) -> None:
    ending = src.file_ending
    ref = case.reference
    source_files = src.case(case.source_case).images
    for i in range(case.num_channels):
        out = folder / "imagesTr" / f"{case.case_id}_{i:04d}{ending}"
        if i != model_channel:
            copy_file(Path(source_files[i]), out)  # unchanged channel: byte copy
        else:
            write_image_channel(case.channel(i), out, ref, i)
    write_label(case.label, folder / "labelsTr" / f"{case.case_id}{ending}", case.label_properties or {})


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start)).replace(os.sep, "/")


def dataset_json(src: RawDataset, dst: Path, dst_name: str, synthetic: list[str], n_channels: int,
                  copy_originals: bool) -> dict:
    ending = src.file_ending
    dj = {k: v for k, v in src.dataset_json.items() if k not in ("dataset", "numTraining", "name", "description")}
    dj["name"] = dst_name
    dj["description"] = (f"{src.name} enlarged with {len(synthetic)} LeFusion synthetic lesion cases "
                         f"(see {PROVENANCE_NAME}).")
    dj["numTraining"] = len(src.cases) + len(synthetic)
    if not copy_originals:
        entries = {}
        for c in src.cases:
            entries[str(c.case_id)] = {"images": [_relative(f, dst) for f in c.images],
                                       "label": _relative(c.label, dst)}
        for s in synthetic:
            entries[s] = {"images": [f"imagesTr/{s}_{i:04d}{ending}" for i in range(n_channels)],
                          "label": f"labelsTr/{s}{ending}"}
        dj["dataset"] = dict(sorted(entries.items()))
    return dj


def write_montage(folder: Path, src: RawDataset, provenance: dict, model_channel: int, window) -> None:

    rows: list[MontageRow] = []
    ending = src.file_ending
    for s in sorted(provenance)[:MONTAGE_ROWS]:
        p = provenance[s]
        case = src.case(p["source_case"])
        source = read_image([case.images[model_channel]])
        synthetic = read_image([folder / "imagesTr" / f"{s}_{model_channel:04d}{ending}"])
        new_label, _ = read_label(folder / "labelsTr" / f"{s}{ending}")
        old_label = read_label(case.label)[0] if case.label is not None else np.zeros_like(new_label)
        mask = new_label != old_label
        cz = int(round(p["center_voxel_zyx"][0]))
        rows.append(row_from_volumes(f"{s}\n{p['diameter_mm']:.1f} mm", source.array[0], synthetic.array[0], mask,
                                     source.spacing, window=window, center_z=cz))
    render_montage(rows, folder / MONTAGE_NAME, max_rows=MONTAGE_ROWS,
                   title=f"{src.name}: {len(provenance)} synthetic lesion(s)")


