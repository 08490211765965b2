"""Flags shared by several commands, named as nnU-Net names them where it has a name."""
from __future__ import annotations

import argparse
from pathlib import Path

from lefusion_nnunet.errors import LeFusionInputError


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda (default: auto)")


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help=f"random seed (default: {default})")


def add_training_run_args(p: argparse.ArgumentParser, steps: int = 2000, batch_size: int = 4) -> None:
    """Options every diffusion training command shares (`lefusion train`, `lefusion train-mask`): how long,
    how big a step, when to save, and what to do with an existing run folder; plus --device and --seed."""
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"ROIs per step (default: {batch_size})")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: stop (and save) after this many minutes even if --steps is not reached")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt in the run folder")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a run")
    add_device(p)
    add_seed(p)


def add_sampler(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=list(SAMPLER_CHOICES), default=None,
                   help="ddim: fast inpainting sampler (default); repaint: paper-faithful RePaint with jumps; "
                        "dpmpp2m: DPM-Solver++ 2M, few steps (see README for how it compares)")
    g.add_argument("--steps", dest="sampler_steps", type=int, default=None,
                   help="denoising steps = network evaluations of ddim / dpmpp2m (default: 10 / 10)")
    g.add_argument("--eta", type=float, default=None,
                   help="ddim / dpmpp2m stochasticity in [0, 1]: 0 deterministic, 1 fresh noise every step "
                        "(default: ddim 1, dpmpp2m 0)")
    g.add_argument("--jump-length", type=int, default=None, help="RePaint jump length j (default: 2)")
    g.add_argument("--jump-n-sample", type=int, default=None, help="RePaint resampling count r (default: 2)")
    g.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = conditional model only; default: 1.0)")
    g.add_argument("--texture", nargs="+", default=None, metavar="SPEC",
                   help="cluster:K, random or file:PATH (JSON list of 16 numbers); per class as LABEL=SPEC "
                        "(default: random)")
    g.add_argument("--batch-size", type=int, default=4, help="ROIs per network call (default: 4)")


def sampler_overrides(args: argparse.Namespace) -> dict:
    """SamplerConfig fields set on the command line."""
    out = {}
    if args.sampler is not None:
        out["name"] = args.sampler
    if args.sampler_steps is not None:
        out["num_steps"] = args.sampler_steps
    if args.eta is not None:
        out["eta"] = args.eta
    if args.jump_length is not None:
        out["jump_length"] = args.jump_length
    if args.jump_n_sample is not None:
        out["jump_n_sample"] = args.jump_n_sample
    return out


def xyz_to_zyx(values, what: str, kind=float) -> tuple:
    """A user's ``X Y Z`` triple -> ``(z, y, x)``."""
    if values is None:
        return None
    if len(values) != 3:
        raise LeFusionInputError(f"{what} takes three numbers X Y Z.")
    return tuple(kind(v) for v in values[::-1])


MASK_SOURCE_CHOICES = ("ellipsoid", "real", "diffusion")
#: diffusion.sampler_config.SAMPLER_NAMES, spelled out: importing it would import torch before --threads applies
#: (tests/test_cli_consistency.py keeps the two equal).
SAMPLER_CHOICES = ("ddim", "repaint", "dpmpp2m")
AUTO_REGION_CHOICES = ("lung",)


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




def add_variant_args(p: argparse.ArgumentParser, per_case_help: str, default_per_case: int = 2) -> None:
    """How synthetic lesions are shaped and placed: shared by `enlarge` (K default 2) and `trainer-config` (K
    default ``integration.trainer_settings.DEFAULT_PER_CASE``, passed in; a test keeps the two equal)."""
    p.add_argument("--per-case", type=int, default=default_per_case,
                   help=f"{per_case_help} (default: {default_per_case})")
    add_mask_control_flags(p)
    region = p.add_mutually_exclusive_group()
    region.add_argument("--region-label", type=int, default=None,
                        help="label lesions must lie in (default: the checkpoint's region label, else the body)")
    region.add_argument("--region-masks", type=Path, default=None, help="folder with one region mask per case")
    region.add_argument("--auto-region", choices=AUTO_REGION_CHOICES, default=None,
                        help="lung: place lesions inside the lungs found in the CT itself (threshold + morphology; "
                             "for datasets without a lung label; vessels and airways inside the lung included)")


def variant_settings_from_args(args: argparse.Namespace):
    """VariantSettings from the flags of :func:`add_variant_args` and :func:`add_sampler`."""
    from lefusion_nnunet.variant_settings import VariantSettings

    return VariantSettings(per_case=args.per_case, region_label=args.region_label,
                           region_masks_dir=str(args.region_masks) if args.region_masks else None,
                           textures=tuple(args.texture or ("random",)), sampler=sampler_overrides(args),
                           auto_region=args.auto_region,
                           guidance_scale=args.guidance, seed=args.seed, **mask_settings_from_args(args))
