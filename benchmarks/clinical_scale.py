"""LeFusionTrainer at clinical size (issue 14): bank cost, time to the first iteration, peak memory, loader speed.

One run, printed as flat JSON (units in the key names, the exact command under ``command``):

1. **Data.** A chest phantom (``lefusion phantom``, default 512 x 512 x 128 voxels); every second case is
   resampled to 0.75 x 0.75 x 2 mm so nnU-Net's preprocessing resamples (mixed spacings); then
   ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` (reused when the workdir already holds it).
2. **Lesion checkpoint.** ``--checkpoint`` or, by default, ``lefusion train --preset tiny --steps 20`` on the
   phantom's nodules. Either way the bank is made by the product's own path (mask planning, placement, the
   checkpoint's sampler, paste, nnU-Net's preprocessing, difference patch); a tiny network makes the network
   part small, and that part is timed and reported separately (``network_*``).
3. **Bank build in this process** (``bank.build_bank_contents``, the trainer's settings, all lesion-free
   cases): seconds and MiB per variant, network seconds, peak RSS of the build (VmHWM reset before it).
4. **Time to the first training iteration**, real ``nnUNetv2_train D 3d_fullres F -tr T -device cpu`` runs,
   interleaved: nnUNetTrainer, LeFusionTrainer (fresh bank), nnUNetTrainer, ..., LeFusionTrainer (bank reused),
   nnUNetTrainer. Measured from our start of the process to nnU-Net's timestamped ``Epoch 0`` log line (the
   network, the loaders and their first batch exist then). LeFusion's bank is built in ``--bank-build`` mode:
   ``background`` (the trainer's default: training starts at once, the bank is built alongside; its
   ``bank_ready`` time is the thread's summary line) or ``before-training`` (the bank exists at ``Epoch 0``).
   Each run then trains ``--train-seconds`` more and is stopped; a fresh background run trains at least until its
   bank is complete (``--fresh-train-seconds``, default from the in-process build time), so that the reused run
   finds it. Peak RSS of the main process (whole run, and up to the bank's completion) and peak PSS of the
   process tree (main process + loader workers) are recorded. Target: the fresh LeFusion run starts at most
   10 % + its bank's network time later than nnUNetTrainer.
5. **Loader throughput**: both trainers built in this process, ``next(trainer.dataloader_train)`` timed in
   interleaved blocks after the same untimed drain, the same ``nnUNet_n_proc_DA`` workers, the idle trainer's
   workers paused. Target: LeFusion >= 0.95 x nnUNetTrainer's cases per second.

Usage::

    python benchmarks/clinical_scale.py WORKDIR [--shape 512 512 128] [--cases 6] [--per-case 2] [--fold 0]
        [--checkpoint lesion.pt] [--workers 2] [--train-seconds 120] [--bank-build background]
        [--out benchmarks/results/clinical_scale.json]

Needs ``lefusion install-trainer`` (done here when missing; left installed, as that command leaves it). Logs of
the training runs: ``WORKDIR/train_runs/``. Peak training memory needs ``--train-seconds`` to cover at least one
full iteration (forward + backward). nnU-Net logs nothing per iteration, so the default 120 s is not checked here:
compare it with ``benchmarks/trainer_overhead.py``'s iteration time at the same size.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (build_trainer, emit, lefusion_cmd, loader_throughput, peak_rss_mb, repo_env,  # noqa: E402
                     reset_peak_rss, rss_mb, run_measured, timed_nnunet_train)

DATASET_ID, NAME = 964, "LFClinicalScale"
DATASET = f"Dataset{DATASET_ID}_{NAME}"
# the trainer's log lines (lefusion_nnunet/integration/nnunet_trainer.py): the build's announcement ("... in the
# background" in background mode, logged once the loaders exist) and the bank's summary line, logged when the bank
# is complete (by the build thread in background mode, before the loaders are built otherwise)
BANK_MILESTONES = {"bank_start": r"^LeFusion: building the synthetic bank",
                   "bank_ready": r"^LeFusion: \d+ synthetic cases of"}
FIRST_ITERATION_TARGET = 0.10   # fresh LeFusion may start <= 10 % + its network time later
LOADER_TARGET = 0.95            # LeFusion loader >= 0.95 x nnUNetTrainer's


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 128], metavar=("X", "Y", "Z"))
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--per-case", type=int, default=16,
                    help="K variants per lesion-free case (default: 16, LeFusionTrainer's default)")
    ap.add_argument("--probability", type=float, default=0.5, help="LeFusion's P (default: 0.5)")
    ap.add_argument("--fold", default="0", help="nnU-Net fold, 0-4 or all (default: 0; use all below 5 cases)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="lesion checkpoint (default: train a tiny one)")
    ap.add_argument("--device", default="cpu", help="device of nnUNetv2_train and the trainers (default: cpu)")
    ap.add_argument("--workers", type=int, default=2, help="nnUNet_n_proc_DA for every run (default: 2)")
    ap.add_argument("--repeats", type=int, default=1, help="fresh-bank LeFusion runs (default: 1)")
    ap.add_argument("--train-seconds", type=float, default=120.0,
                    help="training after the first iteration starts, per run, for peak memory (default: 120)")
    ap.add_argument("--bank-build", choices=("background", "before-training"), default="background",
                    help="LeFusionTrainer's bank-build mode in the nnUNetv2_train runs (default: background, the "
                         "trainer's default)")
    ap.add_argument("--fresh-train-seconds", type=float, default=None,
                    help="training after the first iteration of a fresh background run, which must cover the "
                         "bank's build (default: the larger of --train-seconds and 3 x the in-process build + 60)")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="per nnUNetv2_train run (default: 3600 s)")
    ap.add_argument("--loader-blocks", type=int, default=3)
    ap.add_argument("--loader-batches", type=int, default=8, help="timed batches per block (default: 8)")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def _resample(path: Path, spacing: tuple[float, float, float], label: bool) -> None:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        img.GetOrigin(), spacing, img.GetDirection(), -1000 if not label else 0, img.GetPixelID())
    sitk.WriteImage(out, str(path), True)


def _prepare_dataset(work: Path, args: argparse.Namespace) -> dict:
    """Phantom + resampling + nnU-Net plan/preprocess (skipped when the workdir holds them)."""
    raw = work / "nnUNet_raw" / DATASET
    if (work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres").is_dir():
        return {"dataset_reused": True}
    shutil.rmtree(raw, ignore_errors=True)
    phantom = run_measured([*lefusion_cmd(), "phantom", "-o", str(work / "nnUNet_raw"), "--id", str(DATASET_ID),
                            "--name", NAME, "--cases", str(args.cases), "--lesion-free-fraction", "0.5",
                            "--shape", *map(str, args.shape)], repo_env())
    for i, f in enumerate(sorted((raw / "labelsTr").iterdir())):
        if i % 2:
            case = f.name[:-len(".nii.gz")]
            _resample(raw / "imagesTr" / f"{case}_0000.nii.gz", (0.75, 0.75, 2.0), label=False)
            _resample(f, (0.75, 0.75, 2.0), label=True)
    plan = run_measured(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-npfp", "1",
                         "-np", "1"], repo_env())
    return {"dataset_reused": False, "phantom_s": phantom["wall_s"], "plan_and_preprocess_s": plan["wall_s"],
            "plan_and_preprocess_peak_rss_mb": plan["peak_rss_mb"]}


def _checkpoint(work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    if args.checkpoint is not None:
        return args.checkpoint.resolve(), {"lesion_checkpoint_kind": "given (--checkpoint)"}
    run_dir = work / "lesion_tiny"
    info = {"lesion_checkpoint_kind": "tiny preset, 20 steps, trained by this script (the product's synthesis "
                                      "path with a small network; network time reported separately)"}
    if not (run_dir / "checkpoint_final.pt").is_file():
        info["lesion_train_s"] = run_measured(
            [*lefusion_cmd(), "train", "-d", str(DATASET_ID), "--lesion-label", "2", "--region-label", "1",
             "--preset", "tiny", "--steps", "20", "-o", str(run_dir), "--overwrite", "--device", "cpu"],
            repo_env())["wall_s"]
    return run_dir / "checkpoint_final.pt", info


def _bank_build(work: Path, settings, pm, cm, pre: Path, device: str) -> dict:
    """The trainer's bank for all lesion-free cases, built here with the trainer's settings (network timed)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from lefusion_nnunet.checkpoints.loaders import checkpoint_data_config
    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.integration import bank as bank_mod

    data_folder = pre / cm.data_identifier
    ids = sorted(p.name[:-4] for p in data_folder.glob("*.pkl"))
    labels = [int(v) for v in checkpoint_data_config(settings.checkpoint, expected_kind="lesion").lesion_labels]
    free = bank_mod.lesion_free_cases(data_folder, ids, labels)
    network, synth_s = [0.0], [0.0]

    def factory():
        synth = bank_mod.make_synthesizer(settings.checkpoint, settings.variants, device, settings.batch_size)
        inner = synth.synthesize_edits

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                synth_s[0] += time.perf_counter() - t0
        synth.synthesize_edits = timed
        model = getattr(getattr(synth, "checkpoint", None), "model", None)
        if model is not None:  # the denoiser's forward calls: the network time proper
            started = [0.0]

            def sync() -> None:
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()

            def pre(*_):
                sync()
                started[0] = time.perf_counter()

            def post(*_):
                sync()
                network[0] += time.perf_counter() - started[0]
            model.register_forward_pre_hook(pre)
            model.register_forward_hook(post)
        return synth

    out_dir = work / "bank_in_process"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    rss_before, hwm_reset = rss_mb(), reset_peak_rss()
    start = time.perf_counter()
    variants, warnings = bank_mod.build_bank_contents(
        out_dir, synthesizer_factory=factory, raw_dataset=load_raw_dataset(DATASET), case_ids=free,
        variant_settings=settings.variants, plans_manager=pm, configuration_manager=cm,
        dataset_json=load_json(str(pre / "dataset.json")), dataset_class=nnUNetDatasetBlosc2,
        preprocessed_folder=data_folder, log=lambda m: print(m, file=sys.stderr))
    build_s = time.perf_counter() - start
    peak = peak_rss_mb() if hwm_reset else None
    n = max(len(variants), 1)
    source_bytes = [sum((data_folder / f"{v['source_case']}{s}").stat().st_size for s in (".b2nd", "_seg.b2nd", ".pkl"))
                    for v in variants.values()]
    patch_bytes = [v["patch_bytes"] for v in variants.values() if "patch_bytes" in v]
    shapes = [[int(v) for v in nnUNetDatasetBlosc2(str(data_folder), [c]).load_case(c)[0].shape] for c in free]
    net_s = network[0] if network[0] > 0 or not variants else None  # None: no denoiser forward was seen
    return {
        "lesion_free_cases": len(free), "variants": len(variants), "bank_warnings": warnings,
        "target_spacing_zyx": cm.spacing, "lesion_free_preprocessed_shapes_czyx": shapes,
        "bank_build_s": round(build_s, 2), "seconds_per_variant": round(build_s / n, 3),
        "network_seconds_per_variant": round(net_s / n, 3) if net_s is not None else None,
        "seconds_per_variant_excluding_network": round((build_s - net_s) / n, 3) if net_s is not None else None,
        "synthesize_seconds_per_variant": round(synth_s[0] / n, 3),  # ROI in, sampler (network), paste back
        "mb_per_variant": round(float(np.mean(patch_bytes)) / 2 ** 20, 3) if patch_bytes else None,
        "mb_per_source_case": round(float(np.mean(source_bytes)) / 2 ** 20, 3) if source_bytes else None,
        "patch_to_case_ratio": round(float(np.sum(patch_bytes) / np.sum(source_bytes)), 4) if patch_bytes else None,
        "patch_bboxes_zyx": [v.get("bbox") for v in variants.values()],
        "bank_build_rss_before_mb": rss_before, "bank_build_peak_rss_mb": peak,
    }


