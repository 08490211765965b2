"""Training speed and memory per sample at 64 x 64 x 32 (x, y, z) for each preset.

Each (preset, batch size) runs in a fresh subprocess that does a few real training steps (forward, masked
loss, backward, AdamW). The first step measures memory: what it adds on top of what the process held before it
(model, inputs): on CPU the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident size before the step, on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated memory
before it (later steps would reuse blocks the allocator cached). The following steps are timed. Memory per sample =
that step memory at batch 2 minus at batch 1 (activations and their gradients of one more sample), the
figure that limits the batch size; the step memory at batch 1 is reported too (it also holds the weight
gradients and the optimizer state). Allocators reuse freed memory, so the resident-size figure can undercount;
the bytes autograd saves for backward per sample (counted exactly with saved-tensor hooks) are reported beside
it as a lower bound.

    python benchmarks/training_speed.py --out benchmarks/results/training_speed_cpu.json
    python benchmarks/training_speed.py --device cuda --presets small base   # bf16 autocast on CUDA

Prints one JSON object. Target: `small` at most 1.5 GB per sample in fp32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import emit

WORKER = r"""
import json, resource, sys, time, torch
from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, masked_epsilon_loss
preset, batch, steps, device, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
torch.manual_seed(0)
cfg = DenoiserConfig.from_preset(preset, gradient_checkpointing=ckpt)
model = LesionDenoiser(cfg).to(device).to(memory_format=torch.channels_last_3d).train()
opt = torch.optim.AdamW(model.parameters(), 2e-4)
shape = (batch, 1, 32, 64, 64)
x0 = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last_3d)
mask = torch.zeros(shape, device=device); mask[..., 8:24, 16:48, 16:48] = 1
cond = torch.full((batch, 16), 1 / 16, device=device)
amp = device.startswith("cuda")
def step():
    t = torch.randint(0, 300, (batch,), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        eps = model(x0, t, x0 * (1 - mask), mask, cond)
    loss = masked_epsilon_loss(eps.float(), x0, mask)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
def status_gib(field):  # Linux /proc/self/status, kB
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
if amp:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated() / 2**30
    method = "torch.cuda.max_memory_allocated"
else:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # resets VmHWM (peak RSS) to the current RSS
        before, method = status_gib("VmRSS"), "VmHWM after clear_refs"
    except OSError:
        before, method = 0.0, "ru_maxrss (not resettable here: includes start-up)"
step()                                         # the first step: memory (later steps reuse cached blocks)
if amp:
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() / 2**30
elif method.startswith("VmHWM"):
    peak = status_gib("VmHWM")
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t0 = time.perf_counter()
for _ in range(steps): step()
if amp: torch.cuda.synchronize()
sec = (time.perf_counter() - t0) / steps
saved = {}                                     # tensors autograd keeps for backward (exact, allocator-independent)
def pack(t):
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        model(x0, torch.zeros(batch, dtype=torch.long, device=device), x0 * (1 - mask), mask, cond)
print(json.dumps({"seconds_per_step": sec, "peak_gib": peak, "step_gib": peak - before, "memory_method": method,
                  "saved_gib": sum(saved.values()) / 2**30,
                  "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def run(preset: str, batch: int, steps: int, device: str, checkpointing: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, preset, str(batch), str(steps), device,
                          "1" if checkpointing else "0"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: dict = {"benchmark": "training_speed", "device": args.device, "roi_xyz": [64, 64, 32],
                    "precision": "bf16 autocast" if args.device.startswith("cuda") else "fp32", "presets": {}}
    for preset in args.presets:
        variants = [False, True] if preset == "base" else [False]
        for ckpt in variants:
            steps = 1 if preset == "base" and not args.device.startswith("cuda") else args.steps
            b1, b2 = run(preset, 1, steps, args.device, ckpt), run(preset, 2, steps, args.device, ckpt)
            name = preset + ("+activation_checkpointing" if ckpt else "")
            result["presets"][name] = {
                "parameters_millions": b1["parameters_millions"],
                "steps_per_s_batch_1": 1 / b1["seconds_per_step"], "steps_per_s_batch_2": 1 / b2["seconds_per_step"],
                "samples_per_s_batch_2": 2 / b2["seconds_per_step"],
                "peak_gib_batch_1": b1["peak_gib"], "peak_gib_batch_2": b2["peak_gib"],
                "step_memory_gib_batch_1": b1["step_gib"], "step_memory_gib_batch_2": b2["step_gib"],
                "memory_per_sample_gib": b2["step_gib"] - b1["step_gib"], "memory_method": b1["memory_method"],
                "saved_for_backward_gib_per_sample": b2["saved_gib"] - b1["saved_gib"]}
    result["targets"] = {"small_memory_per_sample_gib_at_most": 1.5 * 1e9 / 2**30}
    emit(result, args.out)


if __name__ == "__main__":
    main()
