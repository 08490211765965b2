"""nnU-Net's preprocessing of a small native window: the crop route of the patch bank.

nnU-Net's ``DefaultPreprocessor.run_case_npy`` transposes a case (``transpose_forward``), crops it to the
bounding box of its nonzero mask, normalises it per channel and resamples it to the configuration's spacing.
A synthetic variant differs from its source case only in a small native region D, so only the preprocessed
voxels near D can differ. This module computes those voxels from a native window W around D alone:

* **Geometry.** All arrays here are in the transposed, cropped native grid ("input grid", ``(Z, Y, X)`` after
  ``transpose_forward``) or in nnU-Net's preprocessed grid ("output grid"). :func:`resampling_plan` decides,
  with nnU-Net's own ``determine_do_sep_z_and_axis``, how each axis is resampled: ``"spline"`` (skimage
  ``resize`` = ``scipy.ndimage.zoom`` with ``grid_mode``: output ``i`` samples input ``(i + 0.5) * n_in / n_out -
  0.5``), ``"nearest"`` (the order-0 ``map_coordinates`` along the anisotropic axis of separate-z resampling) or
  ``"identity"``. :func:`axis_windows` maps D to the outputs it can influence (O) and the inputs these need (W).
* **Exactness.** ``map_coordinates`` on W at the outputs' input coordinates (shifted by W's start, an exact
  operation) gives bit for bit what ``zoom`` gives on the whole case for orders 0 and 1 (no prefilter, local
  support): the segmentation, resampled per label with nnU-Net's argmax rule (:func:`resample_seg_window`), is
  exact. Order 3 has a global (IIR, pole 0.268) prefilter: evaluated on W it is exact only up to about
  ``0.268 ** margin`` times the amplitude of what is resampled. The image is therefore resampled as the
  source's stored value plus the resampled *change* (:func:`resample_window` on normalised variant minus source,
  a linear map), so crop-edge errors scale with the change and voxels the change does not reach keep the stored
  value bit for bit. skimage clips each ``resize`` to its input's range; the caller checks the variant keeps
  that range and re-applies the clip.
* **Normalisation** of W is nnU-Net's normaliser for per-voxel schemes (CT, no normalisation, RGB). Per-case
  schemes (z-score, rescale to [0, 1]) use the SOURCE case's statistics (:func:`case_statistics`, computed
  exactly as nnU-Net computes them), so a lesion does not shift every voxel of the case; the deviation from a
  full re-run is the lesion's effect on the case's mean/std (or min/max), measured in tests/test_local_preprocessing.py.

:func:`crop_route_problem` says when a configuration is not one this module reproduces (the bank then runs
nnU-Net's full preprocessing instead).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["INFLUENCE_MARGIN", "PREFILTER_MARGIN", "ResamplingPlan", "AxisWindow", "crop_route_problem",
           "resampling_plan", "axis_windows", "resample_window", "resample_seg_window", "case_statistics",
           "normalise_window", "min_max_outside", "local_nonzero_mask", "bounding_box", "normalizer_class",
           "PER_VOXEL_SCHEMES", "PER_CASE_SCHEMES"]

#: Input voxels around D whose outputs are recomputed: beyond them a change decays below 0.268 ** 14 ~ 1e-8.
INFLUENCE_MARGIN = 16
#: Extra input voxels around those outputs, for the order-3 prefilter (crop error ~ 0.268 ** 16 ~ 7e-10).
PREFILTER_MARGIN = 16

PER_VOXEL_SCHEMES = ("CTNormalization", "NoNormalization", "RGBTo01Normalization")
PER_CASE_SCHEMES = ("ZScoreNormalization", "RescaleTo01Normalization")
_KNOWN_KWARGS = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}


def normalizer_class(scheme: str):
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    return recursive_find_python_class(join(nnunetv2.__path__[0], "preprocessing", "normalization"), scheme,
                                       "nnunetv2.preprocessing.normalization")


def crop_route_problem(plans_manager, configuration_manager) -> str | None:
    """Why the crop route cannot reproduce ``configuration_manager``'s preprocessing (None when it can).

    It reproduces nnU-Net's ``DefaultPreprocessor`` with the default resampling function
    (``resample_data_or_seg_to_shape``: image order 1 or 3, segmentation order 1, order 0 along z) and
    nnU-Net's five built-in normalisation schemes; anything else (custom classes, other kwargs) is refused.
    """
    from batchgenerators.augmentations.utils import resize_segmentation
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    if configuration_manager.preprocessor_class is not DefaultPreprocessor:
        return f"custom preprocessor {configuration_manager.preprocessor_name}"
    cfg = configuration_manager.configuration
    for kind, fn, expected in (("data", configuration_manager.resampling_fn_data, dict(is_seg=False, order_z=0)),
                               ("seg", configuration_manager.resampling_fn_seg, dict(is_seg=True, order=1, order_z=0))):
        kwargs = dict(cfg.get(f"resampling_fn_{kind}_kwargs") or {})
        if getattr(fn, "func", None) is not resample_data_or_seg_to_shape:
            return f"custom {kind} resampling function {cfg.get(f'resampling_fn_{kind}')}"
        if set(kwargs) - _KNOWN_KWARGS:
            return f"unknown {kind} resampling kwargs {sorted(set(kwargs) - _KNOWN_KWARGS)}"
        full = {"is_seg": False, "order": 3, "order_z": 0, **kwargs}
        if any(full[k] != v for k, v in expected.items()) or (kind == "data" and full["order"] not in (1, 3)):
            return f"non-default {kind} resampling kwargs {kwargs}"
    if inspect.signature(resize_segmentation).parameters.get("seg_tiebreak", None) is None or \
            inspect.signature(resize_segmentation).parameters["seg_tiebreak"].default != "nearest":
        return "batchgenerators' resize_segmentation is not the argmax version with nearest tie-break"
    known = {getattr(schemes, n) for n in PER_VOXEL_SCHEMES + PER_CASE_SCHEMES}
    for scheme in configuration_manager.normalization_schemes:
        if normalizer_class(scheme) not in known:
            return f"custom normalisation scheme {scheme}"
    return None


# ----------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class ResamplingPlan:
    """How nnU-Net resamples the input grid ``shape_in`` to ``shape_out`` (both ``(Z, Y, X)`` after transpose).

    ``mode``: "none" (no resampling), "3d" (one 3D resize) or "separate" (2D resize of every slice along
    ``axis``, then order 0 along it). ``kinds``: per axis "spline" | "nearest" | "identity". ``order``: the
    image's spline order (1 or 3).
    """

    mode: str
    axis: int | None
    kinds: tuple[str, str, str]
    shape_in: tuple[int, int, int]
    shape_out: tuple[int, int, int]
    order: int


def resampling_plan(shape_in, shape_out, spacing_in, spacing_out, kwargs: dict) -> ResamplingPlan:
    """The plan of ``resample_data_or_seg_to_shape(data, shape_out, spacing_in, spacing_out, **kwargs)``
    (spacings in mm, ``(z, y, x)`` after transpose), decided with nnU-Net's own function."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    shape_in, shape_out = tuple(int(v) for v in shape_in), tuple(int(v) for v in shape_out)
    order = int(kwargs.get("order", 3))
    if shape_in == shape_out:
        return ResamplingPlan("none", None, ("identity",) * 3, shape_in, shape_out, order)
    separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z", False), spacing_in, spacing_out,
                                                 kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))
    if not separate:
        return ResamplingPlan("3d", None, ("spline",) * 3, shape_in, shape_out, order)
    axis = int(axis)
    inplane = "identity" if all(shape_in[k] == shape_out[k] for k in range(3) if k != axis) else "spline"
    kinds = tuple(("identity" if shape_in[k] == shape_out[k] else "nearest") if k == axis else inplane
                  for k in range(3))
    return ResamplingPlan("separate", axis, kinds, shape_in, shape_out, order)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AxisWindow:
    """One axis of the recomputed block: outputs ``[o0, o1)``, native window inputs ``[w0, w1)``, and per
    output its window-relative input coordinate (``coords``, spline) or input index (``index``, otherwise)."""

    o0: int
    o1: int
    w0: int
    w1: int
    coords: np.ndarray | None
    index: np.ndarray | None


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """The input slice of every output slice along the anisotropic axis: nnU-Net's own order-0
    ``map_coordinates`` call (coordinates ``scale * (i + 0.5) - 0.5``, mode 'nearest') on an index vector."""
    scale = float(n_in) / n_out
    coords = scale * (np.arange(n_out) + 0.5) - 0.5
    return np.rint(ndi.map_coordinates(np.arange(n_in, dtype=float), coords[None], order=0,
                                       mode="nearest")).astype(np.int64)


