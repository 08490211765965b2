"""The bank's files (format 4): one folder per bank key, written in place while training may already read it.

Layout of ``$nnUNet_preprocessed/<Dataset>/lefusion_bank/``::

    .<key>.lock                  exclusive fcntl lock, held by the one process that builds the bank
    <key>/
        <variant>.npz            one variant's patch (``swap_dataset.save_patch``), written atomically
        cases/<source>.json      per-source record, written atomically once all of that source's variants are
                                 stored: {"variants": {variant_id: entry}, "warnings": [...]}
        bank.json                the complete manifest, written last (atomically)

Every file appears under its final name only when complete (a temporary hidden sibling, then ``os.replace``;
:func:`is_temporary` names never match what readers look for). A reader of an incomplete bank sees only sources
with a record (:func:`read_records`), so it never reads a half-made source; :class:`SyntheticBank` means a
complete bank (``bank.json`` of this format and key, and every patch). :func:`prepare_resume` turns the folder a
killed build left into one a new build continues: finished sources are kept, everything else goes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lefusion_nnunet.utils import atomic_write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks (one build at a time is then the user's job)
    fcntl = None  # type: ignore[assignment]

__all__ = ["BANK_FOLDER", "MANIFEST_NAME", "CASES_FOLDER", "FORMAT", "FORMAT_VERSION", "PATCH_SUFFIX",
           "DRAWS_LOG_NAME", "SyntheticBank", "BankLock", "json_safe", "patch_path", "is_temporary",
           "read_manifest", "write_manifest", "variants_by_source", "read_records", "write_record",
           "prepare_resume"]

BANK_FOLDER = "lefusion_bank"
MANIFEST_NAME = "bank.json"
CASES_FOLDER = "cases"
FORMAT = "lefusion-bank"
#: 1: full preprocessed cases; 2: patches of the full route only; 3: built in a ``.partial`` folder renamed when
#: complete; 4: built in place with per-source records (all older ones are ignored: the version is in the key).
FORMAT_VERSION = 4
PATCH_SUFFIX = ".npz"
DRAWS_LOG_NAME = "lefusion_draws.log"
_RECORD_SUFFIX = ".json"


def json_safe(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples, paths and dataclass-like configs."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def patch_path(folder: Path | str, variant_id: str) -> Path:
    """Where the patch of ``variant_id`` lives in the bank ``folder``."""
    return Path(folder) / f"{variant_id}{PATCH_SUFFIX}"


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary sibling of an atomic write (``.<name>.tmp-<pid>``)."""
    return name.startswith(".") and ".tmp-" in name


# ----------------------------------------------------------------------------------------------- manifest

