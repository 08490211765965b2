"""Sampling speed: seconds per lesion through the full synthesis path, and denoiser efficiency.

Measures, in one run on this machine:
- seconds per lesion (and lesions per second) for a 64 x 64 x 32 (x, y, z) ROI with the default preset (`small`)
  and the default sampler (DDIM, 25 steps; another with --sampler, e.g. `dpmpp2m:10`), at each batch size in
  --batch-sizes (best reported), through the full synthesis path (ROI extraction, sampler, paste back) and, with
  `--paths synthesis sampler`, for the sampler loop alone on ROI tensors already on the device;
  the same for the paper-faithful RePaint sampler is *estimated* from its evaluation count (599 at j=r=2);
- network evaluations per lesion;
- achieved GFLOP/s of the denoiser (FLOPs counted with torch.utils.flop_counter) and its ratio to a dense
  Conv3d measured in the same run (the machine's practical peak for this kind of work).
Weights are random: speed does not depend on training.

    python benchmarks/sampling_speed.py --out benchmarks/results/sampling_speed_cpu.json
    python benchmarks/sampling_speed.py --sampler dpmpp2m:10 --batch-sizes 4 --skip-efficiency
    python benchmarks/sampling_speed.py --device cuda --preset base      # GPU, bf16 autocast

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import emit, parse_sampler
from torch.utils.flop_counter import FlopCounterMode

from lefusion_nnunet.checkpoints.loaders import LoadedCheckpoint
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.histogram import Prototypes
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import (DenoiserConfig, LesionDenoiser, NoiseSchedule, SamplerConfig, ScheduleConfig,
                                       make_sampler)
from lefusion_nnunet.seeding import seeded_generator
from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer

REFERENCE = {"denoiser": "factorised video UNet, 35.8 M parameters, ~505 GFLOPs per forward at 32x64x64",
             "cpu_seconds_per_evaluation": 12.8, "evaluations_per_lesion_j2_r2": 599,
             "cpu_seconds_per_lesion_j2_r2": 12.8 * 599, "a100_seconds_per_lesion_j2_r2_stated": 40}


def random_checkpoint(preset: str, roi: RoiGeometry, device: str) -> LoadedCheckpoint:
    torch.manual_seed(0)
    model = LesionDenoiser(DenoiserConfig.from_preset(preset)).to(device).eval()
    data = DataConfig("Dataset000_Bench", (2,), ("lesion",), None, 0, "CT", roi, IntensitySpace())
    protos = [Prototypes(np.full((1, 16), 1 / 16, np.float32), np.array([1]))]
    return LoadedCheckpoint(Path("random"), "0" * 64, data, protos, np.full((1, 16), 1 / 16, np.float32), {}, model,
                            NoiseSchedule(ScheduleConfig()).to(device))


def median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sampler_loop_seconds(ckpt: LoadedCheckpoint, sampler: SamplerConfig, batch: int, dev: str, repeats: int,
                         sync) -> float:
    """Median seconds of one ``sampler.sample`` call on a (batch, 1, 32, 64, 64) ROI already on ``dev``
    (bf16 autocast on CUDA), without the numpy data path around it."""
    model, amp = ckpt.model, dev.startswith("cuda")
    known = torch.rand(batch, 1, 32, 64, 64, device=dev) * 2 - 1
    zz, yy, xx = torch.meshgrid(*[torch.arange(n, device=dev) for n in (32, 64, 64)], indexing="ij")
    ball = ((zz - 16) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2) <= 8 ** 2
    mask = ball.float()[None, None].expand(batch, 1, -1, -1, -1)
    context, cond = known * (1 - mask), torch.full((batch, 16), 1 / 16, device=dev)

    def eps_fn(x, t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return model(x.contiguous(memory_format=torch.channels_last_3d), t, context, mask, cond).float()
    gens = [seeded_generator(i) for i in range(batch)]
    run = lambda: make_sampler(sampler).sample(eps_fn, ckpt.schedule, known, mask, generator=gens)  # noqa: E731
    run()  # warm-up
    return median_time(run, repeats, sync)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sampler", type=parse_sampler, default=SamplerConfig(),
                    help="NAME[:STEPS][:SPACING][:eta=X], e.g. dpmpp2m:10 (default: the package default, ddim:25)")
    ap.add_argument("--steps", type=int, default=None, help="override the sampler's steps (ddim default: 25)")
    ap.add_argument("--paths", nargs="+", choices=["synthesis", "sampler"], default=["synthesis"],
                    help="timed paths: full synthesis and/or the sampler loop alone (default: synthesis)")
    ap.add_argument("--skip-efficiency", action="store_true", help="skip the GFLOP/s measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = args.device
    sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
    roi = RoiGeometry((32, 64, 64), (1.0, 1.0, 1.0))
    ckpt = random_checkpoint(args.preset, roi, dev)
    model = ckpt.model.to(memory_format=torch.channels_last_3d)
    amp = dev.startswith("cuda")
    result: dict = {"benchmark": "sampling_speed", "device": torch.cuda.get_device_name() if amp else
                    f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                    "torch": torch.__version__, "preset": args.preset, "roi_xyz": [64, 64, 32],
                    "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6}

    # denoiser GFLOP/s vs a dense Conv3d (practical peak) at batch 1 and the largest batch
    def forward(b):
        x = torch.randn(b, 1, 32, 64, 64, device=dev).contiguous(memory_format=torch.channels_last_3d)
        t = torch.full((b,), 150, device=dev)
        cond = torch.full((b, 16), 1 / 16, device=dev)
        return lambda: model(x, t, x, x, cond)
    eff = {}
    for b in ([] if args.skip_efficiency else sorted({1, max(args.batch_sizes)})):
        fn = forward(b)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            # FLOPs counted on the nn.Conv3d path: the counter knows aten.convolution, not the oneDNN op that
            # lefusion_nnunet.diffusion.unet.Conv3d calls on CPU (same arithmetic)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TF32 acceleration")   # printed by flags() on CPU builds
                with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as fc:
                    fn()
            fn()
            sec = median_time(fn, args.repeats, sync)
        eff[b] = {"gflop_per_forward": fc.get_total_flops() / 1e9, "seconds_per_forward": sec,
                  "gflops_per_s": fc.get_total_flops() / 1e9 / sec}
    if eff:
        conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(dev).to(memory_format=torch.channels_last_3d)
        xc = torch.randn(1, 64, 32, 64, 64, device=dev).contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            with FlopCounterMode(display=False) as fc:
                conv(xc)
            conv(xc)
            sec = median_time(lambda: conv(xc), args.repeats, sync)
        dense = fc.get_total_flops() / 1e9 / sec
        result["denoiser"] = {f"batch_{b}": v for b, v in eff.items()}
        result["dense_conv3d_gflops_per_s"] = dense
        result["denoiser_vs_dense_conv3d"] = max(v["gflops_per_s"] for v in eff.values()) / dense

    # full synthesis path: ROI extraction -> sampler -> paste back, on a 64^2 x 48 native volume
    rng = np.random.default_rng(0)
    image = rng.normal(-800, 30, size=(48, 96, 96)).astype(np.float32)
    zz, yy, xx = np.indices(image.shape)
    mask = ((zz - 24) ** 2 + (yy - 48) ** 2 + (xx - 48) ** 2 <= 8 ** 2)[None]
    sampler = args.sampler if args.steps is None else SamplerConfig(**{**args.sampler.to_dict(),
                                                                        "num_steps": args.steps})
    per_lesion, loop_per_lesion = {}, {}
    for b in args.batch_sizes if "sampler" in args.paths else []:
        loop_per_lesion[f"batch_{b}"] = sampler_loop_seconds(ckpt, sampler, b, dev, max(1, args.repeats - 1), sync) / b
    for b in args.batch_sizes if "synthesis" in args.paths else []:
        synth = LesionSynthesizer(ckpt, device=dev, sampler=sampler, batch_size=b)
        reqs = [LesionRequest(image, (1.0, 1.0, 1.0), mask, np.full(16, 1 / 16, np.float32)) for _ in range(b)]
        gens = [seeded_generator(i) for i in range(b)]
        synth.synthesize(reqs[:1], generator=gens[:1])  # warm-up
        sec = median_time(lambda: synth.synthesize(reqs, generator=gens), max(1, args.repeats - 1), sync)
        per_lesion[f"batch_{b}"] = sec / b
    evals = make_sampler(sampler).num_network_evaluations(300)
    repaint_evals = make_sampler(SamplerConfig(name="repaint")).num_network_evaluations(300)
    result["sampler"] = sampler.to_dict()
    result["precision"] = "bf16 autocast" if amp else "fp32"
    result["network_evaluations_per_lesion"] = evals
    if loop_per_lesion:
        best = min(loop_per_lesion, key=loop_per_lesion.get)
        result["sampler_loop_seconds_per_lesion"] = loop_per_lesion
        result["sampler_loop_lesions_per_second"] = {k: 1 / v for k, v in loop_per_lesion.items()}
        result["sampler_loop_best"] = {"batch": int(best.split("_")[1]),
                                       "lesions_per_second": 1 / loop_per_lesion[best]}
    if per_lesion:
        best = min(per_lesion, key=per_lesion.get)
        result["seconds_per_lesion"] = per_lesion
        result["lesions_per_second"] = {k: 1 / v for k, v in per_lesion.items()}
        result["seconds_per_lesion_best"] = {"batch": int(best.split("_")[1]), "seconds": per_lesion[best]}
        if "batch_1" in per_lesion:
            result["seconds_per_lesion_batch_1"] = per_lesion["batch_1"]
        result["repaint_j2_r2_estimated_seconds_per_lesion"] = per_lesion.get("batch_1", per_lesion[best]) \
            / evals * repaint_evals
        result["speedup_vs_reference_cpu_j2_r2"] = REFERENCE["cpu_seconds_per_lesion_j2_r2"] / per_lesion[best]
    result["reference_lefusion"] = REFERENCE
    result["targets"] = {"cpu_seconds_per_lesion_at_most": 30, "cpu_seconds_per_lesion_batch_4_at_most_issue_16": 1.0,
                         "gpu_small_lesions_per_second_at_least": 100, "denoiser_vs_dense_conv3d_at_least": 0.5}
    emit(result, args.out)


if __name__ == "__main__":
    main()
