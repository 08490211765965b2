"""The synthetic bank of ``LeFusionTrainer``: lesion patches of variants of lesion-free training cases.

The trainer makes K synthetic variants of every lesion-free case of the current fold's *training* split
(:func:`lefusion_nnunet.variants.make_variants`, the same path as ``lefusion enlarge``). Each variant becomes a
``swap_dataset.Patch``: the bounding box where nnU-Net's preprocessing of the variant (the run's
plans/configuration, the image cast to the source's pixel type) differs from the source case as nnU-Net stored it
(:class:`~lefusion_nnunet.integration.patch_maker.PatchMaker`). By default only the neighbourhood of what the
variant changed is preprocessed (route "crop": about 0.23 s per variant at 512 x 512 x 128 on a 2-core CPU);
nnU-Net's ``run_case_npy`` on the whole variant (route "full", the reference: 41 s there) is the fallback where
the crop route does not apply; the manifest records each variant's route. The bank lives in
``$nnUNet_preprocessed/<Dataset>/lefusion_bank/<configuration>_fold<F>_<hash>/`` (files:
:mod:`~lefusion_nnunet.integration.bank_store`).

``<hash>`` covers everything the bank's content depends on (:class:`BankSpec`, format version included, so banks
of older formats are ignored): the checkpoint's SHA-256, the variant settings, the fold, the plans + configuration
+ dataset.json, the lesion labels and the sorted source cases. The next run (or ``--c``) with the same inputs
reuses the bank; any change makes a new one (P, device, batch size and the bank-build mode do not enter the key).

A build writes in place, under the bank's lock: each patch atomically, a per-source record once a source's
variants are all stored, the manifest last. A killed build is continued by the next one (finished sources are
kept and not made again; variant k of case c depends only on the seed, c and k, so the result equals an
uninterrupted build). :func:`ensure_bank` builds before returning (with DDP only rank 0 builds, the other ranks
wait for the manifest); :mod:`~lefusion_nnunet.integration.bank_build` builds in a background thread while
training reads the growing bank.

At training time :class:`~lefusion_nnunet.integration.swap_dataset.SyntheticSwapDataset` pastes the patches.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration.bank_store import (BANK_FOLDER, DRAWS_LOG_NAME, FORMAT, FORMAT_VERSION, MANIFEST_NAME,
                                                    BankLock, SyntheticBank, json_safe, patch_path, prepare_resume,
                                                    read_records, write_manifest, write_record)
from lefusion_nnunet.integration.patch_maker import PatchMaker
from lefusion_nnunet.integration.swap_dataset import save_patch
from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
from lefusion_nnunet.variants import make_variants as _make_variants

__all__ = ["BankSpec", "BuildFn", "SyntheticBank", "BANK_FOLDER", "MANIFEST_NAME", "DRAWS_LOG_NAME", "FORMAT",
           "FORMAT_VERSION", "canonical_sha256", "plans_sha256", "lesion_free_cases", "lock_path", "build_locked",
           "ensure_bank", "make_synthesizer", "make_variants", "build_bank_contents"]


# ----------------------------------------------------------------------------------------------- key

def canonical_sha256(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()



@dataclass(frozen=True)
class BankSpec:
    """Everything a bank's content depends on; its hash names the bank folder."""

    checkpoint_sha256: str
    variants: dict
    fold: str
    configuration: str
    plans_name: str
    data_identifier: str
    plans_sha256: str
    lesion_labels: tuple[int, ...]
    case_ids: tuple[str, ...]
    mask_checkpoint_sha256: str | None = None  # the mask model's, for mask_source "diffusion"

    def to_dict(self) -> dict:
        d = {"format_version": FORMAT_VERSION, "checkpoint_sha256": self.checkpoint_sha256,
             "variants": json_safe(self.variants), "fold": self.fold, "configuration": self.configuration,
             "plans_name": self.plans_name, "data_identifier": self.data_identifier,
             "plans_sha256": self.plans_sha256, "lesion_labels": list(self.lesion_labels),
             "case_ids": sorted(self.case_ids)}
        if self.mask_checkpoint_sha256 is not None:  # (absent otherwise: banks of other mask sources keep their key)
            d["mask_checkpoint_sha256"] = self.mask_checkpoint_sha256
        return d

    @property
    def key(self) -> str:
        safe_cfg = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in self.configuration)
        return f"{safe_cfg}_fold{self.fold}_{canonical_sha256(self.to_dict())[:16]}"


