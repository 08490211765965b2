"""Texture control: do generated lesions follow the requested histogram prototype?

Trains the `small` preset on the chest phantom within a CPU budget, then synthesises lesions into the
lesion-free cases through the same path as `lefusion enlarge` (`lefusion_nnunet.variants.make_variants`),
asking for each prototype in turn (`--texture cluster:K`). A sample counts as a hit when the 16-bin histogram
of its generated voxels (model space) is nearer (L1, `histogram_distance`) to the requested prototype than to
every other one (`score`). The same score with the earth mover's distance over the ordered intensity bins
(`histogram_emd`: how far intensity mass must move, so a solid core counts and a half-bin shift of a peak hardly
does) is reported alongside (`score_emd`). Several samplers can be scored side by side from the one trained model
(`--samplers ddim:25,dpmpp2m:10`, NAME[:STEPS][:SPACING][:eta=X]); every sampler gets the same requests, masks,
textures and seeds, so their hit rates are paired: the difference to the first sampler is reported with the
standard error of a paired difference (discordant pairs, as in McNemar's test) besides each rate's binomial
standard error. The paper-faithful RePaint (T=300, j=r=2) is scored too unless --skip-repaint.

    python benchmarks/texture_control.py --minutes 25 --out benchmarks/results/texture_control.json
    python benchmarks/texture_control.py --minutes 8 --samplers ddim:25,dpmpp2m:10 --skip-repaint

Prints one JSON object (also written to --out). Target: score >= 0.8 for the default sampler, and the
default within 5 points of RePaint; a few-step sampler replaces DDIM-25 only within 3 points of it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit, parse_sampler

from lefusion_nnunet.checkpoints.loaders import load_lesion_checkpoint
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.histogram import histogram_distance, histogram_emd, lesion_histogram
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import SamplerConfig, make_sampler
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom
from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
from lefusion_nnunet.training.lesion import train_lesion_model
from lefusion_nnunet.training.loop import TrainConfig
from lefusion_nnunet.variant_settings import VariantSettings
from lefusion_nnunet.variants import make_variants


def score_sampler(ckpt, dataset, free_cases: list[str], sampler: SamplerConfig, per_proto: int, guidance: float,
                  batch_size: int, seed: int) -> dict:
    synth = LesionSynthesizer(ckpt, device="cpu", sampler=sampler, guidance_scale=guidance, batch_size=batch_size)
    protos = ckpt.prototypes[0]
    window = ckpt.data.intensity
    per_case = max(1, int(np.ceil(per_proto / len(free_cases))))
    hits, hits_emd, total, per_k, t0, n_lesions = 0, 0, 0, {}, time.perf_counter(), 0
    for k in range(len(protos.centers)):
        settings = VariantSettings(per_case=per_case, mask_source="ellipsoid", size_mm=(10.0, 16.0), region_label=1,
                                   textures=(f"cluster:{k}",), boundary=0.2, guidance_scale=guidance, seed=seed + k)
        k_hits, k_hits_emd, k_total, dists, nearest, nearest_emd, hists = 0, 0, 0, [], [], [], []
        for cases, _warnings in make_variants(synth, dataset, free_cases, settings):
            for case in cases:
                if k_total >= per_proto:
                    break
                lesion = case.label == ckpt.data.lesion_labels[0]
                values = window.to_model(case.channels[ckpt.data.channel][lesion], window.case_range(case.channels[0]))
                hist = lesion_histogram(values)
                d = [histogram_distance(hist, c) for c in protos.centers]
                d_emd = [histogram_emd(hist, c) for c in protos.centers]
                k_hits += int(np.argmin(d) == k)
                k_hits_emd += int(np.argmin(d_emd) == k)
                k_total += 1
                dists.append(d[k])
                nearest.append(int(np.argmin(d)))
                nearest_emd.append(int(np.argmin(d_emd)))
                hists.append([round(float(v), 4) for v in hist])
        n_lesions += k_total
        hits, hits_emd, total = hits + k_hits, hits_emd + k_hits_emd, total + k_total
        per_k[f"cluster:{k}"] = {"score": k_hits / max(k_total, 1), "score_emd": k_hits_emd / max(k_total, 1),
                                 "n": k_total, "nearest_prototype": nearest, "nearest_prototype_emd": nearest_emd,
                                 "mean_l1_to_requested": float(np.mean(dists)) if dists else None,
                                 "histograms": hists}
    seconds = time.perf_counter() - t0
    return {"sampler": sampler.to_dict(), "guidance": guidance, "score": hits / max(total, 1),
            "score_emd": hits_emd / max(total, 1), "n": total,
            "per_prototype": per_k, "seconds_per_lesion": seconds / max(n_lesions, 1),
            "network_evaluations_per_lesion": make_sampler(sampler).num_network_evaluations(
                ckpt.schedule.num_train_timesteps) * (2 if guidance != 1.0 else 1)}


def parse_samplers(text: str) -> list[SamplerConfig]:
    """``"ddim:25,dpmpp2m:10"`` -> SamplerConfigs, one per comma-separated :func:`parse_sampler` item."""
    configs = [parse_sampler(item) for item in text.split(",") if item.strip()]
    if not configs:
        raise argparse.ArgumentTypeError("--samplers names no sampler")
    return configs


def sampler_label(cfg: SamplerConfig) -> str:
    """Result key of a sampler: ``ddim_default`` for the package default, else e.g. ``dpmpp2m_10_quadratic``
    (``_eta1`` appended for a stochastic one)."""
    if cfg == SamplerConfig():
        return "ddim_default"
    return f"{cfg.name}_{cfg.num_steps}_{cfg.timestep_spacing}" + (f"_eta{cfg.eta:g}" if cfg.eta else "")


def hit_vector(scored: dict, field: str = "nearest_prototype") -> list[int]:
    """Per-lesion hits (1 = nearest prototype is the requested one), in request order."""
    return [int(n == int(k.split(":")[1])) for k, v in scored["per_prototype"].items() for n in v[field]]


def paired_difference(a: dict, b: dict, field: str = "nearest_prototype") -> dict:
    """Hit rate of ``a`` minus ``b`` in points over the same requests, with the paired standard error
    sqrt(discordant - (b_only - a_only)^2 / n) / n (the normal approximation behind McNemar's test)."""
    ha, hb = hit_vector(a, field), hit_vector(b, field)
    n = min(len(ha), len(hb))
    a_only = sum(1 for x, y in zip(ha, hb) if x and not y)
    b_only = sum(1 for x, y in zip(ha, hb) if y and not x)
    diff = (a_only - b_only) / max(n, 1)
    se = math.sqrt(max(a_only + b_only - (a_only - b_only) ** 2 / max(n, 1), 0.0)) / max(n, 1)
    return {"points": 100 * diff, "paired_standard_error_points": 100 * se, "n_pairs": n,
            "hit_only_in_this": a_only, "hit_only_in_reference": b_only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=25.0, help="training wall-clock budget (default 25)")
    ap.add_argument("--steps", type=int, default=3000, help="training step cap (default 3000)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples-per-prototype", type=int, default=12)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0],
                    help="guidance scales scored with each of --samplers (default: 1 2)")
    ap.add_argument("--samplers", type=parse_samplers, default=[SamplerConfig()],
                    help="comma-separated NAME[:STEPS][:SPACING][:eta=X] scored side by side, the first is the "
                         "reference "
                         "(default: ddim:25, the package default)")
    ap.add_argument("--repaint-samples-per-prototype", type=int, default=7,
                    help="RePaint costs 599 evaluations per lesion: fewer samples (default 7: one batch of the 7 "
                         "lesion-free cases)")
    ap.add_argument("--skip-repaint", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="reuse a trained checkpoint (skips training)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the training run in --work/run for another --minutes (several short runs)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lefusion_texture_"))
    raw = work / "raw"
    folder = raw / "Dataset601_TexturePhantom"
    if not folder.exists():
        generate_chest_phantom(raw, 601, "TexturePhantom", PhantomConfig(num_cases=28, lesion_free_fraction=0.25,
                                                                          seed=args.seed))
    dataset = load_raw_dataset(folder)
    manifest = json.loads((folder / "phantom_manifest.json").read_text())
    free = [c["case_id"] for c in manifest["cases"] if not c["has_lesion"]]
    result: dict = {"benchmark": "texture_control", "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                    "torch": torch.__version__}
    if args.checkpoint is None:
        spacing = tuple(PhantomConfig().spacing_zyx)
        cfg = TrainConfig(preset="small", steps=args.steps, batch_size=args.batch_size, max_minutes=args.minutes,
                          seed=args.seed, device="cpu", checkpoint_every=200)
        t0 = time.perf_counter()
        ckpt_path = train_lesion_model(dataset, [2], work / "run", cfg, RoiGeometry((16, 32, 32), spacing),
                                       region_label=1, progress=False, resume=args.resume)
        rows = [json.loads(x) for x in (work / "run" / "training_log.jsonl").read_text().splitlines()]
        result["training"] = {"preset": "small", "roi_xyz": [32, 32, 16], "batch_size": args.batch_size,
                              "steps": rows[-1]["step"], "minutes": (time.perf_counter() - t0) / 60,
                              "final_loss_mean_last_10": float(np.mean([r["loss"] for r in rows[-10:]]))}
    else:
        ckpt_path = args.checkpoint
        log = ckpt_path.parent / "training_log.jsonl"
        if log.exists():  # report how the reused checkpoint was trained
            rows = [json.loads(x) for x in log.read_text().splitlines()]
            result["training"] = {"reused_checkpoint": str(ckpt_path), "steps": rows[-1]["step"],
                                  "final_loss_mean_last_10": float(np.mean([r["loss"] for r in rows[-10:]]))}
    ckpt = load_lesion_checkpoint(ckpt_path)
    result["prototypes"] = {"counts": ckpt.prototypes[0].counts.tolist(), "num_training_lesions":
                            ckpt.training_summary.get("num_lesions"),
                            "centers": [[round(float(v), 4) for v in c] for c in ckpt.prototypes[0].centers]}
    result["distance"] = "L1 over the 16 bins (score); earth mover's distance over the ordered bins alongside (score_emd)"
    reference = sampler_label(args.samplers[0])
    for g in args.guidance:
        for cfg in args.samplers:
            key = f"{sampler_label(cfg)}_guidance_{g:g}"
            scored = score_sampler(ckpt, dataset, free, cfg, args.samples_per_prototype, g, 12, args.seed + 100)
            n = max(scored["n"], 1)
            scored["standard_error_points"] = 100 * math.sqrt(scored["score"] * (1 - scored["score"]) / n)
            result[key] = scored
            if cfg is not args.samplers[0]:
                ref = result[f"{reference}_guidance_{g:g}"]
                scored[f"minus_{reference}"] = paired_difference(scored, ref)
                scored[f"minus_{reference}_emd"] = paired_difference(scored, ref, "nearest_prototype_emd")
                scored[f"seconds_per_lesion_ratio_to_{reference}"] = (scored["seconds_per_lesion"]
                                                                       / ref["seconds_per_lesion"])
            emit(result, args.out)  # partial results survive an interrupted run
    if not args.skip_repaint:  # paper-faithful sampler, compared at guidance 1 (no doubled evaluations)
        result["repaint_j2_r2_guidance_1"] = score_sampler(
            ckpt, dataset, free, SamplerConfig(name="repaint", jump_length=2, jump_n_sample=2),
            args.repaint_samples_per_prototype, 1.0, 12, args.seed + 100)
        if 1.0 in args.guidance and f"{reference}_guidance_1" in result:
            result["default_minus_repaint_points_at_guidance_1"] = 100 * (
                result[f"{reference}_guidance_1"]["score"] - result["repaint_j2_r2_guidance_1"]["score"])
    result["targets"] = {"score_default_at_least": 0.8, "default_vs_repaint_within_points": 5,
                         "few_step_sampler_vs_ddim_25_within_points": 3}
    emit(result, args.out)


if __name__ == "__main__":
    main()
