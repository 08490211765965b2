"""The synthetic bank of ``LeFusionTrainer``: lesion patches of variants of lesion-free training cases.

At training start the trainer makes K synthetic variants of every lesion-free case of the current fold's
*training* split (:func:`lefusion_nnunet.variants.make_variants`, the same path as ``lefusion enlarge``).
Each variant becomes a ``swap_dataset.Patch``: the bounding box where nnU-Net's preprocessing of the variant (the
run's plans/configuration, the image cast to the source's pixel type) differs from the source case as nnU-Net
stored it (:class:`~lefusion_nnunet.integration.patch_maker.PatchMaker`). By default only the neighbourhood of
what the variant changed is preprocessed (route "crop": 1.8 s per variant at 512 x 512 x 128 on a busy 2-core
CPU); nnU-Net's ``run_case_npy`` on the whole variant (route "full", the reference: 41 s there) is the fallback
where the crop route does not apply; the manifest records each variant's route. The bank lives in::

    $nnUNet_preprocessed/<Dataset>/lefusion_bank/<configuration>_fold<F>_<hash>/
        <source>_lefusion000.npz, <source>_lefusion001.npz, ...
        bank.json        manifest: key inputs, variant -> source case, patch bbox and size, route, provenance,
                         warnings

``<hash>`` covers everything the bank's content depends on (:class:`BankSpec`, format version included, so
full-case banks of format 1 and full-route banks of format 2 are ignored): the checkpoint's SHA-256, the variant
settings, the fold, the plans + configuration + dataset.json, the lesion labels and the sorted source cases. The
next run (or ``--c``) with the same inputs reuses the bank; any change makes a new one (P, device and batch size do not enter the key).

A build happens in a ``.<key>.partial`` sibling folder renamed into place when complete (an interrupted build
leaves nothing that is ever read), under a file lock (two runs never build the same bank at once). With
DDP only rank 0 builds; the other ranks wait for the manifest.

At training time :class:`~lefusion_nnunet.integration.swap_dataset.SyntheticSwapDataset` pastes the patches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration.patch_maker import PatchMaker
from lefusion_nnunet.integration.swap_dataset import PATCH_SUFFIX, save_patch
from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
from lefusion_nnunet.utils import atomic_directory, atomic_write_json
from lefusion_nnunet.variants import make_variants as _make_variants

BANK_FOLDER = "lefusion_bank"
MANIFEST_NAME = "bank.json"
FORMAT = "lefusion-bank"
FORMAT_VERSION = 3  # 1: full preprocessed cases; 2: patches of the full route only (both ignored since)
DRAWS_LOG_NAME = "lefusion_draws.log"


# ----------------------------------------------------------------------------------------------- key

def canonical_sha256(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(_json_safe(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json_safe(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples, paths and dataclass-like configs."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _json_safe(obj.to_dict())
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


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
             "variants": _json_safe(self.variants), "fold": self.fold, "configuration": self.configuration,
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
        """The bank in ``folder``, or None if it is missing, incomplete or for another key."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            return None
        if key is not None and manifest.get("key") != key:
            return None
        by_source: dict[str, list[str]] = {}
        for vid, entry in sorted(manifest.get("variants", {}).items()):
            if not (folder / f"{vid}{PATCH_SUFFIX}").is_file():
                return None
            by_source.setdefault(entry["source_case"], []).append(vid)
        return cls(folder=folder, key=manifest["key"], variants_by_source=by_source, manifest=manifest,
                   build_seconds=float(manifest.get("build_seconds", 0.0)))


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


BuildFn = Callable[[Path], tuple[dict, list[str]]]


