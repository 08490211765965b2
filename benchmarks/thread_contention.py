"""Thread contention: seconds per step with 1 and 2 intra-op threads, quiet and beside a busy process.

On a shared 2-core machine `lefusion train` / `lefusion enlarge` ran 6-20x slower with 2 intra-op threads than
with OMP_NUM_THREADS=1 while other jobs ran. This measures, in one run, each combination of
- load: ``quiet`` (nothing started by us) or ``busy`` (one pure-Python busy loop started in the background for the
  measurement: the "concurrent load of one busy process"),
- intra-op threads: 1 and 2 (``torch.set_num_threads`` in a fresh process; OMP_NUM_THREADS set to match),
- OpenMP wait policy: ``default`` (libgomp spins ~300,000 iterations at every barrier before sleeping) or
  ``passive`` (OMP_WAIT_POLICY=PASSIVE, plus KMP_BLOCKTIME=0 for Intel's runtime: idle threads sleep at once),
- ``configured``: whatever :func:`lefusion_nnunet.threads.configure_threads` (what the CLI applies) chooses,
for two workloads at the demo's ROI (16 x 32 x 32, z, y, x, `small` preset, batch 4): a training step (forward,
masked loss, backward, AdamW) and a sampling evaluation (inference forward). Every setting runs in its own
subprocess because OpenMP reads its environment once, when torch is imported.

    python benchmarks/thread_contention.py --out benchmarks/results/thread_contention.json

Prints one JSON object: seconds per step for each setting, the best setting per load and workload, and
``configured / best`` (target: at most 1.5 beside one busy process, about 1 when quiet).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import emit

WORKER = r"""
import json, os, sys, time
threads, seconds, configured = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1"
if configured:
    from lefusion_nnunet.threads import configure_threads
    chosen = configure_threads(None)
import torch
if not configured:
    torch.set_num_threads(threads)
from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, masked_epsilon_loss
torch.manual_seed(0)
model = LesionDenoiser(DenoiserConfig.from_preset("small")).to(memory_format=torch.channels_last_3d)
opt = torch.optim.AdamW(model.parameters(), 2e-4)
shape = (4, 1, 16, 32, 32)
x0 = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
mask = torch.zeros(shape); mask[..., 4:12, 8:24, 8:24] = 1
cond = torch.full((4, 16), 1 / 16)
t = torch.full((4,), 150)
def train_step():
    model.train()
    eps = model(x0, t, x0 * (1 - mask), mask, cond)
    loss = masked_epsilon_loss(eps, x0, mask)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
def sample_step():
    model.eval()
    with torch.inference_mode():
        model(x0, t, x0 * (1 - mask), mask, cond)
out = {"threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
for name, fn in (("train_step", train_step), ("sampling_evaluation", sample_step)):
    fn(); fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn(); n += 1
    out[name + "_seconds"] = (time.perf_counter() - t0) / n
    out[name + "_n"] = n
print(json.dumps(out))
"""

BUSY = "while True: pass"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def measure(threads: int, policy: str, seconds: float) -> dict:
    """One setting in a fresh process; ``policy`` is ``default``, ``passive`` or ``configured``."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    if policy != "configured":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if policy == "passive":
        env["OMP_WAIT_POLICY"], env["KMP_BLOCKTIME"] = "PASSIVE", "0"
    proc = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(seconds),
                           "1" if policy == "configured" else "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per workload and setting (default 6)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loads", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: dict = {"benchmark": "thread_contention", "cpus": len(os.sched_getaffinity(0)),
                    "load_average_at_start": os.getloadavg(), "workloads": "small preset, batch 4, ROI 16x32x32",
                    "settings": {}}
    for load in args.loads:
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
        try:
            time.sleep(0.5 if busy else 0.0)
            rows = {}
            for threads in args.threads:
                for policy in ("default", "passive"):
                    rows[f"threads_{threads}_{policy}"] = measure(threads, policy, args.seconds)
            rows["configured"] = measure(0, "configured", args.seconds)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        summary = {}
        for work in ("train_step", "sampling_evaluation"):
            timed = {k: v[f"{work}_seconds"] for k, v in rows.items()}
            best = min(timed, key=timed.get)
            summary[work] = {"best": best, "best_seconds": timed[best],
                             "configured_over_best": timed["configured"] / timed[best],
                             "threads_2_default_over_threads_1_default":
                                 timed.get("threads_2_default", float("nan")) / timed.get("threads_1_default",
                                                                                          float("nan"))}
        result["settings"][load] = {"seconds_per_step": rows, "summary": summary,
                                    "load_average_after": os.getloadavg()}
    result["targets"] = {"configured_over_best_busy_at_most": 1.5}
    emit(result, args.out)


if __name__ == "__main__":
    main()
