"""Training-time use of the synthetic bank: the patch format, the dataset wrapper that swaps in variants, its log.

A variant is stored as a :class:`Patch` of its source's preprocessed case (:func:`save_patch` /
:func:`load_patch`). :class:`SyntheticSwapDataset` wraps nnU-Net's training dataset so that
``load_case(source)`` returns, with probability P, the source case as nnU-Net loads it with one of its variants'
patches pasted in (:class:`PatchedArray`: only the voxels inside the patch differ) and records each load in a
draws log; :func:`read_draws` counts what was drawn. It reads a complete bank, or one still being built
(:meth:`SyntheticSwapDataset.growing`: sources join the draw pool as their records appear).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lefusion_nnunet.integration.bank_store import (PATCH_SUFFIX, SyntheticBank, patch_path, read_manifest,
                                                    read_records, variants_by_source)
from lefusion_nnunet.utils import atomic_write_bytes

__all__ = ["SyntheticSwapDataset", "DrawStats", "read_draws", "DRAWS_LOG_HEADER", "Patch", "PatchedArray",
           "difference_patch", "save_patch", "load_patch", "merge_class_locations", "PATCH_SUFFIX"]

log = logging.getLogger(__name__)

#: First line of a draws log: the columns of every following line.
DRAWS_LOG_HEADER = "# kind (S = synthetic variant, R = real case)\tsource case\tloaded case\n"


# ----------------------------------------------------------------------------------------------- patches

@dataclass
class Patch:
    """What a variant changes in its source's preprocessed case (nnU-Net's grid, ``(C, Z, Y, X)``).

    Attributes:
        data: ``(C, dz, dy, dx)`` float32, the preprocessed variant inside ``bbox``.
        seg: ``(1, dz, dy, dx)`` int16, its segmentation inside ``bbox``.
        bbox: ``(3, 2)`` int64, ``[start, stop)`` per spatial axis (z, y, x) in the full preprocessed case.
        class_locations: nnU-Net's foreground locations (rows ``(0, z, y, x)``, full-case coordinates) of the
            variant that lie inside ``bbox``, per label (or region tuple).
    """

    data: np.ndarray
    seg: np.ndarray
    bbox: np.ndarray
    class_locations: dict

    @property
    def start(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.bbox[:, 0])  # type: ignore[return-value]


def _inside(locations: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    xyz = locations[:, 1:]
    return np.all((xyz >= bbox[:, 0]) & (xyz < bbox[:, 1]), axis=1)


def _as_locations(value) -> np.ndarray:
    return np.asarray(value, np.int64).reshape(-1, 4)


def difference_patch(data: np.ndarray, seg: np.ndarray, class_locations: dict, source_data: np.ndarray,
                     source_seg: np.ndarray) -> Patch | None:
    """The bounding box of every voxel where the preprocessed variant (``data``, ``seg``, ``class_locations``)
    differs from the source's preprocessed case, with the variant's values there; None if nothing differs."""
    changed = (data != source_data).any(0) | (seg != source_seg).any(0)
    if not changed.any():
        return None
    where = np.argwhere(changed)
    bbox = np.stack([where.min(0), where.max(0) + 1], axis=1).astype(np.int64)
    inner = (slice(None), *(slice(int(a), int(b)) for a, b in bbox))
    locations = {}
    for key, value in class_locations.items():
        loc = _as_locations(value)
        locations[key] = loc[_inside(loc, bbox)]
    return Patch(np.ascontiguousarray(data[inner]), np.ascontiguousarray(seg[inner]), bbox, locations)


def save_patch(path: Path | str, patch: Patch) -> int:
    """Write ``patch`` as one compressed ``.npz``, atomically (a reader never sees part of it); returns its size
    in bytes."""
    keys = [list(k) if isinstance(k, tuple) else int(k) for k in patch.class_locations]
    arrays = {f"locations{i}": v for i, v in enumerate(patch.class_locations.values())}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, data=patch.data, seg=patch.seg, bbox=patch.bbox,
                        location_keys=np.array(json.dumps(keys)), **arrays)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


def load_patch(path: Path | str) -> Patch:
    """Read a patch written by :func:`save_patch`."""
    with np.load(path) as z:
        keys = [tuple(k) if isinstance(k, list) else k for k in json.loads(str(z["location_keys"]))]
        return Patch(z["data"], z["seg"], z["bbox"], {k: z[f"locations{i}"] for i, k in enumerate(keys)})


def merge_class_locations(source: dict, patch: Patch) -> dict:
    """The source case's ``class_locations`` outside the patch plus the patch's own (nnU-Net's oversampling)."""
    out = {}
    for key in list(source) + [k for k in patch.class_locations if k not in source]:
        kept = _as_locations(source.get(key, []))
        merged = np.concatenate([kept[~_inside(kept, patch.bbox)],
                                 patch.class_locations.get(key, np.zeros((0, 4), np.int64))])
        out[key] = merged if len(merged) else []
    return out


class PatchedArray:
    """A preprocessed case array ``(C, Z, Y, X)`` as nnU-Net loads it (blosc2 or numpy) with ``patch``
    ``(C, dz, dy, dx)`` pasted at spatial ``start`` (z, y, x).

    Slicing with slices (what nnU-Net's data loader does) reads only the requested part of the source and pastes
    the overlapping part of the patch, so a crop costs what it costs on the source; anything else (and
    ``np.asarray``) reads the whole case. Voxels outside the patch are the source's, bit for bit. (acvl's
    ``crop_and_pad_nd`` needs a box that overlaps the case, as nnU-Net's loader always gives, for any type
    other than numpy / blosc2 / torch.)
    """

    def __init__(self, base, patch: np.ndarray, start):
        self.base, self.patch, self.start = base, patch, tuple(int(v) for v in start)
        self.shape = tuple(int(v) for v in base.shape)
        self.dtype = np.dtype(base.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            return self[(slice(None),) * self.ndim][key]
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges = [k.indices(n)[:2] for k, n in zip(key, self.shape)]
        ranges = [(a, max(a, b)) for a, b in ranges]
        out = np.array(self.base[tuple(slice(a, b) for a, b in ranges)], dtype=self.dtype, copy=True)
        origin = (0,) * (self.ndim - len(self.start)) + self.start
        dst, src = [], []
        for (a, b), o, n in zip(ranges, origin, self.patch.shape):
            lo, hi = max(a, o), min(b, o + n)
            if hi <= lo:
                return out
            dst.append(slice(lo - a, hi - a))
            src.append(slice(lo - o, hi - o))
        out[tuple(dst)] = self.patch[tuple(src)]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),) * self.ndim]
        return out if dtype is None else out.astype(dtype, copy=False)


