"""Synthetic variants: one path for ``lefusion enlarge``, the nnU-Net trainer's bank and the demo.

For each source case and each ``k < per_case`` a lesion mask is made (random ellipsoid or a transformed real
lesion, :mod:`lefusion_nnunet.data.masks`, or a sample of a lesion mask model, :mod:`lefusion_nnunet.synthesis.masks`),
placed so that every lesion voxel lies inside the allowed region (host label, user region mask, or the body) and off
existing lesions - at a random valid place or as near as possible to ``center_mm`` - capped so it fits the model ROI,
and inpainted by :class:`lefusion_nnunet.synthesis.LesionSynthesizer`. The synthetic case is the source case with
only the model channel changed, and only inside the lesion; its label is the source label with the lesion
class values written inside each class mask.

Randomness of variant ``k`` of case ``c`` comes only from ``(settings.seed, c, k)`` (a numpy generator for
size, shape, position and texture, and a torch generator for the sampler), so the same seed gives the same
output whatever else is generated, and a resumed run forms the same chunks as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Iterator

import numpy as np

from lefusion_nnunet.checkpoints.loaders import check_mask_checkpoint_matches
from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.histogram import parse_textures
from lefusion_nnunet.data.io import (ImageVolume, check_same_grid, read_image, read_label, read_mask, voxel_to_world,
                                     world_to_voxel)
from lefusion_nnunet.data.lung_region import lung_region
from lefusion_nnunet.data.mask_library import MaskLibrary
from lefusion_nnunet.data.masks import (ellipsoid_mask, mask_bounds, mask_equivalent_diameter, mask_volume_mm3,
                                        nested_class_masks)
from lefusion_nnunet.data.placement import allowed_region, place_mask
from lefusion_nnunet.data.roi import mask_fits_roi, plan_roi_origin
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.paths import find_default_checkpoint
from lefusion_nnunet.seeding import seeded_generator, seeded_rng
from lefusion_nnunet.synthesis.lesion import LesionRequest
from lefusion_nnunet.synthesis.masks import MaskGenerator
from lefusion_nnunet.synthetic_case import SyntheticCase
from lefusion_nnunet.validation import resolve_region_label
from lefusion_nnunet.variant_settings import VariantSettings, sampler_record

if TYPE_CHECKING:  # the real class; tests may pass an object with the same attributes
    from lefusion_nnunet.synthesis.lesion import LesionSynthesizer

log = logging.getLogger(__name__)

#: Synthetic case ids are ``f"{source}{SYNTHETIC_INFIX}{k:03d}"``.
SYNTHETIC_INFIX = "_lefusion"
# Shrink factor and number of tries when a lesion does not fit the model ROI.
_ROI_SHRINK, _ROI_TRIES = 0.85, 8


class VariantWarning(str):
    """A warning line (a ``str``) that also carries its case, variant, short reason and whether it skipped."""

    case_id: str
    variant: int | None
    reason: str
    skipped: bool

    def __new__(cls, case_id: str, variant: int | None, reason: str, detail: str = "", skipped: bool = True):
        who = case_id if variant is None else f"{case_id} variant {variant}"
        obj = super().__new__(cls, f"{who} {'skipped' if skipped else 'warning'}: {reason}"
                                   + (f" ({detail})" if detail else ""))
        obj.case_id, obj.variant, obj.reason, obj.skipped = case_id, variant, reason, skipped
        return obj


def class_frequencies(training_summary: dict | None, num_classes: int) -> list[float]:
    """How often each lesion class occurs in the training lesions (outer class: 1), from a checkpoint's training
    summary; 1 for every class when the summary does not say."""
    summary = training_summary or {}
    per_class, total = summary.get("lesions_per_class"), summary.get("num_lesions")
    if not per_class or not total or len(per_class) != num_classes:
        return [1.0] * num_classes
    return [1.0] + [min(1.0, float(n) / float(total)) for n in per_class[1:]]


def synthetic_case_id(source_case: str, k: int) -> str:
    return f"{source_case}{SYNTHETIC_INFIX}{k:03d}"


def variant_chunks(case_ids: list[str], per_case: int, batch_size: int) -> list[list[str]]:
    """Fixed chunks of source cases: about one network batch of variants each (depends on nothing else)."""
    size = max(1, int(batch_size) // max(1, int(per_case)))
    return [list(case_ids[i:i + size]) for i in range(0, len(case_ids), size)]


@dataclass
class _CaseContext:
    case_id: str
    volume: ImageVolume
    label: np.ndarray
    label_props: dict
    allowed: np.ndarray
    region: str
    value_range: tuple[float, float]            # the model's intensity range for this case (once per case)
    allowed_bounds: tuple[np.ndarray, np.ndarray] | None = None  # bounding box of ``allowed`` (once per case)


@dataclass
class _Plan:
    case_id: str
    k: int
    masks: np.ndarray                       # (C, z, y, x) bool, a tight block of the native grid at ``offset``
    offset: np.ndarray                      # native voxel index (z, y, x) of masks[:, 0, 0, 0]
    texture: np.ndarray
    texture_spec: list[str]
    info: dict
    roi_origin: np.ndarray                  # planned model-ROI origin, native voxel index (z, y, x)


class _VariantMaker:
    def __init__(self, synth: "LesionSynthesizer", dataset: RawDataset, settings: VariantSettings):
        data = synth.checkpoint.data
        self.synth, self.dataset, self.settings, self.data = synth, dataset, settings, data
        self.lesion_labels = [int(v) for v in data.lesion_labels]
        self.channel = int(data.channel)
        self.specs = parse_textures(list(settings.textures), self.lesion_labels)
        self.region_dir = Path(settings.region_masks_dir) if settings.region_masks_dir else None
        if self.region_dir is not None and not self.region_dir.is_dir():
            raise LeFusionInputError(f"region mask folder {self.region_dir} does not exist; pass a folder with "
                                     f"one mask per case (CASE{dataset.file_ending}).")
        self.region_label = resolve_region_label(settings, data)
        if self.region_label is not None:
            dataset.check_labels([int(self.region_label)], "region label")
        self._library: MaskLibrary | None = None
        sampler_cfg = getattr(synth, "sampler_config", None)
        self.sampler_record = (sampler_record(sampler_cfg) if dataclasses.is_dataclass(sampler_cfg)
                               else dict(settings.sampler))
        self.guidance = float(getattr(synth, "guidance_scale", settings.guidance_scale))
        self.checkpoint_sha = getattr(synth.checkpoint, "file_sha256", None)
        self.class_frequencies = class_frequencies(getattr(synth.checkpoint, "training_summary", None),
                                                   len(self.lesion_labels))
        self.device = getattr(synth, "device", "cpu")
        self._mask_generator = None

    @property
    def mask_generator(self):
        """The lesion mask model (``mask_source == "diffusion"``), loaded on first use."""
        if self._mask_generator is None:

            path = self.settings.mask_checkpoint or find_default_checkpoint(self.dataset.name, kind="mask")
            generator = MaskGenerator(path, device=self.device)
            check_mask_checkpoint_matches(generator.data, self.data, path)
            self._mask_generator = generator
        return self._mask_generator

    @property
    def library(self) -> MaskLibrary:
        if self._library is None:
            self._library = MaskLibrary.from_dataset(self.dataset, self.lesion_labels)
        return self._library

    # -- per case ------------------------------------------------------------------------------------------
    def load_case(self, case_id: str) -> _CaseContext:
        case = self.dataset.case(case_id)
        vol = read_image(case.images)
        if case.label is not None:
            label, lprops = read_label(case.label)
            check_same_grid(vol.properties, lprops, case.images[0], case.label, vol.shape_zyx, label.shape)
        else:
            label, lprops = np.zeros(vol.shape_zyx, np.int16), dict(vol.properties, source_dtype="uint8")
        image = vol.channel(self.channel)
        if self.region_dir is not None:
            mfile = self.region_dir / f"{case_id}{self.dataset.file_ending}"
            if not mfile.is_file():
                raise LeFusionInputError(f"region mask {mfile} is missing; add one mask per case to "
                                         f"{self.region_dir} or drop --region-masks.")
            region = read_mask(mfile, like_shape=vol.shape_zyx)
            allowed = allowed_region(label, region_mask=region, lesion_labels=self.lesion_labels)
            what = f"mask {mfile.name}"
        elif self.settings.auto_region == "lung":
            what = "automatic lung region"
            try:
                lungs = lung_region(image, vol.spacing)
            except LeFusionInputError as exc:  # this case is skipped with the reason, the others go on
                lungs, what = np.zeros(vol.shape_zyx, bool), f"automatic lung region ({exc})"
            allowed = allowed_region(label, region_mask=lungs, lesion_labels=self.lesion_labels)
        elif self.region_label is not None:
            allowed = allowed_region(label, region_label=int(self.region_label), lesion_labels=self.lesion_labels)
            what = f"label {int(self.region_label)}"
        else:
            allowed = allowed_region(label, image=image, lesion_labels=self.lesion_labels)
            what = "body"
        return _CaseContext(case_id, vol, label, lprops, allowed, what, self.data.intensity.value_range_for(image),
                            mask_bounds(allowed))

    def _roi_origin(self, masks: np.ndarray, spacing, margin: float = 1.0, offset=(0, 0, 0)) -> np.ndarray | None:
        """The planned model-ROI origin of a lesion (native voxels, z y x) whose ``(C, z, y, x)`` masks start at
        native voxel ``offset``, or None when it does not fit the ROI with ``margin`` model voxels to spare."""
        union = masks.any(0)
        offset = np.asarray(offset, np.float64)
        origin = plan_roi_origin(union, spacing, self.data.roi, offset)
        return origin if mask_fits_roi(union, spacing, origin - offset, self.data.roi, margin=margin) else None

    def _roi_fits(self, masks: np.ndarray, spacing, margin: float = 1.0) -> bool:
        return self._roi_origin(masks, spacing, margin) is not None

    def _make_mask(self, rng: np.random.Generator, diameter: float, spacing) -> tuple[np.ndarray, dict]:
        c = len(self.lesion_labels)
        if self.settings.mask_source == "real":
            return self.library.sample_with_info(rng, diameter, spacing)
        shape = ellipsoid_mask(diameter, spacing, self.settings.boundary, rng)
        if c == 1:
            return shape[None], {"class": self.lesion_labels[0]}
        masks, depths = nested_class_masks(shape, spacing, self.class_frequencies, rng)
        return masks, {"classes": [v for v, m in zip(self.lesion_labels, masks) if m.any()], "core_depths": depths}

    def _center_voxel(self, ctx: _CaseContext, k: int) -> np.ndarray | None | VariantWarning:
        """``settings.center_mm`` as a (z, y, x) voxel position of this case (None: random placement)."""
        if self.settings.center_mm is None:
            return None
        center = world_to_voxel(self.settings.center_mm, ctx.volume.properties)
        if (center < -0.5).any() or (center > np.asarray(ctx.volume.shape_zyx) - 0.5).any():
            return VariantWarning(ctx.case_id, k, "--center lies outside the image",
                                  f"{list(self.settings.center_mm)} mm is voxel {np.round(center, 1).tolist()} "
                                  f"(z, y, x) "
                                  f"of a {list(ctx.volume.shape_zyx)} volume")
        return center

    def _shape_and_place(self, ctx: _CaseContext, k: int, rng: np.random.Generator, center) \
            -> tuple[np.ndarray, np.ndarray, dict, float, int] | VariantWarning:
        """Make a mask and put it in the case: ``(tight (C, z, y, x) masks, their native offset (z, y, x), info,
        diameter, tries)`` or a warning."""
        s, spacing = self.settings, ctx.volume.spacing
        requested = diameter = float(rng.uniform(*s.size_mm))
        too_big = VariantWarning(ctx.case_id, k, "lesion does not fit the model ROI",
                                 f"{requested:.1f} mm requested, ROI {self.data.roi.extent_mm.round(1).tolist()} mm")
        if s.mask_source == "diffusion":

            gen = self.mask_generator
            torch_gen = seeded_generator(s.seed, ctx.case_id, k, "mask")
            for tries in range(_ROI_TRIES + 1):
                made = gen.generate_in_case(ctx.allowed, spacing, diameter, s.boundary, rng, torch_gen,
                                            center_zyx=center)
                if made is None:
                    return VariantWarning(ctx.case_id, k, "no valid position inside the allowed region",
                                          f"{ctx.region}, {diameter:.1f} mm lesion")
                block, offset = _tight_block(made.masks)
                if self._roi_fits(block, spacing, margin=0.0):
                    info = {**made.info, "checkpoint_sha256": gen.checkpoint.file_sha256}
                    return block, offset, info, requested, tries
                diameter *= _ROI_SHRINK
            return too_big
        masks, info = self._make_mask(rng, diameter, spacing)
        tries = 0
        while not self._roi_fits(masks, spacing):
            tries += 1
            if tries > _ROI_TRIES:
                return too_big
            diameter *= _ROI_SHRINK
            masks, info = self._make_mask(rng, diameter, spacing)
        offset = place_mask(masks, ctx.allowed, rng, center_zyx=center, allowed_bounds=ctx.allowed_bounds)
        if offset is None:
            return VariantWarning(ctx.case_id, k, "no valid position inside the allowed region",
                                  f"{ctx.region}, {mask_equivalent_diameter(masks, spacing):.1f} mm lesion")
        return masks, np.asarray(offset, np.int64), info, requested, tries

    def plan(self, ctx: _CaseContext, k: int) -> _Plan | VariantWarning:

        s = self.settings
        if not ctx.allowed.any():
            return VariantWarning(ctx.case_id, k, "the allowed region is empty", ctx.region)
        center = self._center_voxel(ctx, k)
        if isinstance(center, VariantWarning):
            return center
        rng = seeded_rng(s.seed, ctx.case_id, k)
        spacing = ctx.volume.spacing
        made = self._shape_and_place(ctx, k, rng, center)
        if isinstance(made, VariantWarning):
            return made
        masks, offset, info, requested, tries = made
        # planned once; ROI origin rounding may shift a voxel
        origin = self._roi_origin(masks, spacing, margin=0.0, offset=offset)
        if origin is None:
            return VariantWarning(ctx.case_id, k, "lesion does not fit the model ROI", "after placement")
        texture = np.asarray(self.synth.texture_condition(list(self.specs), rng), np.float32)
        union = masks.any(0)
        idx = np.argwhere(union) + offset
        center_vox = (idx.min(0) + idx.max(0)) / 2.0
        volume = mask_volume_mm3(masks, spacing)
        info = {
            "mask_source": s.mask_source, "mask": info,
            "requested_diameter_mm": round(requested, 4),
            "diameter_mm": round(mask_equivalent_diameter(masks, spacing), 4),
            "diameter_capped": tries > 0, "volume_mm3": round(volume, 4), "voxels": int(union.sum()),
            "class_voxels": {str(v): int(masks[i].sum()) for i, v in enumerate(self.lesion_labels)},
            "center_voxel_zyx": [float(v) for v in center_vox],
            "center_world_xyz_mm": voxel_to_world(center_vox, ctx.volume.properties),
            "requested_center_world_xyz_mm": None if s.center_mm is None else list(s.center_mm),
            "offset_zyx": [int(v) for v in idx.min(0)], "allowed_region": ctx.region}
        return _Plan(ctx.case_id, k, masks, offset, texture, [str(sp) for sp in self.specs], info, origin)

    def capped_warning(self, p: _Plan) -> VariantWarning | None:
        if not p.info["diameter_capped"]:
            return None
        return VariantWarning(p.case_id, p.k, "lesion diameter reduced to fit the model ROI",
                              f"{p.info['requested_diameter_mm']:.1f} -> {p.info['diameter_mm']:.1f} mm", skipped=False)

    # -- per chunk -----------------------------------------------------------------------------------------
    def run_chunk(self, case_ids: list[str], progress: bool) -> tuple[list[SyntheticCase], list[str]]:

        contexts: dict[str, _CaseContext] = {}
        plans: list[_Plan] = []
        warnings: list[str] = []
        for case_id in case_ids:
            ctx = self.load_case(case_id)
            contexts[case_id] = ctx
            for k in range(self.settings.per_case):
                p = self.plan(ctx, k)
                if isinstance(p, VariantWarning):
                    warnings.append(p)
                    log.warning("%s", p)
                    continue
                w = self.capped_warning(p)
                if w is not None:
                    warnings.append(w)
                    log.warning("%s", w)
                plans.append(p)
        if not plans:
            return [], warnings
        requests = [LesionRequest(image=contexts[p.case_id].volume.channel(self.channel),
                                  spacing=contexts[p.case_id].volume.spacing, class_masks=p.masks, texture=p.texture,
                                  value_range=contexts[p.case_id].value_range, roi_origin_zyx=p.roi_origin,
                                  mask_offset_zyx=tuple(int(v) for v in p.offset))
                    for p in plans]
        generators = [seeded_generator(self.settings.seed, p.case_id, p.k) for p in plans]
        edits = self.synth.synthesize_edits(requests, generator=generators,
                                            rng=seeded_rng(self.settings.seed, "chunk", *case_ids), progress=progress)
        cases = []
        for p, edit in zip(plans, edits):
            ctx = contexts[p.case_id]
            window = edit.window
            label = np.array(ctx.label[window.slices], copy=True)
            for i, v in enumerate(self.lesion_labels):
                label[edit.class_masks[i]] = v
            prov = {"case_id": synthetic_case_id(p.case_id, p.k), "source_case": p.case_id, "variant": p.k,
                    **p.info, "texture": p.texture_spec, "texture_histogram": [float(v) for v in p.texture],
                    "seed": int(self.settings.seed), "sampler": self.sampler_record,
                    "guidance_scale": self.guidance, "channel": self.channel,
                    "checkpoint_sha256": self.checkpoint_sha}
            # pasted once by the synthesizer: bit-identical outside the lesion's generation region
            cases.append(SyntheticCase.from_edit(
                synthetic_case_id(p.case_id, p.k), p.case_id, ctx.volume, ctx.label, window.box,
                {self.channel: np.asarray(edit.values, np.float32)}, label, prov, label_properties=ctx.label_props))
        return cases, warnings


def _tight_block(masks_czyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A whole-volume ``(C, Z, Y, X)`` mask as its tight block and the block's offset (z, y, x)."""
    bounds = mask_bounds(masks_czyx)
    if bounds is None:
        return masks_czyx[:, :1, :1, :1], np.zeros(3, np.int64)
    lo, hi = bounds
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return np.ascontiguousarray(masks_czyx[(slice(None), *box)]), lo.astype(np.int64)


