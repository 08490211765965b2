"""Copy-paste lesion synthesis: the like-for-like baseline for LeFusion.

:class:`CopyPasteSynthesizer` has the interface of :class:`lefusion_nnunet.synthesis.LesionSynthesizer`
(``checkpoint.data``, ``checkpoint.file_sha256``, ``batch_size``, ``device``, ``texture_condition`` and
``synthesize``), so :func:`lefusion_nnunet.variants.make_variants` and :func:`lefusion_nnunet.enlargement.enlarge`
use it unchanged: the lesion *mask* is made and placed exactly as for LeFusion (``--mask-source real``:
transformed real lesion masks inside the host region), and only the way the mask is filled differs.

How a mask is filled (per request, only voxels inside the requested mask change; every other voxel is
bit-identical to the input):

1. **Which real lesion.** Every connected lesion of the labelled cases (26-connectivity, lesion classes kept
   together) is a *source lesion*: its native intensities and class masks in its bounding box. The request's
   texture condition (a ``(C * 16,)`` histogram, made by :meth:`CopyPasteSynthesizer.texture_condition` from
   ``--texture`` exactly as LeFusion resolves it: ``random`` = a training lesion's histogram jittered
   +-10 %, ``cluster:K`` = prototype K of the training histograms, ``file:PATH``) picks the source lesion whose
   own histogram is nearest (L1). So ``random`` copies a random real lesion and ``cluster:K`` the real lesion
   closest to prototype K. With several lesion classes, lesions holding every class of the target mask are
   preferred.
2. **Resampling.** The source lesion (randomly flipped per axis) is stretched so its bounding box covers the
   target mask's bounding box, and each target class voxel takes the normalised (mask-weighted, linear)
   interpolation of the source lesion's voxels of the same class; target voxels the source does not reach
   take the nearest reached value. Background voxels of the source never leak in.
3. **Intensity transfer.** CT (fixed window): values stay in HU; MR (per-case percentiles): source values are
   mapped through the model space of the source case into the target case's range. The pasted values of each
   class are then affinely matched to the mean and standard deviation of the (mapped) source lesion class,
   which undoes the smoothing of interpolation.
4. **Boundary.** Optional light blending *inside* the mask: a voxel at distance ``d`` mm from the mask
   border takes ``w = min(1, d / blend_mm)`` of the lesion value and ``1 - w`` of the original voxel.

Randomness: the flips of request ``i`` come from its own ``torch.Generator`` when ``synthesize`` gets one per
request (as ``make_variants`` passes them), so results do not depend on batching; the source lesion is a
deterministic function of the texture condition.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from lefusion_nnunet.checkpoints.loaders import checkpoint_data_config
from lefusion_nnunet.data.config import DataConfig, build_data_config
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.histogram import (HIST_BINS, TextureSpec, class_histograms, cluster_prototypes,
                                            lesion_histogram, resolve_texture)
from lefusion_nnunet.data.intensity import IntensitySpace, derive_ct_window
from lefusion_nnunet.data.roi import LesionEdit, NativeWindow, RoiGeometry, mask_block_offset
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.paths import find_default_checkpoint
from lefusion_nnunet.synthesis.copy_paste_sources import CopyPasteSource, SourceLesion, collect_source_lesions

METHOD = "copy-paste"
FORMAT_VERSION = 1
#: Default width (mm) of the blending ramp inside the mask border; 0 = hard paste.
DEFAULT_BLEND_MM = 1.0
# Interpolated source-mask weight below which a target voxel counts as "not reached".
_MIN_WEIGHT = 0.05


class CopyPasteSynthesizer:
    """Fills lesion masks with the voxels of real lesions (see the module docstring).

    Args:
        lesions: the source lesions (:func:`collect_source_lesions`; value ranges and histograms set).
        data: the :class:`DataConfig` ``make_variants`` reads (lesion labels, region label, channel, ROI for
            the size cap, intensity space, file ending).
        blend_mm: blending ramp inside the mask border (mm); 0 = hard paste.
        batch_size: requests per chunk (only sets how ``make_variants`` groups cases).
        texture_clusters: number of histogram prototypes for ``cluster:K``.
    """

    method = METHOD

    def __init__(self, lesions: list[SourceLesion], data: DataConfig, blend_mm: float = DEFAULT_BLEND_MM,
                 batch_size: int = 8, texture_clusters: int = 3, seed: int = 0):
        if not lesions:
            raise LeFusionInputError("copy-paste needs at least one labelled lesion to copy; the training cases "
                                     "hold none of the lesion label(s).")
        c = len(data.lesion_labels)
        for les in lesions:
            if les.masks.shape[0] != c:
                raise LeFusionInputError(f"source lesion of {les.case_id} has {les.masks.shape[0]} class mask(s) "
                                         f"but the configuration has {c} lesion label(s).")
        if not (math.isfinite(blend_mm) and blend_mm >= 0):
            raise LeFusionInputError(f"blend width {blend_mm} mm must be a number >= 0.")
        if batch_size < 1:
            raise LeFusionInputError(f"--batch-size {batch_size} must be at least 1.")
        self.lesions = lesions
        self.blend_mm = float(blend_mm)
        self.batch_size = int(batch_size)
        self.device = "cpu"
        self.last_choices: list[dict] = []
        hists = np.stack([np.asarray(les.histogram, np.float32) for les in lesions])
        if hists.shape[1] != c * HIST_BINS:
            raise LeFusionInputError("source lesion histograms are missing; build the synthesizer with "
                                     "CopyPasteSynthesizer.from_dataset.")
        self._hists = hists
        prototypes = [cluster_prototypes(class_histograms(hists, i), texture_clusters, seed)
                      for i in range(c)]
        self.checkpoint = CopyPasteSource(
            data=data, file_sha256=self._fingerprint(data), prototypes=prototypes, training_histograms=hists,
            training_summary={"method": METHOD, "num_lesions": len(lesions),
                              "case_ids": sorted({les.case_id for les in lesions}), "blend_mm": self.blend_mm})

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset, lesion_labels: Sequence[int] | None = None, region_label: int | None = None,
                     channel: int = 0, roi: RoiGeometry | None = None, intensity: IntensitySpace | None = None,
                     data: DataConfig | None = None, case_ids: Sequence[str] | None = None,
                     blend_mm: float = DEFAULT_BLEND_MM, batch_size: int = 8,
                     texture_clusters: int = 3) -> "CopyPasteSynthesizer":
        """Build from a raw dataset's labelled lesions.

        Either pass ``data`` (e.g. a LeFusion checkpoint's ``DataConfig``, so lesion labels, region label,
        channel, ROI size cap and intensity space are those of the model it is compared with), or
        ``lesion_labels`` (+ ``region_label``, ``channel``, ``roi``, ``intensity``): ``roi`` defaults to a grid
        at the dataset's median spacing large enough for every source lesion at 1.4x scale; ``intensity`` to a
        CT window derived from the lesions and their surroundings (as ``lefusion train`` derives it) or
        per-case percentiles for MR. ``case_ids`` limits which cases lesions are copied from.
        """

        if data is not None:
            lesion_labels, region_label, channel = list(data.lesion_labels), data.region_label, int(data.channel)
            roi, intensity = data.roi, data.intensity
        if not lesion_labels:
            raise LeFusionInputError("copy-paste needs the lesion label(s) (--lesion-label) or a checkpoint's data "
                                     "configuration.")
        lesion_labels = [int(v) for v in lesion_labels]
        lesions = collect_source_lesions(dataset, lesion_labels, channel, case_ids, intensity)
        if not lesions:
            raise LeFusionInputError(f"{dataset.folder} has no lesion with label(s) {lesion_labels} to copy; "
                                     f"copy-paste needs labelled lesion cases.")
        if intensity is None:
            if dataset.modality(channel) == "CT":
                inside = np.concatenate([les.values[les.union] for les in lesions])
                context = np.concatenate([les.values[~les.union] for les in lesions] + [np.zeros(0, np.float32)])
                intensity = IntensitySpace("window", window=derive_ct_window(inside, context))
            else:
                intensity = IntensitySpace("percentile")
        for les in lesions:
            if intensity.kind == "window":
                les.value_range = intensity.case_range(les.values)
            model = intensity.to_model(les.values, les.value_range)
            les.histogram = np.concatenate([lesion_histogram(model[m], HIST_BINS) for m in les.masks])
        if roi is None:
            spacings = np.array([les.spacing for les in lesions])
            sp = np.median(spacings, 0)
            extent = max(float(np.max(np.asarray(les.masks.shape[1:]) * np.asarray(les.spacing))) for les in lesions)
            size = tuple(int(max(8, 2 * math.ceil(extent * 1.4 * 1.5 / s / 2) + 4)) for s in sp)
            roi = RoiGeometry(size, tuple(float(s) for s in sp))
        if data is None:
            data = build_data_config(dataset, lesion_labels, region_label, channel, roi, intensity)
        return cls(lesions, data, blend_mm=blend_mm, batch_size=batch_size, texture_clusters=texture_clusters)

    def _fingerprint(self, data: DataConfig) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"method": METHOD, "version": FORMAT_VERSION, "blend_mm": self.blend_mm,
                             "data": data.to_dict()}, sort_keys=True).encode())
        for les in self.lesions:
            h.update(f"{les.case_id}/{les.component}/{les.spacing}/{les.masks.shape}".encode())
            h.update(np.ascontiguousarray(les.values).tobytes())
            h.update(np.packbits(les.masks).tobytes())
        return h.hexdigest()

    @property
    def data(self) -> DataConfig:
        return self.checkpoint.data

    # -- the synthesizer interface -----------------------------------------------------------------------------
    def texture_condition(self, specs: TextureSpec | Sequence[TextureSpec], rng: np.random.Generator) -> np.ndarray:
        """The ``(C * 16,)`` histogram that picks the source lesion (same rules as LeFusion's condition)."""
        c = self.data.num_classes
        if isinstance(specs, TextureSpec):
            specs = [specs] * c
        if len(specs) != c:
            raise LeFusionInputError(f"{len(specs)} texture choices given for {c} lesion classes.")
        return np.concatenate([
            resolve_texture(s, self.checkpoint.prototypes[i], class_histograms(self._hists, i), rng)
            for i, s in enumerate(specs)]).astype(np.float32)

    def choose_lesion(self, texture: np.ndarray, classes: Sequence[bool] | None = None) -> int:
        """Index of the source lesion whose histogram is nearest (L1) to ``texture`` (first on ties).

        ``classes`` (one bool per lesion class): the classes the target mask holds; lesions that hold all of them
        are preferred, so a multi-class mask is filled class by class from a lesion that has each class.
        """
        t = np.asarray(texture, np.float64).ravel()
        if t.shape[0] != self._hists.shape[1]:
            raise LeFusionInputError(f"texture condition has {t.shape[0]} values, expected {self._hists.shape[1]}.")
        dist = np.abs(self._hists.astype(np.float64) - t).sum(1)
        if classes is not None and len(classes) > 1:
            need = np.asarray(classes, bool)
            has = np.stack([les.masks.reshape(len(need), -1).any(1) for les in self.lesions])
            ok = (has | ~need).all(1)
            if ok.any():
                dist = np.where(ok, dist, np.inf)
        return int(np.argmin(dist))

    def synthesize_edits(self, requests: list, generator=None, rng: np.random.Generator | None = None,
                         progress: bool = False) -> list[LesionEdit]:
        """Fill each request's mask with a real lesion; returns per request a :class:`LesionEdit` on the box of
        its mask, changed only inside the union of the request's class masks (the interface of
        :meth:`LesionSynthesizer.synthesize_edits`)."""
        rng = rng if rng is not None else np.random.default_rng()
        gens = None
        if generator is not None and not hasattr(generator, "manual_seed"):
            gens = list(generator)
            if len(gens) != len(requests):
                raise ValueError(f"{len(gens)} generators for {len(requests)} requests")
        self.last_choices = []
        edits = []
        for i, req in enumerate(tqdm(requests, desc="copy-paste", disable=not progress, leave=False)):
            g = gens[i] if gens is not None else generator
            texture = req.texture if req.texture is not None else self.texture_condition(TextureSpec("random"), rng)
            masks = np.asarray(req.class_masks, bool)
            idx = self.choose_lesion(texture, masks.reshape(masks.shape[0], -1).any(1) if masks.ndim == 4 else None)
            flips = self._flips(g, rng)
            edits.append(self.fill(req, idx, flips))
            les = self.lesions[idx]
            self.last_choices.append({"source_case": les.case_id, "component": les.component, "flips_zyx": flips})
        return edits

    def synthesize(self, requests: list, generator=None, rng: np.random.Generator | None = None,
                   progress: bool = False) -> list[np.ndarray]:
        """Like :meth:`synthesize_edits`, but returns whole native float32 ``(Z, Y, X)`` images."""
        edits = self.synthesize_edits(requests, generator, rng, progress)
        return [edit.apply(np.asarray(req.image, np.float32)) for edit, req in zip(edits, requests)]

    @staticmethod
    def _flips(generator, rng: np.random.Generator) -> list[bool]:
        if generator is not None and hasattr(generator, "manual_seed"):
            import torch

            return [bool(v) for v in torch.randint(0, 2, (3,), generator=generator).tolist()]
        return [bool(v) for v in rng.integers(0, 2, size=3)]

    # -- the fill --------------------------------------------------------------------------------------------------
    def fill(self, req, lesion_index: int, flips: Sequence[bool] = (False, False, False)) -> LesionEdit:
        """Fill ``req.class_masks`` of ``req.image`` with source lesion ``lesion_index`` (flipped per axis): the
        edit on the box of the mask (float32)."""
        data = self.data
        image = np.asarray(req.image)
        masks = np.asarray(req.class_masks, bool)
        offset = mask_block_offset(masks, req.mask_offset_zyx, image.shape, data.num_classes)
        union = masks.any(0)
        if not union.any():
            window = NativeWindow((0, 0, 0), (1, 1, 1), tuple(int(v) for v in image.shape))
            return LesionEdit(window, image[window.slices].astype(np.float32), np.zeros((1, 1, 1), bool),
                              np.zeros((masks.shape[0], 1, 1, 1), bool))
        idx = np.argwhere(union)
        lo, hi = idx.min(0), idx.max(0) + 1
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        window = NativeWindow(tuple(int(v) for v in lo + offset), tuple(int(v) for v in hi + offset),
                              tuple(int(v) for v in image.shape))
        out = np.array(image[window.slices], dtype=np.float32, copy=True)
        t_masks = masks[(slice(None),) + sl]
        t_union = t_masks.any(0)
        les = self.lesions[lesion_index]
        s_vals, s_masks = les.values, les.masks
        for axis, flip in enumerate(flips):
            if flip:
                s_vals = np.flip(s_vals, axis=axis)
                s_masks = np.flip(s_masks, axis=axis + 1)
        s_vals = self._transfer_values(np.ascontiguousarray(s_vals), les, req, image)
        s_masks = np.ascontiguousarray(s_masks)
        t_shape = np.asarray(t_union.shape, np.float64)
        s_shape = np.asarray(s_vals.shape, np.float64)
        axes = [(np.arange(int(t_shape[a])) + 0.5) / t_shape[a] * s_shape[a] - 0.5 for a in range(3)]
        coords = np.stack(np.meshgrid(*axes, indexing="ij"))
        s_union = s_masks.any(0)
        filled = np.zeros(t_union.shape, np.float32)
        for c in range(data.num_classes):
            target = t_masks[c]
            if not target.any():
                continue
            src = s_masks[c] if s_masks[c].any() else s_union
            values = self._resample_class(s_vals, src, coords, target)
            mean, std = float(s_vals[src].mean()), float(s_vals[src].std())
            cur_mean, cur_std = float(values[target].mean()), float(values[target].std())
            scaled = (values - cur_mean) * (std / cur_std if cur_std > 1e-6 else 0.0) + mean
            filled[target] = scaled[target]
        if self.blend_mm > 0:
            dist = ndimage.distance_transform_edt(np.pad(t_union, 1), sampling=np.asarray(req.spacing, np.float64))
            w = np.clip(dist[1:-1, 1:-1, 1:-1] / self.blend_mm, 0.0, 1.0).astype(np.float32)
            filled = w * filled + (1.0 - w) * out
        out[t_union] = filled[t_union]
        return LesionEdit(window, out, t_union, t_masks)

    def _transfer_values(self, values: np.ndarray, les: SourceLesion, req, image: np.ndarray) -> np.ndarray:
        """Source native values in the target case's units (CT: unchanged; MR: through model space)."""
        space = self.data.intensity
        if space.kind != "percentile":
            return values.astype(np.float32)
        target_range = req.value_range or space.value_range_for(image)
        lo_s, hi_s = les.value_range
        lo_t, hi_t = target_range
        # affine, unclipped version of to_model / to_native (keeps the lesion's full range)
        return ((values - lo_s) / (hi_s - lo_s) * (hi_t - lo_t) + lo_t).astype(np.float32)

    @staticmethod
    def _resample_class(values: np.ndarray, src_mask: np.ndarray, coords: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Mask-weighted linear interpolation of the source lesion voxels at ``coords``; unreached target voxels
        take the nearest reached value (so source background never enters)."""
        m = src_mask.astype(np.float32)
        num = ndimage.map_coordinates(values * m, coords, order=1, mode="constant", cval=0.0)
        den = ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0)
        reached = den >= _MIN_WEIGHT
        out = np.where(reached, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)
        if not reached.any():
            return np.full(target.shape, float(values[src_mask].mean()), np.float32)
        if (target & ~reached).any():
            _, inds = ndimage.distance_transform_edt(~reached, return_indices=True)
            out = out[tuple(inds)]
        return out


__all__ = ["CopyPasteSynthesizer", "CopyPasteSource", "SourceLesion", "collect_source_lesions", "METHOD",
           "DEFAULT_BLEND_MM"]


def copy_paste_synthesizer(dataset: str | int, lesion_labels: Sequence[int] | None = None,
                           checkpoint: Path | str | None = None, region_label: int | None = None,
                           blend_mm: float | None = None, batch_size: int = 4) -> CopyPasteSynthesizer:
    """The copy-paste baseline for ``enlarge --method copy-paste``: real lesions of ``dataset``.

    Lesion labels, ROI size cap and intensity space come from the lesion checkpoint when ``lesion_labels`` is not
    given (``checkpoint``, else the dataset's newest ``lefusion train`` run), so a comparison with LeFusion uses
    the same size cap; with ``lesion_labels`` no checkpoint is needed.
    """
    src = load_raw_dataset(dataset)
    data = None
    if lesion_labels is None:
        if checkpoint is None:
            try:
                checkpoint = find_default_checkpoint(src.name)
            except LeFusionInputError as exc:
                raise LeFusionInputError("--method copy-paste needs --lesion-label (or a lesion checkpoint of the "
                                         "dataset to take the labels from).") from exc
        data = checkpoint_data_config(checkpoint, expected_kind="lesion")
    return CopyPasteSynthesizer.from_dataset(src, lesion_labels, region_label=region_label, data=data,
                                             blend_mm=DEFAULT_BLEND_MM if blend_mm is None else blend_mm,
                                             batch_size=batch_size)