def plans_sha256(plans: dict, configuration: str, dataset_json: dict) -> str:
    """Hash of what nnU-Net's preprocessing of ``configuration`` depends on."""
    return canonical_sha256({"plans": plans, "configuration": configuration, "dataset_json": dataset_json})


# ----------------------------------------------------------------------------------------------- cases


def lesion_free_cases(preprocessed_folder: Path | str, case_ids: Iterable[str],
                      lesion_labels: Sequence[int]) -> list[str]:
    """The cases of ``case_ids`` without a voxel of any of ``lesion_labels`` (sorted).

    Reads ``class_locations`` from nnU-Net's per-case ``.pkl`` (at least one location per label present).
    Region-based datasets key it by region (``(1, 2)``, ``(2,)`` or ``2``): a region that is exactly the label
    decides; a label found only in larger regions with locations is looked up in the stored segmentation.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder, free = Path(preprocessed_folder), []
    for case in sorted(case_ids):
        pkl = folder / f"{case}.pkl"
        if not pkl.is_file():
            raise LeFusionInputError(f"{pkl} is missing; rerun nnUNetv2_plan_and_preprocess for this dataset.")
        locations, present = load_pickle(str(pkl)).get("class_locations") or {}, False
        for label in map(int, lesion_labels):
            keys = [k for k in locations if (label in k if isinstance(k, tuple) else int(k) == label)]
            if not keys:
                raise LeFusionInputError(f"label {label} of the LeFusion checkpoint is not a label of the "
                                         f"preprocessed dataset ({pkl}); use a checkpoint trained on this "
                                         f"dataset's labels.")
            exact = [k for k in keys if not isinstance(k, tuple) or set(k) == {label}]
            if exact or present or not any(len(locations[k]) for k in keys):
                present = present or any(len(locations[k]) > 0 for k in exact)
            else:  # only larger regions hold the label: read the segmentation
                seg = infer_dataset_class(str(folder))(str(folder), [case]).load_case(case)[1]
                present = bool(np.any(np.asarray(seg[:]) == label))
        if not present:
            free.append(case)
    return free


# ----------------------------------------------------------------------------------------------- bank

BuildFn = Callable[[Path], tuple[dict, list[str]]]
"""``build(folder)`` writes a bank's patches and records into ``folder`` (continuing the sources recorded there) and
returns ``({variant_id: entry}, warnings)`` of all its sources (:func:`build_bank_contents`)."""


def lock_path(root: Path | str, key: str) -> Path:
    """The lock file of bank ``key`` under ``root``."""
    return Path(root) / f".{key}.lock"


def build_locked(spec: BankSpec, root: Path | str, build: BuildFn, log: Callable[[str], None]) -> SyntheticBank:
    """The complete bank of ``spec`` under ``root``: loaded if complete, else built (continued) in place by
    ``build`` and its manifest written last. The caller holds the bank's :class:`BankLock`."""
    folder = Path(root) / spec.key
    bank = SyntheticBank.load(folder, spec.key)
    if bank is not None:
        return bank
    kept = prepare_resume(folder)
    if kept:
        log(f"LeFusion bank: continuing an interrupted build in {folder} ({len(kept)} of {len(spec.case_ids)} "
            f"source cases done)")
    start = time.perf_counter()
    variants, warnings = build(folder)
    write_manifest(folder, spec.key, spec.to_dict(), variants, warnings, time.perf_counter() - start)
    bank = SyntheticBank.load(folder, spec.key)
    if bank is None:  # pragma: no cover - would be a bug in the build
        raise RuntimeError(f"the LeFusion bank {folder} was written but cannot be read back")
    bank.built = True
    return bank


