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
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from lefusion_nnunet.data.dataset import RawDataset, env_folder, load_raw_dataset
from lefusion_nnunet.data.io import read_image, read_label, write_image_channel, write_label
from lefusion_nnunet.distributed import init_distributed
from lefusion_nnunet.enlarge_journal import (JOURNAL_NAME, journal_key, load_journal, merge_journals, new_journal,
                                             rank_journal_name, record_chunk, remove_unjournaled_files,
                                             write_merged_journal)
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.utils import _friendly_os_error, atomic_directory, atomic_write_json, resolve_device
from lefusion_nnunet.validation import check_checkpoint_fits, check_finite_voxels, validate_dataset
from lefusion_nnunet.variants import (SyntheticCase, VariantSettings, VariantWarning, make_variants,
                                      synthetic_case_id, variant_chunks)

if TYPE_CHECKING:
    from lefusion_nnunet.synthesis import LesionSynthesizer

log = logging.getLogger(__name__)

CASES_FROM = ("lesion-free", "all")
PROVENANCE_NAME = "lefusion_provenance.json"
MONTAGE_NAME = "lefusion_montage.png"
#: How long a rank waits for the slowest one of a sharded run (uneven shards on a big dataset).
SHARD_TIMEOUT_MINUTES = 24 * 60
MONTAGE_ROWS = 24
_NAME_RE = re.compile(r"Dataset(\d{3})_(\w+)")


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
        m = _NAME_RE.fullmatch(self.destination.name)
        if m:
            lines.append(f"next: nnUNetv2_plan_and_preprocess -d {int(m.group(1))} --verify_dataset_integrity")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# names
def destination_name(destination: str | int, source_name: str) -> str:
    """``502`` -> ``Dataset502_<SourceName>LeFusion``; ``Dataset502_Name`` as given."""
    text = str(destination).strip()
    if text.isdigit():
        if not 1 <= int(text) <= 999:
            raise LeFusionInputError(f"destination id {text} must be between 1 and 999.")
        m = _NAME_RE.fullmatch(source_name)
        base = m.group(2) if m else re.sub(r"\W", "", source_name)
        return f"Dataset{int(text):03d}_{base}LeFusion"
    if not _NAME_RE.fullmatch(text):
        raise LeFusionInputError(f"destination {text!r} is neither a dataset id (e.g. 502) nor a name "
                                 f"(Dataset502_Name).")
    return text


def _dataset_id(name: str) -> int | None:
    m = _NAME_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def _check_destination(dst_name: str, src: RawDataset, raw_root: Path, overwrite: bool) -> Path:
    dst_id = _dataset_id(dst_name)
    if dst_name == src.name or (dst_id is not None and dst_id == _dataset_id(src.name)):
        raise LeFusionInputError(f"destination {dst_name} has the same dataset id as the source {src.name}; "
                                 f"choose a free id, e.g. -o {(_dataset_id(src.name) or 0) + 1}.")
    roots = [raw_root] + [Path(p) for p in (os.environ.get(v) for v in ("nnUNet_preprocessed", "nnUNet_results")) if p]
    for root in roots:
        if not root.is_dir():
            continue
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(f"Dataset{dst_id:03d}_") and d.name != dst_name:
                raise LeFusionInputError(f"dataset id {dst_id} is already used by {root / d.name}; choose another "
                                         f"destination id (nnU-Net needs unique ids).")
    dst = raw_root / dst_name
    if dst.exists() and not overwrite:
        raise LeFusionInputError(f"output {dst} already exists; pass --overwrite to replace it or choose another "
                                 f"output.")
    return dst


# --------------------------------------------------------------------------------------------------------
# the synthesizer
def _build_synthesizer(src: RawDataset, checkpoint, settings: VariantSettings, batch_size: int,
                       device: str) -> "LesionSynthesizer":
    from lefusion_nnunet.paths import find_default_checkpoint
    from lefusion_nnunet.synthesis import LesionSynthesizer

    path = Path(checkpoint) if checkpoint is not None else find_default_checkpoint(src.name)
    return LesionSynthesizer.from_checkpoint(path, device, settings.sampler, settings.guidance_scale, batch_size)


# --------------------------------------------------------------------------------------------------------
# writing
def _copy_file(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _friendly_os_error(exc, dst) from exc


def _write_case(folder: Path, case: SyntheticCase, src: RawDataset, model_channel: int) -> None:
    ending = src.file_ending
    ref = case.reference
    source_files = src.case(case.source_case).images
    for i, arr in enumerate(case.channels):
        out = folder / "imagesTr" / f"{case.case_id}_{i:04d}{ending}"
        if i != model_channel:
            _copy_file(Path(source_files[i]), out)  # unchanged channel: byte copy
        else:
            write_image_channel(arr, out, ref, i)
    write_label(case.label, folder / "labelsTr" / f"{case.case_id}{ending}", case.label_properties or {})


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start)).replace(os.sep, "/")


