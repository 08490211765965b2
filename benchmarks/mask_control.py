"""Mask control: do diffusion lesion masks have the requested size, stay in the allowed region, and does
``--boundary`` order their surface roughness?

Trains the lesion mask model (`lefusion train-mask`, `small` preset) on a generated phantom within a CPU
budget, then makes masks in the lesion-free cases through the same function the enlarger, the nnU-Net trainer
and `lefusion sample-mask` use (`MaskGenerator.generate_in_case`): random valid centres in the host region
(lung for the chest phantom, myocardium for the cardiac one), requested equivalent-sphere diameters, boundary
0 / 0.5 / 1 (paired: the same centre and network noise for every boundary value).

    python benchmarks/mask_control.py --datasets chest cardiac --minutes 5 --out benchmarks/results/mask_control.json

Prints one JSON object (also written to --out). Targets: volume within +-25 % of the request in >= 80 % of
samples; 100 % of lesion voxels inside the allowed region; mean surface-to-volume ratio increasing with
``--boundary`` (0 < 0.5 < 1) at every diameter. Size is enforced by the post-processing threshold; the raw
network's own size agreement (its >= 0 region) is reported too (``raw_network``), so the two can be told apart.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lefusion_nnunet.checkpoints.loaders import load_mask_checkpoint
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.io import read_label
from lefusion_nnunet.data.masks import mask_volume_mm3, sphere_volume_mm3, sphericity, surface_to_volume
from lefusion_nnunet.data.placement import allowed_region
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.phantoms.cardiac import CardiacPhantomConfig, generate_cardiac_phantom
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom
from lefusion_nnunet.seeding import seeded_generator, seeded_rng
from lefusion_nnunet.synthesis.masks import MaskGenerator
from lefusion_nnunet.training.loop import TrainConfig
from lefusion_nnunet.training.mask import train_mask_model

BOUNDARIES = (0.0, 0.5, 1.0)
SETUPS = {
    # name: (phantom writer, config, lesion labels, host label, ROI (z, y, x), diameters mm)
    "chest": (generate_chest_phantom, PhantomConfig(num_cases=24, lesion_free_fraction=0.25), [2], 1, (16, 32, 32),
              (8.0, 12.0, 16.0, 20.0)),
    "cardiac": (generate_cardiac_phantom, CardiacPhantomConfig(num_cases=20, lesion_free_fraction=0.3), [3, 4], 2,
                (8, 32, 32), (12.0, 16.0, 20.0)),
}


def _raw_network_ratio(gen: MaskGenerator, allowed, spacing, diameter: float, rng, generator) -> float:
    """Volume of the network's own outer mask (sample >= 0, component on the sphere) / requested volume."""
    from lefusion_nnunet.data.mask_shapes import center_distance_mm, component_on_ball
    from lefusion_nnunet.data.placement import choose_center
    from lefusion_nnunet.data.roi import extract_roi_mask, roi_origin_for_center

    roi = gen.data.roi
    center = choose_center(allowed, spacing, diameter / 2, rng)
    origin = roi_origin_for_center(center, spacing, roi)
    region = extract_roi_mask(allowed, spacing, origin, roi)
    c_model = (center - origin) / (np.asarray(roi.spacing_zyx) / np.asarray(spacing))
    soft = gen.sample_soft(c_model[None], diameter, gen.condition(diameter, 0.5, rng)[None], region[None], generator)[0]
    ball = center_distance_mm(roi.size_zyx, roi.spacing_zyx, c_model) <= diameter / 2
    raw = component_on_ball((soft[0] >= 0) & region, ball)
    return mask_volume_mm3(raw, roi.spacing_zyx) / sphere_volume_mm3(diameter)


