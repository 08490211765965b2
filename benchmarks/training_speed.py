"""Training speed and memory per sample at 64 x 64 x 32 (x, y, z) for each preset.

Each (preset, batch size) runs in a fresh subprocess that does a few real training steps (forward, masked
loss, backward, AdamW) and reports steps/s and peak memory: on CPU the process's peak RSS, on CUDA
torch.cuda.max_memory_allocated. Memory per sample = (peak at batch 2 - peak at batch 1), i.e. what one
more sample costs (activations + gradients of activations), the figure that limits the batch size.

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
step()
if amp: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(steps): step()
if amp: torch.cuda.synchronize()
sec = (time.perf_counter() - t0) / steps
peak = torch.cuda.max_memory_allocated() / 2**30 if amp else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds_per_step": sec, "peak_gib": peak,
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
                "memory_per_sample_gib": b2["peak_gib"] - b1["peak_gib"]}
    result["targets"] = {"small_memory_per_sample_gib_at_most": 1.5 * 1e9 / 2**30}
    emit(result, args.out)


if __name__ == "__main__":
    main()
