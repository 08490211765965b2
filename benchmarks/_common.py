"""Shared by the benchmark scripts: JSON output, sampler specs, subprocess environment, building nnU-Net trainers
in one process, interleaved A/B timing, loader throughput, peak memory and timed ``nnUNetv2_train`` runs."""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
try:
    import lefusion_nnunet  # noqa: F401
except ModuleNotFoundError:  # run from a checkout whose package is not installed (or installed elsewhere)
    sys.path.insert(1, str(REPO))

from lefusion_nnunet.diffusion.sampler_config import SAMPLER_NAMES, SamplerConfig  # noqa: E402
MB = 2 ** 20


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as indented JSON and write the same text to ``out`` (folders created)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def parse_sampler(text: str) -> SamplerConfig:
    """``NAME[:STEPS][:SPACING][:eta=X]``, e.g. ``dpmpp2m:10:quadratic:eta=1`` -> SamplerConfig (missing parts:
    the sampler's defaults); for the benchmarks' ``--sampler`` / ``--samplers`` options."""
    name, *rest = text.strip().split(":")
    if name not in SAMPLER_NAMES:
        raise argparse.ArgumentTypeError(f"unknown sampler {name!r} (valid: {', '.join(SAMPLER_NAMES)})")
    kwargs: dict = {"name": name}
    for token in rest:
        if token.isdigit():
            kwargs["num_steps"] = int(token)
        elif token.startswith("eta="):
            kwargs["eta"] = float(token[4:])
        else:
            kwargs["timestep_spacing"] = token
    return SamplerConfig(**kwargs)


# ------------------------------------------------------------------------------------------ subprocesses

def lefusion_cmd() -> list[str]:
    """The ``lefusion`` command as ``python -m`` (works whether or not the console script is on PATH)."""
    return [sys.executable, "-m", "lefusion_nnunet.cli.main"]


def repo_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with this checkout first on PYTHONPATH (nnU-Net's trainer shim imports it), unbuffered
    output (log lines arrive when printed), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (its stdout to our stderr) to completion; raises CalledProcessError on failure.

    Returns ``{"wall_s", "peak_rss_mb"}``: wall time, and the kernel's peak resident set of the process (the
    largest of it and its waited-for children, ``wait4`` rusage ``ru_maxrss``), in MiB.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(usage.ru_maxrss * 1024 / MB, 1)}


# ------------------------------------------------------------------------------------------ memory