def _train_runs(work: Path, args: argparse.Namespace, env: dict, install_shim, fresh_train_s: float) -> dict:
    """Interleaved nnUNetv2_train runs: A, (B fresh, A) x repeats, B reused, A. A fresh run trains
    ``fresh_train_s`` after its first iteration; each LeFusion run records whether the bank was complete when it
    started (``bank_complete_before``) and when it was stopped (``bank_complete_after``)."""
    from lefusion_nnunet.integration.bank_store import SyntheticBank

    exe = Path(sys.executable).with_name("nnUNetv2_train")
    train = str(exe) if exe.is_file() else "nnUNetv2_train"
    plan = ["nnunet"] + ["lefusion_fresh", "nnunet"] * args.repeats + ["lefusion_reused", "nnunet"]
    bank_root = work / "nnUNet_preprocessed" / DATASET / "lefusion_bank"  # documented location of the banks
    runs: dict[str, list[dict]] = {k: [] for k in ("nnunet", "lefusion_fresh", "lefusion_reused")}
    for i, label in enumerate(plan):
        trainer = "nnUNetTrainer" if label == "nnunet" else "LeFusionTrainer"
        if label == "lefusion_fresh":
            shutil.rmtree(bank_root, ignore_errors=True)
        if trainer == "LeFusionTrainer":
            install_shim()  # idempotent; guards against another process having removed it meanwhile
        folder = work / "train_runs" / f"{i:02d}_{label}"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [train, str(DATASET_ID), "3d_fullres", args.fold, "-tr", trainer, "-device", args.device]
        print(f"clinical_scale: run {i + 1}/{len(plan)}: {shlex.join(cmd)}", file=sys.stderr)
        complete = lambda: any(SyntheticBank.load(b) is not None for b in bank_root.glob("*"))  # noqa: E731
        before = complete() if trainer == "LeFusionTrainer" else None
        r = timed_nnunet_train(cmd, dict(env, nnUNet_results=str(folder), LEFUSION_BANK_BUILD=args.bank_build),
                               folder / "stdout.txt",
                               train_seconds=fresh_train_s if label == "lefusion_fresh" else args.train_seconds,
                               timeout_s=args.run_timeout,
                               milestones=BANK_MILESTONES if trainer == "LeFusionTrainer" else None)
        if r.get("error"):
            raise RuntimeError(f"nnUNetv2_train {trainer} (run {i + 1}): {r['error']}")
        if trainer == "LeFusionTrainer":
            r.update(bank_complete_before=before, bank_complete_after=complete())
        print(f"clinical_scale: {label}: first iteration after {r['first_iteration_s']} s"
              + (f", bank ready after {r.get('bank_ready_s')} s" if trainer == "LeFusionTrainer" else ""),
              file=sys.stderr)
        runs[label].append(r)
    return runs


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 2) if values else None


