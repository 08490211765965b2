"""Lesion mask diffusion ("DiffMask"): generate lesion masks with size, location and boundary control.

A second diffusion model learns the *shape* of the lesions of a dataset, on the same kind of model grid as
the lesion model (ROI size and spacing, z, y, x). It reuses :class:`~lefusion_nnunet.diffusion.LesionDenoiser`:

* ``x_t``: the C mask channels in [-1, 1] (-1 = outside). Channels are *cumulative* in lesion-label order:
  channel c = voxels of class c or of any later class, so an inner class (MVO inside an infarct) stays nested
  inside the outer one; ``decode_cumulative`` gives disjoint class masks back.
* ``context``: the sphere channel ``clip((r - d) / r, -1, 1)`` (``d`` = distance in mm to the requested
  centre, ``r`` = requested equivalent radius): 1 at the centre, 0 on the sphere, -1 from 2 r outward.
* ``class_masks``: the host region (``region_label`` or the allowed region at sampling), repeated C times, so
  the model learns lesions that follow their host (an infarct follows the myocardial wall).
* ``cond``: 4 features per channel (relative equivalent diameter, irregularity = 1 - sphericity, present,
  volume fraction of the whole lesion); dropped with probability ``cond_dropout`` (learned null condition).

Training is :func:`lefusion_nnunet.training.mask_trainer.train_mask_model` (plain eps MSE over all voxels: a mask
is the whole ROI). This module loads mask checkpoints and samples masks (:class:`MaskGenerator`,
:func:`generate_case_mask`): DDIM over the whole ROI (the inpainting sampler with an all-ones generation mask), then
:func:`lefusion_nnunet.mask_shapes.postprocess_masks` turns the sampled channels into masks of the requested size
and boundary (the encodings are in :mod:`lefusion_nnunet.data.mask_shapes` too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lefusion_nnunet.checkpoints.loaders import DEFAULT_MASK_SAMPLER, LoadedMaskCheckpoint, load_mask_checkpoint
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.io import world_to_voxel
from lefusion_nnunet.data.mask_shapes import (MASK_FEATURES, VOLUME_TOLERANCE, check_boundary, decode_cumulative,
                                              postprocess_masks, reference_mm, sphere_channel)
from lefusion_nnunet.data.masks import (equivalent_diameter_mm, keep_largest_component, mask_volume_mm3,
                                        roi_mask_to_native, sphere_volume_mm3)
from lefusion_nnunet.data.placement import allowed_region, choose_center, nearest_allowed_voxel
from lefusion_nnunet.data.roi import extract_roi_mask, roi_origin_for_center
from lefusion_nnunet.diffusion import DDIMInpaintSampler, SamplerConfig
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.seeding import seeded_generator, seeded_rng
from lefusion_nnunet.utils import resolve_device

__all__ = ["GeneratedMask", "MaskGenerator", "generate_case_mask"]


@dataclass
class GeneratedMask:
    """A mask made for one case: disjoint class masks on the native grid and a JSON-safe record."""

    masks: np.ndarray                     # bool (C, Z, Y, X)
    info: dict


class MaskGenerator:
    """Samples lesion masks from a mask checkpoint with size, location and boundary control.

    Args:
        checkpoint: a :class:`LoadedMaskCheckpoint` or a checkpoint path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        sampler: DDIM settings (default: the checkpoint's, 10 steps).
        guidance_scale: classifier-free guidance weight on the size/irregularity condition.
    """

    def __init__(self, checkpoint: LoadedMaskCheckpoint | str | Path, device: str = "auto",
                 sampler: SamplerConfig | None = None, guidance_scale: float = 1.0):
        self.device = resolve_device(device)
        self.checkpoint = checkpoint if isinstance(checkpoint, LoadedMaskCheckpoint) \
            else load_mask_checkpoint(checkpoint, self.device)
        self.checkpoint.model.to(self.device)
        self.checkpoint.schedule = self.checkpoint.schedule.to(self.device)
        cfg = sampler or SamplerConfig(**(self.checkpoint.sampler_defaults or DEFAULT_MASK_SAMPLER.to_dict()))
        if cfg.name != "ddim":
            raise LeFusionInputError("the mask model samples with the ddim sampler only; pass --sampler ddim.")
        self.sampler = DDIMInpaintSampler(cfg)
        if guidance_scale < 0:
            raise LeFusionInputError(f"--guidance {guidance_scale} must be >= 0.")
        self.guidance_scale = float(guidance_scale)

    @property
    def data(self) -> DataConfig:
        return self.checkpoint.data

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def condition(self, diameter_mm: float, boundary: float, rng: np.random.Generator) -> np.ndarray:
        """``(C * 4,)`` condition: a random training lesion's features, rescaled to ``diameter_mm``, with the
        irregularity set to the ``boundary`` quantile of the training lesions'."""
        feats = self.checkpoint.features.reshape(len(self.checkpoint.features), self.num_classes, MASK_FEATURES)
        ref = feats[int(rng.integers(len(feats)))].copy()
        ratio = (float(diameter_mm) / reference_mm(self.data.roi)) / max(float(ref[0, 0]), 1e-6)
        ref[:, 0] *= ratio
        for c in range(self.num_classes):
            present = feats[:, c, 2] > 0
            if ref[c, 2] > 0 and present.any():
                ref[c, 1] = float(np.quantile(feats[present, c, 1], check_boundary(boundary)))
        return ref.ravel().astype(np.float32)

    def sample_soft(self, centers_zyx: np.ndarray, diameter_mm: float, conds: np.ndarray,
                    regions: np.ndarray | None = None, generator=None) -> np.ndarray:
        """Raw DDIM samples ``(n, C, Z, Y, X)`` in [-1, 1] on the model grid.

        Args:
            centers_zyx: ``(n, 3)`` sphere centres in model-grid voxels.
            conds: ``(n, C * 4)`` conditions (:meth:`condition`).
            regions: bool ``(n, Z, Y, X)`` host/allowed region hint, or None (everywhere).
            generator: a torch generator or one per sample (None: seed 0, one per sample).
        """
        roi = self.data.roi
        n, C = len(centers_zyx), self.num_classes
        shape = (n, C, *roi.size_zyx)
        spheres = np.stack([sphere_channel(roi.size_zyx, roi.spacing_zyx, c, diameter_mm / 2) for c in centers_zyx])
        reg = np.ones((n, *roi.size_zyx), np.float32) if regions is None else np.asarray(regions, np.float32)
        if not self.data.extra.get("mask_model", {}).get("region_hint", False):
            reg = np.ones_like(reg)
        dev = self.device
        context = torch.from_numpy(spheres[:, None]).to(dev)
        hint = torch.from_numpy(reg[:, None]).to(dev).expand(shape).contiguous()
        cond = torch.from_numpy(np.asarray(conds, np.float32)).to(dev)
        model, w = self.checkpoint.model, self.guidance_scale

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if w == 1.0:
                return model(x_t, t, context, hint, cond).float()
            b = x_t.shape[0]
            drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x_t.device)
            both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, context]),
                         torch.cat([hint, hint]), torch.cat([cond, cond]), drop_cond=drop).float()
            eps_c, eps_u = both.chunk(2)
            return eps_u + w * (eps_c - eps_u)

        known = torch.zeros(shape, device=dev)
        ones = torch.ones((n, 1, *roi.size_zyx), device=dev)
        if generator is None:  # seeded, never the global RNG
            generator = [seeded_generator(0, "mask", i) for i in range(n)]
        x0 = self.sampler.sample(eps_fn, self.checkpoint.schedule, known, ones, generator=generator)
        return x0.float().cpu().numpy()

    def sample(self, diameter_mm: float, boundary: float = 0.3, n: int = 1, generator=None,
               rng: np.random.Generator | None = None, center_zyx: Sequence[float] | None = None,
               region: np.ndarray | None = None) -> np.ndarray:
        """``n`` post-processed masks on the model grid: bool ``(n, C, Z, Y, X)`` disjoint class masks.

        Args:
            diameter_mm: equivalent-sphere diameter of the whole lesion (all classes), mm.
            boundary: 0 smooth ... 1 irregular.
            center_zyx: sphere centre in model voxels (default: the ROI centre).
            region: bool ``(Z, Y, X)`` allowed region on the model grid (default: everywhere).
        """
        rng = rng if rng is not None else np.random.default_rng()
        _check_diameter(diameter_mm)
        roi = self.data.roi
        center = np.asarray(center_zyx if center_zyx is not None else (np.asarray(roi.size_zyx) - 1) / 2.0, np.float64)
        conds = np.stack([self.condition(diameter_mm, boundary, rng) for _ in range(n)])
        regions = None if region is None else np.broadcast_to(np.asarray(region, bool), (n, *roi.size_zyx))
        soft = self.sample_soft(np.repeat(center[None], n, 0), diameter_mm, conds, regions, generator)
        target = sphere_volume_mm3(diameter_mm) / float(np.prod(roi.spacing_zyx))
        out = []
        for i in range(n):
            fr = conds[i].reshape(self.num_classes, MASK_FEATURES)[1:, 3]
            cum = postprocess_masks(soft[i], roi.spacing_zyx, target, boundary, center, diameter_mm / 2, rng,
                                    None if region is None else regions[i], fr)
            out.append(decode_cumulative(cum))
        return np.stack(out)

    def generate_in_case(self, allowed_zyx: np.ndarray, spacing_zyx: Sequence[float], diameter_mm: float,
                         boundary: float, rng: np.random.Generator, generator=None,
                         center_zyx: Sequence[float] | None = None, max_centers: int = 4) -> GeneratedMask | None:
        """A lesion mask for one case on its native grid, every voxel inside ``allowed_zyx``.

        The centre is ``center_zyx`` (native voxels; the nearest allowed voxel is used) or a random allowed
        place (:func:`lefusion_nnunet.data.masks.choose_center`, up to ``max_centers`` tries when the region
        around a centre is too small). The mask is sampled on the model grid around the centre with the allowed
        region as hint, post-processed to the requested volume, resampled to the native grid, intersected with
        ``allowed`` and its threshold corrected until the native volume is within 5 % (up to 4 rounds).

        Returns:
            :class:`GeneratedMask` (disjoint class masks ``(C, Z, Y, X)`` and a record: centre, requested and
            obtained diameter, volume, boundary), or None when no centre gives the requested size.
        """

        _check_diameter(diameter_mm)
        b = check_boundary(boundary)
        allowed = np.asarray(allowed_zyx, bool)
        sp = np.asarray(spacing_zyx, np.float64)
        roi = self.data.roi
        scale = np.asarray(roi.spacing_zyx) / sp
        want_mm3 = sphere_volume_mm3(diameter_mm)
        best: GeneratedMask | None = None
        tries = 1 if center_zyx is not None else max_centers
        for attempt in range(tries):
            center = (nearest_allowed_voxel(allowed, center_zyx, sp) if center_zyx is not None
                      else choose_center(allowed, sp, diameter_mm / 2, rng))
            if center is None:
                return None
            origin = roi_origin_for_center(center, sp, roi)
            region = extract_roi_mask(allowed, sp, origin, roi)
            center_model = (center - origin) / scale
            cond = self.condition(diameter_mm, b, rng)[None]
            soft = self.sample_soft(center_model[None], diameter_mm, cond, region[None], generator)[0]
            fractions = cond[0].reshape(self.num_classes, MASK_FEATURES)[1:, 3]
            target = want_mm3 / float(np.prod(roi.spacing_zyx))
            post_seed = int(rng.integers(1 << 62))
            for _ in range(4):
                cum = postprocess_masks(soft, roi.spacing_zyx, target, b, center_model, diameter_mm / 2,
                                        np.random.default_rng(post_seed), region, fractions)
                native = roi_mask_to_native(cum, origin, sp, roi, allowed.shape)
                native[0] = keep_largest_component(native[0] & allowed)
                for c in range(1, len(native)):
                    native[c] &= native[c - 1]
                got = mask_volume_mm3(native[0], sp)
                if got > 0 and abs(got / want_mm3 - 1.0) <= VOLUME_TOLERANCE:
                    break
                target *= want_mm3 / max(got, float(np.prod(sp)))
            classes = decode_cumulative(native)
            got = mask_volume_mm3(native[0], sp)
            info = {"center_voxel_zyx": [int(v) for v in center], "requested_diameter_mm": round(float(diameter_mm), 4),
                    "diameter_mm": round(equivalent_diameter_mm(got), 4), "volume_mm3": round(got, 4),
                    "boundary": b, "attempt": attempt}
            candidate = GeneratedMask(classes, info)
            if best is None or abs(got - want_mm3) < abs(mask_volume_mm3(best.masks, sp) - want_mm3):
                best = candidate
            if got > 0 and abs(got / want_mm3 - 1.0) <= 2 * VOLUME_TOLERANCE:
                break
        if best is None or not best.masks.any():
            return None
        return best


