"""Offline dataset enlargement: a new nnU-Net raw dataset = the source cases + synthetic lesion cases.

``enlarge("501", "502")`` reads ``$nnUNet_raw/Dataset501_X`` (never writes it) and builds
``$nnUNet_raw/Dataset502_XLeFusion`` holding:

* ``imagesTr`` / ``labelsTr``: the synthetic cases (``CASE_lefusion000`` ...) in the source's file format,
  pixel types and geometry (only the model channel differs from the source case, and only inside the lesion;
  other channels are byte copies of the source files);
* ``dataset.json``: the source's channel names, labels and file ending; ``numTraining`` counts all cases;
  the original cases are referenced through the ``"dataset"`` key with paths relative to the new folder
  (``../Dataset501_X/imagesTr/...``, which nnU-Net resolves against the dataset folder), or copied with
  ``copy_originals``;
* ``splits_final.json``: nnU-Net's default 5 folds of the real cases, each synthetic case in the training
  lists of exactly the folds that train on its source case (never in a validation list);
* ``lefusion_provenance.json``: per synthetic case where its lesion is, how it was made, and the settings
  and checkpoint SHA-256;
* ``lefusion_montage.png``: one axial slice through each synthetic lesion (source / synthetic / mask).

The dataset is built in a hidden sibling ``.Dataset502_XLeFusion.partial`` and moved into place when
complete. A progress journal in that folder (written atomically after each chunk) lets ``resume=True``
finish an interrupted run with byte-identical results.

Under ``torchrun --nproc_per_node N`` the fixed chunks of source cases (:func:`variant_chunks`) are dealt out
to the ranks round-robin (each rank on its own GPU when there are GPUs); every rank writes its cases and its
own journal (``lefusion_progress.rank<R>.json``) into the one partial folder, and rank 0 merges the journals
and finishes the dataset. Every case's randomness depends only on its id, so the output is byte-identical to a
single-process run, and a sharded run can be resumed with any number of ranks.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from lefusion_nnunet.data.dataset import RawDataset, env_folder, load_raw_dataset
from lefusion_nnunet.data.raw_writer import (check_dataset_id_free, dataset_id_of, derived_dataset_name, nnunet_roots,
                                             raw_dataset_folder)
from lefusion_nnunet.data.splits import grouped_splits
from lefusion_nnunet.distributed import init_distributed
from lefusion_nnunet.enlargement.journal import (JOURNAL_NAME, journal_key, load_journal, merge_journals, new_journal,
                                                 rank_journal_name, record_chunk, remove_unjournaled_files,
                                                 write_merged_journal)
from lefusion_nnunet.enlargement.writer import PROVENANCE_NAME, copy_file, dataset_json, write_case, write_montage
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.paths import find_default_checkpoint
from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
from lefusion_nnunet.utils import atomic_write_json, resolve_device
from lefusion_nnunet.validation import validate_variant_inputs
from lefusion_nnunet.variant_settings import VariantSettings
from lefusion_nnunet.variants import VariantWarning, make_variants, synthetic_case_id, variant_chunks

log = logging.getLogger(__name__)

CASES_FROM = ("lesion-free", "all")
#: How long a rank waits for the slowest one of a sharded run (uneven shards on a big dataset).
SHARD_TIMEOUT_MINUTES = 24 * 60


@dataclass
class EnlargeSummary:
    """What an :func:`enlarge` run produced.

    Attributes:
        destination: the new dataset folder.
        source: the source dataset name.
        source_cases: number of source cases that received lesions.
        cases_written: number of synthetic cases in the new dataset.
        originals: number of original cases referenced (or copied).
        skipped: skip reason -> number of variants skipped for it.
        warnings: warning reason -> count (e.g. diameters reduced to fit the model ROI).
        seconds_per_lesion: wall time per synthetic lesion of this run (None if none was made now).
        resumed_cases: source cases already done by an earlier, interrupted run.
        notes: other remarks (e.g. fewer than 5 folds).
    """

    destination: Path
    source: str
    source_cases: int
    cases_written: int
    originals: int
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    seconds_per_lesion: float | None = None
    resumed_cases: int = 0
    copied_originals: bool = False
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """Human-readable summary for the command line."""
        how = "copied" if self.copied_originals else "referenced"
        lines = [f"wrote {self.cases_written} synthetic case(s) from {self.source_cases} source case(s) of "
                 f"{self.source} (+ {self.originals} original case(s) {how}) to {self.destination}"]
        if self.resumed_cases:
            lines.append(f"resumed: {self.resumed_cases} source case(s) were already done")
        n_skip = sum(self.skipped.values())
        if n_skip:
            lines.append(f"skipped {n_skip} variant(s): " + "; ".join(f"{n} x {r}" for r, n in self.skipped.items()))
        for reason, n in self.warnings.items():
            lines.append(f"warning: {n} x {reason}")
        if self.seconds_per_lesion is not None:
            lines.append(f"{self.seconds_per_lesion:.2f} s per lesion")
        lines.extend(self.notes)
        dataset_id = dataset_id_of(self.destination.name)
        if dataset_id is not None:
            lines.append(f"next: nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# validate
def _check_destination(dst_name: str, src: RawDataset, raw_root: Path, overwrite: bool) -> Path:
    dst_id, src_id = dataset_id_of(dst_name), dataset_id_of(src.name)
    if dst_name == src.name or (dst_id is not None and dst_id == src_id):
        raise LeFusionInputError(f"destination {dst_name} has the same dataset id as the source {src.name}; "
                                 f"choose a free id, e.g. --destination {(src_id or 0) + 1}.")
    check_dataset_id_free(dst_name, nnunet_roots(raw_root), hint="choose another destination id")
    dst = raw_root / dst_name
    if dst.exists() and not overwrite:
        raise LeFusionInputError(f"output {dst} already exists; pass --overwrite to replace it or choose another "
                                 f"output.")
    return dst


# --------------------------------------------------------------------------------------------------------
# the synthesizer
def _build_synthesizer(src: RawDataset, checkpoint, settings: VariantSettings, batch_size: int,
                       device: str) -> "LesionSynthesizer":

    path = Path(checkpoint) if checkpoint is not None else find_default_checkpoint(src.name)
    return LesionSynthesizer.from_checkpoint(path, device, settings.sampler, settings.guidance_scale, batch_size)


# --------------------------------------------------------------------------------------------------------
def enlarge(source: str | int | Path, destination: str | int, checkpoint: str | Path | None = None,
            settings: VariantSettings = VariantSettings(), cases_from: str = "lesion-free",
            copy_originals: bool = False, batch_size: int = 4, device: str = "auto", resume: bool = False,
            overwrite: bool = False, progress: bool = True, *,
            synthesizer: "LesionSynthesizer | None" = None) -> EnlargeSummary:
    """Write a new nnU-Net raw dataset: the source cases plus ``settings.per_case`` synthetic variants each.

    Args:
        source: source dataset id / name under ``$nnUNet_raw`` (or a dataset folder); never written.
        destination: new dataset id (``502`` -> ``Dataset502_<SourceName>LeFusion``) or full name.
        checkpoint: lesion checkpoint; default: the newest one ``lefusion train`` wrote for the source.
        settings: mask source, sizes, region, textures, sampler, guidance, seed, K (``--per-case``).
        cases_from: ``"lesion-free"`` (cases without any lesion label) or ``"all"``.
        copy_originals: copy the original cases instead of referencing them from ``dataset.json``.
        batch_size: ROIs per network call.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        resume: continue an interrupted run from its ``.<name>.partial`` folder.
        overwrite: replace an existing destination (only once the new one is complete).
        progress: show a progress bar over source cases.
        synthesizer: an already built :class:`~lefusion_nnunet.synthesis.LesionSynthesizer` to use instead of
            loading ``checkpoint`` (``batch_size``/``device``/sampler settings are then its own).

    Returns:
        :class:`EnlargeSummary`.

    Raises:
        LeFusionInputError: unknown source, destination id clash, existing destination, incompatible
            checkpoint, no source cases, or an interrupted run with other settings.
    """
    if cases_from not in CASES_FROM:
        raise LeFusionInputError(f"--cases-from {cases_from!r} is not one of {', '.join(CASES_FROM)}.")
    raw_root = env_folder("nnUNet_raw", must_exist=True)
    src = load_raw_dataset(source, raw_root)
    dst = _check_destination(derived_dataset_name(destination, src.name), src, raw_root, overwrite)
    own_device = resolve_device(device) if synthesizer is None else str(getattr(synthesizer, "device", "cpu"))
    ctx, device = init_distributed(own_device, timeout_minutes=SHARD_TIMEOUT_MINUTES)
    synth = (synthesizer if synthesizer is not None
             else _build_synthesizer(src, checkpoint, settings, batch_size, device))
    job = _validate(src, dst, synth, settings, cases_from, copy_originals)
    partial = dst.with_name(f".{dst.name}.partial")
    journal = _prepare_journal(job, partial, resume) if ctx.is_main else None  # rank 0 alone prepares the folder
    with raw_dataset_folder(dst, overwrite=overwrite, keep_partial=True) if ctx.is_main else _existing(partial) as tmp:
        if ctx.is_main:
            write_merged_journal(tmp, journal)        # rank journals of a resumed run were merged by load_journal
        journal = ctx.broadcast_from_main(journal)  # also: the partial folder exists for every rank from here
        resumed = len(journal["completed"])
        journal, t_synth, n_made = _write_shard(job, ctx, tmp, journal, progress)
        if not ctx.is_main:  # rank 0 assembles the dataset and moves it into place
            summary = ctx.broadcast_from_main(None)
            ctx.shutdown()
            return summary
        notes, all_warnings, synthetic = _finish(job, tmp, journal, merge=ctx.active)
    skipped = Counter(w["reason"] for w in all_warnings if w["skipped"])
    warned = Counter(w["reason"] for w in all_warnings if not w["skipped"])
    summary = EnlargeSummary(destination=dst, source=src.name, source_cases=len(job.case_ids),
                             cases_written=len(synthetic), originals=len(src.cases), skipped=dict(skipped),
                             warnings=dict(warned), seconds_per_lesion=(t_synth / n_made) if n_made else None,
                             resumed_cases=resumed, copied_originals=copy_originals, notes=notes)
    log.debug("%s", summary.format())  # the CLI prints it
    ctx.broadcast_from_main(summary)
    ctx.shutdown()
    return summary


@dataclass
class _Job:
    """What validation settled for one enlargement run (before anything is written)."""

    src: RawDataset
    dst: Path
    synth: "LesionSynthesizer"
    settings: VariantSettings
    cases_from: str
    copy_originals: bool
    case_ids: list[str]
    key: dict

    @property
    def channel(self) -> int:
        return int(self.synth.checkpoint.data.channel)


def _validate(src: RawDataset, dst: Path, synth, settings: VariantSettings, cases_from: str,
              copy_originals: bool) -> _Job:
    """Every input problem, reported before anything is written; returns the run's plan."""
    data = synth.checkpoint.data
    case_ids = validate_variant_inputs(
        src, data, settings, cases=[c.case_id for c in src.cases] if cases_from == "all" else None,
        lesion_free_hint="use --cases-from all or add cases without lesions")
    clash = sorted({synthetic_case_id(c, k) for c in case_ids for k in range(settings.per_case)}
                   & {c.case_id for c in src.cases})
    if clash:
        raise LeFusionInputError(f"synthetic case id {clash[0]} already names a case of {src.name}; rename that case.")
    key = journal_key(src, settings, getattr(synth.checkpoint, "file_sha256", None), cases_from, case_ids,
                      copy_originals)
    return _Job(src, dst, synth, settings, cases_from, copy_originals, case_ids, key)


