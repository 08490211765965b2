"""Speed of our ReleaseUnet against the authors' code on the same work, and seconds per lesion on CPU.

One run, one process: the release's ``Unet3D`` (imported from a checkout of github.com/M3DV/LeFusion, never
copied here) and our :class:`~lefusion_nnunet.diffusion.release_unet.ReleaseUnet` at the published LIDC width
(dim 64, mults 1 2 4 8, 1 channel, 16-bin condition), holding identical seeded random weights, each evaluate eps for
one ROI of 64 x 64 x 32 (x, y, z) voxels, batch 1, fp32, after one warm-up call each, interleaved ``--repeats``
times. Reports every time, the ratios of the minima and of the medians, and the largest absolute output difference.
Then the same weights go through the import path (a release-format file -> ``import_release_checkpoint`` -> our
checkpoint) and our default sampler inpaints one lesion: seconds per lesion (network evaluations dominate).

The release's model code needs ``rotary-embedding-torch==0.1.5``, ``einops`` and ``einops-exts`` importable;
install them outside this project and pass ``--site``::

    python benchmarks/release_speed.py --release /path/to/LeFusion --site /tmp/release_site \\
        [--threads 2] [--repeats 2] [--sampler-steps N] [-o benchmarks/results/release_speed.json]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import emit
from torch import nn

from lefusion_nnunet.checkpoints.format import load_checkpoint_content
from lefusion_nnunet.checkpoints.release import build_release_model, import_release_checkpoint
from lefusion_nnunet.diffusion import NoiseSchedule, SamplerConfig, ScheduleConfig, make_sampler
from lefusion_nnunet.diffusion.release_unet import ReleaseUnet, ReleaseUnetConfig

ROI_ZYX = (32, 64, 64)


def _release_module(release: Path):
    sys.path.insert(0, str(release / "LeFusion"))
    import ddpm.diffusion as module  # noqa: PLC0415  (the authors' code, from --release)
    return module


def _interleaved(fns: list, repeats: int) -> tuple[list[torch.Tensor], list[list[float]]]:
    """Outputs and per-call seconds of each function, called in turn ``repeats`` times after one warm-up call each
    (allocator, oneDNN primitive caches); interleaving spreads load from other processes over both."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return outs, times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="checkout of github.com/M3DV/LeFusion")
    parser.add_argument("--site", type=Path, action="append", default=[],
                        help="import path holding rotary_embedding_torch, einops, einops_exts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed evaluations per model after the warm-up, interleaved (default: 3)")
    parser.add_argument("--sampler-steps", type=int, default=None,
                        help="override the default sampler's step count (default: the default sampler's own)")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("-o", "--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for site in args.site:
        sys.path.insert(0, str(site))
    torch.set_num_threads(args.threads)
    module = _release_module(args.release)

    torch.manual_seed(0)
    theirs = module.Unet3D(dim=64, dim_mults=(1, 2, 4, 8), channels=1, cond_dim=16).eval()
    ours = ReleaseUnet(ReleaseUnetConfig.from_preset("lidc")).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, 1, *ROI_ZYX), generator=g)
    t = torch.tensor([150])
    cond = torch.softmax(torch.randn((1, 16), generator=g), dim=-1)
    with torch.no_grad():
        (eps_theirs, eps_ours), (t_theirs, t_ours) = _interleaved(
            [lambda: theirs(x, t, cond=cond), lambda: ours(x, t, cond)], args.repeats)
    result = {
        "benchmark": "release_speed", "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": args.threads, "roi_xyz": list(ROI_ZYX[::-1]), "batch": 1,
        "parameters": sum(p.numel() for p in ours.parameters()),
        "release_seconds_per_eval": [round(v, 3) for v in t_theirs],
        "ours_seconds_per_eval": [round(v, 3) for v in t_ours],
        "speedup_of_minimum": round(min(t_theirs) / min(t_ours), 2),
        "speedup_of_median": round(statistics.median(t_theirs) / statistics.median(t_ours), 2),
        "max_abs_diff": float((eps_theirs - eps_ours).abs().max()),
        "eps_abs_max": float(eps_theirs.abs().max()),
    }

    if not args.skip_sampler:
        with tempfile.TemporaryDirectory() as tmp:
            wrapped = module.GaussianDiffusion_Nolatent(nn.DataParallel(theirs), image_size=64, num_frames=32,
                                                        channels=1, timesteps=300, data_type="lidc")
            sd = wrapped.state_dict()
            torch.save({"step": 0, "model": sd, "ema": sd, "scaler": {}}, Path(tmp) / "lidc_like.pt")
            imported = import_release_checkpoint(Path(tmp) / "lidc_like.pt", "lidc", out=Path(tmp) / "ours.pt")
            content = load_checkpoint_content(imported.path, expected_kind="lesion")
        model = build_release_model(content["model_config"])
        model.load_state_dict(content["ema_state"], strict=True)
        model.eval()
        schedule = NoiseSchedule(ScheduleConfig.from_dict(content["schedule_config"]))
        config = SamplerConfig(**content.get("sampler_defaults", {}))
        if args.sampler_steps:
            config = SamplerConfig(**{**config.to_dict(), "num_steps": args.sampler_steps})
        sampler = make_sampler(config)
        known = torch.rand((1, 1, *ROI_ZYX), generator=g) * 2 - 1
        zz, yy, xx = torch.meshgrid(*(torch.arange(n) - n / 2 for n in ROI_ZYX), indexing="ij")
        mask = ((zz / 4) ** 2 + (yy / 8) ** 2 + (xx / 8) ** 2 <= 1).float()[None, None]
        context = known * (1 - mask)

        def eps_fn(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            return model(x_t, t_, context, mask, cond)

        start = time.perf_counter()
        with torch.no_grad():
            out = sampler.sample(eps_fn, schedule, known, mask, generator=torch.Generator().manual_seed(2))
        seconds = time.perf_counter() - start
        result.update({
            "sampler": config.to_dict(), "sampler_network_evaluations": sampler.num_network_evaluations(300),
            "ours_seconds_per_lesion": round(seconds, 1),
            "background_bit_identical": bool(torch.equal(out[mask == 0], known[mask == 0]))})
    emit(result, args.out)


if __name__ == "__main__":
    main()
