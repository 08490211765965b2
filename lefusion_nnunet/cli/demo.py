"""`lefusion demo`: the whole workflow on the embedded phantom, in a few minutes on 2 CPU cores.

phantom -> short lesion-model training -> synthetic nodules in the lesion-free cases (enlarged dataset
with montage) -> nnU-Net's integrity check on the enlarged dataset -> a 1-epoch
``nnUNetv2_train ... -tr LeFusionTrainer_1epoch`` run. Everything lives under one folder with its own
nnUNet_raw / nnUNet_preprocessed / nnUNet_results. The trainer is registered with the guarded shim
(`lefusion install-trainer`; the ``nnUNet_extTrainer`` route cannot work on CPU-only installs, where nnU-Net's
own trainer scan imports torchvision first); the shim stays installed afterwards (`lefusion uninstall-trainer`
removes it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from lefusion_nnunet.errors import LeFusionInputError

SOURCE_ID, ENLARGED_ID = 501, 502


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole workflow on the embedded phantom",
                       description="Phantom -> LeFusion training -> synthetic lesions in lesion-free cases "
                                   "(montage PNG, enlarged dataset checked by nnU-Net) -> 1-epoch nnU-Net run "
                                   "with -tr LeFusionTrainer_1epoch. Takes a few minutes on 2 CPU cores.")
    p.add_argument("-o", "--output", type=Path, default=Path("lefusion_demo"), help="demo folder (default: ./lefusion_demo)")
    p.add_argument("--steps", type=int, default=1500, help="lesion-model training steps (default: 1500)")
    p.add_argument("--preset", choices=["tiny", "small", "base"], default="small", help="model preset (default: small)")
    p.add_argument("--cases", type=int, default=16, help="phantom cases (default: 16)")
    p.add_argument("--skip-nnunet", action="store_true", help="stop before the nnU-Net steps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=run)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _nnunet(cmd: list[str], env: dict) -> None:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        raise LeFusionInputError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} (output above).")
    print("\n".join(proc.stdout.strip().splitlines()[-3:]))


def run(args: argparse.Namespace) -> int:
    import shutil

    from lefusion_nnunet.enlargement.run import enlarge
    from lefusion_nnunet.integration.install import install_trainer_shim, shim_installed
    from lefusion_nnunet.integration.trainer_config import configure_trainer
    from lefusion_nnunet.phantoms import generate_phantom
    from lefusion_nnunet.training.lesion import train_lesion_model_on_dataset
    from lefusion_nnunet.training.loop import TrainConfig
    from lefusion_nnunet.variant_settings import VariantSettings

    root = args.output.resolve()
    if root.exists() and any(root.iterdir()):
        if not args.overwrite:
            raise LeFusionInputError(f"demo folder {root} already exists; pass --overwrite or choose -o.")
        shutil.rmtree(root)
    env_paths = {v: root / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, path in env_paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    t_total = time.perf_counter()
    timings = {}

    t = _step("1/5 phantom dataset")
    print(f"dataset: {generate_phantom('chest', dataset_id=SOURCE_ID, num_cases=args.cases)}")
    timings["phantom"] = time.perf_counter() - t

    t = _step(f"2/5 lesion model ({args.preset}, {args.steps} steps)")
    checkpoint = train_lesion_model_on_dataset(SOURCE_ID, [2], TrainConfig(preset=args.preset, steps=args.steps,
                                                                          batch_size=4, device=args.device),
                                               roi_size_zyx=(16, 32, 32), region_label=1)
    print(f"checkpoint: {checkpoint}")
    timings["train"] = time.perf_counter() - t

    t = _step("3/5 synthetic nodules in lesion-free cases (enlarged dataset)")
    variants = VariantSettings(per_case=1, region_label=1, size_mm=(8.0, 16.0))
    print(enlarge(SOURCE_ID, ENLARGED_ID, checkpoint=checkpoint, settings=variants, device=args.device).format())
    timings["enlarge"] = time.perf_counter() - t
    enlarged = next(env_paths["nnUNet_raw"].glob(f"Dataset{ENLARGED_ID}_*"))

    if not args.skip_nnunet:
        env = dict(os.environ)
        # one iteration of nnU-Net's full-size 3d_fullres network takes ~20 s on 2 CPU cores, so the demo's epoch
        # is 4 training + 2 validation iterations instead of 250 + 50 (enough to see synthetic cases drawn)
        env.setdefault("LEFUSION_ITERATIONS_PER_EPOCH", "4")
        env.setdefault("LEFUSION_VAL_ITERATIONS_PER_EPOCH", "2")
        env.setdefault("LEFUSION_BANK_BUILD", "before-training")  # 4 iterations: draw from the whole bank at once
        t = _step("4/5 nnU-Net integrity check and preprocessing")
        _nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(ENLARGED_ID), "--verify_dataset_integrity",
                 "-c", "3d_fullres", "-np", "1"], env)
        _nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(SOURCE_ID), "-c", "3d_fullres", "-np", "1"], env)
        timings["nnunet_preprocess"] = time.perf_counter() - t
        t = _step("5/5 nnUNetv2_train -tr LeFusionTrainer_1epoch")
        print(f"settings: {configure_trainer(SOURCE_ID, variants, checkpoint=checkpoint, device=args.device)}")
        if not shim_installed():  # left installed: `nnUNetv2_train ... -tr LeFusionTrainer` keeps working afterwards
            print(f"installed the LeFusionTrainer shim {install_trainer_shim()} (remove: lefusion uninstall-trainer)")
        _nnunet(["nnUNetv2_train", str(SOURCE_ID), "3d_fullres", "0", "-tr", "LeFusionTrainer_1epoch",
                 "-device", "cuda" if args.device == "cuda" else "cpu"], env)
        timings["nnunet_train"] = time.perf_counter() - t

    results = env_paths["nnUNet_results"]
    print("\n== done in {:.0f} s ({})".format(time.perf_counter() - t_total,
                                               ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())))
    print(f"phantom dataset:   {env_paths['nnUNet_raw'] / f'Dataset{SOURCE_ID}_LeFusionChestPhantom'}")
    print(f"lesion model:      {next(results.glob('*/LeFusion_*/checkpoint_final.pt'))}")
    print(f"enlarged dataset:  {enlarged}")
    print(f"montage:           {enlarged / 'lefusion_montage.png'}")
    if not args.skip_nnunet:
        print(f"nnU-Net run:       {next(results.glob('*/LeFusionTrainer_1epoch__*'), results)}")
    print(f"to reuse these folders: export nnUNet_raw={env_paths['nnUNet_raw']} "
          f"nnUNet_preprocessed={env_paths['nnUNet_preprocessed']} nnUNet_results={results}")
    return 0

