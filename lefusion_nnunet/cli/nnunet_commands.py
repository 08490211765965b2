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
    add_variant_args(c, "synthetic variants per lesion-free training case")
    c.add_argument("--overwrite", action="store_true", help="replace an existing lefusion_trainer.json")
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
    from lefusion_nnunet.data.config import DataConfig
    from lefusion_nnunet.data.dataset import dataset_folder_name, load_raw_dataset
    from lefusion_nnunet.integration.trainer_settings import TrainerSettings, write_trainer_settings
    from lefusion_nnunet.paths import find_default_checkpoint, trainer_settings_file
    from lefusion_nnunet.training.checkpoint import load_checkpoint_content
    from lefusion_nnunet.validation import check_checkpoint_fits, check_output_absent, validate_dataset

    name = dataset_folder_name(args.dataset)
    check_output_absent(trainer_settings_file(name), args.overwrite, "LeFusion trainer settings")
    checkpoint = args.checkpoint or find_default_checkpoint(name)
    variants = variant_settings_from_args(args)
    settings = TrainerSettings(checkpoint=str(Path(checkpoint).resolve()), probability=args.probability,
                               variants=variants, batch_size=args.batch_size, device=args.device)
    # the checkpoint and the raw dataset the trainer's bank is built from, checked now rather than mid-training
    data = DataConfig.from_dict(load_checkpoint_content(checkpoint, expected_kind="lesion")["data_config"])
    raw = load_raw_dataset(name)
    check_checkpoint_fits(data, raw)
    region = None if variants.region_masks_dir else (
        variants.region_label if variants.region_label is not None else data.region_label)
    validate_dataset(raw, data.lesion_labels, region, data.channel, need_lesions=variants.mask_source == "real",
                     need_lesion_free=True, read_voxels="none", region_masks_dir=variants.region_masks_dir,
                     roi=data.roi, lesion_flag="the checkpoint's lesion label",
                     region_flag="--region-label" if variants.region_label is not None
                     else "the checkpoint's region label", channel_flag="the checkpoint's channel",
                     lesion_free_hint="LeFusionTrainer only adds lesions to lesion-free cases, add some")
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
