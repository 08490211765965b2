"""Shared fixtures: small generated volumes and nnU-Net env vars in a temp folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lefusion_nnunet.data.roi import LesionEdit, NativeWindow

os.environ.setdefault("OMP_NUM_THREADS", "2")


def write_sitk(path: Path, array_zyx: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def plan_and_preprocess_template(root: Path, write_raw, dataset_id: int, configurations=("3d_fullres",)) -> Path:
    """``root/nnUNet_raw`` written by ``write_raw(raw_folder)``, then fingerprinted, planned and preprocessed by
    nnU-Net itself (one process) into ``root/nnUNet_preprocessed``; returns ``root``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    with pytest.MonkeyPatch.context() as mp:
        for var in NNUNET_ENV:
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        mp.setenv("nnUNet_def_n_proc", "1")
        write_raw(root / "nnUNet_raw")
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False)
        plan_experiments([dataset_id])
        preprocess([dataset_id], configurations=tuple(configurations), num_processes=(1,) * len(configurations),
                   verbose=False)
    return root


def use_template_copy(template: Path, tmp_path: Path, monkeypatch) -> Path:
    """Copy the nnU-Net folders of :func:`plan_and_preprocess_template`'s ``template`` into ``tmp_path`` and point
    nnU-Net's environment variables at the copy (a private, writable dataset per test); returns ``tmp_path``."""
    for var in NNUNET_ENV:
        shutil.copytree(template / var, tmp_path / var)
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path


def block_edit(request, fill=None):
    """What a test double of ``LesionSynthesizer.synthesize_edits`` returns for one request: a
    :class:`~lefusion_nnunet.data.roi.LesionEdit` whose window is the request's mask block (or the whole
    image) and whose values are the image there, with ``fill(n)`` (n values) written inside the lesion."""
    masks = np.asarray(request.class_masks, bool)
    start = np.zeros(3, int) if request.mask_offset_zyx is None else np.asarray(request.mask_offset_zyx, int)
    shape = tuple(int(v) for v in np.shape(request.image))
    window = NativeWindow(tuple(int(v) for v in start), tuple(int(a + b) for a, b in zip(start, masks.shape[1:])),
                          shape)
    values = np.array(np.asarray(request.image)[window.slices], copy=True)
    union = masks.any(0)
    if fill is not None:
        values[union] = fill(int(union.sum()))
    return LesionEdit(window, values, union, masks)


def rotation_direction(angle_deg: float = 30.0) -> tuple:
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return tuple(r.ravel())


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results in tmp_path (also for subprocesses)."""
    paths = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        p = tmp_path / var
        p.mkdir()
        monkeypatch.setenv(var, str(p))
        paths[var] = p
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    return paths
