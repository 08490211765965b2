"""`lefusion train-mask` (the lesion mask model), `lefusion sample-mask` (one mask for one image), and the
mask-control flags shared by the commands that make masks (`synthesize`, `enlarge`, `trainer-config`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_device, add_seed, add_training_run_args, xyz_to_zyx

MASK_SOURCE_CHOICES = ("ellipsoid", "real", "diffusion")


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
    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.data.lesions import median_spacing
    from lefusion_nnunet.data.roi import RoiGeometry
    from lefusion_nnunet.training.mask_trainer import train_mask_model
    from lefusion_nnunet.paths import default_run_dir
    from lefusion_nnunet.training.trainer import TrainConfig

    dataset = load_raw_dataset(args.dataset)
    dataset.check_labels(args.lesion_label, "--lesion-label")
    like = None
    if args.lesion_checkpoint is not None:
        from lefusion_nnunet.data.config import DataConfig
        from lefusion_nnunet.training.checkpoint import load_checkpoint_content

        like = DataConfig.from_dict(load_checkpoint_content(args.lesion_checkpoint, "lesion")["data_config"])
    size = xyz_to_zyx(args.roi_size, "--roi-size", int) or (like.roi.size_zyx if like else (32, 64, 64))
    spacing = (xyz_to_zyx(args.spacing, "--spacing") or (like.roi.spacing_zyx if like else None)
               or median_spacing([c.images[0] for c in dataset.cases]))
    region = args.region_label if args.region_label is not None else (like.region_label if like else None)
    config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes, seed=args.seed,
                         device=args.device)
    out = args.output or default_run_dir(dataset.name, args.preset, kind="mask")
    final = train_mask_model(dataset, args.lesion_label, out, config, RoiGeometry(size, spacing), region_label=region,
                             resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {final}")
    print(f"log: {final.parent / 'training_log.jsonl'}  plot: {final.parent / 'loss.png'}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# flags for the commands that make masks
def add_mask_control_flags(p: argparse.ArgumentParser, with_source: bool = True,
                           checkpoint_required: bool = False) -> None:
    """``--mask-source`` (optional), ``--mask-checkpoint``, ``--size-mm``, ``--center``, ``--boundary``."""
    g = p.add_argument_group("lesion masks")
    if with_source:
        g.add_argument("--mask-source", choices=MASK_SOURCE_CHOICES, default="ellipsoid",
                       help="lesion shapes: random ellipsoids, real masks from labelled cases, or samples of a mask "
                            "model (`lefusion train-mask`) (default: ellipsoid)")
    g.add_argument("--mask-checkpoint", type=Path, default=None, required=checkpoint_required,
                   help="mask model (train-mask checkpoint_final.pt)" if checkpoint_required else
                   "mask model for --mask-source diffusion (default: the dataset's newest train-mask run)")
    g.add_argument("--size-mm", type=float, nargs=2, default=[8.0, 20.0], metavar=("MIN", "MAX"),
                   help="equivalent-sphere diameter range of the whole lesion in mm (default: 8 20)")
    g.add_argument("--center", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="lesion centre in world coordinates (mm, as ITK/SimpleITK/3D Slicer LPS report them); the "
                        "lesion goes as near as the allowed region permits (default: a random valid place)")
    g.add_argument("--boundary", type=float, default=0.3,
                   help="0 smooth ... 1 irregular lesion surface (ellipsoids: surface perturbation; diffusion masks: "
                        "post-processing smoothing vs. perturbation and the irregularity condition) (default: 0.3)")


def mask_settings_from_args(args: argparse.Namespace) -> dict:
    """The VariantSettings fields set by :func:`add_mask_control_flags`."""
    return {"mask_source": getattr(args, "mask_source", "ellipsoid"), "size_mm": tuple(args.size_mm),
            "boundary": args.boundary, "center_mm": None if args.center is None else tuple(args.center),
            "mask_checkpoint": None if args.mask_checkpoint is None else str(args.mask_checkpoint)}


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
    info = write_sampled_mask(args.mask_checkpoint, args.image, args.label, args.output, tuple(args.size_mm),
                              args.boundary, None if args.center is None else tuple(args.center), args.region_label,
                              args.seed, args.device)
    print(f"mask: {args.output}")
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def write_sampled_mask(mask_checkpoint: Path, image_file: Path, label_file: Path | None, out_file: Path,
                       size_mm: tuple[float, float], boundary: float, center_mm: tuple[float, float, float] | None,
                       region_label: int | None, seed: int, device: str = "auto") -> dict:
    """Sample a diffusion lesion mask for one image and write it (class label values, the image's geometry).

    The diameter is drawn uniformly from ``size_mm`` with ``seed``. Returns the mask's record (centre voxel,
    requested and obtained diameter, volume, boundary). Used by `sample-mask`; `synthesize --mask-source
    diffusion` can call it to make its ``--mask`` file.
    """
    import numpy as np

    from lefusion_nnunet.data.io import check_same_grid, read_image, read_label, write_label
    from lefusion_nnunet.mask_diffusion import MaskGenerator, generate_case_mask
    from lefusion_nnunet.synthesis import seeded_rng

    gen = MaskGenerator(mask_checkpoint, device=device)
    vol = read_image([image_file])
    label = None
    if label_file is not None:
        label, lprops = read_label(label_file)
        check_same_grid(vol.properties, lprops, vol.files[0], Path(label_file), vol.shape_zyx, label.shape)
    lo, hi = (float(v) for v in size_mm)
    if not 0 < lo <= hi:
        from lefusion_nnunet.errors import LeFusionInputError

        raise LeFusionInputError(f"--size-mm {lo} {hi} must be two diameters 0 < MIN <= MAX in mm.")
    diameter = float(seeded_rng(seed, "size").uniform(lo, hi)) if hi > lo else lo
    made = generate_case_mask(gen, vol.channel(0), vol.spacing, vol.properties, label, diameter, boundary, seed,
                              center_mm, region_label)
    out = np.zeros(vol.shape_zyx, np.int16)
    for c, value in enumerate(gen.data.lesion_labels):
        out[made.masks[c]] = value
    write_label(out, out_file, dict(vol.properties, source_dtype="uint8"))
    return made.info
