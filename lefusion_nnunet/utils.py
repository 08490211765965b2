"""Small shared helpers: atomic file and folder writes, hashing, device choice.

Everything that writes user-visible output goes through :func:`atomic_write_bytes`,
:func:`atomic_write_json` or :func:`atomic_directory`, so an interrupted run never leaves a
half-written file or dataset behind.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from lefusion_nnunet.errors import LeFusionInputError


def _friendly_os_error(exc: OSError, path: Path) -> LeFusionInputError:
    """One sentence for an operating-system error while writing ``path`` (disk full, permission, quota)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LeFusionInputError(f"no space left on the device while writing {path}; free some disk space "
                                  f"or choose another output folder (partial output was removed).")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LeFusionInputError(f"permission denied while writing {path}; choose an output folder you can "
                                  f"write to (partial output was removed).")
    return LeFusionInputError(f"could not write {path} ({exc.strerror or exc}); check the output folder "
                              f"(partial output was removed).")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        for folder in created:  # innermost first: folders this call made, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise _friendly_os_error(exc, path) from exc


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: Path | str, overwrite: bool = False, keep_partial: bool = False) -> Iterator[Path]:
    """Build a folder in a sibling ``.<name>.partial`` folder and move it into place on success.

    Yields the partial folder to write into. On any exception the partial folder is removed and ``final`` is
    untouched. With ``keep_partial`` (resumable runs) an interruption (Ctrl-C, or an unexpected error) keeps
    the partial folder for ``--resume``, but bad input and output errors (:class:`LeFusionInputError`, e.g.
    disk full or permission denied) still remove it. With ``overwrite`` an existing ``final`` is replaced only
    once the new one is complete.
    """
    final = Path(final)
    partial = final.with_name(f".{final.name}.partial")
    if final.exists() and not overwrite:
        raise LeFusionInputError(f"output {final} already exists; pass --overwrite to replace it "
                                 f"or choose another output.")
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _friendly_os_error(exc, partial) from exc
    try:
        yield partial
    except BaseException as exc:
        if not keep_partial or isinstance(exc, (OSError, LeFusionInputError)):
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _friendly_os_error(exc, final) from exc
        raise
    try:
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            try:
                os.replace(partial, final)
            except OSError:
                os.replace(trash, final)  # put the previous output back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, final)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise _friendly_os_error(exc, final) from exc


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; validates explicit choices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LeFusionInputError(f"--device {device} was requested but no CUDA GPU is available; "
                                 f"use --device cpu.")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise LeFusionInputError(f"unknown device {device!r}; use auto, cpu or cuda.")
    return device
