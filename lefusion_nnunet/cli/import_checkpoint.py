"""`lefusion import-checkpoint`: turn a published LeFusion model (lidc.pt, emidec.pt, diffmask.pt) into ours."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_import_checkpoint_parser(sub) -> None:
    """Register ``import-checkpoint`` on the ``lefusion`` subparsers."""
    p = sub.add_parser(
        "import-checkpoint", help="import a published LeFusion model (lidc.pt, emidec.pt, diffmask.pt)",
        description="Convert a checkpoint of the LeFusion release (github.com/M3DV/LeFusion; download lidc.pt, "
                    "emidec.pt or diffmask.pt yourself) into a lefusion-nnunet checkpoint usable by synthesize, "
                    "enlarge and -tr LeFusionTrainer (lidc, emidec) or by --mask-source diffusion (diffmask). The "
                    "file is read with torch.load(weights_only=True) and never modified; the output records the "
                    "architecture, intensity space, ROI size and spacing, labels, texture prototypes, schedule and "
                    "the source file's SHA-256.")
    p.add_argument("path", type=Path, help="the release's checkpoint file")
    p.add_argument("--kind", required=True, choices=["lidc", "emidec", "diffmask"],
                   help="which published model the file is")
    p.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="model: the weights the release's inference uses (default); ema: its EMA copy")
    p.add_argument("--lesion-label", dest="lesion_labels", type=int, nargs="+", default=None,
                   help="label value of each lesion class in your dataset, in channel order "
                        "(default: lidc 1, emidec 3 4, diffmask 1)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="model-grid voxel size in mm, x y z. The release never resamples (its ROIs keep each "
                        "scan's voxel size), so this is an assumption: default lidc/diffmask 0.7 0.7 1.25, emidec "
                        "1.5 1.5 10; pass your scans' spacing for exact (interpolation-free) paste-back")
    p.add_argument("--roi-size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="model grid in voxels, x y z (default: the release's, lidc/diffmask 64 64 32, emidec "
                        "72 72 10); x and y must be multiples of the network's downsampling factor")
    p.add_argument("-o", "--output", type=Path, required=True, help="the checkpoint to write (OUT.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_import_checkpoint)


#: What ``lefusion`` calls to register this command (the convention of the other command modules).
register = add_import_checkpoint_parser


def run_import_checkpoint(args: argparse.Namespace) -> int:
    from lefusion_nnunet.checkpoints.release import import_release_checkpoint
    from lefusion_nnunet.errors import LeFusionInputError

    if args.output.exists() and not args.overwrite:
        raise LeFusionInputError(f"{args.output} exists; pass --overwrite to replace it or choose another -o.")
    roi_size_zyx = None if args.roi_size is None else tuple(args.roi_size)[::-1]
    result = import_release_checkpoint(args.path, args.kind, args.weights, args.lesion_labels, args.spacing,
                                       args.output, roi_size_zyx=roi_size_zyx)
    what = "lesion model" if result.checkpoint_kind == "lesion" else "mask model (use with --mask-source diffusion)"
    print(f"imported {args.path} ({args.kind}, {args.weights} weights, step {result.step}, "
          f"{result.num_tensors} tensors, sha256 {result.source_sha256[:12]}...) as a {what}: {result.path}")
    print(f"lesion labels {list(result.lesion_labels)}; model grid spacing x y z = "
          f"{' '.join(f'{s:g}' for s in result.spacing_xyz)} mm"
          + (" (assumed default; pass --spacing to change)" if args.spacing is None else ""))
    return 0