# --------------------------------------------------------------------------------------------------------
# shard
def _prepare_journal(job: _Job, partial: Path, resume: bool) -> dict:
    """Rank 0: the journal of a resumed run (its stray files removed), or a new one in a clean partial folder."""
    n_channels, ending = len(job.src.channel_names), job.src.file_ending
    journal = None
    if resume and partial.is_dir():
        journal = load_journal(partial, job.key, n_channels, ending)
        remove_unjournaled_files(partial, journal, n_channels, ending)
    elif partial.exists():
        shutil.rmtree(partial)
    return journal if journal is not None else new_journal(job.key)


def _write_shard(job: _Job, ctx, tmp: Path, journal: dict, progress: bool) -> tuple[dict, float, int]:
    """This rank's chunks of source cases: synthesise, write, journal. Rank 0 gets every rank's journal merged;
    returns (journal, synthesis seconds, variants made)."""
    journal_name = rank_journal_name(ctx.rank)
    chunks = variant_chunks(job.case_ids, job.settings.per_case, job.synth.batch_size)
    others = {c for i, chunk in enumerate(chunks) if i % ctx.world_size != ctx.rank for c in chunk}
    done = set(journal["completed"]) | others  # cases this rank does not (re)make
    bar = tqdm(total=len(job.case_ids) - len(others), initial=len(done - others), unit="case",
               desc=f"enlarging {job.src.name}" + (f" (rank {ctx.rank}/{ctx.world_size})" if ctx.active else ""),
               disable=not progress or not ctx.is_main)
    t_synth, n_made = 0.0, 0
    try:
        gen = make_variants(job.synth, job.src, job.case_ids, job.settings, progress=False, done=done)
        for chunk in chunks:
            t0 = time.perf_counter()
            cases, warnings = next(gen)
            todo = [c for c in chunk if c not in done]
            if not todo:
                continue
            for case in cases:
                write_case(tmp, case, job.src, job.channel)
            t_synth += time.perf_counter() - t0
            n_made += len(cases)
            record_chunk(journal, todo, cases, warnings)
            atomic_write_json(tmp / journal_name, journal)
            done.update(todo)
            bar.update(len(todo))
    finally:
        bar.close()
    shards = ctx.gather_to_main((journal, t_synth, n_made))
    if ctx.is_main:
        for other, t_other, n_other in shards[1:]:
            merge_journals(journal, other)
            t_synth, n_made = max(t_synth, t_other), n_made + n_other  # ranks run side by side
    return journal, t_synth, n_made