def axis_windows(plan: ResamplingPlan, d_box, influence: int = INFLUENCE_MARGIN,
                 prefilter: int = PREFILTER_MARGIN) -> list[AxisWindow] | None:
    """Per axis, the outputs that the input box ``d_box`` (``[(start, stop)] * 3``, input grid) can change and
    the inputs they need. Spline axes: outputs sampling within ``influence`` inputs of D, inputs 2 + ``prefilter``
    beyond their support (clipped to the case). None when no output samples D (slices that nnU-Net's order-0
    downsampling along z skips)."""
    out = []
    for k, (d0, d1) in enumerate(d_box):
        n_in, n_out = plan.shape_in[k], plan.shape_out[k]
        if plan.kinds[k] == "identity":
            out.append(AxisWindow(d0, d1, d0, d1, None, np.arange(d1 - d0)))
        elif plan.kinds[k] == "nearest":
            index = _nearest_index(n_in, n_out)
            sel = np.flatnonzero((index >= d0) & (index < d1))
            if not len(sel):
                return None
            out.append(AxisWindow(int(sel[0]), int(sel[-1]) + 1, d0, d1, None, index[sel] - d0))
        else:
            coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # what zoom computes (checked in tests)
            sel = np.flatnonzero((coords >= d0 - influence) & (coords <= d1 - 1 + influence))
            lo, hi = coords[sel[0]], coords[sel[-1]]
            w0 = max(0, int(np.floor(lo)) - 2 - prefilter)
            w1 = min(n_in, int(np.floor(hi)) + 3 + prefilter)
            out.append(AxisWindow(int(sel[0]), int(sel[-1]) + 1, w0, w1, coords[sel] - w0, None))
    return out