def read_manifest(folder: Path | str, key: str | None = None) -> dict | None:
    """``bank.json`` of ``folder`` if it is of this format (and of ``key``, when given), else None."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        return None
    if key is not None and manifest.get("key") != key:
        return None
    return manifest


def write_manifest(folder: Path | str, key: str, spec: dict, variants: dict, warnings: Iterable[str],
                   build_seconds: float) -> None:
    """Write the complete manifest, atomically; the last file of a build."""
    atomic_write_json(Path(folder) / MANIFEST_NAME, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "spec": spec,
        "variants": json_safe(variants), "warnings": [str(w) for w in warnings],
        "build_seconds": round(float(build_seconds), 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def variants_by_source(variants: dict) -> dict[str, list[str]]:
    """``{variant_id: entry}`` -> ``{source_case: sorted variant ids}``."""
    out: dict[str, list[str]] = {}
    for vid, entry in sorted(variants.items()):
        out.setdefault(entry["source_case"], []).append(vid)
    return out


@dataclass
class SyntheticBank:
    """A complete bank folder and its manifest."""

    folder: Path
    key: str
    variants_by_source: dict[str, list[str]]
    manifest: dict = field(repr=False)
    built: bool = False
    build_seconds: float = 0.0

    @property
    def num_variants(self) -> int:
        return sum(len(v) for v in self.variants_by_source.values())

    @property
    def warnings(self) -> list[str]:
        return list(self.manifest.get("warnings", []))

    def source_of(self, variant_id: str) -> str:
        return self.manifest["variants"][variant_id]["source_case"]

    @classmethod
    def load(cls, folder: Path | str, key: str | None = None) -> "SyntheticBank | None":
        """The bank in ``folder``, or None if it is missing, incomplete, of another format or for another key."""
        folder = Path(folder)
        manifest = read_manifest(folder, key)
        if manifest is None:
            return None
        variants = manifest.get("variants", {})
        if not all(patch_path(folder, vid).is_file() for vid in variants):
            return None
        return cls(folder=folder, key=manifest["key"], variants_by_source=variants_by_source(variants),
                   manifest=manifest, build_seconds=float(manifest.get("build_seconds", 0.0)))


# ----------------------------------------------------------------------------------------------- records

def _record_path(folder: Path, source: str) -> Path:
    return folder / CASES_FOLDER / f"{source}{_RECORD_SUFFIX}"


def write_record(folder: Path | str, source: str, variants: dict, warnings: Iterable[str]) -> None:
    """Record that every variant of ``source`` is stored (``variants``: ``{variant_id: entry}``), atomically."""
    atomic_write_json(_record_path(Path(folder), source),
                      {"variants": json_safe(variants), "warnings": [str(w) for w in warnings]})


def read_records(folder: Path | str, skip: Iterable[str] = ()) -> dict[str, dict]:
    """``{source: record}`` of every finished source in the bank ``folder`` (empty if there is none yet).

    Sources in ``skip`` are not read again (records never change once written); temporary files are ignored.
    """
    cases, skip = Path(folder) / CASES_FOLDER, set(skip)
    try:
        names = sorted(os.listdir(cases))
    except OSError:
        return {}
    out: dict[str, dict] = {}
    for name in names:
        source = name[:-len(_RECORD_SUFFIX)]
        if is_temporary(name) or not name.endswith(_RECORD_SUFFIX) or source in skip:
            continue
        try:
            record = json.loads((cases / name).read_text())
        except (OSError, json.JSONDecodeError):  # cannot happen for files written by write_record
            continue
        out[source] = {"variants": dict(record.get("variants", {})), "warnings": list(record.get("warnings", []))}
    return out


def prepare_resume(folder: Path | str) -> dict[str, dict]:
    """Make the folder of an unfinished (killed) or damaged build ready to be continued; returns the records kept.

    Removes ``bank.json`` (the caller found the bank incomplete), the records of sources with a missing patch and
    every other file no kept record names (temporary files, patches of unfinished sources, files of other
    formats): what is left is exactly what an uninterrupted build had written after the kept sources. Call it
    only while holding the bank's :class:`BankLock`.
    """
    folder = Path(folder)
    cases = folder / CASES_FOLDER
    cases.mkdir(parents=True, exist_ok=True)
    records = read_records(folder)
    for source, record in list(records.items()):
        if not all(patch_path(folder, vid).is_file() for vid in record["variants"]):
            del records[source]
    keep = {CASES_FOLDER} | {patch_path(folder, vid).name for r in records.values() for vid in r["variants"]}
    keep_records = {_record_path(folder, source).name for source in records}
    for sub, wanted in ((folder, keep), (cases, keep_records)):
        for entry in os.scandir(sub):
            if entry.name in wanted:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    return records


# ----------------------------------------------------------------------------------------------- lock

class BankLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``root/.<key>.lock``: the one builder of a bank holds it.

    ``flock`` locks belong to an open file, so two acquisitions conflict also within one process (another
    trainer, a test). Where ``fcntl`` is unavailable (Windows) acquiring always succeeds.
    """

    def __init__(self, handle):
        self._handle = handle

    @classmethod
    def acquire(cls, path: Path | str, blocking: bool = True) -> "BankLock | None":
        """Take the lock (waiting for it with ``blocking``); None when ``blocking`` is False and it is held."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.close()
                return None
        return cls(handle)

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._handle is not None:
            if fcntl is not None:
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "BankLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