def _summarise_runs(runs: dict, network_per_variant: float | None, variants_in_process: int) -> dict:
    out: dict = {}
    for label, rs in runs.items():
        out[f"first_iteration_{label}_runs_s"] = [r["first_iteration_s"] for r in rs]
        out[f"first_iteration_{label}_s"] = _mean([r["first_iteration_s"] for r in rs])
        out[f"first_log_line_{label}_s"] = _mean([r["first_log_line_s"] for r in rs])
        out[f"{label}_peak_rss_to_first_iteration_mb"] = max(r["peak_rss_to_first_iteration_mb"] or 0 for r in rs)
        out[f"{label}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        out[f"{label}_peak_tree_pss_mb"] = max(r["peak_tree_pss_mb"] or 0 for r in rs)
        out[f"{label}_trained_after_first_iteration_s"] = _mean([r["trained_s"] for r in rs])
    fresh = runs["lefusion_fresh"]
    ready = [r.get("bank_ready_match", "") for r in fresh]
    counts = [int(m.group(1)) for m in (re.search(r"^LeFusion: (\d+) synthetic", t) for t in ready) if m]
    built = [float(m.group(1)) for m in (re.search(r"built in ([\d.]+) s", t) for t in ready) if m]
    out["lefusion_fresh_bank_variants"] = counts[0] if counts else None
    out["lefusion_fresh_bank_build_logged_s"] = _mean(built)
    out["lefusion_fresh_bank_phase_s"] = _mean([(r.get("bank_ready_s") or 0) - (r.get("bank_start_s") or 0)
                                                for r in fresh if r.get("bank_ready_s")])
    out["lefusion_fresh_bank_ready_s"] = _mean([r.get("bank_ready_s") for r in fresh])  # None: not within the run
    out["lefusion_fresh_bank_ready_after_first_iteration_s"] = _mean(
        [r["bank_ready_s"] - r["first_iteration_s"] for r in fresh if r.get("bank_ready_s") is not None])
    out["lefusion_fresh_bank_complete_at_stop"] = all(r.get("bank_complete_after") for r in fresh)
    out["lefusion_reused_bank_was_complete"] = all(r.get("bank_complete_before") for r in runs["lefusion_reused"])
    out["lefusion_fresh_peak_rss_through_bank_build_mb"] = max((r.get("peak_rss_to_bank_ready_mb") or 0)
                                                               for r in fresh) or None
    base, first = out["first_iteration_nnunet_s"], out["first_iteration_lefusion_fresh_s"]
    n_variants = counts[0] if counts else variants_in_process  # (a background bank may not finish in the run)
    network = network_per_variant * n_variants if network_per_variant is not None else None
    out["lefusion_fresh_bank_network_estimate_s"] = round(network, 2) if network is not None else None
    if base and first is not None and network is not None:
        allowed = FIRST_ITERATION_TARGET * base + network
        out.update(first_iteration_delay_fresh_s=round(first - base, 2),
                   first_iteration_allowed_delay_s=round(allowed, 2),
                   first_iteration_within_target=bool(first - base <= allowed))
    reused = out["first_iteration_lefusion_reused_s"]
    out["first_iteration_ratio_reused_bank"] = round(reused / base, 3) if base and reused else None
    return out


def _loader(args: argparse.Namespace) -> dict:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from lefusion_nnunet.integration.nnunet_trainer import LeFusionTrainer
    from lefusion_nnunet.integration.swap_dataset import read_draws

    fold = args.fold if args.fold == "all" else int(args.fold)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="lefusion_clinical_loader_") as results:
        os.environ["nnUNet_results"] = results
        trainers = {"nnunet": build_trainer(nnUNetTrainer, DATASET, "3d_fullres", fold, device),
                    "lefusion": build_trainer(LeFusionTrainer, DATASET, "3d_fullres", fold, device)}
        lef = trainers["lefusion"]
        reused = bool(lef.lefusion_bank is not None and not lef.lefusion_bank.built)
        offset = os.path.getsize(lef.lefusion_draws_log) if os.path.isfile(lef.lefusion_draws_log or "") else 0
        speed = loader_throughput(trainers, blocks=args.loader_blocks, per_block=args.loader_batches)
        draws = read_draws(lef.lefusion_draws_log, offset) if lef.lefusion_bank is not None else None
        batch_size = lef.batch_size
        for trainer in trainers.values():
            trainer.on_train_end()
    ratio = speed["lefusion"]["cases_per_s"] / speed["nnunet"]["cases_per_s"]
    return {"loader_cases_per_s_nnunet": speed["nnunet"]["cases_per_s"],
            "loader_cases_per_s_lefusion": speed["lefusion"]["cases_per_s"],
            "loader_block_cases_per_s_nnunet": speed["nnunet"]["block_cases_per_s"],
            "loader_block_cases_per_s_lefusion": speed["lefusion"]["block_cases_per_s"],
            "loader_throughput_ratio": round(ratio, 3), "loader_target_ratio": LOADER_TARGET,
            "loader_within_target": bool(ratio >= LOADER_TARGET), "loader_batch_size": batch_size,
            "loader_timed_batches_per_trainer": speed["nnunet"]["batches"],
            "loader_drain_batches_per_block": speed["nnunet"]["drain_batches"], "loader_bank_reused": reused,
            "loader_lefusion_loads": draws.loads if draws else 0,
            "loader_lefusion_synthetic_loads": draws.synthetic if draws else 0}


