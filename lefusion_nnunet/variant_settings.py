"""How synthetic variants are made: :class:`VariantSettings` (mask source, sizes, region, textures, sampler,
guidance, seed, K), shared by ``lefusion enlarge``, ``lefusion trainer-config`` and ``LeFusionTrainer``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.data.histogram import parse_texture
from lefusion_nnunet.errors import LeFusionInputError

MASK_SOURCES = ("real", "ellipsoid", "diffusion")
#: Host regions found from the image itself (``--auto-region``) for datasets without a host-organ label.
AUTO_REGIONS = ("lung",)


SAMPLER_FIELDS = ("name", "num_steps", "eta", "jump_length", "jump_n_sample", "resample_steps", "timestep_spacing")


#: The SamplerConfig fields each sampler uses (what provenance records; other fields have no effect).
SAMPLER_RECORD_FIELDS = {"ddim": ("name", "num_steps", "eta", "resample_steps", "timestep_spacing"),
                         "repaint": ("name", "jump_length", "jump_n_sample"),
                         "dpmpp2m": ("name", "num_steps", "eta", "timestep_spacing")}


@dataclass(frozen=True)
class VariantSettings(JsonConfig):
    """How synthetic variants are made (JSON round trip with :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        per_case: K variants per source case.
        mask_source: ``"ellipsoid"`` (random smooth ellipsoids), ``"real"`` (transformed real lesions) or
            ``"diffusion"`` (samples of a lesion mask model, ``lefusion train-mask``).
        size_mm: equivalent-sphere diameter range ``(min, max)`` in mm, drawn uniformly.
        region_label: label the lesion must lie in; None -> the checkpoint's region label -> the body.
        region_masks_dir: folder with one mask per case (``CASE + file_ending``); overrides ``region_label``.
        textures: ``--texture`` items (``random``, ``cluster:K``, ``file:PATH``, or ``LABEL=SPEC`` per class).
        boundary: 0 = smooth ... 1 = irregular: the ellipsoid surface perturbation; for diffusion masks the
            post-processing (size-dependent smoothing vs. surface perturbation) and the irregularity condition.
        mask_checkpoint: mask model for ``"diffusion"``; None -> the dataset's newest ``train-mask`` run.
        auto_region: ``"lung"``: lesions go inside the lungs found from the CT itself
            (:func:`lefusion_nnunet.data.lung_region.lung_region`), for datasets without a lung label; excludes
            ``region_label`` and ``region_masks_dir``.
        center_mm: lesion centre in world coordinates ``(x, y, z)`` mm (as ITK/SimpleITK report positions);
            the lesion goes as near to it as the allowed region permits. None -> a random valid place.
        sampler: SamplerConfig fields overriding the checkpoint's defaults (e.g. ``{"num_steps": 10}``).
        guidance_scale: classifier-free guidance weight.
        seed: the seed every random choice derives from.
    """

    per_case: int = 2
    mask_source: str = "ellipsoid"
    size_mm: tuple[float, float] = (8.0, 20.0)
    region_label: int | None = None
    region_masks_dir: str | None = None
    textures: tuple[str, ...] = ("random",)
    boundary: float = 0.3
    sampler: dict = field(default_factory=dict)
    guidance_scale: float = 1.0
    seed: int = 0
    mask_checkpoint: str | None = None
    center_mm: tuple[float, float, float] | None = None
    auto_region: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.per_case, int) or self.per_case < 1:
            raise LeFusionInputError(f"--per-case {self.per_case} must be a whole number of at least 1.")
        if self.mask_source not in MASK_SOURCES:
            raise LeFusionInputError(f"--mask-source {self.mask_source!r} is not one of {', '.join(MASK_SOURCES)}.")
        lo, hi = (float(v) for v in self.size_mm) if len(self.size_mm) == 2 else (math.nan, math.nan)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise LeFusionInputError(f"--size-mm {tuple(self.size_mm)} must be two diameters 0 < MIN <= MAX in mm.")
        object.__setattr__(self, "size_mm", (lo, hi))
        object.__setattr__(self, "textures", tuple(self.textures) or ("random",))
        for item in self.textures:
            label, sep, spec = item.partition("=")
            parse_texture(spec if sep and label.strip().isdigit() else item)
        if not 0.0 <= float(self.boundary) <= 1.0:
            raise LeFusionInputError(f"--boundary {self.boundary} must lie between 0 (smooth) and 1 (irregular).")
        unknown = sorted(set(self.sampler) - set(SAMPLER_FIELDS))
        if unknown:
            raise LeFusionInputError(f"unknown sampler setting(s) {unknown}; use {', '.join(SAMPLER_FIELDS)}.")
        if float(self.guidance_scale) < 0:
            raise LeFusionInputError(f"--guidance {self.guidance_scale} must be >= 0.")
        if self.mask_checkpoint is not None:
            object.__setattr__(self, "mask_checkpoint", str(self.mask_checkpoint))
        if self.auto_region is not None:
            if self.auto_region not in AUTO_REGIONS:
                raise LeFusionInputError(f"--auto-region {self.auto_region!r} is not one of {', '.join(AUTO_REGIONS)}.")
            if self.region_label is not None or self.region_masks_dir is not None:
                raise LeFusionInputError("--auto-region replaces --region-label and --region-masks; give only one "
                                         "of them.")
        if self.center_mm is not None:
            try:
                center = tuple(float(v) for v in self.center_mm)
            except (TypeError, ValueError):
                center = ()
            if len(center) != 3 or not all(math.isfinite(v) for v in center):
                raise LeFusionInputError(f"--center {self.center_mm} must be three numbers X Y Z (world mm).")
            object.__setattr__(self, "center_mm", center)


def sampler_record(config) -> dict:
    """A sampler's settings as provenance records them: only the fields that sampler uses."""
    fields = dataclasses.asdict(config)
    keep = SAMPLER_RECORD_FIELDS.get(fields.get("name"), tuple(fields))
    return {k: v for k, v in fields.items() if k in keep}
