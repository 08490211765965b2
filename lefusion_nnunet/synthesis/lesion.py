"""The one synthesis path: native lesion mask -> model ROI -> inpainting sampler -> pasted back.

Used by ``lefusion synthesize``, the offline enlarger and the nnU-Net trainer alike:

1. the ROI (model grid) is centred on the lesion mask and resampled from the native image;
2. it is mapped to model space [-1, 1] by the checkpoint's intensity space;
3. the sampler inpaints the generation region (background merged with the real ROI at every step): the lesion
   mask plus, for models trained with one, a border ring of ``DataConfig.border_ring_voxels`` model voxels (grown as
   ``DataConfig.border_ring_shape`` says) where real lesions end in partial-volume blur outside their labels (model
   inputs: :mod:`lefusion_nnunet.diffusion.inputs`, the same function training uses);
4. the generated ROI is mapped back to native units and pasted into the native image *only inside the native
   generation region* (:func:`generation_region`): every other voxel is bit-identical to the input. The label
   written is the lesion mask itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lefusion_nnunet.checkpoints.loaders import LoadedCheckpoint, load_lesion_checkpoint
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.histogram import TextureSpec, class_histograms, resolve_texture
from lefusion_nnunet.data.masks import roi_mask_to_native
from lefusion_nnunet.data.roi import (LesionEdit, NativeWindow, extract_roi, extract_roi_mask, mask_block_offset,
                                      mask_fits_roi, paste_roi, plan_roi_origin)
from lefusion_nnunet.diffusion import SamplerConfig, make_sampler
from lefusion_nnunet.diffusion.inputs import lesion_model_inputs
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.seeding import seeded_generator, seeded_rng
from lefusion_nnunet.utils import resolve_device


@dataclass
class LesionRequest:
    """One lesion to synthesise.

    Attributes:
        image: native ``(Z, Y, X)`` image (the channel the model was trained on); never written.
        spacing: ``(z, y, x)`` mm.
        class_masks: bool ``(C, Z, Y, X)``: where to generate each lesion class (native grid); with
            ``mask_offset_zyx`` a ``(C, z, y, x)`` block of the image instead.
        texture: ``(C * 16,)`` histogram condition, or None for a random training-lesion texture.
        value_range: native range mapped to [-1, 1]; None -> from the intensity space (MR: this case's percentiles).
        roi_origin_zyx: native voxel index (z, y, x) of the model ROI's first voxel, as planned by the caller
            (:func:`~lefusion_nnunet.data.roi.plan_roi_origin`); None -> planned here, centred on the mask.
        mask_offset_zyx: image voxel index (z, y, x) of ``class_masks[:, 0, 0, 0]`` when the masks are a block;
            None -> they cover the whole image.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    class_masks: np.ndarray
    texture: np.ndarray | None = None
    value_range: tuple[float, float] | None = None
    roi_origin_zyx: np.ndarray | None = None
    mask_offset_zyx: tuple[int, int, int] | None = None


def generation_region(union_zyx: np.ndarray, generate_roi: np.ndarray, origin_zyx, spacing_zyx,
                      data: DataConfig) -> np.ndarray:
    """The native voxels a synthesised lesion may change, bool ``(Z, Y, X)``: its mask, plus (for models trained
    with a border ring) the native voxels the model-grid ring covers. Every other voxel stays bit-identical."""
    if not data.border_ring_voxels:
        return union_zyx
    ring = roi_mask_to_native(generate_roi, origin_zyx, spacing_zyx, data.roi, union_zyx.shape)[0]
    return union_zyx | ring


def _request_generators(generator, n: int) -> list[torch.Generator] | torch.Generator:
    """The generator(s) for ``n`` requests: one shared, one per request, or (None) seed 0 per request."""
    if generator is None:  # seeded, never the global RNG
        return [seeded_generator(0, "synthesize", i) for i in range(n)]
    if isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for {n} requests")
    return gens


class LesionSynthesizer:
    """Inpaints lesions with a trained LeFusion checkpoint.

    Args:
        checkpoint: a :class:`LoadedCheckpoint` or a checkpoint path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        sampler: sampler settings; default: the fast DDIM inpainting sampler.
        guidance_scale: classifier-free guidance weight w (1 = plain conditional model).
        batch_size: ROIs per network call.
    """

    #: How lesions are made (recorded in provenance; the copy-paste baseline says ``"copy-paste"``).
    method = "lefusion"

    def __init__(self, checkpoint: LoadedCheckpoint | str | Path, device: str = "auto",
                 sampler: SamplerConfig | None = None, guidance_scale: float = 1.0, batch_size: int = 4):
        self.device = resolve_device(device)
        self.checkpoint = (checkpoint if isinstance(checkpoint, LoadedCheckpoint)
                           else load_lesion_checkpoint(checkpoint, self.device))
        self.checkpoint.model.to(self.device, memory_format=torch.channels_last_3d)
        self.checkpoint.schedule = self.checkpoint.schedule.to(self.device)
        self.sampler_config = sampler or SamplerConfig(**self.checkpoint.sampler_defaults)
        self.sampler = make_sampler(self.sampler_config)
        if guidance_scale < 0:
            raise LeFusionInputError(f"--guidance {guidance_scale} must be >= 0.")
        self.guidance_scale = float(guidance_scale)
        if batch_size < 1:
            raise LeFusionInputError(f"--batch-size {batch_size} must be at least 1.")
        self.batch_size = int(batch_size)

    @classmethod
    def from_checkpoint(cls, path: Path | str, device: str = "auto", sampler_overrides: dict | None = None,
                        guidance_scale: float = 1.0, batch_size: int = 4) -> "LesionSynthesizer":
        """Load ``path`` and build a synthesizer whose sampler is the checkpoint's default sampler with
        ``sampler_overrides`` (SamplerConfig fields, e.g. ``{"num_steps": 10}``) applied on top."""
        device = resolve_device(device)
        loaded = load_lesion_checkpoint(path, device)
        sampler = SamplerConfig(**{**loaded.sampler_defaults, **(sampler_overrides or {})})
        return cls(loaded, device=device, sampler=sampler, guidance_scale=guidance_scale, batch_size=batch_size)

    @property
    def data(self) -> DataConfig:
        return self.checkpoint.data

    def texture_condition(self, specs: TextureSpec | Sequence[TextureSpec], rng: np.random.Generator) -> np.ndarray:
        """The ``(C * 16,)`` condition for one spec (all classes) or one spec per class."""
        if isinstance(specs, TextureSpec):
            specs = [specs] * self.data.num_classes
        if len(specs) != self.data.num_classes:
            raise LeFusionInputError(f"{len(specs)} texture choices given for {self.data.num_classes} lesion classes.")
        hists = self.checkpoint.training_histograms
        return np.concatenate([
            resolve_texture(s, self.checkpoint.prototypes[c], class_histograms(hists, c), rng)
            for c, s in enumerate(specs)]).astype(np.float32)

    # -- the data path -------------------------------------------------------------------------------------
    def _prepare(self, req: LesionRequest, rng: np.random.Generator) -> dict:
        """The model inputs of one request, read from the native window of its ROI only (never the whole image,
        except for an MR case's percentiles when ``value_range`` is not given)."""
        data = self.data
        masks = np.asarray(req.class_masks, bool)
        shape = tuple(int(v) for v in np.shape(req.image))
        offset = mask_block_offset(masks, req.mask_offset_zyx, shape, data.num_classes)
        block_union = masks.any(0)
        origin = (np.asarray(req.roi_origin_zyx, np.float64) if req.roi_origin_zyx is not None
                  else plan_roi_origin(block_union, req.spacing, data.roi, offset))
        if not mask_fits_roi(block_union, req.spacing, origin - offset, data.roi, margin=0.0):
            raise LeFusionInputError(f"the lesion mask does not fit the model ROI ({data.roi.extent_mm.round(1).tolist()} "
                                     f"mm, z, y, x); use a smaller lesion or a model trained with a larger --roi-size.")
        window = NativeWindow.around_roi(origin, req.spacing, data.roi, shape)
        local = window.local(origin)
        window_masks = np.zeros((masks.shape[0], *window.shape), bool)
        lo = np.maximum(offset, window.start)
        hi = np.minimum(offset + masks.shape[1:], window.stop)
        if (hi > lo).all():  # (the mask fits the ROI, so nothing of it lies outside the window)
            window_masks[(slice(None), *(slice(a - w, b - w) for a, b, w in zip(lo, hi, window.start)))] = \
                masks[(slice(None), *(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset)))]
        image = np.asarray(req.image)[window.slices]
        value_range = req.value_range or data.intensity.value_range_for(req.image)
        roi_model = data.intensity.to_model(extract_roi(image, req.spacing, local, data.roi), value_range)
        roi_masks = np.stack([extract_roi_mask(m, req.spacing, local, data.roi, window=window) for m in window_masks])
        texture = req.texture if req.texture is not None else self.texture_condition(TextureSpec("random"), rng)
        return dict(origin=origin, value_range=value_range, roi=roi_model, masks=roi_masks,
                    texture=np.asarray(texture, np.float32), window=window, local_origin=local, image=image,
                    window_masks=window_masks)

    def _eps_fn(self, context: torch.Tensor, class_masks: torch.Tensor, cond: torch.Tensor):
        model, w = self.checkpoint.model, self.guidance_scale
        use_amp = self.device.startswith("cuda")

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_t = x_t.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                if w == 1.0:
                    out = model(x_t, t, context, class_masks, cond)
                else:
                    b = x_t.shape[0]
                    drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=x_t.device),
                                      torch.ones(b, dtype=torch.bool, device=x_t.device)])
                    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, context]),
                                 torch.cat([class_masks, class_masks]), torch.cat([cond, cond]), drop_cond=drop)
                    eps_c, eps_u = both.float().chunk(2)
                    out = eps_u + w * (eps_c - eps_u)
            return out.float()
        return eps_fn

    def _sample_batch(self, prepared: list[dict], generators) -> list[tuple[np.ndarray, np.ndarray]]:
        """Sample a batch of prepared ROIs: per request, the model-space ROI ``(Z, Y, X)`` and its generation region
        (bool, model grid: lesion masks + border ring)."""
        dev, c = self.device, self.data.num_classes
        inputs = lesion_model_inputs(torch.from_numpy(np.stack([p["roi"] for p in prepared])).to(dev)[:, None],
                                     torch.from_numpy(np.stack([p["masks"] for p in prepared])).to(dev),
                                     border_ring=self.data.border_ring_voxels,
                                     ring_shape=self.data.border_ring_shape, spacing_zyx=self.data.roi.spacing_zyx)
        masks = inputs.class_masks                                                              # (B, C, Z, Y, X)
        cond = torch.from_numpy(np.stack([p["texture"] for p in prepared])).to(dev)
        x0 = self.sampler.sample(self._eps_fn(inputs.context, masks, cond), self.checkpoint.schedule, inputs.known,
                                 inputs.generate, generator=generators)
        if c == 1:
            composed = x0[:, 0]
        else:  # multi-channel decomposition: output = sum_c channel_c * mask_c (background: every channel = known)
            any_class = masks.sum(1, keepdim=True).clamp(min=1.0)
            composed = torch.where(masks.any(1), (x0 * masks).sum(1) / any_class[:, 0], x0.mean(1))
        generate = inputs.generate[:, 0].bool().cpu().numpy()
        return [(composed[i].float().cpu().numpy(), generate[i]) for i in range(len(prepared))]

    def _window_region(self, p: dict, generate: np.ndarray, spacing) -> np.ndarray:
        return generation_region(p["window_masks"].any(0), generate, p["local_origin"], spacing, self.data)

    def generation_regions(self, requests: list[LesionRequest]) -> list[np.ndarray]:
        """Per request, the native voxels synthesis may change, bool ``(Z, Y, X)`` of the whole image
        (:func:`generation_region`), without sampling: outside them the output is bit-identical to the input."""
        out = []
        for req in requests:
            p = self._prepare(dataclasses.replace(req, texture=np.zeros(1, np.float32)), np.random.default_rng(0))
            inputs = lesion_model_inputs(torch.from_numpy(p["roi"][None, None]), torch.from_numpy(p["masks"][None]),
                                         border_ring=self.data.border_ring_voxels,
                                         ring_shape=self.data.border_ring_shape,
                                         spacing_zyx=self.data.roi.spacing_zyx)
            region = np.zeros(np.shape(req.image), bool)
            region[p["window"].slices] = self._window_region(p, inputs.generate[0, 0].bool().numpy(), req.spacing)
            out.append(region)
        return out

    def synthesize_edits(self, requests: list[LesionRequest], generator=None, rng: np.random.Generator | None = None,
                         progress: bool = False) -> list[LesionEdit]:
        """Synthesise every request; returns, per request, its :class:`LesionEdit`: the native image inside the
        window of its ROI, changed only inside the generation region (:func:`generation_region`: the mask, plus the
        border ring of models trained with one). Touches only the windows, whatever the image size.

        Args:
            generator: one ``torch.Generator`` for all, or one per request (for results that do not depend
                on batch composition), or None.
            rng: numpy generator for random texture choices (requests without ``texture``).
        """
        rng = rng if rng is not None else seeded_rng(0, "synthesize", "textures")
        gens = _request_generators(generator, len(requests))
        prepared = [self._prepare(r, rng) for r in requests]
        edits: list[LesionEdit] = []
        starts = range(0, len(requests), self.batch_size)
        for s in tqdm(starts, desc="synthesising", disable=not progress, leave=False):
            chunk = prepared[s:s + self.batch_size]
            g = gens[s:s + self.batch_size] if isinstance(gens, list) else gens
            for p, req, (roi_out, generate) in zip(chunk, requests[s:s + self.batch_size],
                                                   self._sample_batch(chunk, g)):
                native_roi = self.data.intensity.to_native(roi_out, p["value_range"])
                region = self._window_region(p, generate, req.spacing)
                values = paste_roi(p["image"], req.spacing, p["local_origin"], self.data.roi, native_roi, region)
                edits.append(LesionEdit(p["window"], values, region, p["window_masks"]))
        return edits

    def synthesize(self, requests: list[LesionRequest], generator=None, rng: np.random.Generator | None = None,
                   progress: bool = False) -> list[np.ndarray]:
        """Like :meth:`synthesize_edits`, but returns whole native ``(Z, Y, X)`` images (copies of each request's
        image with its edit pasted: bit-identical outside the generation region)."""
        edits = self.synthesize_edits(requests, generator, rng, progress)
        return [edit.apply(req.image) for edit, req in zip(edits, requests)]
