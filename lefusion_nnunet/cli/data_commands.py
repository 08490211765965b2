"""`lefusion phantom` (the embedded default dataset) and `lefusion enlarge` (offline dataset enlargement)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_device, add_sampler, add_seed, sampler_overrides


def register(sub) -> None:
    p = sub.add_parser("phantom", help="write the procedural CT chest phantom dataset (nnU-Net raw format)",
                       description="Write a deterministic CT-like chest phantom dataset in nnU-Net raw format: "
                                   "body, lungs (label 1), vessels, noise, and nodules (label 2) of three textures "
                                   "(ground-glass, solid, part-solid), plus lesion-free cases.")
    p.add_argument("-o", "--output", type=Path, default=None, help="raw folder (default: $nnUNet_raw)")
    p.add_argument("--id", type=int, default=501, help="dataset id (default: 501)")
    p.add_argument("--name", default="LeFusionChestPhantom", help="dataset name (default: LeFusionChestPhantom)")
    p.add_argument("--cases", type=int, default=16, help="number of cases (default: 16)")
    p.add_argument("--lesion-free-fraction", type=float, default=0.375,
                   help="fraction of cases without nodules (default: 0.375)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="volume size in voxels (default: 96 96 48)")
    p.add_argument("--file-ending", default=".nii.gz", choices=[".nii.gz", ".nrrd", ".mha"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    add_seed(p)
    p.set_defaults(func=run_phantom)

    e = sub.add_parser("enlarge", help="write a new nnU-Net dataset with synthetic lesion cases",
                       description="Enlarge an nnU-Net raw dataset: for each chosen source case write K synthetic "
                                   "variants with LeFusion lesions, plus dataset.json (originals referenced), "
                                   "grouped splits_final.json, lefusion_provenance.json and a montage. The source "
                                   "dataset is never written.")
    e.add_argument("-d", "--dataset", required=True, help="source dataset id or name")
    e.add_argument("-o", "--output", required=True, help="destination dataset id or name (e.g. 502)")
    e.add_argument("--checkpoint", type=Path, default=None, help="lesion checkpoint (default: the one "
                   "`lefusion train` wrote for the source dataset)")
    e.add_argument("--per-case", type=int, default=2, help="synthetic variants per source case (default: 2)")
    e.add_argument("--cases-from", choices=["lesion-free", "all"], default="lesion-free",
                   help="which source cases receive lesions (default: lesion-free)")
    e.add_argument("--mask-source", choices=["ellipsoid", "real"], default="ellipsoid",
                   help="lesion shapes: random ellipsoids or real masks from labelled cases (default: ellipsoid)")
    e.add_argument("--size-mm", type=float, nargs=2, default=[8.0, 20.0], metavar=("MIN", "MAX"),
                   help="equivalent-sphere diameter range in mm (default: 8 20)")
    e.add_argument("--boundary", type=float, default=0.3, help="0 smooth ... 1 irregular (default: 0.3)")
    region = e.add_mutually_exclusive_group()
    region.add_argument("--region-label", type=int, default=None,
                        help="label lesions must lie in (default: the checkpoint's region label, else the body)")
    region.add_argument("--region-masks", type=Path, default=None, help="folder with one region mask per case")
    e.add_argument("--copy-originals", action="store_true", help="copy the source cases instead of referencing them")
    e.add_argument("--resume", action="store_true", help="finish an interrupted run")
    e.add_argument("--overwrite", action="store_true", help="replace an existing destination dataset")
    add_sampler(e)
    add_device(e)
    add_seed(e)
    e.set_defaults(func=run_enlarge)


def run_phantom(args: argparse.Namespace) -> int:
    from lefusion_nnunet.cli.common import xyz_to_zyx
    from lefusion_nnunet.data.dataset import env_folder
    from lefusion_nnunet.data.phantom import PhantomConfig, generate_chest_phantom

    out = args.output or env_folder("nnUNet_raw")
    kwargs = dict(num_cases=args.cases, lesion_free_fraction=args.lesion_free_fraction,
                  file_ending=args.file_ending, seed=args.seed)
    if args.shape:
        kwargs["shape_zyx"] = xyz_to_zyx(args.shape, "--shape", int)
    folder = generate_chest_phantom(out, args.id, args.name, PhantomConfig(**kwargs), overwrite=args.overwrite)
    print(f"dataset: {folder}")
    return 0


def variant_settings_from_args(args: argparse.Namespace):
    """VariantSettings from the mask/texture/sampler flags shared by `enlarge` and `trainer-config`."""
    from lefusion_nnunet.variants import VariantSettings

    return VariantSettings(per_case=args.per_case, mask_source=args.mask_source, size_mm=tuple(args.size_mm),
                           region_label=args.region_label,
                           region_masks_dir=str(args.region_masks) if getattr(args, "region_masks", None) else None,
                           textures=tuple(args.texture or ("random",)), boundary=args.boundary,
                           sampler=sampler_overrides(args), guidance_scale=args.guidance, seed=args.seed)


def run_enlarge(args: argparse.Namespace) -> int:
    from lefusion_nnunet.enlargement import enlarge

    summary = enlarge(args.dataset, args.output, checkpoint=args.checkpoint, settings=variant_settings_from_args(args),
                      cases_from=args.cases_from, copy_originals=args.copy_originals, batch_size=args.batch_size,
                      device=args.device, resume=args.resume, overwrite=args.overwrite)
    print(summary.format())
    return 0