def _check_diameter(diameter_mm: float) -> None:
    if not (math.isfinite(float(diameter_mm)) and float(diameter_mm) > 0):
        raise LeFusionInputError(f"lesion diameter {diameter_mm} mm must be a positive number.")


def generate_case_mask(generator: MaskGenerator, image_zyx: np.ndarray, spacing_zyx: Sequence[float],
                       properties: dict, label_zyx: np.ndarray | None, diameter_mm: float, boundary: float,
                       seed: int = 0, center_mm: Sequence[float] | None = None, region_label: int | None = None,
                       region_mask: np.ndarray | None = None) -> GeneratedMask:
    """A diffusion lesion mask for one image (what `lefusion sample-mask` and `synthesize --mask-source diffusion`
    do): the allowed region is ``region_mask`` > ``region_label`` (default: the mask model's) > the body, minus
    existing lesions; the centre is ``center_mm`` (world x, y, z mm) or random. Raises
    :class:`LeFusionInputError` when no mask of that size fits."""

    region_label = region_label if region_label is not None else generator.data.region_label
    lesions = list(generator.data.lesion_labels)
    if region_mask is not None:
        allowed = allowed_region(label_zyx, region_mask=region_mask, lesion_labels=lesions)
    elif region_label is not None and label_zyx is not None:
        allowed = allowed_region(label_zyx, region_label=int(region_label), lesion_labels=lesions)
    else:
        allowed = allowed_region(label_zyx, image=image_zyx, lesion_labels=lesions)
    center = None if center_mm is None else world_to_voxel(center_mm, properties)
    if center is not None and ((center < -0.5).any() or (center > np.asarray(allowed.shape) - 0.5).any()):
        raise LeFusionInputError(f"--center {list(center_mm)} mm lies outside the image (voxel "
                                 f"{np.round(center, 1).tolist()} of {list(allowed.shape)}, z, y, x); pick a point "
                                 f"inside.")
    made = generator.generate_in_case(allowed, spacing_zyx, diameter_mm, boundary, seeded_rng(seed, "mask"),
                                      seeded_generator(seed, "mask"), center_zyx=center)
    if made is None:
        raise LeFusionInputError(f"no {diameter_mm:.1f} mm lesion fits the allowed region of this image; use a "
                                 f"smaller --size-mm, another --center or another --region-label.")
    return made