def ensure_bank(spec: BankSpec, root: Path | str, build: BuildFn, *, rank: int = 0,
                barrier: Callable[[], None] | None = None, log: Callable[[str], None] = print,
                poll_seconds: float = 2.0) -> SyntheticBank:
    """The bank for ``spec`` under ``root``, complete when this returns: reused, or built by ``build(folder)``.

    Waits for the bank's lock (another process building it finishes first; its bank is then reused). With DDP
    pass ``rank`` and ``barrier`` (``torch.distributed.barrier``): rank 0 builds, the others poll for the
    finished manifest (no collective timeout however long the build takes) or for rank 0's failure marker.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    failed = root / f".{spec.key}.failed"
    if rank == 0:
        failed.unlink(missing_ok=True)
    if barrier is not None:
        barrier()
    if rank == 0:
        try:
            with BankLock.acquire(lock_path(root, spec.key)):  # type: ignore[union-attr]  (blocking: never None)
                bank = build_locked(spec, root, build, log)
        except BaseException as exc:
            if barrier is not None:
                failed.write_text(f"{type(exc).__name__}: {exc}\n")
            raise
    else:
        while True:
            bank = SyntheticBank.load(root / spec.key, spec.key)
            if bank is not None:
                break
            if failed.exists():
                raise RuntimeError(f"rank 0 failed to build the LeFusion bank {root / spec.key}: "
                                   f"{failed.read_text().strip()}")
            time.sleep(poll_seconds)
    if barrier is not None:
        barrier()
    return bank


# ----------------------------------------------------------------------------------------------- build

def make_synthesizer(checkpoint: Path | str, variants: Any, device: str, batch_size: int):
    """The lesion synthesizer for the bank: checkpoint defaults, overridden by ``variants.sampler``."""
    return LesionSynthesizer.from_checkpoint(checkpoint, device, getattr(variants, "sampler", None),
                                             getattr(variants, "guidance_scale", 1.0), batch_size)


def make_variants(synth, raw_dataset, case_ids: list[str], settings, done: Collection[str] = ()):
    """:func:`lefusion_nnunet.variants.make_variants` (a seam tests replace); cases in ``done`` are skipped."""
    return _make_variants(synth, raw_dataset, case_ids, settings, done=done)


def _warning_source(warning: str, sources: Sequence[str]) -> str | None:
    """The source case a warning is about: its ``case_id`` (``VariantWarning``), else the longest source id the
    text starts with."""
    case = getattr(warning, "case_id", None)
    if case in sources:
        return case
    matches = [s for s in sources if str(warning).startswith(s)]
    return max(matches, key=len) if matches else None


class _SourceRecords:
    """Per-source entries and warnings of one build, each source's record written once its variants are stored."""

    def __init__(self, folder: Path, case_ids: Sequence[str], kept: dict[str, dict]):
        self.folder, self.case_ids = folder, list(case_ids)
        self.records = {s: kept[s] for s in self.case_ids if s in kept}
        self.open: dict[str, dict] = {}
        self.pending: list[str] = []  # warnings of no known source: go with the next record written

    def add_warning(self, warning: str) -> None:
        source = _warning_source(warning, self.case_ids)
        if source is None:
            self.pending.append(str(warning))
        else:
            self._open(source)["warnings"].append(str(warning))

    def add_variant(self, source: str, variant_id: str, entry: dict) -> None:
        self._open(source)["variants"][variant_id] = entry

    def _open(self, source: str) -> dict:
        return self.open.setdefault(source, {"variants": {}, "warnings": []})

    def close(self, sources: Iterable[str]) -> None:
        """Write the records of ``sources`` (every variant of each is stored)."""
        for source in sources:
            record = self.open.pop(source, None) or {"variants": {}, "warnings": []}
            record["warnings"] = self.pending + record["warnings"]
            self.pending = []
            write_record(self.folder, source, record["variants"], record["warnings"])
            self.records[source] = record

    def contents(self) -> tuple[dict, list[str]]:
        """All variants and warnings, in source order (the same for a continued and an uninterrupted build)."""
        variants: dict[str, dict] = {}
        warnings: list[str] = []
        for source in self.case_ids:
            record = self.records.get(source, {"variants": {}, "warnings": []})
            variants.update(record["variants"])
            warnings.extend(record["warnings"])
        return variants, warnings + self.pending


