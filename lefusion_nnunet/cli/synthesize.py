"""`lefusion synthesize`: inpaint a lesion into one image inside a given mask."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.cli.common import add_device, add_sampler, add_seed, sampler_overrides


def register(sub) -> None:
    p = sub.add_parser("synthesize", help="inpaint a lesion into an image inside a mask",
                       description="Inpaint a synthetic lesion into IMAGE inside MASK (same grid; 1 = lesion, or "
                                   "class label values for a multi-class model). Writes the image and the label "
                                   "(lesion label added to LABEL, if given) to OUT_DIR in the input's format and "
                                   "geometry. Voxels outside the mask stay bit-identical.")
    p.add_argument("--checkpoint", type=Path, required=True, help="lesion checkpoint (checkpoint_final.pt)")
    p.add_argument("-i", "--image", type=Path, nargs="+", required=True,
                   help="image file(s), one per channel (CASE_0000.nii.gz ...)")
    p.add_argument("-l", "--label", type=Path, default=None, help="existing label map of the image (optional)")
    p.add_argument("--mask", type=Path, required=True, help="lesion mask on the image grid")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_sampler(p)
    add_device(p)
    add_seed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lefusion_nnunet.data.histogram import parse_textures
    from lefusion_nnunet.synthesis.files import synthesize_files
    from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
    from lefusion_nnunet.validation import check_output_absent, validate_case_files

    check_output_absent(args.output, args.overwrite, "output folder")
    synth = LesionSynthesizer.from_checkpoint(args.checkpoint, args.device, sampler_overrides(args), args.guidance,
                                              args.batch_size)
    validate_case_files(args.image, synth.data.channel, args.mask, args.label, roi=synth.data.roi)
    textures = parse_textures(args.texture, list(synth.data.lesion_labels))
    written = synthesize_files(synth, args.image, args.mask, args.output, args.label, textures, args.seed,
                               args.overwrite)
    for key, path in written.items():
        print(f"{key}: {path}")
    return 0