def _dataset_json(src: RawDataset, dst: Path, dst_name: str, synthetic: list[str], n_channels: int,
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


def _montage(folder: Path, src: RawDataset, provenance: dict, model_channel: int, window) -> None:
    from lefusion_nnunet.montage import MontageRow, render_montage, row_from_volumes

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
    from tqdm.auto import tqdm

    if cases_from not in CASES_FROM:
        raise LeFusionInputError(f"--cases-from {cases_from!r} is not one of {', '.join(CASES_FROM)}.")
    raw_root = env_folder("nnUNet_raw", must_exist=True)
    src = load_raw_dataset(source, raw_root)
    dst_name = destination_name(destination, src.name)
    dst = _check_destination(dst_name, src, raw_root, overwrite)
    partial = dst.with_name(f".{dst.name}.partial")
    own_device = resolve_device(device) if synthesizer is None else str(getattr(synthesizer, "device", "cpu"))
    ctx, device = init_distributed(own_device, timeout_minutes=SHARD_TIMEOUT_MINUTES)
    synth = (synthesizer if synthesizer is not None
             else _build_synthesizer(src, checkpoint, settings, batch_size, device))
    data = synth.checkpoint.data
    channel = int(data.channel)
    check_checkpoint_fits(data, src)
    lesion_labels = [int(v) for v in data.lesion_labels]
    n_channels = len(src.channel_names)

    # every input problem is reported here, before anything is written
    region_label = None if settings.region_masks_dir else (
        settings.region_label if settings.region_label is not None else data.region_label)
    region_flag = "--region-label" if settings.region_label is not None else "the checkpoint's region label"
    check = validate_dataset(src, lesion_labels, region_label, channel, need_lesions=settings.mask_source == "real",
                             need_lesion_free=cases_from == "lesion-free", read_voxels="none",
                             region_masks_dir=settings.region_masks_dir, roi=data.roi,
                             lesion_flag="the checkpoint's lesion label", region_flag=region_flag,
                             channel_flag="the checkpoint's channel",
                             lesion_free_hint="use --cases-from all or add cases without lesions")
    case_ids = [c.case_id for c in src.cases] if cases_from == "all" else list(check.lesion_free_cases)
    case_ids = sorted(str(c) for c in case_ids)
    if region_label is not None and not any(int(region_label) in check.label_values[c] for c in case_ids):
        raise LeFusionInputError(f"{region_flag} {region_label} occurs in none of the {len(case_ids)} case(s) that "
                                 f"would receive lesions ({cases_from}); pick a label present in them, or "
                                 f"--region-masks.")
    for c in case_ids:  # the images that will be read: truncated files and NaN/Inf voxels
        for f in src.case(c).images:
            check_finite_voxels(f, "image")
    clash = sorted({synthetic_case_id(c, k) for c in case_ids for k in range(settings.per_case)}
                   & {c.case_id for c in src.cases})
    if clash:
        raise LeFusionInputError(f"synthetic case id {clash[0]} already names a case of {src.name}; rename that case.")

    key = journal_key(src, settings, getattr(synth.checkpoint, "file_sha256", None), cases_from, case_ids,
                       copy_originals)
    journal = None
    if ctx.is_main:  # a sharded run: rank 0 alone prepares the partial folder
        if resume and partial.is_dir():
            journal = load_journal(partial, key, n_channels, src.file_ending)
            remove_unjournaled_files(partial, journal, n_channels, src.file_ending)
        elif partial.exists():
            shutil.rmtree(partial)
        if journal is None:
            journal = new_journal(key)
    notes: list[str] = []
    t_synth, n_made = 0.0, 0

    with atomic_directory(dst, overwrite=overwrite, keep_partial=True) if ctx.is_main else _existing(partial) as tmp:
        if ctx.is_main:
            (tmp / "imagesTr").mkdir(exist_ok=True)
            (tmp / "labelsTr").mkdir(exist_ok=True)
            write_merged_journal(tmp, journal)        # rank journals of a resumed run were merged by load_journal
        journal = ctx.broadcast_from_main(journal)  # also: the partial folder exists for every rank from here
        resumed = len(journal["completed"])
        journal_name = rank_journal_name(ctx.rank)
        chunks = variant_chunks(case_ids, settings.per_case, synth.batch_size)
        others = {c for i, chunk in enumerate(chunks) if i % ctx.world_size != ctx.rank for c in chunk}
        done = set(journal["completed"]) | others  # cases this rank does not (re)make
        bar = tqdm(total=len(case_ids) - len(others), initial=len(done - others), unit="case",
                   desc=f"enlarging {src.name}" + (f" (rank {ctx.rank}/{ctx.world_size})" if ctx.active else ""),
                   disable=not progress or not ctx.is_main)
        try:
            gen = make_variants(synth, src, case_ids, settings, progress=False, done=done)
            for chunk in chunks:
                t0 = time.perf_counter()
                cases, warnings = next(gen)
                todo = [c for c in chunk if c not in done]
                if not todo:
                    continue
                for case in cases:
                    _write_case(tmp, case, src, channel)
                t_synth += time.perf_counter() - t0
                n_made += len(cases)
                record_chunk(journal, todo, cases, warnings)
                atomic_write_json(tmp / journal_name, journal)
                done.update(todo)
                bar.update(len(todo))
        finally:
            bar.close()
        shards = ctx.gather_to_main((journal, t_synth, n_made))
        if not ctx.is_main:  # rank 0 assembles the dataset and moves it into place
            summary = ctx.broadcast_from_main(None)
            ctx.shutdown()
            return summary
        for other, t_other, n_other in shards[1:]:
            merge_journals(journal, other)
            t_synth, n_made = max(t_synth, t_other), n_made + n_other  # ranks run side by side
        if ctx.active:
            write_merged_journal(tmp, journal)

        provenance = dict(sorted(journal["provenance"].items()))
        synthetic = sorted(provenance)
        if copy_originals:
            for c in src.cases:
                for i, f in enumerate(c.images):
                    _copy_file(Path(f), tmp / "imagesTr" / f"{c.case_id}_{i:04d}{src.file_ending}")
                _copy_file(Path(c.label), tmp / "labelsTr" / f"{c.case_id}{src.file_ending}")
        atomic_write_json(tmp / "dataset.json",
                          _dataset_json(src, dst, dst_name, synthetic, n_channels, copy_originals))
        real_ids = [str(c.case_id) for c in src.cases]
        n_folds = min(5, len(real_ids))
        if n_folds >= 2:
            from lefusion_nnunet.integration.splits import grouped_splits

            splits = grouped_splits(real_ids, {s: provenance[s]["source_case"] for s in synthetic}, n_folds=n_folds)
            atomic_write_json(tmp / "splits_final.json", splits)
            if n_folds < 5:
                notes.append(f"note: only {len(real_ids)} original cases, so splits_final.json has {n_folds} folds.")
        else:
            notes.append("note: a single original case cannot be cross-validated; no splits_final.json was written.")
        all_warnings = [w for c in case_ids for w in journal["warnings"].get(c, [])]
        checkpoint_path = getattr(synth.checkpoint, "path", None)
        atomic_write_json(tmp / PROVENANCE_NAME, {
            "format": "lefusion-nnunet enlarge", "version": 1, "source_dataset": src.name,
            "destination_dataset": dst_name, "cases_from": cases_from,
            "originals": "copied" if copy_originals else "referenced",
            "method": getattr(synth, "method", "lefusion"), "settings": settings.to_dict(),
            "checkpoint": {"sha256": key["checkpoint_sha256"],
                           "file": Path(checkpoint_path).name if checkpoint_path else None,
                           "data": data.to_dict()},
            "source_cases": case_ids, "synthetic_cases": provenance,
            "skipped": [w["text"] for w in all_warnings if w["skipped"]],
            "warnings": [w["text"] for w in all_warnings if not w["skipped"]]})
        window = tuple(data.intensity.window) if data.intensity.kind == "window" else None
        _montage(tmp, src, provenance, channel, window)
        (tmp / JOURNAL_NAME).unlink()

    skipped = Counter(w["reason"] for w in all_warnings if w["skipped"])
    warned = Counter(w["reason"] for w in all_warnings if not w["skipped"])
    summary = EnlargeSummary(destination=dst, source=src.name, source_cases=len(case_ids),
                             cases_written=len(synthetic), originals=len(src.cases), skipped=dict(skipped),
                             warnings=dict(warned), seconds_per_lesion=(t_synth / n_made) if n_made else None,
                             resumed_cases=resumed, copied_originals=copy_originals, notes=notes)
    log.debug("%s", summary.format())  # the CLI prints it
    ctx.broadcast_from_main(summary)
    ctx.shutdown()
    return summary


@contextlib.contextmanager
def _existing(folder: Path) -> Iterator[Path]:
    """The partial folder as seen by ranks other than 0 (rank 0 creates, finishes and moves it)."""
    yield folder


__all__ = ["enlarge", "EnlargeSummary", "destination_name", "VariantWarning"]
