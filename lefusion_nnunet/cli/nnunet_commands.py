"""nnU-Net integration commands: `trainer-config`, `install-trainer`, `uninstall-trainer`, `trainer-dir`."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_device, add_sampler, add_seed, add_variant_args, variant_settings_from_args


def register(sub) -> None:
    c = sub.add_parser("trainer-config", help="write LeFusionTrainer settings next to the preprocessed dataset",
                       description="Write $nnUNet_preprocessed/<Dataset>/lefusion_trainer.json, read by "
                                   "`nnUNetv2_train ... -tr LeFusionTrainer`. LEFUSION_* environment variables "
                                   "override it (see README).")
    c.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    c.add_argument("--checkpoint", type=Path, default=None, help="lesion checkpoint (default: the dataset's)")
    c.add_argument("--probability", type=float, default=0.5,
                   help="chance that a lesion-free training case is replaced by a synthetic variant (default: 0.5)")
    # K = integration.trainer_settings.DEFAULT_PER_CASE (not imported: the CLI starts without torch; a test checks)
    add_variant_args(c, "synthetic variants per lesion-free training case", default_per_case=16)
    c.add_argument("--bank-build", choices=("background", "before-training"), default="background",
                   help="background: training starts at once and lesion-free cases join as their variants are made; "
                        "before-training: the whole bank is built before the first iteration (default: background)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing lefusion_trainer.json")
    add_sampler(c)
    add_device(c)
    add_seed(c)
    c.set_defaults(func=run_trainer_config)

    i = sub.add_parser("install-trainer", help="register LeFusionTrainer with nnU-Net (guarded shim file)",
                       description="Write a guarded shim into nnU-Net's trainer folder so that `-tr LeFusionTrainer` "
                                   "works for nnUNetv2_train and nnUNetv2_predict (also on CPU-only installs).")
    i.set_defaults(func=run_install)
    u = sub.add_parser("uninstall-trainer", help="remove the shim written by install-trainer",
                       description="Remove the shim `lefusion install-trainer` wrote into nnU-Net's trainer folder "
                                   "(nnU-Net then no longer finds -tr LeFusionTrainer).")
    u.set_defaults(func=run_uninstall)
    t = sub.add_parser("trainer-dir", help="print the folder to put in nnUNet_extTrainer",
                       description="Print the folder holding the thin LeFusion trainer re-export, for "
                                   "`export nnUNet_extTrainer=$(lefusion trainer-dir)` (works only where torchvision "
                                   "imports; on CPU-only installs use `lefusion install-trainer`).")
    t.set_defaults(func=run_trainer_dir)


def run_trainer_config(args: argparse.Namespace) -> int:
    from lefusion_nnunet.integration.install import shim_installed
    from lefusion_nnunet.integration.trainer_config import configure_trainer

    path = configure_trainer(args.dataset, variant_settings_from_args(args), checkpoint=args.checkpoint,
                             probability=args.probability, batch_size=args.batch_size, device=args.device,
                             overwrite=args.overwrite, bank_build=args.bank_build)
    print(f"settings: {path}")
    if not shim_installed():  # nnU-Net finds no plugin trainer on its own (its lookup would crash on CPU installs)
        print("next: run `lefusion install-trainer` once so that `nnUNetv2_train ... -tr LeFusionTrainer` finds the "
              "trainer")
    return 0


def run_install(args: argparse.Namespace) -> int:
    from lefusion_nnunet.integration.install import install_trainer_shim

    print(f"installed: {install_trainer_shim()}")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    from lefusion_nnunet.integration.install import uninstall_trainer_shim

    removed = uninstall_trainer_shim()
    print(f"removed: {removed}" if removed else "nothing to remove: the shim was not installed")
    return 0


def run_trainer_dir(args: argparse.Namespace) -> int:
    from lefusion_nnunet.integration.install import trainer_dir

    print(trainer_dir())
    return 0
