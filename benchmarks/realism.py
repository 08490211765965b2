"""Realism: do synthetic lesions look like held-out real lesions of the same kind, and do they sit in the lung?

Per lesion (:mod:`lefusion_nnunet.evaluation.realism`): intensity mean and sd, high-frequency grain, clipped voxels, border
step, in the chest window (default -1000..400 HU); per arm: synthetic/real ratios, the worst clipping, and a
real-vs-synthetic logistic regression on the five statistics (stratified 5-fold, seeded, ROC AUC with the
per-fold spread); placement: the fraction of synthetic lesion voxels inside the automatic lung region
(:func:`lefusion_nnunet.data.lung_region.lung_region`) and, on the phantom, inside its lung label. A montage PNG
shows the central axial slice of real and synthetic lesions side by side (one row per arm).

Arms, each made with the ``lefusion`` command (subprocess, so the benchmark uses only the public CLI):
``lefusion`` (``lefusion enlarge`` defaults: DDIM sampler, ellipsoid masks), ``lefusion_repaint_j2_r2``
(``--sampler repaint --jump-length 2 --jump-n-sample 2``) and ``copy_paste`` (``--method copy-paste
--mask-source real``); on request (``--arms``) the 10-evaluation samplers ``lefusion_ddim10`` (``--steps 10``) and
``lefusion_dpmpp2m10`` (``--sampler dpmpp2m --steps 10``), and the earlier deterministic defaults
``lefusion_ddim10_eta0`` / ``lefusion_ddim25_eta0``.

Datasets:

* ``phantom``: the chest phantom (``lefusion phantom``, seed ``--seed``) trains the model (``lefusion train``
  defaults with ``--max-minutes --minutes``); the synthetic lesions go into its lesion-free cases; the real
  lesions come from a held-out phantom (seed ``--seed + 1000``, 12 lesion cases). Texture per lesion: real from
  the phantom manifest; synthetic from the condition histogram the provenance records (the real texture whose
  mean histogram is nearest).
* ``real-ct``: the two chest CTs with tumour labels in the pyradiomics 3.0.1 source distribution (5 mm slices,
  0.57-0.63 mm in-plane), read from ``--real-data-dir`` (get them as printed when missing; kept out of the
  repository). The model is trained on both tumours with ``lefusion train``'s defaults (the ROI planned in mm
  from the tumours; ``--real-roi`` / ``--real-spacing`` override it), lesions are placed with ``--cases-from all``
  and ``lefusion enlarge --auto-region lung``. Only two real lesions exist and they are the training lesions, not
  held out.

    python benchmarks/realism.py phantom --minutes 5 --out benchmarks/results/realism_phantom.json
    python benchmarks/realism.py real-ct --minutes 5 --real-data-dir ~/.cache/lefusion_realdata \\
        --out benchmarks/results/realism_real_ct.json

Targets (issue 13, phantom, defaults + 10 minutes): sd and grain ratios in [0.8, 1.25], no lesion over 1 %
clipped, border step ratio in [0.67, 1.5], discriminator AUC <= 0.70; every real-CT lesion inside the lung.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _common import emit
from scipy import ndimage

from lefusion_nnunet.data.lung_region import lung_region
from lefusion_nnunet.evaluation.realism import CHEST_WINDOW_HU, lesion_statistics, realism_summary, split_lesions

TRAIN_ID, HELDOUT_ID, REAL_ID = 501, 503, 601
ARMS = {"lefusion": [],
        "lefusion_repaint_j2_r2": ["--sampler", "repaint", "--jump-length", "2", "--jump-n-sample", "2"],
        "copy_paste": ["--method", "copy-paste", "--mask-source", "real"],
        "lefusion_ddim10": ["--sampler", "ddim", "--steps", "10"],
        "lefusion_dpmpp2m10": ["--sampler", "dpmpp2m", "--steps", "10"],
        "lefusion_ddim10_eta0": ["--sampler", "ddim", "--steps", "10", "--eta", "0"],
        "lefusion_ddim25_eta0": ["--sampler", "ddim", "--steps", "25", "--eta", "0"]}
ARM_IDS = {"lefusion": 1, "lefusion_repaint_j2_r2": 2, "copy_paste": 3, "lefusion_ddim10": 4, "lefusion_dpmpp2m10": 5,
           "lefusion_ddim10_eta0": 6, "lefusion_ddim25_eta0": 7}
REAL_FILES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd")
GET_REAL = ("pip download --no-deps --no-build-isolation pyradiomics==3.0.1 -d {d} && tar xzf "
            "{d}/pyradiomics-3.0.1.tar.gz -C {d} --strip-components=2 --wildcards 'pyradiomics-3.0.1/data/lung*'")


def run(cmd: list[str], env: dict, log: Path) -> float:
    """Run a ``lefusion`` command, output to ``log``; raise with the log's tail on failure. Returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}): {log.read_text()[-1500:]}")
    return time.perf_counter() - t0