def make_variants(synth: "LesionSynthesizer", dataset: RawDataset, case_ids: list[str], settings: VariantSettings,
                  progress: bool = False, *,
                  done: Collection[str] = ()) -> Iterator[tuple[list[SyntheticCase], list[str]]]:
    """Make ``settings.per_case`` synthetic variants of each case, chunk by chunk.

    Yields, per fixed chunk of ``case_ids`` (:func:`variant_chunks`: chunks depend only on the full list,
    ``settings.per_case`` and ``synth.batch_size``, so a resumed run forms the same batches), the synthetic
    cases made and the warnings (``VariantWarning`` strings: skipped variants and reduced diameters). Cases in
    ``done`` are not redone; a chunk with nothing left yields ``([], [])``.

    Raises:
        LeFusionInputError: unknown case, bad region label / mask folder, no real masks for ``"real"``, no or a
            mismatched mask checkpoint for ``"diffusion"``.
    """
    case_ids = [str(c) for c in case_ids]  # plain str: seeds hash repr(case id), and numpy strings repr differently
    if len(set(case_ids)) != len(case_ids):
        raise LeFusionInputError("the list of source cases has duplicates; pass each case once.")
    maker = _VariantMaker(synth, dataset, settings)
    for c in case_ids:
        dataset.case(c)  # fail early on unknown ids
    if settings.mask_source == "real" and any(c not in done for c in case_ids):
        maker.library  # noqa: B018 - build it (and fail) before any work
    if settings.mask_source == "diffusion" and any(c not in done for c in case_ids):
        maker.mask_generator  # noqa: B018 - load it (and fail on a missing/mismatched checkpoint) first
    done = {str(c) for c in done}
    for chunk in variant_chunks(case_ids, settings.per_case, synth.batch_size):
        todo = [c for c in chunk if c not in done]
        if not todo:
            yield [], []
            continue
        yield maker.run_chunk(todo, progress)

