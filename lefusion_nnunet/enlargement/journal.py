"""The progress journal of `lefusion enlarge`: what an interrupted (or sharded) run has finished.

The journal is a JSON file in the partial output folder, rewritten atomically after every chunk of source cases:
``{"version", "key", "completed": [source case ids], "written": {source case: [synthetic ids]},
"provenance": {synthetic id: {...}}, "warnings": {source case: [...]}}``. ``key`` holds everything that
determines the output (source, settings, checkpoint SHA-256, case list); a resume with another key is refused.
Under torchrun every rank r > 0 keeps its own ``lefusion_progress.rank<r>.json``; rank 0 merges them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.synthetic_case import SyntheticCase
from lefusion_nnunet.utils import atomic_write_json
from lefusion_nnunet.variant_settings import VariantSettings

__all__ = ["JOURNAL_NAME", "JOURNAL_VERSION", "journal_key", "new_journal", "case_files", "rank_journal_name",
           "merge_journals", "load_journal", "remove_unjournaled_files", "record_chunk", "write_merged_journal"]

JOURNAL_NAME = "lefusion_progress.json"
JOURNAL_VERSION = 1


def journal_key(src: RawDataset, settings: VariantSettings, sha: str | None, cases_from: str,
                case_ids: list[str], copy_originals: bool) -> dict:
    """What determines the output of a run: a resume must match it exactly."""
    return {"source": src.name, "settings": settings.to_dict(), "checkpoint_sha256": sha, "cases_from": cases_from,
            "case_ids": list(case_ids), "copy_originals": bool(copy_originals)}


def case_files(folder: Path, case_id: str, n_channels: int, ending: str) -> list[Path]:
    """The image channel files and the label file of one synthetic case."""
    return [folder / "imagesTr" / f"{case_id}_{i:04d}{ending}" for i in range(n_channels)] + \
        [folder / "labelsTr" / f"{case_id}{ending}"]


def rank_journal_name(rank: int) -> str:
    """File name of the journal rank ``rank`` writes (rank 0 writes the main one)."""
    return JOURNAL_NAME if rank == 0 else JOURNAL_NAME.replace(".json", f".rank{rank}.json")


def merge_journals(journal: dict, other: dict) -> None:
    """Add the cases another rank completed to ``journal`` (in place)."""
    for part in ("written", "provenance", "warnings"):
        journal[part].update(other[part])
    journal["completed"] = sorted(set(journal["completed"]) | set(other["completed"]))


def load_journal(partial: Path, key: dict, n_channels: int, ending: str) -> dict | None:
    """The journal of an interrupted run (rank journals of a sharded run merged in); ``None`` if there is none."""
    path = partial / JOURNAL_NAME
    if not path.is_file():
        return None
    journal = None
    for f in [path] + sorted(partial.glob(JOURNAL_NAME.replace(".json", ".rank*.json"))):
        try:
            part = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if part.get("version") != JOURNAL_VERSION or part.get("key") != key:
            raise LeFusionInputError(f"the interrupted run in {partial} used other settings, source cases or "
                                     f"checkpoint; rerun with the same options, or without --resume to start over.")
        if journal is None:
            journal = part
        else:
            merge_journals(journal, part)
    if journal is None:
        return None
    completed = []
    for case in journal["completed"]:
        ids = journal["written"].get(case, [])
        if all(f.is_file() for s in ids for f in case_files(partial, s, n_channels, ending)):
            completed.append(case)
        else:  # files missing: redo the case
            for s in ids:
                journal["provenance"].pop(s, None)
            journal["written"].pop(case, None)
            journal["warnings"].pop(case, None)
    journal["completed"] = completed
    return journal


def remove_unjournaled_files(partial: Path, journal: dict | None, n_channels: int, ending: str) -> None:
    """Before resuming: drop what a killed run left that the journal does not vouch for.

    Temporary files (``.tmp-<pid>-...``, ``.<name>.tmp-<pid>``) and case files of source cases not recorded as
    completed are removed, so the finished dataset holds exactly what an uninterrupted run writes.
    """
    keep: set[Path] = set()
    if journal is not None:
        for case in journal["completed"]:
            for s in journal["written"].get(case, []):
                keep.update(case_files(partial, s, n_channels, ending))
    for sub in ("imagesTr", "labelsTr"):
        folder = partial / sub
        if folder.is_dir():
            for f in folder.iterdir():
                if f in keep:
                    continue
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
    for f in partial.glob(".*"):
        if f.is_file():
            f.unlink(missing_ok=True)


def new_journal(key: dict) -> dict:
    """An empty journal for a run identified by ``key``."""
    return {"version": JOURNAL_VERSION, "key": key, "completed": [], "written": {}, "provenance": {}, "warnings": {}}


def record_chunk(journal: dict, todo: list[str], cases: list[SyntheticCase], warnings: list) -> None:
    """Record (in place) that the source cases ``todo`` are done: their synthetic cases, provenance and warnings."""
    for c in todo:
        journal["written"][c] = [s.case_id for s in cases if s.source_case == c]
        journal["warnings"][c] = [
            {"text": str(w), "reason": getattr(w, "reason", str(w)), "skipped": getattr(w, "skipped", True)}
            for w in warnings if getattr(w, "case_id", c) == c]
    for case in cases:
        journal["provenance"][case.case_id] = case.provenance
    journal["completed"] = sorted(set(journal["completed"]) | set(todo))


def write_merged_journal(folder: Path, journal: dict) -> None:
    """Write rank 0's journal (holding every rank's progress) and drop the rank journals merged into it."""
    atomic_write_json(folder / JOURNAL_NAME, journal)
    for f in folder.glob(JOURNAL_NAME.replace(".json", ".rank*.json")):
        f.unlink()