def destination_flag(env: dict) -> str:
    """``--destination`` where ``lefusion enlarge`` has it (``-o`` is deprecated there), else ``-o``."""
    text = subprocess.run(["lefusion", "enlarge", "--help"], env=env, capture_output=True, text=True).stdout
    return "--destination" if "--destination" in text else "-o"


def read(path: Path) -> tuple[np.ndarray, tuple[float, float, float], sitk.Image]:
    """Array ``(Z, Y, X)``, spacing ``(z, y, x)`` mm, and the SimpleITK image (for its geometry)."""
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(float(s) for s in img.GetSpacing()[::-1]), img


def dataset_dir(raw: Path, ds_id: int) -> Path:
    found = sorted(raw.glob(f"Dataset{ds_id:03d}_*"))
    if not found:
        raise RuntimeError(f"no Dataset{ds_id:03d}_* under {raw}")
    return found[0]


def lesion_records(image, mask, spacing, window, texture, case, region=None, lung_label=None) -> list[dict]:
    """One record per 26-connected lesion of ``mask``: statistics, texture, placement, montage crop."""
    out = []
    for part in split_lesions(mask, min_voxels=8):
        rec = {"case": case, "texture": texture(part) if callable(texture) else texture,
               "stats": lesion_statistics(image, part, spacing, window), "values": image[part]}
        if region is not None:
            rec["inside_lung_region"] = float(region[part].mean())
        if lung_label is not None:
            rec["inside_lung_label"] = float(lung_label[part].mean())
        zc, yc, xc = (int(round(c)) for c in ndimage.center_of_mass(part))
        extent_mm = max((np.ptp(ix) + 1) * s for ix, s in zip(np.nonzero(part)[1:], spacing[1:]))
        half = [max(int(max(22.0, 0.75 * extent_mm) / s), 4) for s in spacing[1:]]   # >= 44 mm square
        sl = (zc, slice(max(yc - half[0], 0), yc + half[0]), slice(max(xc - half[1], 0), xc + half[1]))
        rec["crop"], rec["crop_mask"] = image[sl].astype(np.float32), part[sl]
        out.append(rec)
    return out


def histogram(values_hu: np.ndarray, window) -> np.ndarray:
    """16-bin histogram of HU values mapped from ``window`` to [-1, 1] (the model's condition space)."""
    lo, hi = window
    v = np.clip(2.0 * (np.asarray(values_hu, np.float64) - lo) / (hi - lo) - 1.0, -1.0, 1.0)
    return np.histogram(v, bins=16, range=(-1.0, 1.0))[0] / max(v.size, 1)


def synthetic_records(dest: Path, src: Path, lesion_label: int, window, region_of, lung_label_value, texture_of):
    """Records of the new lesions of every synthetic case of ``dest`` (new = lesion voxels not in the source)."""
    prov = json.loads((dest / "lefusion_provenance.json").read_text())
    ending = json.loads((dest / "dataset.json").read_text())["file_ending"]
    out = []
    for cid, entry in prov["synthetic_cases"].items():
        image, spacing, _ = read(dest / "imagesTr" / f"{cid}_0000{ending}")
        label, _, _ = read(dest / "labelsTr" / f"{cid}{ending}")
        source = entry["source_case"]
        src_label, _, _ = read(src / "labelsTr" / f"{source}{ending}")
        new = (label == lesion_label) & (src_label != lesion_label)
        lung = (src_label == lung_label_value) if lung_label_value is not None else None
        out += lesion_records(image, new, spacing, window, texture_of(entry, prov), cid, region_of(source), lung)
    return out, prov


def summarise(real: list[dict], synth: list[dict], seed: int) -> dict:
    out = realism_summary([r["stats"] for r in real], [s["stats"] for s in synth], seed=seed)
    for key in ("inside_lung_region", "inside_lung_label"):
        vals = [s[key] for s in synth if key in s]
        if vals:
            out[key] = {"min": round(min(vals), 4), "mean": round(float(np.mean(vals)), 4),
                        "lesions_fully_inside": sum(v >= 1.0 for v in vals), "n": len(vals)}
    textures = sorted({r["texture"] for r in real if r["texture"]} & {s["texture"] for s in synth if s["texture"]})
    if len(textures) > 1:
        out["per_texture"] = {t: realism_summary([r["stats"] for r in real if r["texture"] == t],
                                                 [s["stats"] for s in synth if s["texture"] == t], seed=seed)
                              for t in textures}
    return out