def _grid(windows: list[AxisWindow]) -> list[np.ndarray]:
    return list(np.meshgrid(*[w.coords for w in windows], indexing="ij"))


def resample_window(x: np.ndarray, plan: ResamplingPlan, windows: list[AxisWindow]) -> np.ndarray:
    """nnU-Net's image resampling, without its clip, of the window ``x`` (``(Zw, Yw, Xw)`` float64, input grid)
    at the outputs of ``windows``; returns ``(Zo, Yo, Xo)`` float64 (separate-z: one 2D resize per window slice,
    then the nearest slice of every output slice)."""
    x = np.asarray(x, np.float64)
    if plan.mode == "none":
        return x.copy()
    if plan.mode == "3d":
        return ndi.map_coordinates(x, _grid(windows), order=plan.order, mode="nearest")
    a = plan.axis
    slices = np.moveaxis(x, a, 0)
    if plan.kinds[(a + 1) % 3] != "identity":
        grid = _grid([w for k, w in enumerate(windows) if k != a])
        slices = np.stack([ndi.map_coordinates(s, grid, order=plan.order, mode="nearest") for s in slices])
    return np.moveaxis(slices[windows[a].index], 0, a)


def _seg_slab(seg: np.ndarray, windows: list[AxisWindow]) -> np.ndarray:
    """resize_segmentation(order 1) of ``seg`` at the windows' coordinates (all axes spline): each label's
    indicator linearly interpolated, the first label with the largest score wins, except where the nearest
    neighbour's label shares the top (non-zero) score (batchgenerators' ``seg_tiebreak='nearest'``)."""
    labels = np.unique(seg)
    shape = tuple(len(w.coords) for w in windows)
    if len(labels) == 1:
        return np.full(shape, labels[0], dtype=seg.dtype)
    grid = _grid(windows)
    nearest = ndi.map_coordinates(seg, grid, order=0, mode="nearest")
    scores = np.stack([np.clip(ndi.map_coordinates((seg == v).astype(float), grid, order=1, mode="nearest"), 0, 1)
                       for v in labels])
    best = scores.max(0)
    nn_score = np.take_along_axis(scores, np.searchsorted(labels, nearest)[None], 0)[0]
    return np.where((nn_score == best) & (nn_score > 0), nearest, labels[np.argmax(scores, 0)])