def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident set (VmHWM) of a live process in MiB, or None where /proc is unavailable."""
    kb = _status_kb(pid, "VmHWM")
    return round(kb / 1024, 1) if kb is not None else None


def rss_mb(pid: int | str = "self") -> float | None:
    """Current resident set (VmRSS) of a live process in MiB, or None where /proc is unavailable."""
    kb = _status_kb(pid, "VmRSS")
    return round(kb / 1024, 1) if kb is not None else None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``/proc/self/clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_pss_mb(pid: int) -> float:
    """Proportional set size (shared pages split between sharers) summed over ``pid`` and its descendants, MiB:
    the memory a process tree with forked workers really uses (summing RSS counts shared pages per worker)."""
    total = 0
    for p in _descendants(pid):
        try:
            m = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{p}/smaps_rollup").read_text(), re.M)
        except OSError:
            continue
        total += int(m.group(1)) if m else 0
    return round(total / 1024, 1)


# ------------------------------------------------------------------------------------------ nnUNetv2_train

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?): ?(.*)$")
FIRST_ITERATION = re.compile(r"^Epoch 0$")  # logged by on_train_epoch_start, after on_train_start has built the
# network and the loaders (and drawn their first batch), immediately before the first train_step


def timed_nnunet_train(cmd: list[str], env: dict[str, str], log_file: Path, *, train_seconds: float = 0.0,
                       timeout_s: float = 3600.0, milestones: dict[str, str] | None = None,
                       sample_every_s: float = 0.5) -> dict:
    """Run ``nnUNetv2_train`` until its first training iteration starts, let it train ``train_seconds`` more,
    then stop it (SIGKILL to the process group it leads). Timing comes from nnU-Net's own timestamped log lines.

    Returns (seconds from our ``Popen``, memory in MiB):
        ``first_iteration_s``: to the ``Epoch 0`` line (None if never reached; ``error`` then says why);
        ``first_log_line_s``: to the first timestamped line (imports, trainer lookup, trainer construction);
        ``<name>_s`` / ``<name>_match``: to the first line matching each regex of ``milestones`` (and its text);
        ``peak_rss_to_first_iteration_mb`` / ``peak_rss_to_<name>_mb``: the main process's VmHWM when that line
        arrived; ``peak_rss_mb``: its peak over the whole run (``wait4``); ``peak_tree_pss_mb``: the largest PSS
        of the main process plus its loader workers, sampled every ``sample_every_s``; ``trained_s``: the
        training window actually run after ``Epoch 0``.
    Everything the process prints is written to ``log_file``.
    """
    patterns = {"first_iteration": FIRST_ITERATION, **{k: re.compile(v) for k, v in (milestones or {}).items()}}
    lines: queue.Queue = queue.Queue()
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def read() -> None:
        with open(log_file, "w") as log:
            for line in proc.stdout:
                log.write(line)
                lines.put(line.rstrip("\n"))
        lines.put(None)

    peak_pss = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(sample_every_s):
            peak_pss[0] = max(peak_pss[0], tree_pss_mb(proc.pid))

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    result: dict = {"first_iteration_s": None, "first_log_line_s": None}
    deadline, first_iteration_at, eof = start + timeout_s, None, False
    while time.time() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            eof = True
            break
        m = _LOG_LINE.match(line)
        if not m:
            continue
        stamp = datetime.fromisoformat(m.group(1)).timestamp() - start
        if result["first_log_line_s"] is None:
            result["first_log_line_s"] = round(stamp, 2)
        for name, pattern in patterns.items():
            if f"{name}_s" not in result or result[f"{name}_s"] is None:
                if pattern.search(m.group(2).strip()):
                    result[f"{name}_s"] = round(stamp, 2)
                    result[f"peak_rss_to_{name}_mb"] = peak_rss_mb(proc.pid)
                    if name != "first_iteration":
                        result[f"{name}_match"] = m.group(2).strip()
        if first_iteration_at is None and result["first_iteration_s"] is not None:
            first_iteration_at = time.time()
            deadline = first_iteration_at + train_seconds
    stop.set()
    result["trained_s"] = round(time.time() - first_iteration_at, 1) if first_iteration_at else 0.0
    if not eof:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this Popen created: nnUNetv2_train and its loader workers
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    threads[0].join(timeout=10)
    result["peak_rss_mb"] = round(usage.ru_maxrss * 1024 / MB, 1)
    result["peak_tree_pss_mb"] = peak_pss[0] or None
    if result["first_iteration_s"] is None:
        result["error"] = (f"exited with status {proc.returncode} before its first iteration" if eof else
                           f"no first iteration within {timeout_s:.0f} s") + f"; see {log_file}"
    return result


# ------------------------------------------------------------------------------------------ trainers in-process

def build_trainer(cls, dataset: str, configuration: str, fold: int | str, device):
    """An nnU-Net trainer of class ``cls`` as ``nnUNetv2_train`` builds it, started up to its first iteration
    (``on_train_start`` + ``on_train_epoch_start``: network, loaders, and for LeFusionTrainer its bank)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = cls(plans, configuration, fold, load_json(str(pre / "dataset.json")), device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def _set_paused(loader, paused: bool) -> None:
    """Pause / resume the worker processes of a batchgenerators ``NonDetMultiThreadedAugmenter`` (a no-op for
    the single-threaded augmenter): workers of the trainer not being timed would otherwise compete for CPU."""
    event = getattr(loader, "pause_event", None)
    if event is not None:
        event.set() if paused else event.clear()


def pause_loaders(trainers, paused: bool = True) -> None:
    """Pause (or resume) the training and validation loaders of every trainer in ``trainers``."""
    for trainer in trainers:
        _set_paused(trainer.dataloader_train, paused)
        _set_paused(trainer.dataloader_val, paused)


def interleaved(trainers: dict, step: Callable, *, blocks: int, per_block: int, warmup: int,
                warmup_rounds: int = 0) -> dict[str, list[float]]:
    """Seconds per ``step(trainer)`` call for each trainer, timed in interleaved blocks whose order alternates
    (A B, B A, A B, ...) so that drift of a shared machine and the position in a round hit all alike. Before each
    timed block the trainer gets ``warmup`` untimed calls; the other trainers' loader workers are paused
    meanwhile. ``warmup_rounds`` whole rounds (warm-up + block per trainer) run first, untimed: the first
    block after building the trainers pays start-up costs (page cache, workers still filling their queues)."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    pause_loaders(trainers.values())
    try:
        for round_ in range(warmup_rounds + blocks):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                trainer = trainers[name]
                _set_paused(trainer.dataloader_train, False)
                for _ in range(warmup):
                    step(trainer)
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    step(trainer)
                    if round_ >= warmup_rounds:
                        times[name].append(time.perf_counter() - t0)
                _set_paused(trainer.dataloader_train, True)
    finally:
        pause_loaders(trainers.values(), False)
    return times


def loader_drain(trainer) -> int:
    """Batches a trainer's training loader can hold ready (its two queues plus one per worker) + 1: drawing this
    many untimed before a timed block leaves only batches produced at the steady rate."""
    loader = trainer.dataloader_train
    return 2 * int(getattr(loader, "num_cached", 0)) + int(getattr(loader, "num_processes", 0)) + 1


def loader_throughput(trainers: dict, *, blocks: int, per_block: int) -> dict:
    """Training-loader throughput of each trainer: ``next(trainer.dataloader_train)`` timed in interleaved blocks
    (:func:`interleaved`, one untimed round first), each after the same untimed drain (:func:`loader_drain`), the
    other trainers' workers paused.

    Returns ``{name: {"cases_per_s", "batch_s", "block_cases_per_s", "batches", "drain_batches"}}`` (cases =
    batch size x batches; ``block_cases_per_s``: per timed block, to judge the spread).
    """
    drain = max(loader_drain(t) for t in trainers.values())
    times = interleaved(trainers, lambda t: next(t.dataloader_train), blocks=blocks, per_block=per_block,
                        warmup=drain, warmup_rounds=1)
    out = {}
    for name, v in times.items():
        cases = trainers[name].batch_size
        blocks_ = [v[i:i + per_block] for i in range(0, len(v), per_block)]
        out[name] = {"cases_per_s": round(cases * len(v) / sum(v), 3), "batch_s": round(sum(v) / len(v), 4),
                     "block_cases_per_s": [round(cases * len(b) / sum(b), 2) for b in blocks_],
                     "batches": len(v), "drain_batches": drain}
    return out