def montage(rows: dict[str, list[dict]], path: Path, window, columns: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.75 * len(rows)), squeeze=False)
    for i, (name, recs) in enumerate(rows.items()):
        for j in range(columns):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(recs):
                continue
            r = recs[j]
            ax.imshow(r["crop"], cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
            if r["crop_mask"].any():
                ax.contour(r["crop_mask"], [0.5], colors="yellow", linewidths=0.4, alpha=0.5)
            s = r["stats"]
            ax.set_title(f"{(r['texture'] or '')[:11]}\nsd {s.sd_hu:.0f} gr {s.grain_hu:.0f} st {s.border_step_hu:.0f}",
                         fontsize=5)
        axes[i][0].text(-0.08, 0.5, name, transform=axes[i][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=7)
    fig.suptitle(f"central axial slice, window {window[0]:g}..{window[1]:g} HU, yellow = lesion mask "
                 f"(sd / grain / border step in HU)", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def prepare_phantom(args, env, raw: Path, logs: Path, timings: dict) -> dict:
    if not any(raw.glob(f"Dataset{TRAIN_ID}_*")):
        timings["phantom"] = run(["lefusion", "phantom", "-o", str(raw), "--id", str(TRAIN_ID), "--seed",
                                  str(args.seed)], env, logs / "phantom.log")
    if not any(raw.glob(f"Dataset{HELDOUT_ID}_*")):
        run(["lefusion", "phantom", "-o", str(raw), "--id", str(HELDOUT_ID), "--name", "LeFusionChestHeldout",
             "--seed", str(args.seed + 1000), "--cases", "13", "--lesion-free-fraction", "0"], env,
            logs / "phantom_heldout.log")
    return {"train": ["-d", str(TRAIN_ID), "--lesion-label", "2", "--region-label", "1"], "lesion_label": 2,
            "lung_label": 1, "enlarge": ["--cases-from", "lesion-free"]}


def prepare_real(args, env, raw: Path, work: Path) -> dict:
    d = Path(args.real_data_dir).expanduser()
    missing = [f for f in REAL_FILES if not (d / f).is_file()]
    if missing:
        sys.exit(f"realism: the real chest CTs are missing from {d} ({', '.join(missing)}); get them (35 MB, "
                 f"kept outside the repository) with\n  mkdir -p {d} && " + GET_REAL.format(d=d) +
                 "\nor pass --real-data-dir; CI does not need them.")
    ds = raw / f"Dataset{REAL_ID}_PyradiomicsLung"
    regions = work / "lung_regions"
    if not (ds / "dataset.json").is_file():
        for sub in ("imagesTr", "labelsTr"):
            (ds / sub).mkdir(parents=True, exist_ok=True)
        regions.mkdir(parents=True, exist_ok=True)
        for case in ("lung1", "lung2"):
            image = sitk.ReadImage(str(d / f"{case}_image.nrrd"))
            label = sitk.Cast(sitk.ReadImage(str(d / f"{case}_label.nrrd")) > 0, sitk.sitkUInt8)
            label.CopyInformation(image)
            sitk.WriteImage(image, str(ds / "imagesTr" / f"{case}_0000.nrrd"), True)
            sitk.WriteImage(label, str(ds / "labelsTr" / f"{case}.nrrd"), True)
            lung = lung_region(sitk.GetArrayFromImage(image), tuple(image.GetSpacing()[::-1]))
            mask = sitk.GetImageFromArray(lung.astype(np.uint8))
            mask.CopyInformation(image)
            sitk.WriteImage(mask, str(regions / f"{case}.nrrd"), True)
        (ds / "dataset.json").write_text(json.dumps(
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 2,
             "file_ending": ".nrrd", "name": ds.name,
             "description": "pyradiomics 3.0.1 sdist data/lung1, lung2 (chest CT, tumour labels)"}, indent=2))
    geometry = [] if args.real_roi is None else ["--roi-size", *map(str, args.real_roi)]
    geometry += [] if args.real_spacing is None else ["--spacing", *map(str, args.real_spacing)]
    placement = ["--auto-region", "lung"] if args.real_region == "auto-lung" else ["--region-masks", str(regions)]
    return {"train": ["-d", str(REAL_ID), "--lesion-label", "1", *geometry], "lesion_label": 1, "lung_label": None,
            "enlarge": ["--cases-from", "all", *placement]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=["phantom", "real-ct"])
    p.add_argument("--minutes", type=float, default=5.0, help="lefusion train --max-minutes (default 5)")
    p.add_argument("--work", type=Path, default=Path("~/.cache/lefusion_realism").expanduser(),
                   help="work folder (nnU-Net raw/results); finished steps are reused (default ~/.cache/...)")
    p.add_argument("--real-data-dir", default="~/.cache/lefusion_realdata")
    p.add_argument("--real-roi", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="real CT: model ROI in voxels (default: lefusion train's plan from the tumours)")
    p.add_argument("--real-spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="real CT: model spacing in mm (default: lefusion train's)")
    p.add_argument("--real-region", choices=["auto-lung", "masks"], default="auto-lung",
                   help="real CT placement: enlarge --auto-region lung (default), or the same lung regions passed "
                        "as --region-masks")
    p.add_argument("--border-ring-shape", default=None,
                   choices=["in-plane-faces", "in-plane", "faces", "cube"],
                   help="lefusion train --border-ring-shape (default: lefusion train's default)")
    p.add_argument("--border-ring", type=int, default=None,
                   help="lefusion train --border-ring voxels (default: lefusion train's default)")
    p.add_argument("--per-case", type=int, default=3, help="variants per source case (DDIM, copy-paste)")
    p.add_argument("--repaint-per-case", type=int, default=1, help="variants per source case for RePaint")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["lefusion", "lefusion_repaint_j2_r2", "copy_paste"])
    p.add_argument("--window", type=float, nargs=2, default=CHEST_WINDOW_HU, metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--montage", type=Path, default=None, help="PNG (default: next to --out, else in --work)")
    p.add_argument("--montage-columns", type=int, default=8, help="lesions per montage row (default 8)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    work = args.work.expanduser() / args.dataset
    raw, logs = work / "raw", work / "logs"
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"))
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    window = tuple(float(v) for v in args.window)
    timings_file = work / "timings.json"        # seconds of each finished step, kept for reruns that reuse it
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    setup = prepare_phantom(args, env, raw, logs, timings) if args.dataset == "phantom" else \
        prepare_real(args, env, raw, work)
    src_id = TRAIN_ID if args.dataset == "phantom" else REAL_ID
    src = dataset_dir(raw, src_id)
    ckpts = sorted((work / "results").glob(f"{src.name}/*/checkpoint_final.pt"))
    if not ckpts:
        ring = [] if args.border_ring_shape is None else ["--border-ring-shape", args.border_ring_shape]
        ring += [] if args.border_ring is None else ["--border-ring", str(args.border_ring)]
        timings["train"] = run(["lefusion", "train", *setup["train"], "--max-minutes", str(args.minutes),
                                "--seed", str(args.seed), *ring], env, logs / "train.log")
        ckpts = sorted((work / "results").glob(f"{src.name}/*/checkpoint_final.pt"))
    train_log = [json.loads(line) for line in (ckpts[0].parent / "training_log.jsonl").read_text().splitlines()
                 if line.strip()]
    steps = max((r.get("step", 0) for r in train_log), default=0)

    # real lesions, and the lung regions of the cases that receive synthetic lesions
    ending = json.loads((src / "dataset.json").read_text())["file_ending"]
    regions: dict[str, np.ndarray] = {}

    def region_of(case: str) -> np.ndarray:
        if case not in regions:
            image, spacing, _ = read(src / "imagesTr" / f"{case}_0000{ending}")
            regions[case] = lung_region(image, spacing)
        return regions[case]

    real: list[dict] = []
    if args.dataset == "phantom":
        held = dataset_dir(raw, HELDOUT_ID)
        for case in json.loads((held / "phantom_manifest.json").read_text())["cases"]:
            if not case["nodules"]:
                continue
            image, spacing, _ = read(held / case["image"])
            label, _, _ = read(held / case["label"])
            real += lesion_records(image, label == 2, spacing, window, _nearest_texture(case["nodules"]),
                                   case["case_id"])
    else:
        for case in ("lung1", "lung2"):
            image, spacing, _ = read(src / "imagesTr" / f"{case}_0000{ending}")
            label, _, _ = read(src / "labelsTr" / f"{case}{ending}")
            real += lesion_records(image, label == 1, spacing, window, "tumour", case, region_of(case))

    result = {"benchmark": "realism", "dataset": args.dataset, "device": f"cpu ({platform.machine()}, "
              f"{os.cpu_count()} threads)", "window_hu": list(window), "train_minutes": args.minutes,
              "train_steps": steps, "checkpoint": str(ckpts[0]), "seed": args.seed,
              "border_ring": _checkpoint_ring(ckpts[0]),
              "real": {"n": len(real), "lesions": [{"case": r["case"], "texture": r["texture"], **r["stats"].to_dict(),
                                                    **({"inside_lung_region": round(r["inside_lung_region"], 4)}
                                                       if "inside_lung_region" in r else {})} for r in real]},
              "arms": {}}
    rows = {"real": real[: args.montage_columns]}
    dest_flag = destination_flag(env)
    for arm in args.arms:
        dest_id = 700 + 10 * (src_id == REAL_ID) + ARM_IDS[arm]
        per_case = args.repaint_per_case if "repaint" in arm else args.per_case
        try:
            if not any(raw.glob(f"Dataset{dest_id}_*")):
                extra = ARMS[arm] if arm != "copy_paste" else [*ARMS[arm], "--checkpoint", str(ckpts[0])]
                timings[arm] = run(["lefusion", "enlarge", "-d", str(src_id), dest_flag, str(dest_id), "--per-case",
                                    str(per_case), "--seed", str(args.seed), *setup["enlarge"], *extra], env,
                                   logs / f"enlarge_{arm}.log")
            dest = dataset_dir(raw, dest_id)
            synth, prov = synthetic_records(dest, src, setup["lesion_label"], window, region_of, setup["lung_label"],
                                            _texture_of(real))
        except RuntimeError as exc:
            result["arms"][arm] = {"error": str(exc)}
            continue
        result["arms"][arm] = {"enlarge_args": ARMS[arm], "per_case": per_case, "seconds": timings.get(arm),
                               **summarise(real, synth, args.seed),
                               "lesions": [{"case": s["case"], "texture": s["texture"], **s["stats"].to_dict(),
                                            **{k: round(s[k], 4) for k in ("inside_lung_region", "inside_lung_label")
                                               if k in s}} for s in synth]}
        rows[arm] = synth[: args.montage_columns]
    timings_file.write_text(json.dumps(timings, indent=2))
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    png = args.montage or (args.out.with_suffix(".png") if args.out else work / "realism_montage.png")
    montage(rows, png, window, columns=max(len(r) for r in rows.values()))
    result["montage"] = str(png)
    emit(result, args.out)
    return result


def _checkpoint_ring(path: Path) -> dict:
    """The border ring a checkpoint was trained with (voxels and shape, from its DataConfig)."""
    from lefusion_nnunet.checkpoints.loaders import checkpoint_data_config

    data = checkpoint_data_config(path)
    return {"voxels": data.border_ring_voxels, "shape": data.border_ring_shape}


def _nearest_texture(nodules: list[dict]):
    """Texture of a phantom lesion: the manifest nodule whose centre is nearest the lesion's centroid."""
    def texture(part: np.ndarray) -> str | None:
        if not nodules:
            return None
        c = np.array(ndimage.center_of_mass(part))
        d = [np.linalg.norm(c - np.array(n["center_zyx"])) for n in nodules]
        return nodules[int(np.argmin(d))]["texture"]
    return texture


def _texture_of(real: list[dict]):
    """A synthetic lesion's texture: the real texture whose mean histogram (in the checkpoint's window, 16 bins)
    is nearest in L1 to the lesion's recorded condition histogram (``texture_histogram`` of the provenance; for
    copy-paste the histogram its source lesion was chosen by)."""
    textures = sorted({r["texture"] for r in real if r["texture"]})

    def of(entry: dict, prov: dict) -> str | None:
        hist = entry.get("texture_histogram")
        if len(textures) < 2 or hist is None:
            return textures[0] if len(textures) == 1 else None
        intensity = prov["checkpoint"]["data"]["intensity"]
        if intensity.get("kind") != "window":
            return None
        means = {t: np.mean([histogram(r["values"], intensity["window"]) for r in real if r["texture"] == t], 0)
                 for t in textures}
        h = np.asarray(hist, np.float64).ravel()[:16]
        return min(means, key=lambda t: float(np.abs(means[t] - h).sum()))
    return of


if __name__ == "__main__":
    main()
