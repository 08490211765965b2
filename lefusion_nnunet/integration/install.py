"""Register ``LeFusionTrainer`` with nnU-Net (``-tr LeFusionTrainer`` for ``nnUNetv2_train`` / ``nnUNetv2_predict``).

nnU-Net has no plugin registry: it finds ``-tr NAME`` by importing the modules of its own
``nnunetv2/training/nnUNetTrainer`` folder (plain modules first, sorted, then subpackages), and only then the
folders in ``nnUNet_extTrainer``. Two routes are offered:

- :func:`install_trainer_shim` (``lefusion install-trainer``) writes ``zz_lefusion_trainers.py`` into that
  folder: a guarded re-export (``try: from nnunet_trainers import *`` / ``except ImportError: pass``). It is
  scanned after ``nnUNetTrainer.py`` and before the subpackages, so it works on CPU-only installs where the
  ``primus`` subpackage fails to import torchvision; it is never imported when the default trainer is used, and
  it is harmless if this package is uninstalled. :func:`uninstall_trainer_shim` removes it.
- :func:`trainer_dir` (``lefusion trainer-dir``) prints the folder to put in ``nnUNet_extTrainer`` (needs
  nnU-Net >= 2.8 and an install where nnU-Net's own subpackages import, i.e. a working torchvision).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.utils import atomic_write_bytes

SHIM_NAME = "zz_lefusion_trainers.py"
SHIM_MARKER = "# lefusion-nnunet trainer shim"
SHIM_TEXT = f'''{SHIM_MARKER} (written by `lefusion install-trainer`; remove with `lefusion uninstall-trainer`).
"""Makes LeFusionTrainer and its variants visible to nnU-Net's trainer lookup (-tr LeFusionTrainer).

Guarded: if lefusion-nnunet is not importable, this module defines nothing and nnU-Net is unaffected.
"""
try:
    from nnunet_trainers import *  # noqa: F401,F403
except ImportError:
    pass
'''


def nnunet_trainer_folder() -> Path:
    """``nnunetv2/training/nnUNetTrainer`` of the installed nnU-Net (found without importing nnunetv2)."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise LeFusionInputError("nnunetv2 is not installed in this Python environment; install it with "
                                 "`pip install nnunetv2` (keep your torch build with a constraints file).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "training" / "nnUNetTrainer"
    if not folder.is_dir():
        raise LeFusionInputError(f"{folder} does not exist; this nnunetv2 installation is incomplete, reinstall it.")
    return folder


def trainer_dir() -> Path:
    """The ``nnunet_trainers`` folder to add to ``nnUNet_extTrainer``."""
    spec = importlib.util.find_spec("nnunet_trainers")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    folder = Path(__file__).resolve().parents[2] / "nnunet_trainers"
    if folder.is_dir():
        return folder
    raise LeFusionInputError("the nnunet_trainers package of lefusion-nnunet cannot be found; reinstall "
                             "lefusion-nnunet (`pip install -e .` in its folder).")


def _shim_path(target_dir: Path | str | None) -> Path:
    return Path(target_dir) / SHIM_NAME if target_dir is not None else nnunet_trainer_folder() / SHIM_NAME


def _not_writable(folder: Path) -> LeFusionInputError:
    return LeFusionInputError(f"cannot write to nnU-Net's trainer folder {folder} (read-only or system-wide "
                              f"install); rerun with write permission, or register the trainer without "
                              f"writing there: export nnUNet_extTrainer=\"$(lefusion trainer-dir)\".")


def shim_installed(target_dir: Path | str | None = None) -> bool:
    """Whether our shim is present (in nnU-Net's trainer folder by default)."""
    path = _shim_path(target_dir)
    try:
        return SHIM_MARKER in path.read_text()
    except OSError:
        return False


def install_trainer_shim(target_dir: Path | str | None = None) -> Path:
    """Write the guarded shim into nnU-Net's trainer folder (or ``target_dir``); returns its path.

    Idempotent: an identical shim is left alone, an older version of ours is replaced. A foreign file of the
    same name is never overwritten.
    """
    path = _shim_path(target_dir)
    folder = path.parent
    if not folder.is_dir():
        raise LeFusionInputError(f"{folder} is not a folder; pass nnU-Net's training/nnUNetTrainer folder.")
    if path.exists():
        try:
            current = path.read_text()
        except OSError as exc:
            raise LeFusionInputError(f"{path} exists but cannot be read ({exc.strerror}); remove it by hand.")
        if current == SHIM_TEXT:
            return path
        if SHIM_MARKER not in current:
            raise LeFusionInputError(f"{path} exists and was not written by lefusion-nnunet; move it away "
                                     f"before running `lefusion install-trainer`.")
    if not os.access(folder, os.W_OK):
        raise _not_writable(folder)
    try:
        atomic_write_bytes(path, SHIM_TEXT.encode())
    except LeFusionInputError as exc:
        raise _not_writable(folder) from exc
    return path


def uninstall_trainer_shim(target_dir: Path | str | None = None) -> Path | None:
    """Remove our shim (and its bytecode); returns the removed path, or None if it was not installed."""
    path = _shim_path(target_dir)
    if not path.exists():
        return None
    if not shim_installed(target_dir):
        raise LeFusionInputError(f"{path} was not written by lefusion-nnunet; it is left in place.")
    try:
        path.unlink()
        cache = path.parent / "__pycache__"
        if cache.is_dir():
            for pyc in cache.glob(f"{path.stem}.*.pyc"):
                pyc.unlink()
    except OSError as exc:
        raise _not_writable(path.parent) from exc
    return path