def resample_seg_window(seg: np.ndarray, plan: ResamplingPlan, windows: list[AxisWindow]) -> np.ndarray:
    """nnU-Net's segmentation resampling (``resize_segmentation`` order 1, order 0 along z) of the window
    ``seg`` (``(Zw, Yw, Xw)`` float labels, -1 outside the nonzero mask) at the outputs of ``windows``:
    exactly nnU-Net's values there."""
    seg = np.asarray(seg, np.float64)
    if plan.mode == "none":
        return seg.copy()
    if plan.mode == "3d":
        return _seg_slab(seg, windows)
    a = plan.axis
    slices = np.moveaxis(seg, a, 0)
    if plan.kinds[(a + 1) % 3] != "identity":
        inplane = [w for k, w in enumerate(windows) if k != a]
        slices = np.stack([_seg_slab(s, inplane) for s in slices])
    return np.moveaxis(slices[windows[a].index], 0, a)


def local_nonzero_mask(nonzero: np.ndarray, inner: tuple[slice, ...], open_faces) -> np.ndarray | None:
    """nnU-Net's nonzero mask (``binary_fill_holes`` of ``nonzero``, 6-connected) on ``inner``, decided from the
    block ``nonzero`` (bool, input grid) alone. ``open_faces``: ``(axis, 0 | -1)`` faces of the block inside the
    case; the others lie on nnU-Net's crop box, beyond which everything is background. None when a zero region
    of ``inner`` reaches an open face (it may be a hole of the whole case: ask the whole case)."""
    filled = ndi.binary_fill_holes(nonzero)
    if filled[inner].all():
        return filled[inner]
    labels, _ = ndi.label(~filled)
    reaching = set()
    for axis, side in open_faces:
        reaching.update(int(v) for v in np.unique(np.take(labels, side, axis=axis)))
    reaching.discard(0)
    if reaching and np.isin(labels[inner], list(reaching)).any():
        return None
    return filled[inner]


def nonzero_mask_unchanged(source_nonzero: np.ndarray, flips: np.ndarray, box) -> bool:
    """Whether nnU-Net's nonzero mask (``binary_fill_holes`` of "any channel != 0", 6-connected background) stays
    the source's when the voxels ``flips`` (bool, shape of ``box``) change between zero and nonzero.

    ``source_nonzero``: the source's "any channel != 0" over the whole case (native grid, bool); ``box``:
    ``[(start, stop)]`` per axis of ``flips`` in it. Sufficient condition checked: every flipped voxel and its 6
    neighbours lie in the source's holes-filled nonzero region, found in a block 2 voxels larger than ``box`` (a
    hole enclosed inside the block is one of the whole case). Then a new zero voxel cannot join the background
    outside (its path out would leave the filled region through a voxel that is nonzero, or a flipped voxel
    whose neighbours are all inside, or an enclosed hole: none can touch the outside), and a new nonzero voxel
    was inside the mask already. A flipped voxel on the case's edge fails the check."""
    shape = source_nonzero.shape
    where = np.argwhere(flips) + np.array([a for a, _ in box])
    if not len(where):
        return True
    if (where == 0).any() or (where == np.array(shape) - 1).any():
        return False
    block = [(max(a - 2, 0), min(b + 2, n)) for (a, b), n in zip(box, shape)]
    filled = ndi.binary_fill_holes(source_nonzero[tuple(slice(a, b) for a, b in block)])
    grown = np.zeros_like(filled)
    grown[tuple(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(box, block))] = flips
    grown = ndi.binary_dilation(grown, structure=ndi.generate_binary_structure(3, 1))
    return bool(filled[grown].all())


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """``[(start, stop)]`` per axis of the True voxels of ``mask`` (None if there are none); each axis is
    searched only inside the range found for the axes before it."""
    out: list[tuple[int, int]] = []
    for k in range(mask.ndim):
        hit = np.flatnonzero(np.moveaxis(mask, k, 0).reshape(mask.shape[k], -1).any(1))
        if not len(hit):
            return None
        out.append((int(hit[0]), int(hit[-1]) + 1))
        mask = mask[(slice(None),) * k + (slice(*out[-1]),)]
    return out