def run_setup(name: str, work: Path, minutes: float, steps: int, batch_size: int, samples: int, seed: int) -> dict:
    writer, pcfg, labels, host, roi_size, diameters = SETUPS[name]
    raw = work / "raw"
    ds_id = {"chest": 621, "cardiac": 622}[name]
    folders = list(raw.glob(f"Dataset{ds_id}_*")) if raw.exists() else []
    folder = folders[0] if folders else writer(raw, ds_id, f"Mask{name.title()}", pcfg)
    dataset = load_raw_dataset(folder)
    manifest = json.loads((folder / "phantom_manifest.json").read_text())
    free = [c["case_id"] for c in manifest["cases"] if not c["has_lesion"]]
    spacing = tuple(pcfg.spacing_zyx)
    roi = RoiGeometry(roi_size, spacing)
    run_dir = work / f"run_{name}"
    result: dict = {"dataset": dataset.name, "lesion_labels": labels, "host_label": host,
                    "roi_xyz": list(roi_size[::-1]), "spacing_xyz_mm": list(spacing[::-1])}
    t0 = time.perf_counter()
    reused = (run_dir / "checkpoint_final.pt").exists()
    if reused:
        ckpt_path = run_dir / "checkpoint_final.pt"
    else:
        cfg = TrainConfig(preset="small", steps=steps, batch_size=batch_size, max_minutes=minutes, seed=seed,
                          device="cpu", checkpoint_every=200)
        ckpt_path = train_mask_model(dataset, labels, run_dir, cfg, roi, region_label=host, progress=False)
    rows = [json.loads(x) for x in (run_dir / "training_log.jsonl").read_text().splitlines() if x.strip()]
    ckpt = load_mask_checkpoint(ckpt_path)
    log_minutes = sum((b["step"] - a) / max(b["steps_per_s"], 1e-9)
                      for a, b in zip([0] + [r["step"] for r in rows[:-1]], rows)) / 60
    result["training"] = {"preset": "small", "batch_size": batch_size, "steps": rows[-1]["step"],
                          "minutes": round(log_minutes if reused else (time.perf_counter() - t0) / 60, 2),
                          "reused_checkpoint": reused,
                          "num_training_lesions": ckpt.training_summary["num_lesions"],
                          "final_loss_mean_last_5": float(np.mean([r["loss"] for r in rows[-5:]]))}
    gen = MaskGenerator(ckpt, device="cpu")
    result["sampler"] = gen.sampler.config.to_dict()
    cases = {}
    for cid in free:
        label, props = read_label(dataset.case(cid).label)
        cases[cid] = (allowed_region(label, region_label=host, lesion_labels=labels), tuple(props["spacing"]))
    records, t1 = [], time.perf_counter()
    for d in diameters:
        for i in range(samples):
            cid = free[i % len(free)]
            allowed, sp = cases[cid]
            for b in BOUNDARIES:
                rng = seeded_rng(seed, name, d, i)           # paired: same centre / condition draw for every b
                made = gen.generate_in_case(allowed, sp, d, b, rng, seeded_generator(seed, name, d, i))
                if made is None:
                    records.append({"diameter": d, "sample": i, "boundary": b, "case": cid, "failed": True})
                    continue
                union = made.masks.any(0)
                v = mask_volume_mm3(union, sp)
                centroid = np.argwhere(union).mean(0)
                records.append({
                    "diameter": d, "sample": i, "boundary": b, "case": cid, "failed": False,
                    "volume_ratio": v / sphere_volume_mm3(d), "inside_fraction": float(allowed[union].mean()),
                    "surface_to_volume": surface_to_volume(union, sp), "sphericity": sphericity(union, sp),
                    "centroid_to_centre_mm": float(np.linalg.norm((centroid - made.info["center_voxel_zyx"]) * sp)),
                    "classes_present": [bool(m.any()) for m in made.masks]})
    n_masks = len(records)
    ok = [r for r in records if not r["failed"]]
    ratios = np.array([r["volume_ratio"] for r in ok])
    result["masks"] = {"n": n_masks, "failed": n_masks - len(ok),
                       "seconds_per_mask": round((time.perf_counter() - t1) / max(n_masks, 1), 3)}
    result["size"] = {"within_25pct_fraction": float(np.mean(np.abs(ratios - 1) <= 0.25)) if len(ok) else 0.0,
                      "volume_ratio_median": float(np.median(ratios)), "volume_ratio_min": float(ratios.min()),
                      "volume_ratio_max": float(ratios.max()),
                      "per_diameter": {str(d): {"within_25pct_fraction": float(np.mean(
                          [abs(r["volume_ratio"] - 1) <= 0.25 for r in ok if r["diameter"] == d]))}
                          for d in diameters}}
    inside = [r["inside_fraction"] for r in ok]
    result["region"] = {"lesion_voxels_inside_fraction_min": float(min(inside)),
                        "all_voxels_inside_all_masks": bool(all(x == 1.0 for x in inside))}
    result["location"] = {"centroid_to_centre_mm_median": float(np.median([r["centroid_to_centre_mm"] for r in ok]))}
    per_b = {}
    for b in BOUNDARIES:
        sel = [r for r in ok if r["boundary"] == b]
        per_b[str(b)] = {"surface_to_volume_mean": float(np.mean([r["surface_to_volume"] for r in sel])),
                         "sphericity_mean": float(np.mean([r["sphericity"] for r in sel])),
                         "per_diameter_surface_to_volume": {str(d): float(np.mean(
                             [r["surface_to_volume"] for r in sel if r["diameter"] == d])) for d in diameters}}
    mono_d = {str(d): bool(all(per_b[str(a)]["per_diameter_surface_to_volume"][str(d)]
                               < per_b[str(c)]["per_diameter_surface_to_volume"][str(d)]
                               for a, c in zip(BOUNDARIES, BOUNDARIES[1:]))) for d in diameters}
    paired = []
    for d in diameters:
        for i in range(samples):
            s = [r["surface_to_volume"] for r in ok if r["diameter"] == d and r["sample"] == i]
            if len(s) == len(BOUNDARIES):
                paired.append(all(x < y for x, y in zip(s, s[1:])))
    result["boundary"] = {"per_boundary": per_b, "monotonic_per_diameter": mono_d,
                          "monotonic_all_diameters": bool(all(mono_d.values())),
                          "paired_samples_strictly_increasing_fraction": float(np.mean(paired)) if paired else None}
    if len(labels) > 1:
        result["classes"] = {"fraction_with_inner_class": float(np.mean([r["classes_present"][1] for r in ok]))}
    raw_ratios = [_raw_network_ratio(gen, cases[free[i % len(free)]][0], cases[free[i % len(free)]][1], d,
                                     seeded_rng(seed, "raw", d, i), seeded_generator(seed, "raw", d, i))
                  for d in diameters for i in range(min(samples, 4))]
    result["raw_network"] = {"note": "network output thresholded at 0 (component on the sphere), before size "
                                     "post-processing", "volume_ratio_median": float(np.median(raw_ratios)),
                             "within_25pct_fraction": float(np.mean(np.abs(np.array(raw_ratios) - 1) <= 0.25)),
                             "n": len(raw_ratios)}
    result["pass"] = {"size": result["size"]["within_25pct_fraction"] >= 0.8,
                      "region": result["region"]["all_voxels_inside_all_masks"],
                      "boundary_monotonic": result["boundary"]["monotonic_all_diameters"]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", choices=sorted(SETUPS), default=["chest", "cardiac"])
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per dataset (default 5)")
    ap.add_argument("--steps", type=int, default=3000, help="training step cap (default 3000)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=6, help="masks per diameter and boundary value (default 6)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder); reused if present")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lefusion_maskctl_"))
    t0 = time.perf_counter()
    result: dict = {"benchmark": "mask_control", "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                    "torch": torch.__version__, "boundaries": list(BOUNDARIES),
                    "targets": {"size_within_25pct_fraction_at_least": 0.8, "lesion_voxels_inside_region": 1.0,
                                "surface_to_volume_increasing_with_boundary": True}}
    for name in args.datasets:
        result[name] = run_setup(name, work / name, args.minutes, args.steps, args.batch_size, args.samples, args.seed)
    result["total_minutes"] = round((time.perf_counter() - t0) / 60, 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