class SyntheticSwapDataset:
    """nnU-Net training dataset in which a lesion-free case is replaced by a synthetic variant with probability P.

    Behaves like the wrapped dataset for ``nnUNetDataLoader``: same ``identifiers`` (the real training
    cases, so sampling weights are unchanged) and the same ``load_case`` return value
    ``(data, seg, seg_prev, properties)``. When a case with variants is drawn, a uniform draw below P
    returns a uniformly chosen variant instead (:meth:`load_variant`: the source loaded by the wrapped dataset,
    the variant's patch pasted, ``class_locations`` merged). Randomness is numpy's, from a generator created
    per process (forked data-augmentation workers each get their own from OS entropy). Every load appends a
    line ``S|R <tab> source <tab> loaded id`` to ``draws_log`` (``O_APPEND``, safe across processes) below a
    header line (:data:`DRAWS_LOG_HEADER`).
    Picklable (only the wrapped dataset, paths and plain data are kept).

    Built from a complete :class:`SyntheticBank`, or with :meth:`growing` from a bank still being built.
    """

    #: Seconds between two reads of a growing bank's records, in each process that loads cases.
    REFRESH_SECONDS = 5.0

    def __init__(self, real, bank: SyntheticBank, probability: float, draws_log: str | None = None):
        self._setup(real, bank.folder, probability, draws_log)
        self._use(bank.variants_by_source)

    @classmethod
    def growing(cls, real, folder: Path | str, key: str, probability: float,
                draws_log: str | None = None) -> "SyntheticSwapDataset":
        """The dataset over the bank ``folder`` (of ``key``) while it is built: in every process (nnU-Net's loader
        workers each get a copy) the per-source records are read again at most every :data:`REFRESH_SECONDS`, so
        a source joins the draw pool once all its variants are stored; until then it loads as the real case ("R"
        in the draws log). Once the bank's manifest exists it is read once and reading stops."""
        dataset = cls.__new__(cls)
        dataset._setup(real, folder, probability, draws_log)
        dataset._use({})
        dataset.growing_key = str(key)
        dataset._refresh()
        return dataset

    def _setup(self, real, folder: Path | str, probability: float, draws_log: str | None) -> None:
        self.real = real
        self.identifiers = real.identifiers
        self.source_folder = real.source_folder
        self.folder_with_segs_from_previous_stage = getattr(real, "folder_with_segs_from_previous_stage", None)
        self.probability = float(probability)
        self.bank_folder = str(folder)
        self.draws_log = draws_log
        self.growing_key: str | None = None  # set while the bank is incomplete
        self._recorded: set[str] = set()
        self._next_refresh = 0.0
        if draws_log is not None and not os.path.exists(draws_log):  # main process, before any worker forks
            try:
                with open(draws_log, "x") as f:
                    f.write(DRAWS_LOG_HEADER)
            except FileExistsError:
                pass
        self._pid: int | None = None
        self._rng: np.random.Generator | None = None
        self._fd: int | None = None

    def _use(self, by_source: dict[str, list[str]]) -> None:
        train = set(self.identifiers)
        self.variants_by_source = {k: sorted(v) for k, v in by_source.items() if k in train and v}
        self.source_of = {v: k for k, vs in self.variants_by_source.items() for v in vs}

    def _refresh(self) -> None:
        """Growing bank: take up the sources recorded since the last read, or the manifest once it exists."""
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.REFRESH_SECONDS
        manifest = read_manifest(self.bank_folder, self.growing_key)
        if manifest is not None:
            self.growing_key = None
            self._use(variants_by_source(manifest.get("variants", {})))
            return
        records = read_records(self.bank_folder, skip=self._recorded)
        if records:
            self._recorded.update(records)
            by_source = dict(self.variants_by_source)
            by_source.update({s: sorted(r["variants"]) for s, r in records.items()})
            self._use(by_source)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _rng=None, _fd=None)
        return state

    def _process_state(self) -> np.random.Generator:
        if self._pid != os.getpid():
            self._pid, self._rng, self._fd = os.getpid(), np.random.default_rng(), None
        return self._rng  # type: ignore[return-value]

    def _record(self, kind: str, source: str, loaded: str) -> None:
        if self.draws_log is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.draws_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, f"{kind}\t{source}\t{loaded}\n".encode())
        except OSError as exc:
            log.warning("LeFusion: cannot write the draws log %s (%s); draws are no longer recorded", self.draws_log, exc)
            self.draws_log = None

    def load_case(self, identifier: str):
        rng = self._process_state()
        if self.growing_key is not None:
            self._refresh()
        variants = self.variants_by_source.get(identifier)
        if variants and rng.random() < self.probability:
            variant = variants[int(rng.integers(len(variants)))]
            self._record("S", identifier, variant)
            return self.load_variant(variant)
        self._record("R", identifier, identifier)
        return self.real.load_case(identifier)

    def load_variant(self, variant: str):
        """``(data, seg, seg_prev, properties)`` of a variant: its source as the wrapped dataset loads it with the
        patch pasted into image and segmentation (:class:`PatchedArray`) and the patch's lesion locations in
        ``properties['class_locations']``."""
        source = self.source_of[variant]
        data, seg, seg_prev, properties = self.real.load_case(source)
        patch = load_patch(patch_path(self.bank_folder, variant))
        properties = dict(properties, lefusion_source_case=source, lefusion_variant=variant)
        properties["class_locations"] = merge_class_locations(properties.get("class_locations") or {}, patch)
        return (PatchedArray(data, patch.data, patch.start), PatchedArray(seg, patch.seg, patch.start), seg_prev,
                properties)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)


@dataclass(frozen=True)
class DrawStats:
    """Counts from a draws log (see :class:`SyntheticSwapDataset`)."""

    loads: int
    synthetic: int
    distinct_variants: int
    sources: tuple[str, ...]
    variants: tuple[str, ...]


def read_draws(path: Path | str, offset: int = 0) -> DrawStats:
    """Count the loads recorded in a draws log from byte ``offset`` on."""
    loads = synthetic = 0
    variants: set[str] = set()
    sources: set[str] = set()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) != 3:
            continue
        loads += 1
        if parts[0] == "S":
            synthetic += 1
            sources.add(parts[1])
            variants.add(parts[2])
    return DrawStats(loads=loads, synthetic=synthetic, distinct_variants=len(variants),
                     sources=tuple(sorted(sources)), variants=tuple(sorted(variants)))
