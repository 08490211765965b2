"""Where LeFusion puts things, following nnU-Net's folders.

- lesion model runs: ``$nnUNet_results/<DatasetName>/LeFusion_<preset>/checkpoint_{latest,final}.pt``
- mask model runs:   ``$nnUNet_results/<DatasetName>/LeFusionMask_<preset>/...``
- trainer settings:  ``$nnUNet_preprocessed/<DatasetName>/lefusion_trainer.json``
- trainer banks:     ``$nnUNet_preprocessed/<DatasetName>/lefusion_bank/<key>/``
Env vars are read when a function is called, never at import time.
"""
from __future__ import annotations

from pathlib import Path

from lefusion_nnunet.data.dataset import env_folder
from lefusion_nnunet.errors import LeFusionInputError

LESION_RUN_PREFIX = "LeFusion_"
MASK_RUN_PREFIX = "LeFusionMask_"


def default_run_dir(dataset_name: str, preset: str, kind: str = "lesion") -> Path:
    prefix = LESION_RUN_PREFIX if kind == "lesion" else MASK_RUN_PREFIX
    return env_folder("nnUNet_results") / dataset_name / f"{prefix}{preset}"


def find_default_checkpoint(dataset_name: str, kind: str = "lesion") -> Path:
    """The newest ``checkpoint_final.pt`` (else ``checkpoint_latest.pt``) that `lefusion train` wrote for a dataset."""
    prefix = LESION_RUN_PREFIX if kind == "lesion" else MASK_RUN_PREFIX
    root = env_folder("nnUNet_results") / dataset_name
    candidates = sorted(root.glob(f"{prefix}*/checkpoint_final.pt"), key=lambda p: p.stat().st_mtime) or \
        sorted(root.glob(f"{prefix}*/checkpoint_latest.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        cmd = "train" if kind == "lesion" else "train-mask"
        raise LeFusionInputError(f"no LeFusion {kind} checkpoint found under {root}; run `lefusion {cmd} -d "
                                 f"{dataset_name} ...` first or pass --checkpoint.")
    return candidates[-1]


def trainer_settings_file(dataset_name: str) -> Path:
    return env_folder("nnUNet_preprocessed") / dataset_name / "lefusion_trainer.json"
