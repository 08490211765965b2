"""LeFusionTrainer's patch bank at clinical size (issue 14): time and storage per variant (prints JSON).

Builds a chest phantom (``lefusion phantom``, default 512 x 512 x 128 voxels), resamples every second case to
0.75 x 0.75 x 2 mm so nnU-Net's preprocessing resamples (mixed spacings), runs nnU-Net's fingerprint + plan +
preprocess (3d_fullres), then builds the trainer's bank for the lesion-free cases exactly as
``LeFusionTrainer`` does (``bank.build_bank_contents``). With ``--checkpoint`` the variants come from the real
sampler (network time reported separately); without one a fixed 15 mm, 30 HU sphere is painted into the lung
(network time 0), which measures what the bank itself costs.

Usage::

    python benchmarks/clinical_scale.py WORKDIR [--shape 512 512 128] [--cases 6] [--per-case 2]
        [--checkpoint lesion.pt] [--out benchmarks/results/clinical_scale.json]

Not measured here (issue 14's other numbers): time to the first training iteration and loader throughput
(see ``benchmarks/trainer_overhead.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

DATASET_ID, NAME = 964, "LFClinicalScale"


def _resample(path: Path, spacing: tuple[float, float, float], label: bool) -> None:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        img.GetOrigin(), spacing, img.GetDirection(), -1000 if not label else 0, img.GetPixelID())
    sitk.WriteImage(out, str(path), True)


def _painted_variants(made_seconds: list):
    """A stand-in for ``variants.make_variants``: a 15 mm sphere of 30 HU (label 2) in the lung (label 1)."""
    from lefusion_nnunet.data.io import read_image, read_label
    from lefusion_nnunet.variants import SyntheticCase

    def make(synth, dataset, case_ids, settings):
        for cid in case_ids:
            files = dataset.case(cid)
            image = read_image(files.images)
            label, label_props = read_label(files.label)
            lung = np.argwhere(label == 1)
            rng = np.random.default_rng(0)
            grid = np.ogrid[tuple(slice(0, n) for n in label.shape)]
            out = []
            for k in range(settings.per_case):
                centre = lung[int(rng.integers(len(lung)))]
                ball = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, image.spacing)) <= 7.5 ** 2
                channels = [c.copy() for c in image.array]
                channels[0][ball] = 30.0
                lab = label.copy()
                lab[ball] = 2
                out.append(SyntheticCase(f"{cid}_lefusion{k:03d}", cid, channels, lab, {"centre": centre.tolist()},
                                         reference=image, label_properties=label_props))
            yield out, []
    return make


def _plan_and_preprocess(extract_fingerprints, plan_experiments, preprocess) -> None:
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=False, verbose=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), verbose=False)


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 128], metavar=("X", "Y", "Z"))
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--per-case", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir.resolve()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / var)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    dataset = f"Dataset{DATASET_ID}_{NAME}"
    raw = work / "nnUNet_raw" / dataset
    timings: dict[str, float] = {}
    if not (work / "nnUNet_preprocessed" / dataset / "nnUNetPlans_3d_fullres").is_dir():
        shutil.rmtree(raw, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "lefusion_nnunet.cli.main", "phantom", "-o", str(work / "nnUNet_raw"),
                        "--id", str(DATASET_ID), "--name", NAME, "--cases", str(args.cases),
                        "--lesion-free-fraction", "0.5", "--shape", *map(str, args.shape)], check=True,
                       stdout=sys.stderr)
        for i, f in enumerate(sorted((raw / "labelsTr").iterdir())):
            if i % 2:
                case = f.name[:-len(".nii.gz")]
                _resample(raw / "imagesTr" / f"{case}_0000.nii.gz", (0.75, 0.75, 2.0), label=False)
                _resample(f, (0.75, 0.75, 2.0), label=True)
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                          preprocess)

        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints; stdout is the JSON only
            _plan_and_preprocess(extract_fingerprints, plan_experiments, preprocess)
        timings["plan_and_preprocess_s"] = round(time.perf_counter() - start, 1)

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.integration import bank as bank_mod
    from lefusion_nnunet.variant_settings import VariantSettings

    pre = work / "nnUNet_preprocessed" / dataset
    pm = PlansManager(str(pre / "nnUNetPlans.json"))
    cm = pm.get_configuration("3d_fullres")
    data_folder = pre / cm.data_identifier
    ids = sorted(p.name[:-4] for p in data_folder.glob("*.pkl"))
    free = bank_mod.lesion_free_cases(data_folder, ids, [2])
    network = [0.0]
    if args.checkpoint is None:
        bank_mod.make_variants = _painted_variants([])
        factory = object
    else:
        def factory():
            synth = bank_mod.make_synthesizer(args.checkpoint, VariantSettings(), "cpu", 4)
            inner = synth.synthesize

            def timed(*a, **k):
                t0 = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    network[0] += time.perf_counter() - t0
            synth.synthesize = timed
            return synth
    out_dir = work / "bank"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    start = time.perf_counter()
    variants, warnings = bank_mod.build_bank_contents(
        out_dir, synthesizer_factory=factory, raw_dataset=load_raw_dataset(dataset), case_ids=free,
        variant_settings=VariantSettings(per_case=args.per_case), plans_manager=pm, configuration_manager=cm,
        dataset_json=load_json(str(pre / "dataset.json")), dataset_class=nnUNetDatasetBlosc2,
        preprocessed_folder=data_folder, log=lambda m: print(m, file=sys.stderr))
    build_s = time.perf_counter() - start
    n = max(len(variants), 1)
    source_bytes = [sum((data_folder / f"{v['source_case']}{s}").stat().st_size for s in (".b2nd", "_seg.b2nd", ".pkl"))
                    for v in variants.values()]
    patch_bytes = [v["patch_bytes"] for v in variants.values()]
    shapes = {c: [int(v) for v in nnUNetDatasetBlosc2(str(data_folder), [c]).load_case(c)[0].shape] for c in free}
    return {
        "shape_xyz": args.shape, "cases": args.cases, "lesion_free_cases": len(free), "variants": len(variants),
        "warnings": warnings, "target_spacing_zyx": cm.spacing, "preprocessed_shapes": shapes, **timings,
        "bank_build_s": round(build_s, 2), "seconds_per_variant": round(build_s / n, 3),
        "network_seconds_per_variant": round(network[0] / n, 3),
        "seconds_per_variant_excluding_network": round((build_s - network[0]) / n, 3),
        "mb_per_variant": round(float(np.mean(patch_bytes)) / 2 ** 20, 3) if patch_bytes else None,
        "mb_per_source_case": round(float(np.mean(source_bytes)) / 2 ** 20, 3) if source_bytes else None,
        "patch_to_case_ratio": round(float(np.sum(patch_bytes) / np.sum(source_bytes)), 4) if patch_bytes else None,
        "patch_bbox": {k: v["bbox"] for k, v in variants.items()},
    }


def main(argv: list[str] | None = None) -> int:
    out = _out_arg(sys.argv[1:] if argv is None else argv)
    emit(run(argv), Path(out) if out else None)
    return 0


def _out_arg(argv: list[str]) -> str | None:
    return argv[argv.index("--out") + 1] if "--out" in argv and argv.index("--out") + 1 < len(argv) else None


if __name__ == "__main__":
    sys.exit(main())
