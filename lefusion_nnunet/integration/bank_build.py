"""A bank build in a background thread, so that training starts at once and variants join as they are made.

:func:`start_bank_build` takes the bank's lock without waiting. If it gets it, a daemon thread builds (or
continues) the bank in place (:func:`lefusion_nnunet.integration.bank.build_locked`) and releases the lock when
done; a reader (:meth:`~lefusion_nnunet.integration.swap_dataset.SyntheticSwapDataset.growing`) takes up each
source as its record appears. If another process holds the lock (another DDP rank or a second run of the same
bank), nothing is started: that process builds, this one only reads the growing bank.

An exception in the thread is kept in :attr:`BankBuild.error` (and logged) for the caller to raise in its own
thread; it is never lost with the thread.
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Callable

from lefusion_nnunet.integration.bank import BankSpec, BuildFn, build_locked, lock_path
from lefusion_nnunet.integration.bank_store import BankLock, SyntheticBank

__all__ = ["BankBuild", "start_bank_build"]


class BankBuild:
    """One bank build in a daemon thread (or none, where another process builds the bank).

    Attributes:
        building: True if this process holds the bank's lock and builds it.
        bank: the complete bank once the build has finished (None before, after a failure, or if not building).
        error: the exception the build raised, if any.
    """

    def __init__(self, spec: BankSpec, root: Path | str, build: BuildFn, log: Callable[[str], None],
                 on_done: Callable[[SyntheticBank], None] | None = None):
        self.spec, self.root, self._build, self._log, self._on_done = spec, Path(root), build, log, on_done
        self.building = False
        self.bank: SyntheticBank | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock: BankLock | None = None

    @property
    def folder(self) -> Path:
        return self.root / self.spec.key

    @property
    def done(self) -> bool:
        """Nothing is running in this process (finished, failed, or never started)."""
        return self._thread is None or not self._thread.is_alive()

    def start(self) -> bool:
        """Take the lock without waiting and start the thread; False (nothing started) if the lock is held."""
        if self._thread is not None:
            raise RuntimeError("this bank build was already started")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = BankLock.acquire(lock_path(self.root, self.spec.key), blocking=False)
        if self._lock is None:
            return False
        self.building = True
        self._thread = threading.Thread(target=self._run, name=f"lefusion-bank-{self.spec.key}", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> SyntheticBank | None:
        """Wait for the thread (at most ``timeout`` s); returns :attr:`bank`. A failure stays in :attr:`error`."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.bank

    def _run(self) -> None:
        try:
            bank = build_locked(self.spec, self.root, self._build, self._log)
            self.bank = bank
            if self._on_done is not None:
                self._on_done(bank)
        except BaseException as exc:  # kept for the caller's thread, which raises it
            self.error = exc
            self._log("LeFusion: error: the background bank build failed: "
                      + "".join(traceback.format_exception(exc)).rstrip())
        finally:
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()


def start_bank_build(spec: BankSpec, root: Path | str, build: BuildFn, log: Callable[[str], None],
                     on_done: Callable[[SyntheticBank], None] | None = None) -> BankBuild:
    """Start building (or continuing) the bank of ``spec`` under ``root`` in a daemon thread.

    ``build(folder)`` is as for :func:`~lefusion_nnunet.integration.bank.ensure_bank`; ``on_done(bank)`` runs in
    the thread once the bank is complete. Check :attr:`BankBuild.building` to see whether this process builds.
    """
    job = BankBuild(spec, root, build, log, on_done)
    job.start()
    return job
