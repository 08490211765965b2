"""`lefusion train`: train a lesion model on an nnU-Net raw dataset."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_training_run_args, xyz_to_zyx

# diffusion.inputs.RING_SHAPES (importing it would import torch); tests/test_model_inputs.py keeps them equal
RING_SHAPE_CHOICES = ("in-plane-faces", "in-plane", "faces", "cube")


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
    p.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model ROI in voxels (default: planned in mm from the training lesions so that each fits "
                        "with margin, at the median spacing, never with thinner slices than the scans; printed)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model spacing in mm (default: median spacing of the dataset)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="CT intensity window in HU mapped to [-1, 1] (default: chosen from the training lesions)")
    p.add_argument("--channel", type=int, default=0, help="image channel to learn (default: 0)")
    p.add_argument("--texture-clusters", type=int, default=3, help="histogram prototypes per class (default: 3)")
    p.add_argument("--border-ring", type=int, default=1,
                   help="model voxels generated around each lesion, where real lesions end in partial-volume blur "
                        "outside their labels; voxels beyond it stay bit-identical (default: 1; 0 = the mask only)")
    p.add_argument("--border-ring-shape", choices=RING_SHAPE_CHOICES, default="in-plane-faces",
                   help="how each ring voxel step grows the mask: in-plane-faces (default: face neighbours along the "
                        "axes no coarser than 1.5 x the finest, so thick slices get no ring across them), in-plane "
                        "(all neighbours along those axes), faces (6-neighbourhood), cube (26-neighbourhood, the "
                        "ring of earlier versions); recorded in the checkpoint")
    add_training_run_args(p, steps=4000, batch_size=8)  # TrainConfig's defaults (importing it would import torch)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lefusion_nnunet.training.lesion import train_lesion_model_on_dataset
    from lefusion_nnunet.training.loop import TrainConfig

    config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
                         texture_clusters=args.texture_clusters, seed=args.seed, device=args.device,
                         border_ring=args.border_ring, border_ring_shape=args.border_ring_shape)
    final = train_lesion_model_on_dataset(
        args.dataset, args.lesion_label, config, out_dir=args.output,
        roi_size_zyx=xyz_to_zyx(args.roi_size, "--roi-size", int), spacing_zyx=xyz_to_zyx(args.spacing, "--spacing"),
        window=tuple(args.window) if args.window is not None else None, region_label=args.region_label,
        channel=args.channel, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {final}")
    print(f"log: {final.parent / 'training_log.jsonl'}  plot: {final.parent / 'loss.png'}")
    return 0