def run(argv: list[str] | None = None) -> dict:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from lefusion_nnunet.integration.install import install_trainer_shim, shim_installed
    from lefusion_nnunet.integration.trainer_settings import (ENV_CHECKPOINT, ENV_PER_CASE, ENV_PROBABILITY, ENV_VARS,
                                                              load_trainer_settings)

    wall = time.perf_counter()
    args = _parse(argv)
    work = args.workdir.resolve()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / var)
    for var in ENV_VARS:  # settings of the caller's shell must not leak into the measurement
        os.environ.pop(var, None)
    os.environ.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA=str(args.workers), nnUNet_compile="f")
    result: dict = {"benchmark": "clinical_scale",
                    "command": shlex.join(["python", "benchmarks/clinical_scale.py",
                                           *(sys.argv[1:] if argv is None else argv)]),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "shape_xyz": args.shape, "cases": args.cases, "per_case": args.per_case,
                    "probability": args.probability, "fold": args.fold, "device": args.device,
                    "nnUNet_n_proc_DA": args.workers}
    result.update(_prepare_dataset(work, args))
    checkpoint, info = _checkpoint(work, args)
    result.update(lesion_checkpoint=str(checkpoint), **info)
    os.environ.update({ENV_CHECKPOINT: str(checkpoint), ENV_PER_CASE: str(args.per_case),
                       ENV_PROBABILITY: str(args.probability)})
    settings = load_trainer_settings(DATASET)
    pre = work / "nnUNet_preprocessed" / DATASET
    pm = PlansManager(str(pre / "nnUNetPlans.json"))
    result.update(_bank_build(work, settings, pm, pm.get_configuration("3d_fullres"), pre,
                               args.device))

    # the shim stays (guarded, harmless, what `lefusion install-trainer` leaves): removing it at the end could
    # break another nnUNetv2_train -tr LeFusionTrainer running meanwhile
    result["trainer_shim_installed_by_benchmark"] = not shim_installed()
    fresh_train_s = args.fresh_train_seconds
    if fresh_train_s is None:
        fresh_train_s = args.train_seconds if args.bank_build == "before-training" else \
            max(args.train_seconds, 3 * result["bank_build_s"] + 60)
    result.update(bank_build_mode=args.bank_build, lefusion_fresh_train_seconds=round(fresh_train_s, 1))
    runs = _train_runs(work, args, repo_env(), install_trainer_shim, fresh_train_s)
    result.update(train_runs_dir=str(work / "train_runs"),
                  **_summarise_runs(runs, result["network_seconds_per_variant"], result["variants"]))
    os.environ["LEFUSION_BANK_BUILD"] = "before-training"  # the loader is timed on a complete bank, never a build
    result.update(_loader(args))
    result["total_wall_s"] = round(time.perf_counter() - wall, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints; stdout is the JSON only
        result = run(args)
    out = _parse(args).out
    emit(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
