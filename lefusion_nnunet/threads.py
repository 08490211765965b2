"""Intra-op thread settings that degrade gracefully when the machine is shared.

The cause of the slowdown (measured with ``benchmarks/thread_contention.py``): PyTorch's CPU kernels run in
OpenMP parallel regions (GNU libgomp in the PyPI wheels; oneDNN and MKL use the same runtime) that end in a
barrier. By default a thread that reaches the barrier first spins for about 300,000 iterations before it
sleeps. When other processes occupy the cores, the spinning thread takes CPU time from its own partner,
which still has work to do and is waiting to be scheduled, and every one of the thousands of small
parallel regions of a denoiser step pays for it: on a shared 2-core machine 2 threads were 8-15x slower
than 1 thread with the default policy, and 1.1-1.4x of the best setting with ``OMP_WAIT_POLICY=PASSIVE``
(``KMP_BLOCKTIME=0`` for Intel's runtime), which makes waiting threads sleep at once. On an idle machine a
sleeping thread costs a wake-up (microseconds) per parallel region, small beside the convolutions of a
step. The package starts no data-loader workers of its own, so oversubscription by workers is not the
cause here (nnU-Net's augmentation workers are nnU-Net's business).

OpenMP reads these variables once, when the runtime is loaded (on ``import torch``), so
:func:`configure_threads` must run before torch is imported to change the wait policy; the thread count
can still be set afterwards. Library code never calls it: entry points do (the ``lefusion`` command at
start-up), as with every global torch setting.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

from lefusion_nnunet.errors import LeFusionInputError

#: Set (without overriding the user's own values) before torch is imported.
WAIT_POLICY_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
_COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cpus: Optional[int] = None) -> int:
    """Intra-op threads used when neither ``--threads`` nor OMP_NUM_THREADS is given: every available CPU
    (with the passive wait policy this stays close to the best setting when another process is busy)."""
    return max(1, cpus if cpus is not None else available_cpus())


def configure_threads(threads: Optional[int] = None, environ: Optional[MutableMapping[str, str]] = None) -> int:
    """Apply the thread settings of an entry point; returns the intra-op thread count in effect.

    Args:
        threads: ``--threads N`` (>= 1): use N threads, overriding OMP_NUM_THREADS. None: keep a user's
            explicit OMP_NUM_THREADS, else :func:`default_threads`.
        environ: the environment to update (default ``os.environ``; tests pass a dict).

    The wait policy variables of :data:`WAIT_POLICY_DEFAULTS` are set only where the user has not set them
    and only matter if torch has not been imported yet. If torch is already imported,
    ``torch.set_num_threads`` is called as well.
    """
    env = os.environ if environ is None else environ
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise LeFusionInputError(f"--threads must be a positive integer, got {threads!r}.")
        count = threads
    else:
        count = _explicit_count(env) or default_threads()
    for name in _COUNT_VARS:
        if threads is not None or name not in env:
            env[name] = str(count)
    for name, value in WAIT_POLICY_DEFAULTS.items():
        env.setdefault(name, value)
    torch = sys.modules.get("torch")
    if torch is not None and environ is None and torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def _explicit_count(env: MutableMapping[str, str]) -> Optional[int]:
    """The user's OMP_NUM_THREADS as a positive integer, or None (unset or not a positive integer)."""
    raw = env.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None