def _load_or_build(spec: BankSpec, root: Path, build: BuildFn, log: Callable[[str], None]) -> SyntheticBank:
    key = spec.key
    final = root / key
    with _file_lock(root / f".{key}.lock"):
        bank = SyntheticBank.load(final, key)
        if bank is not None:
            return bank
        shutil.rmtree(root / f".{key}.partial", ignore_errors=True)  # left by a killed build
        start = time.perf_counter()
        with atomic_directory(final, overwrite=True) as partial:
            variants, warnings = build(partial)
            seconds = time.perf_counter() - start
            atomic_write_json(partial / MANIFEST_NAME, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "spec": spec.to_dict(),
                "variants": _json_safe(variants), "warnings": list(warnings), "build_seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        bank = SyntheticBank.load(final, key)
        if bank is None:  # pragma: no cover - would be a bug in the build
            raise RuntimeError(f"the LeFusion bank {final} was written but cannot be read back")
        bank.built = True
        return bank


def ensure_bank(spec: BankSpec, root: Path | str, build: BuildFn, *, rank: int = 0,
                barrier: Callable[[], None] | None = None, log: Callable[[str], None] = print,
                poll_seconds: float = 2.0) -> SyntheticBank:
    """The bank for ``spec`` under ``root``: reused when complete, else built by ``build(partial_folder)``.

    ``build`` writes the preprocessed variants into the folder it gets and returns
    ``({variant_id: {"source_case": ..., "provenance": {...}}}, warnings)``. With DDP pass ``rank`` and
    ``barrier`` (``torch.distributed.barrier``): rank 0 builds, the others poll for the finished manifest
    (no collective timeout however long the build takes) or for rank 0's failure marker.
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
            bank = _load_or_build(spec, root, build, log)
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


def make_variants(synth, raw_dataset, case_ids: list[str], settings):
    """:func:`lefusion_nnunet.variants.make_variants` (a seam tests replace)."""
    return _make_variants(synth, raw_dataset, case_ids, settings)


def build_bank_contents(out_dir: Path, *, synthesizer_factory: Callable[[], Any], raw_dataset, case_ids: list[str],
                        variant_settings, plans_manager, configuration_manager, dataset_json: dict,
                        dataset_class, preprocessed_folder: Path | str | None = None,
                        log: Callable[[str], None] = print, crop_route: bool = True,
                        progress: Callable[[int], None] | None = None) -> tuple[dict, list[str]]:
    """Make the variants of ``case_ids`` and save each one's patch into ``out_dir``; returns (variants, warnings).

    ``preprocessed_folder`` holds the source cases as nnU-Net stored them (default: the configuration's folder
    under ``$nnUNet_preprocessed``); ``dataset_class`` is the nnU-Net dataset class that reads them. Each
    variant's entry records its ``route`` ("crop" or "full", :mod:`~lefusion_nnunet.integration.patch_maker`;
    ``crop_route=False`` forces "full") and, for "full", ``route_reason``. ``progress`` is called after each
    source case with the number of its variants handled (stored or skipped).
    """
    if preprocessed_folder is None:
        from nnunetv2.paths import nnUNet_preprocessed

        preprocessed_folder = Path(nnUNet_preprocessed) / plans_manager.dataset_name / \
            configuration_manager.data_identifier
    maker = PatchMaker(raw_dataset, plans_manager, configuration_manager, dataset_json,
                       dataset_class(str(preprocessed_folder), list(case_ids)), crop_route=crop_route)
    synth = synthesizer_factory()
    variants: dict[str, dict] = {}
    warnings: list[str] = []
    done_sources: set[str] = set()
    routes: dict[str, int] = {}
    seconds = 0.0
    try:
        for cases, chunk_warnings in make_variants(synth, raw_dataset, list(case_ids), variant_settings):
            warnings.extend(str(w) for w in chunk_warnings)
            for case in cases:
                if case.source_case not in case_ids:
                    raise RuntimeError(f"make_variants returned a variant of {case.source_case}, which was "
                                       f"not requested")
                start = time.perf_counter()
                result = maker(case)
                if result.patch is None:
                    warnings.append(str(result.warning))
                    continue
                size = save_patch(out_dir / f"{case.case_id}{PATCH_SUFFIX}", result.patch)
                seconds += time.perf_counter() - start
                routes[result.route] = routes.get(result.route, 0) + 1
                variants[case.case_id] = {"source_case": case.source_case, "bbox": result.patch.bbox.tolist(),
                                          "patch_bytes": size, "route": result.route,
                                          "provenance": _json_safe(getattr(case, "provenance", {}))}
                if result.reason is not None:
                    variants[case.case_id]["route_reason"] = result.reason
                done_sources.add(case.source_case)
            if progress is not None:
                progress(len(cases))
            log(f"LeFusion bank: {len(variants)} synthetic cases from {len(done_sources)} of "
                f"{len(case_ids)} lesion-free training cases"
                + (f" ({seconds / len(variants):.2f} s preprocessing per variant; routes "
                   f"{', '.join(f'{k} {v}' for k, v in sorted(routes.items()))})" if variants else ""))
    finally:
        del synth
    return variants, warnings
