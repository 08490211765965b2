"""`lefusion train-mask` (the lesion mask model), `lefusion sample-mask` (one mask for one image), and the
mask-control flags shared by the commands that make masks (`synthesize`, `enlarge`, `trainer-config`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_device, add_mask_control_flags, add_seed, add_training_run_args, xyz_to_zyx


def register(sub) -> None:
    p = sub.add_parser("train-mask", help="train a LeFusion lesion mask model (size/location/boundary control)",
                       description="Train a 3D diffusion model of the lesion masks of an nnU-Net raw dataset (one "
                                   "channel per lesion class, classes nested in --lesion-label order), conditioned on "
                                   "a sphere (centre, radius) and the host region. Use it with --mask-source "
                                   "diffusion. "
                                   "Writes checkpoint_latest.pt / checkpoint_final.pt, training_log.jsonl and loss.png "
                                   "to $nnUNet_results/<Dataset>/LeFusionMask_<preset>/ unless -o is given.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (e.g. 501 or Dataset501_Name)")
    p.add_argument("--lesion-label", type=int, nargs="+", required=True, metavar="L",
                   help="lesion label value(s), outer class first (e.g. 3 4: infarct, then the MVO inside it)")
    p.add_argument("--region-label", type=int, default=None, metavar="R",
                   help="host-region label (e.g. lung, myocardium): the model learns lesions that follow it "
                        "(default: the lesion checkpoint's, else none)")
    p.add_argument("-o", "--output", type=Path, default=None, help="run folder (default under $nnUNet_results)")
    p.add_argument("--preset", choices=["tiny", "small", "base"], default="small",
                   help="model size: tiny (tests), small (CPU default), base (GPU)")
    p.add_argument("--lesion-checkpoint", type=Path, default=None,
                   help="lesion checkpoint whose ROI size, spacing and region label to use (recommended)")
    p.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model ROI in voxels (default: the lesion checkpoint's, else 64 64 32)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model spacing in mm (default: the lesion checkpoint's, else the dataset's median spacing)")
    add_training_run_args(p)
    p.set_defaults(func=run_train_mask)
    register_sample_mask(sub)


def run_train_mask(args: argparse.Namespace) -> int:
    from lefusion_nnunet.training.loop import TrainConfig
    from lefusion_nnunet.training.mask import train_mask_model_on_dataset

    config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes, seed=args.seed,
                         device=args.device)
    final = train_mask_model_on_dataset(
        args.dataset, args.lesion_label, config, out_dir=args.output, lesion_checkpoint=args.lesion_checkpoint,
        roi_size_zyx=xyz_to_zyx(args.roi_size, "--roi-size", int), spacing_zyx=xyz_to_zyx(args.spacing, "--spacing"),
        region_label=args.region_label, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {final}")
    print(f"log: {final.parent / 'training_log.jsonl'}  plot: {final.parent / 'loss.png'}")
    return 0


def register_sample_mask(sub) -> None:
    p = sub.add_parser("sample-mask", help="write a lesion mask sampled from a mask model for one image",
                       description="Sample a lesion mask for IMAGE from a `lefusion train-mask` model with size "
                                   "(--size-mm), location (--center) and boundary (--boundary) control; every lesion "
                                   "voxel lies in the allowed region (--region-label of LABEL, default the mask "
                                   "model's, else the body) and off existing lesions. The mask file (class label "
                                   "values, image geometry) can be passed to `lefusion synthesize --mask`.")
    p.add_argument("-i", "--image", type=Path, required=True, help="image file (the grid of the mask)")
    p.add_argument("-l", "--label", type=Path, default=None, help="label map of the image (host region, lesions)")
    p.add_argument("--region-label", type=int, default=None, help="label the lesion must lie in")
    p.add_argument("-o", "--output", type=Path, required=True, help="mask file to write (e.g. mask.nii.gz)")
    add_mask_control_flags(p, with_source=False, checkpoint_required=True)
    add_device(p)
    add_seed(p)
    p.set_defaults(func=run_sample_mask)


def run_sample_mask(args: argparse.Namespace) -> int:
    from lefusion_nnunet.synthesis.files import write_sampled_mask

    info = write_sampled_mask(args.mask_checkpoint, args.image, args.label, args.output, tuple(args.size_mm),
                              args.boundary, None if args.center is None else tuple(args.center), args.region_label,
                              args.seed, args.device)
    print(f"mask: {args.output}")
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    return 0
