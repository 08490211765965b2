"""`lefusion phantom` (the embedded default dataset) and `lefusion enlarge` (offline dataset enlargement)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lefusion_nnunet.cli.common import (add_device, add_sampler, add_seed, add_variant_args, variant_settings_from_args,
                                        xyz_to_zyx)


def register(sub) -> None:
    p = sub.add_parser("phantom", help="write the procedural CT chest phantom dataset (nnU-Net raw format)",
                       description="Write a deterministic CT-like chest phantom dataset in nnU-Net raw format: "
                                   "body, lungs (label 1), vessels, noise, and nodules (label 2) of three textures "
                                   "(ground-glass, solid, part-solid), plus lesion-free cases.")
    p.add_argument("-o", "--output", type=Path, default=None, help="raw folder (default: $nnUNet_raw)")
    p.add_argument("--kind", choices=["chest", "cardiac"], default="chest",
                   help="chest: CT lung nodules (default); cardiac: MR-like myocardium (label 2) with infarct (3) "
                        "and microvascular obstruction (4), two lesion classes")
    p.add_argument("--id", type=int, default=None, help="dataset id (default: 501 chest, 511 cardiac)")
    p.add_argument("--name", default=None, help="dataset name (default: LeFusionChestPhantom / LeFusionCardiacPhantom)")
    p.add_argument("--cases", type=int, default=16, help="number of cases (default: 16)")
    p.add_argument("--lesion-free-fraction", type=float, default=0.375,
                   help="fraction of cases without nodules (default: 0.375)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="volume size in voxels (default: 96 96 48)")
    p.add_argument("--file-ending", default=".nii.gz", choices=[".nii.gz", ".nrrd", ".mha"],
                   help="file format of the images and labels (default: .nii.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    add_seed(p)
    p.set_defaults(func=run_phantom)

    e = sub.add_parser("enlarge", help="write a new nnU-Net dataset with synthetic lesion cases",
                       description="Enlarge an nnU-Net raw dataset: for each chosen source case write K synthetic "
                                   "variants with LeFusion lesions, plus dataset.json (originals referenced), "
                                   "grouped splits_final.json, lefusion_provenance.json and a montage. The source "
                                   "dataset is never written.")
    e.add_argument("-d", "--dataset", required=True, help="source dataset id or name")
    dst = e.add_mutually_exclusive_group(required=True)
    dst.add_argument("--destination", "--dst", dest="destination",
                     help="destination dataset id or name (e.g. 502 -> Dataset502_<Source>LeFusion)")
    dst.add_argument("-o", "--output", dest="destination_deprecated", help=argparse.SUPPRESS)
    e.add_argument("--checkpoint", type=Path, default=None, help="lesion checkpoint (default: the one "
                   "`lefusion train` wrote for the source dataset)")
    e.add_argument("--method", choices=["lefusion", "copy-paste"], default="lefusion",
                   help="how lesion masks are filled: the LeFusion model (default), or copy-paste of the labelled "
                        "cases' real lesions with intensity transfer (baseline; use with --mask-source real)")
    e.add_argument("--lesion-label", type=int, nargs="+", default=None,
                   help="copy-paste: lesion label(s) to copy (default: the lesion checkpoint's)")
    e.add_argument("--blend-mm", type=float, default=None,
                   help="copy-paste: blending ramp inside the mask border in mm, 0 = hard paste (default: 1)")
    e.add_argument("--cases-from", choices=["lesion-free", "all"], default="lesion-free",
                   help="which source cases receive lesions (default: lesion-free)")
    add_variant_args(e, "synthetic variants per source case")
    e.add_argument("--copy-originals", action="store_true", help="copy the source cases instead of referencing them")
    e.add_argument("--resume", action="store_true", help="finish an interrupted run")
    e.add_argument("--overwrite", action="store_true", help="replace an existing destination dataset")
    add_sampler(e)
    add_device(e)
    add_seed(e)
    e.set_defaults(func=run_enlarge)


def run_phantom(args: argparse.Namespace) -> int:
    from lefusion_nnunet.phantoms import generate_phantom

    folder = generate_phantom(args.kind, args.output, dataset_id=args.id, name=args.name, overwrite=args.overwrite,
                              num_cases=args.cases, lesion_free_fraction=args.lesion_free_fraction,
                              file_ending=args.file_ending, seed=args.seed,
                              shape_zyx=xyz_to_zyx(args.shape, "--shape", int))
    print(f"dataset: {folder}")
    return 0


def run_enlarge(args: argparse.Namespace) -> int:
    from lefusion_nnunet.enlargement.run import enlarge
    from lefusion_nnunet.errors import LeFusionInputError
    from lefusion_nnunet.synthesis.copy_paste import copy_paste_synthesizer

    destination = args.destination
    if destination is None:
        destination = args.destination_deprecated
        print("lefusion: warning: `enlarge -o` is deprecated (-o names folders elsewhere); use --destination "
              f"{destination}.", file=sys.stderr)
    if args.method != "copy-paste" and (args.lesion_label is not None or args.blend_mm is not None):
        raise LeFusionInputError("--lesion-label and --blend-mm only apply to --method copy-paste; drop them (the "
                                 "LeFusion method takes its lesion labels from the checkpoint).")
    synthesizer = (copy_paste_synthesizer(args.dataset, args.lesion_label, args.checkpoint, args.region_label,
                                          args.blend_mm, args.batch_size) if args.method == "copy-paste" else None)
    summary = enlarge(args.dataset, destination, checkpoint=args.checkpoint, settings=variant_settings_from_args(args),
                      cases_from=args.cases_from, copy_originals=args.copy_originals, batch_size=args.batch_size,
                      device=args.device, resume=args.resume, overwrite=args.overwrite, synthesizer=synthesizer)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary; print it once
        print(summary.format())
    return 0
