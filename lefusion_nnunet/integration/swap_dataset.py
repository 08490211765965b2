"""Training-time use of the synthetic bank: the dataset wrapper that swaps in variants, and its draws log.

:class:`SyntheticSwapDataset` wraps nnU-Net's training dataset so that ``load_case(source)`` returns one of the
source's variants (from a :class:`~lefusion_nnunet.integration.bank.SyntheticBank`) with probability P, and
records each load in a draws log; :func:`read_draws` counts what was drawn.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lefusion_nnunet.integration.bank import SyntheticBank

__all__ = ["SyntheticSwapDataset", "DrawStats", "read_draws", "DRAWS_LOG_HEADER"]

log = logging.getLogger(__name__)

#: First line of a draws log: the columns of every following line.
DRAWS_LOG_HEADER = "# kind (S = synthetic variant, R = real case)\tsource case\tloaded case\n"


class SyntheticSwapDataset:
    """nnU-Net training dataset in which a lesion-free case is replaced by a synthetic variant with probability P.

    Behaves like the wrapped dataset for ``nnUNetDataLoader``: same ``identifiers`` (the real training
    cases, so sampling weights are unchanged) and the same ``load_case`` return value
    ``(data, seg, seg_prev, properties)``. When a case with variants is drawn, a uniform draw below P
    returns a uniformly chosen variant from the bank instead. Randomness is numpy's, from a generator created
    per process (forked data-augmentation workers each get their own from OS entropy). Every load appends a
    line ``S|R <tab> source <tab> loaded id`` to ``draws_log`` (``O_APPEND``, safe across processes) below a
    header line (:data:`DRAWS_LOG_HEADER`).
    Picklable (only paths and plain data are kept).
    """

    def __init__(self, real, bank: SyntheticBank, dataset_class, probability: float, draws_log: str | None = None):
        self.real = real
        self.identifiers = real.identifiers
        self.source_folder = real.source_folder
        self.folder_with_segs_from_previous_stage = getattr(real, "folder_with_segs_from_previous_stage", None)
        self.probability = float(probability)
        train = set(real.identifiers)
        self.variants_by_source = {k: sorted(v) for k, v in bank.variants_by_source.items() if k in train and v}
        variant_ids = sorted(v for vs in self.variants_by_source.values() for v in vs)
        self.bank = dataset_class(str(bank.folder), variant_ids)
        self.draws_log = draws_log
        if draws_log is not None and not os.path.exists(draws_log):  # main process, before any worker forks
            try:
                with open(draws_log, "x") as f:
                    f.write(DRAWS_LOG_HEADER)
            except FileExistsError:
                pass
        self._pid: int | None = None
        self._rng: np.random.Generator | None = None
        self._fd: int | None = None

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
        variants = self.variants_by_source.get(identifier)
        if variants and rng.random() < self.probability:
            variant = variants[int(rng.integers(len(variants)))]
            self._record("S", identifier, variant)
            return self.bank.load_case(variant)
        self._record("R", identifier, identifier)
        return self.real.load_case(identifier)

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
