"""`lefusion train`: train a lesion model on an nnU-Net raw dataset."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_training_run_args, xyz_to_zyx


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LeFusion lesion model on a raw dataset",
                       description="Train a lesion-focused diffusion model on the lesions of an nnU-Net raw dataset "
                                   "(under $nnUNet_raw). Writes checkpoint_latest.pt / checkpoint_final.pt, "
                                   "training_log.jsonl and loss.png to "
                                   "$nnUNet_results/<Dataset>/LeFusion_<preset>/ unless -o is given.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (e.g. 501 or Dataset501_Name)")
    p.add_argument("--lesion-label", type=int, nargs="+", required=True, metavar="L",
                   help="lesion label value(s); several = one multi-channel model for several lesion classes")
    p.add_argument("--region-label", type=int, default=None, metavar="R",
                   help="host-region label lesions live in (e.g. lung), recorded for placement")
    p.add_argument("-o", "--output", type=Path, default=None, help="run folder (default under $nnUNet_results)")
    p.add_argument("--preset", choices=["tiny", "small", "base"], default="small",
                   help="model size: tiny (tests), small (CPU default), base (GPU)")
    p.add_argument("--roi-size", type=int, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"),
                   help="model ROI in voxels (default: 64 64 32)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model spacing in mm (default: median spacing of the dataset)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="CT intensity window in HU mapped to [-1, 1] (default: chosen from the training lesions)")
    p.add_argument("--channel", type=int, default=0, help="image channel to learn (default: 0)")
    p.add_argument("--texture-clusters", type=int, default=3, help="histogram prototypes per class (default: 3)")
    add_training_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.data.intensity import IntensitySpace
    from lefusion_nnunet.data.roi import RoiGeometry
    from lefusion_nnunet.errors import LeFusionInputError
    from lefusion_nnunet.paths import default_run_dir
    from lefusion_nnunet.training.trainer import TrainConfig, check_run_folder, train_lesion_model
    from lefusion_nnunet.validation import (check_channel, check_labels_declared, median_spacing_zyx,
                                            note_roi_larger_than_images, validate_dataset)

    config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
                         texture_clusters=args.texture_clusters, seed=args.seed, device=args.device)
    if args.window is not None and not args.window[0] < args.window[1]:
        raise LeFusionInputError(f"--window {args.window[0]:g} {args.window[1]:g} must be LO HI with LO < HI (HU).")
    dataset = load_raw_dataset(args.dataset)
    check_labels_declared(dataset, args.lesion_label, args.region_label)  # cheap checks first
    check_channel(dataset, args.channel)
    out = args.output or default_run_dir(dataset.name, args.preset)
    check_run_folder(out, args.resume, args.overwrite)
    check = validate_dataset(dataset, args.lesion_label, args.region_label, args.channel, need_lesions=True)
    spacing = xyz_to_zyx(args.spacing, "--spacing") or median_spacing_zyx(check)
    roi = RoiGeometry(size_zyx=xyz_to_zyx(args.roi_size, "--roi-size", int), spacing_zyx=spacing)
    note_roi_larger_than_images(check, roi)
    intensity = IntensitySpace("window", window=tuple(args.window)) if args.window else None
    final = train_lesion_model(dataset, args.lesion_label, out, config, roi, region_label=args.region_label,
                               intensity=intensity, channel=args.channel, resume=args.resume,
                               overwrite=args.overwrite, check=check)
    print(f"checkpoint: {final}")
    print(f"log: {final.parent / 'training_log.jsonl'}  plot: {final.parent / 'loss.png'}")
    return 0
