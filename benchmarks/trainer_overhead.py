"""Training-iteration overhead of LeFusionTrainer over nnUNetTrainer on the same preprocessed data (prints JSON).

Both trainers are built in one process on the same dataset, configuration and fold. The LeFusion bank is
built (or reused) first and its build time is reported separately; then the mean time of one training
iteration (``train_step(next(dataloader_train))``, i.e. data loading + augmentation + forward/backward) is
measured in interleaved blocks (A B A B ...), each after an untimed warm-up and with the other trainer's loader
workers paused, so drift of a shared machine hits both alike.
Target: ``ratio <= 1.10``.

Usage::

    # on an existing preprocessed dataset with a trained lesion checkpoint
    python benchmarks/trainer_overhead.py -d 501 [-c 3d_fullres] [-f 0] [--iterations 20] [--device cpu]

    # self-contained: phantom -> nnUNetv2_plan_and_preprocess -> lefusion train (tiny) in WORKDIR
    python benchmarks/trainer_overhead.py --demo WORKDIR

Trainer output folders (logs, debug.json) go to a temporary ``nnUNet_results``; the bank goes where the
trainer puts it (``$nnUNet_preprocessed/<Dataset>/lefusion_bank/``). LEFUSION_* variables apply as in training.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_trainer, interleaved, lefusion_cmd, repo_env  # noqa: E402


def make_demo(workdir: Path, dataset_id: int = 962) -> str:
    """Phantom (8 cases, 48 x 48 x 32), nnU-Net preprocessing and a tiny lesion model in ``workdir``."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(workdir / var)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("LEFUSION_BANK_BUILD", "before-training")  # iterations are timed once the bank exists
    env = repo_env()
    existing = list((workdir / "nnUNet_raw").glob(f"Dataset{dataset_id}_*"))
    if not existing:
        subprocess.run([*lefusion_cmd(), "phantom", "-o", str(workdir / "nnUNet_raw"), "--id", str(dataset_id),
                        "--cases", "8", "--lesion-free-fraction", "0.5", "--shape", "48", "48", "32"],
                       env=env, check=True, stdout=sys.stderr)
    name = next((workdir / "nnUNet_raw").glob(f"Dataset{dataset_id}_*")).name
    if not (workdir / "nnUNet_preprocessed" / name / "nnUNetPlans.json").is_file():
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1"],
                       env=env, check=True, stdout=sys.stderr)
    if not list((workdir / "nnUNet_results" / name).glob("LeFusion_*/checkpoint_final.pt")):
        subprocess.run([*lefusion_cmd(), "train", "-d", str(dataset_id), "--lesion-label", "2", "--preset", "tiny",
                        "--steps", "20", "--roi-size", "32", "32", "16"], env=env, check=True, stdout=sys.stderr)
    return name


def main(argv: list[str] | None = None) -> int:
    """Prints the result as JSON on stdout; everything nnU-Net prints goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        result = run(argv)
    print(json.dumps(result, indent=2))
    return 0


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-d", "--dataset", help="preprocessed dataset id or name")
    src.add_argument("--demo", type=Path, metavar="WORKDIR", help="make a small phantom dataset in WORKDIR")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per trainer (default: 20)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed iterations per trainer before each block (default: 1)")
    p.add_argument("--blocks", type=int, default=4, help="interleaved blocks per trainer (default: 4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = p.parse_args(argv)

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from lefusion_nnunet.data.dataset import dataset_folder_name
    from lefusion_nnunet.integration.nnunet_trainer import LeFusionTrainer
    from lefusion_nnunet.integration.trainer_settings import ENV_CHECKPOINT, load_trainer_settings

    name = make_demo(args.demo.resolve()) if args.demo else dataset_folder_name(args.dataset)
    # resolve the checkpoint before nnUNet_results is pointed at a scratch folder for the trainers' logs
    os.environ[ENV_CHECKPOINT] = load_trainer_settings(name).checkpoint
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="lefusion_bench_results_") as results:
        os.environ["nnUNet_results"] = results
        start = time.perf_counter()
        lefusion = build_trainer(LeFusionTrainer, name, args.configuration, args.fold, device)
        lefusion_setup = time.perf_counter() - start
        bank = lefusion.lefusion_bank
        start = time.perf_counter()
        baseline = build_trainer(nnUNetTrainer, name, args.configuration, args.fold, device)
        baseline_setup = time.perf_counter() - start
        times = interleaved({"nnUNetTrainer": baseline, "LeFusionTrainer": lefusion},
                            lambda t: t.train_step(next(t.dataloader_train)), blocks=args.blocks,
                            per_block=max(1, args.iterations // args.blocks), warmup=args.warmup)
        from lefusion_nnunet.integration.swap_dataset import read_draws

        draws = read_draws(lefusion.lefusion_draws_log) if bank is not None else None
        for trainer in (baseline, lefusion):
            trainer.on_train_end()
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    ratio = mean["LeFusionTrainer"] / mean["nnUNetTrainer"]
    result = {
        "benchmark": "trainer_overhead", "dataset": name, "configuration": args.configuration, "fold": args.fold,
        "device": str(device), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
        "timed_iterations_per_trainer": len(times["nnUNetTrainer"]), "warmup_iterations_per_block": args.warmup,
        "nnunet_iteration_s": round(mean["nnUNetTrainer"], 4),
        "lefusion_iteration_s": round(mean["LeFusionTrainer"], 4),
        "ratio": round(ratio, 3), "target_ratio": 1.10, "within_target": ratio <= 1.10,
        "probability": lefusion.lefusion_settings.probability,
        "bank_variants": bank.num_variants if bank is not None else 0,
        "bank_built_now": bool(bank is not None and bank.built),
        "bank_build_s": round(bank.build_seconds, 2) if bank is not None else None,
        "lefusion_setup_s": round(lefusion_setup, 2), "nnunet_setup_s": round(baseline_setup, 2),
        "synthetic_loads": draws.synthetic if draws else 0, "loads": draws.loads if draws else 0,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