def build_bank_contents(out_dir: Path, *, synthesizer_factory: Callable[[], Any], raw_dataset, case_ids: list[str],
                        variant_settings, plans_manager, configuration_manager, dataset_json: dict,
                        dataset_class, preprocessed_folder: Path | str | None = None,
                        log: Callable[[str], None] = print, crop_route: bool = True,
                        progress: Callable[..., None] | None = None) -> tuple[dict, list[str]]:
    """Make the variants of ``case_ids`` into the bank folder ``out_dir``; returns (variants, warnings).

    Each variant's patch is saved atomically; once all variants of a source case are stored its record
    (``cases/<source>.json``) is written. Sources already recorded in ``out_dir`` (a killed build's) are kept and
    not made again. ``preprocessed_folder`` holds the source cases as nnU-Net stored them (default: the
    configuration's folder under ``$nnUNet_preprocessed``); ``dataset_class`` is the nnU-Net dataset class that
    reads them. Each variant's entry records its ``route`` ("crop" or "full",
    :mod:`~lefusion_nnunet.integration.patch_maker`; ``crop_route=False`` forces "full") and, for "full",
    ``route_reason``. ``progress(n)`` is called after each chunk of source cases with the number of its variants
    handled (stored or skipped), and first ``progress(n, kept=True)`` with the variants kept from a killed build.
    """
    if preprocessed_folder is None:
        from nnunetv2.paths import nnUNet_preprocessed

        preprocessed_folder = Path(nnUNet_preprocessed) / plans_manager.dataset_name / \
            configuration_manager.data_identifier
    out_dir, case_ids = Path(out_dir), list(case_ids)
    kept = {s: r for s, r in read_records(out_dir).items() if s in case_ids}
    records = _SourceRecords(out_dir, case_ids, kept)
    if kept and progress is not None:
        progress(sum(len(r["variants"]) for r in kept.values()), kept=True)
    maker = PatchMaker(raw_dataset, plans_manager, configuration_manager, dataset_json,
                       dataset_class(str(preprocessed_folder), case_ids), crop_route=crop_route)
    synth = synthesizer_factory()
    routes: dict[str, int] = {}
    made, seconds = 0, 0.0
    try:
        for cases, chunk_warnings in make_variants(synth, raw_dataset, case_ids, variant_settings, done=set(kept)):
            for warning in chunk_warnings:
                records.add_warning(warning)
            sources: list[str] = []
            for case in cases:
                if case.source_case not in case_ids or case.source_case in records.records:
                    raise RuntimeError(f"make_variants returned a variant of {case.source_case}, which was "
                                       f"not requested or is already complete")
                if case.source_case not in sources:
                    sources.append(case.source_case)
                start = time.perf_counter()
                result = maker(case)
                if result.patch is None:
                    records.add_warning(str(result.warning))
                    continue
                size = save_patch(patch_path(out_dir, case.case_id), result.patch)
                seconds += time.perf_counter() - start
                made += 1
                routes[result.route] = routes.get(result.route, 0) + 1
                entry = {"source_case": case.source_case, "bbox": result.patch.bbox.tolist(), "patch_bytes": size,
                         "route": result.route, "provenance": json_safe(getattr(case, "provenance", {}))}
                if result.reason is not None:
                    entry["route_reason"] = result.reason
                records.add_variant(case.source_case, case.case_id, entry)
            records.close(sources + [s for s in records.open if s not in sources])
            if progress is not None:
                progress(len(cases))
            log(f"LeFusion bank: {sum(len(r['variants']) for r in records.records.values())} synthetic cases "
                f"from {len(records.records)} of {len(case_ids)} lesion-free training cases"
                + (f" ({seconds / made:.2f} s preprocessing per variant; routes "
                   f"{', '.join(f'{k} {v}' for k, v in sorted(routes.items()))})" if made else ""))
        records.close([s for s in case_ids if s not in records.records])  # sources that gave nothing at all
    finally:
        del synth
    return records.contents()
