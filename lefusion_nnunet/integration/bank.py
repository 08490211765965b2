"""The synthetic bank of ``LeFusionTrainer``: lesion patches of variants of lesion-free training cases.

At training start the trainer makes K synthetic variants of every lesion-free case of the current fold's
*training* split (:func:`lefusion_nnunet.variants.make_variants`, the same path as ``lefusion enlarge``).
Each native variant is preprocessed in memory by nnU-Net's own preprocessor of the run's plans/configuration
(``run_case_npy`` on the image cast to the source's pixel type, with the plans' reader's properties: the
numbers of writing the variant to files and running ``run_case``), compared with the source case as nnU-Net
stored it, and only the bounding box of what differs is kept (a ``swap_dataset.Patch``). The bank lives in::

    $nnUNet_preprocessed/<Dataset>/lefusion_bank/<configuration>_fold<F>_<hash>/
        <source>_lefusion000.npz, <source>_lefusion001.npz, ...
        bank.json        manifest: key inputs, variant -> source case, patch bbox and size, provenance, warnings

``<hash>`` covers everything the bank's content depends on (:class:`BankSpec`, format version included, so
full-case banks of format 1 are ignored): the checkpoint's SHA-256, the variant settings, the fold, the plans +
configuration + dataset.json, the lesion labels and the sorted source cases. The next run (or ``--c``) with the
same inputs reuses the bank; any change makes a new one (P, device and batch size do not enter the key).

A build happens in a ``.<key>.partial`` sibling folder renamed into place when complete (an interrupted build
leaves nothing that is ever read), under a file lock (two runs never build the same bank at once). With
DDP only rank 0 builds; the other ranks wait for the manifest.

At training time :class:`~lefusion_nnunet.integration.swap_dataset.SyntheticSwapDataset` pastes the patches.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lefusion_nnunet.data.io import _to_dtype, read_image, read_label
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration.swap_dataset import PATCH_SUFFIX, Patch, difference_patch, save_patch
from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
from lefusion_nnunet.utils import atomic_directory, atomic_write_json
from lefusion_nnunet.variants import make_variants as _make_variants

BANK_FOLDER = "lefusion_bank"
MANIFEST_NAME = "bank.json"
FORMAT = "lefusion-bank"
FORMAT_VERSION = 2  # 1: full preprocessed cases (ignored since)
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

    Reads ``class_locations`` from nnU-Net's per-case ``.pkl``: nnU-Net stores at least one location for
    every label present in the preprocessed segmentation.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    folder = Path(preprocessed_folder)
    free = []
    for case in sorted(case_ids):
        pkl = folder / f"{case}.pkl"
        if not pkl.is_file():
            raise LeFusionInputError(f"{pkl} is missing; rerun nnUNetv2_plan_and_preprocess for this dataset.")
        locations = load_pickle(str(pkl)).get("class_locations") or {}
        present = False
        for label in lesion_labels:
            if label not in locations:
                raise LeFusionInputError(f"label {label} of the LeFusion checkpoint is not a label of the "
                                         f"preprocessed dataset ({pkl}); use a checkpoint trained on this "
                                         f"dataset's labels.")
            present = present or len(locations[label]) > 0
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


def _label_dtype(label: np.ndarray, properties: dict) -> str:
    """The pixel type :func:`lefusion_nnunet.data.io.write_label` would write ``label`` with."""
    dtype = properties.get("source_dtype") or ("uint8" if int(np.max(label)) < 256 else "uint16")
    if np.dtype(dtype).kind == "f":
        dtype = "uint8" if int(np.max(label)) < 256 else "uint16"
    return dtype


class _PatchMaker:
    """nnU-Net's preprocessing of one synthetic case in memory, reduced to the patch where it differs from the
    source's stored preprocessed case.

    The native variant is cast exactly as the NIfTI writer would store it (source pixel type, then read back
    as float32), given the plans' reader's properties of the source files and run through the configuration's
    preprocessor (``run_case_npy``): the same numbers as writing the variant to files and running
    ``run_case`` on them, without the files. The full case is resampled; only the difference is kept.
    """

    def __init__(self, raw_dataset, plans_manager, configuration_manager, dataset_json: dict, source_dataset):
        self.raw, self.plans_manager, self.configuration_manager = raw_dataset, plans_manager, configuration_manager
        self.dataset_json, self.source_dataset = dataset_json, source_dataset
        self.preprocessor = configuration_manager.preprocessor_class(verbose=False)
        self._source: dict = {}

    def source(self, case) -> dict:
        """The source case: the plans' reader's properties of its files ('spacing', 'sitk_stuff', ...), the
        stored pixel types, and its preprocessed ``data`` (C, Z, Y, X) / ``seg`` (1, Z, Y, X) as nnU-Net stored it."""
        if self._source.get("case_id") == case.source_case:
            return self._source
        files = self.raw.case(case.source_case)
        if files.label is None:
            raise LeFusionInputError(f"case {case.source_case} of {self.raw.folder} has no label file; every "
                                     f"training case needs one.")
        image, label_props = getattr(case, "reference", None), getattr(case, "label_properties", None)
        if image is None or label_props is None:
            image = read_image(files.images)
            label_props = read_label(files.label)[1]
        array, props = self.plans_manager.image_reader_writer_class().read_images([str(f) for f in files.images])
        if array.shape != image.array.shape or not np.array_equal(array, image.array):
            raise LeFusionInputError(f"the plans' image reader reads {files.images[0]} differently from "
                                     f"LeFusion's reader; plan this dataset with nnU-Net's default SimpleITKIO.")
        data, seg, _, stored_props = self.source_dataset.load_case(case.source_case)
        self._source = dict(case_id=case.source_case, properties=props, dtypes=list(image.source_dtypes),
                            label_properties=label_props, data=np.asarray(data[:], np.float32),
                            seg=np.asarray(seg[:]).astype(np.int16, copy=False),
                            crop_bbox=_json_safe(stored_props.get("bbox_used_for_cropping")))
        return self._source

    def __call__(self, case) -> tuple["Patch | None", str | None]:
        """The patch of ``case`` (None with a reason when the variant cannot be stored as one)."""
        src = self.source(case)
        data = np.stack([_to_dtype(np.asarray(ch), dt).astype(np.float32) for ch, dt in
                         zip(case.channels, src["dtypes"])])
        label = np.asarray(case.label)
        seg = _to_dtype(label, _label_dtype(label, src["label_properties"])).astype(np.float32)[None]
        pdata, pseg, props = self.preprocessor.run_case_npy(data, seg, copy.deepcopy(src["properties"]),
                                                            self.plans_manager, self.configuration_manager,
                                                            self.dataset_json)
        pdata, pseg = pdata.astype(np.float32, copy=False), pseg.astype(np.int16, copy=False)
        if pdata.shape != src["data"].shape or pseg.shape != src["seg"].shape or \
                _json_safe(props.get("bbox_used_for_cropping")) != src["crop_bbox"]:
            return None, (f"{case.case_id}: skipped, the variant changes nnU-Net's crop to the nonzero region of "
                          f"{case.source_case}")
        patch = difference_patch(pdata, pseg, props["class_locations"], src["data"], src["seg"])
        if patch is None:
            return None, f"{case.case_id}: skipped, identical to {case.source_case} after preprocessing"
        return patch, None


def build_bank_contents(out_dir: Path, *, synthesizer_factory: Callable[[], Any], raw_dataset, case_ids: list[str],
                        variant_settings, plans_manager, configuration_manager, dataset_json: dict,
                        dataset_class, preprocessed_folder: Path | str | None = None,
                        log: Callable[[str], None] = print) -> tuple[dict, list[str]]:
    """Make the variants of ``case_ids`` and save each one's patch into ``out_dir``; returns (variants, warnings).

    ``preprocessed_folder`` holds the source cases as nnU-Net stored them (default: the configuration's folder
    under ``$nnUNet_preprocessed``); ``dataset_class`` is the nnU-Net dataset class that reads them.
    """
    if preprocessed_folder is None:
        from nnunetv2.paths import nnUNet_preprocessed

        preprocessed_folder = Path(nnUNet_preprocessed) / plans_manager.dataset_name / \
            configuration_manager.data_identifier
    maker = _PatchMaker(raw_dataset, plans_manager, configuration_manager, dataset_json,
                        dataset_class(str(preprocessed_folder), list(case_ids)))
    synth = synthesizer_factory()
    variants: dict[str, dict] = {}
    warnings: list[str] = []
    done_sources: set[str] = set()
    seconds = 0.0
    try:
        for cases, chunk_warnings in make_variants(synth, raw_dataset, list(case_ids), variant_settings):
            warnings.extend(str(w) for w in chunk_warnings)
            for case in cases:
                if case.source_case not in case_ids:
                    raise RuntimeError(f"make_variants returned a variant of {case.source_case}, which was "
                                       f"not requested")
                start = time.perf_counter()
                patch, problem = maker(case)
                if patch is None:
                    warnings.append(str(problem))
                    continue
                size = save_patch(out_dir / f"{case.case_id}{PATCH_SUFFIX}", patch)
                seconds += time.perf_counter() - start
                variants[case.case_id] = {"source_case": case.source_case, "bbox": patch.bbox.tolist(),
                                          "patch_bytes": size,
                                          "provenance": _json_safe(getattr(case, "provenance", {}))}
                done_sources.add(case.source_case)
            log(f"LeFusion bank: {len(variants)} synthetic cases from {len(done_sources)} of "
                f"{len(case_ids)} lesion-free training cases"
                + (f" ({seconds / len(variants):.2f} s preprocessing per variant)" if variants else ""))
    finally:
        del synth
    return variants, warnings
