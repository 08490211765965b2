"""nnU-Net integration commands: `trainer-config`, `install-trainer`, `uninstall-trainer`, `trainer-dir`."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_device, add_sampler, add_seed


def register(sub) -> None:
    c = sub.add_parser("trainer-config", help="write LeFusionTrainer settings next to the preprocessed dataset",
                       description="Write $nnUNet_preprocessed/<Dataset>/lefusion_trainer.json, read by "
                                   "`nnUNetv2_train ... -tr LeFusionTrainer`. LEFUSION_* environment variables "
                                   "override it (see README).")
    c.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    c.add_argument("--checkpoint", type=Path, default=None, help="lesion checkpoint (default: the dataset's)")
    c.add_argument("--probability", type=float, default=0.5,
                   help="chance that a lesion-free training case is replaced by a synthetic variant (default: 0.5)")
    c.add_argument("--per-case", type=int, default=2, help="synthetic variants per lesion-free case (default: 2)")
    c.add_argument("--mask-source", choices=["ellipsoid", "real"], default="ellipsoid")
    c.add_argument("--size-mm", type=float, nargs=2, default=[8.0, 20.0], metavar=("MIN", "MAX"))
    c.add_argument("--boundary", type=float, default=0.3)
    c.add_argument("--region-label", type=int, default=None)
    c.add_argument("--region-masks", type=Path, default=None)
    add_sampler(c)
    add_device(c)
    add_seed(c)
    c.set_defaults(func=run_trainer_config)

    i = sub.add_parser("install-trainer", help="register LeFusionTrainer with nnU-Net (guarded shim file)",
                       description="Write a guarded shim into nnU-Net's trainer folder so that `-tr LeFusionTrainer` "
                                   "works for nnUNetv2_train and nnUNetv2_predict (also on CPU-only installs).")
    i.set_defaults(func=run_install)
    u = sub.add_parser("uninstall-trainer", help="remove the shim written by install-trainer")
    u.set_defaults(func=run_uninstall)
    t = sub.add_parser("trainer-dir", help="print the folder to put in nnUNet_extTrainer")
    t.set_defaults(func=run_trainer_dir)


def run_trainer_config(args: argparse.Namespace) -> int:
    from lefusion_nnunet.cli.data_commands import variant_settings_from_args
    from lefusion_nnunet.data.dataset import dataset_folder_name
    from lefusion_nnunet.integration.trainer_settings import TrainerSettings, write_trainer_settings
    from lefusion_nnunet.paths import find_default_checkpoint

    name = dataset_folder_name(args.dataset)
    checkpoint = args.checkpoint or find_default_checkpoint(name)
    settings = TrainerSettings(checkpoint=str(Path(checkpoint).resolve()), probability=args.probability,
                               variants=variant_settings_from_args(args), batch_size=args.batch_size,
                               device=args.device)
    path = write_trainer_settings(name, settings)
    print(f"settings: {path}")
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