def min_max_outside(arr: np.ndarray, box, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``arr`` over the voxels outside ``box`` (``[(start, stop)]`` per axis in ``axes``),
    reduced over ``axes`` (other axes kept; +inf / -inf where nothing lies outside)."""
    keep = [n for k, n in enumerate(arr.shape) if k not in axes]
    lo, hi = np.full(keep, np.inf), np.full(keep, -np.inf)
    prefix: list = [slice(None)] * arr.ndim
    for k, (b0, b1) in zip(axes, box):
        for part in (slice(0, b0), slice(b1, None)):
            sl = list(prefix)
            sl[k] = part
            piece = arr[tuple(sl)]
            if piece.size:
                lo, hi = np.minimum(lo, piece.min(axis=axes)), np.maximum(hi, piece.max(axis=axes))
        prefix[k] = slice(b0, b1)
    return lo, hi


# ----------------------------------------------------------------------------------------------- normalisation

def case_statistics(scheme: str, image: np.ndarray, seg: np.ndarray | None, use_mask: bool) -> dict:
    """A per-case scheme's statistics of one channel, as nnU-Net's normaliser computes them on ``image``
    (the transposed, cropped float32 view it normalises, ``(Z, Y, X)``) and ``seg`` (-1 outside the nonzero
    mask): z-score ``mean``/``std`` (float32, over ``seg >= 0`` with ``use_mask``), rescale ``min``/``range``."""
    if scheme == "ZScoreNormalization":
        if use_mask:
            masked = image[seg >= 0]
            return {"mean": masked.mean(), "std": masked.std()}
        return {"mean": image.mean(), "std": image.std()}
    if scheme == "RescaleTo01Normalization":
        low = image.min()
        return {"min": low, "range": image.max() - low}
    raise ValueError(f"{scheme} is not a per-case scheme")


def normalise_window(scheme: str, x: np.ndarray, seg: np.ndarray, use_mask: bool, intensity_properties: dict,
                     stats: dict | None) -> np.ndarray:
    """Channel window ``x`` (native units, ``(Zw, Yw, Xw)``) normalised as nnU-Net would (float32): per-voxel
    schemes with nnU-Net's own normaliser; per-case schemes with the source's ``stats`` (see
    :func:`case_statistics`), the same float32 operations as nnU-Net's."""
    x = np.array(x, np.float32, copy=True)
    if scheme in PER_VOXEL_SCHEMES:
        normalizer = normalizer_class(scheme)(use_mask_for_norm=use_mask, intensityproperties=intensity_properties)
        return normalizer.run(x, seg)
    if scheme == "ZScoreNormalization":
        scale = max(stats["std"], 1e-8)
        if use_mask:
            mask = seg >= 0
            x[mask] = (x[mask] - stats["mean"]) / scale
            return x
        x -= stats["mean"]
        x /= scale
        return x
    if scheme == "RescaleTo01Normalization":
        x -= stats["min"]
        x /= np.clip(stats["range"], a_min=1e-8, a_max=None)
        return x
    raise ValueError(f"{scheme} is not supported by the crop route")