# --------------------------------------------------------------------------------------------------------
# finish
def _finish(job: _Job, tmp: Path, journal: dict, merge: bool) -> tuple[list[str], list[dict], list[str]]:
    """Rank 0: originals (copied or referenced), dataset.json, grouped splits, provenance, montage.
    Returns (notes, warnings of every case, synthetic case ids)."""
    src, data = job.src, job.synth.checkpoint.data
    if merge:
        write_merged_journal(tmp, journal)
    provenance = dict(sorted(journal["provenance"].items()))
    synthetic = sorted(provenance)
    if job.copy_originals:
        for c in src.cases:
            for i, f in enumerate(c.images):
                copy_file(Path(f), tmp / "imagesTr" / f"{c.case_id}_{i:04d}{src.file_ending}")
            copy_file(Path(c.label), tmp / "labelsTr" / f"{c.case_id}{src.file_ending}")
    atomic_write_json(tmp / "dataset.json", dataset_json(src, job.dst, job.dst.name, synthetic,
                                                         len(src.channel_names), job.copy_originals))
    notes: list[str] = []
    real_ids = [str(c.case_id) for c in src.cases]
    n_folds = min(5, len(real_ids))
    if n_folds >= 2:
        splits = grouped_splits(real_ids, {s: provenance[s]["source_case"] for s in synthetic}, n_folds=n_folds)
        atomic_write_json(tmp / "splits_final.json", splits)
        if n_folds < 5:
            notes.append(f"note: only {len(real_ids)} original cases, so splits_final.json has {n_folds} folds.")
    else:
        notes.append("note: a single original case cannot be cross-validated; no splits_final.json was written.")
    all_warnings = [w for c in job.case_ids for w in journal["warnings"].get(c, [])]
    checkpoint_path = getattr(job.synth.checkpoint, "path", None)
    atomic_write_json(tmp / PROVENANCE_NAME, {
        "format": "lefusion-nnunet enlarge", "version": 1, "source_dataset": src.name,
        "destination_dataset": job.dst.name, "cases_from": job.cases_from,
        "originals": "copied" if job.copy_originals else "referenced",
        "method": getattr(job.synth, "method", "lefusion"), "settings": job.settings.to_dict(),
        "checkpoint": {"sha256": job.key["checkpoint_sha256"],
                       "file": Path(checkpoint_path).name if checkpoint_path else None,
                       "data": data.to_dict()},
        "source_cases": job.case_ids, "synthetic_cases": provenance,
        "skipped": [w["text"] for w in all_warnings if w["skipped"]],
        "warnings": [w["text"] for w in all_warnings if not w["skipped"]]})
    window = tuple(data.intensity.window) if data.intensity.kind == "window" else None
    write_montage(tmp, src, provenance, job.channel, window)
    (tmp / JOURNAL_NAME).unlink()
    return notes, all_warnings, synthetic


@contextlib.contextmanager
def _existing(folder: Path) -> Iterator[Path]:
    """The partial folder as seen by ranks other than 0 (rank 0 creates, finishes and moves it)."""
    yield folder


__all__ = ["enlarge", "EnlargeSummary", "VariantWarning"]
