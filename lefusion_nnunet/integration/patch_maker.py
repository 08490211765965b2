"""One synthetic variant -> the :class:`~lefusion_nnunet.integration.swap_dataset.Patch` of nnU-Net's
preprocessed source case it changes, by one of two routes (recorded per variant in the bank's manifest):

* ``"crop"`` (default): only the neighbourhood of what the variant changed is preprocessed
  (:mod:`lefusion_nnunet.integration.local_preprocessing`): the native region D where the variant's channels or
  label differ from the source, mapped through ``transpose_forward`` and the source's stored
  ``bbox_used_for_cropping``, a window around it normalised and resampled onto the outputs D can influence.
  The image equals nnU-Net's preprocessing of the full variant within a tolerance (float32 rounding plus the
  order-3 prefilter's crop error, ~1e-9 of the change), the segmentation exactly; per-case normalisation
  (z-score, rescale) keeps the source case's statistics.
* ``"full"`` (the reference): nnU-Net's ``run_case_npy`` on the whole native variant, then the box where it
  differs from the stored source. Taken when the crop route does not apply, with the reason recorded: a
  configuration it does not reproduce (:func:`~lefusion_nnunet.integration.local_preprocessing.crop_route_problem`),
  a variant that changes which voxels are nonzero (so possibly nnU-Net's nonzero mask and crop), or one that
  changes the intensity range skimage's resize clips to.

Both routes cast the native variant exactly as the NIfTI writer would store it (source pixel types).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from lefusion_nnunet.data.io import _to_dtype, read_image, read_label
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration import local_preprocessing as lp
from lefusion_nnunet.integration.swap_dataset import Patch, difference_patch

__all__ = ["PatchMaker", "PatchResult", "label_dtype"]


def label_dtype(label: np.ndarray, properties: dict) -> str:
    """The pixel type :func:`lefusion_nnunet.data.io.write_label` would write ``label`` with."""
    dtype = properties.get("source_dtype") or ("uint8" if int(np.max(label)) < 256 else "uint16")
    if np.dtype(dtype).kind == "f":
        dtype = "uint8" if int(np.max(label)) < 256 else "uint16"
    return dtype


@dataclass
class PatchResult:
    """A variant's patch (None when it cannot be stored: ``warning`` says why), the route that made it and,
    for the full route, why the crop route was not taken."""

    patch: Patch | None
    warning: str | None
    route: str
    reason: str | None = None


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


class PatchMaker:
    """Patches of the synthetic variants of a dataset's cases for one plans/configuration (see module doc).

    ``source_dataset`` is the nnU-Net dataset class reading the stored preprocessed source cases;
    ``crop_route=False`` forces the full route.
    """

    def __init__(self, raw_dataset, plans_manager, configuration_manager, dataset_json: dict, source_dataset,
                 crop_route: bool = True):
        self.raw, self.plans_manager, self.configuration_manager = raw_dataset, plans_manager, configuration_manager
        self.dataset_json, self.source_dataset = dataset_json, source_dataset
        self.preprocessor = configuration_manager.preprocessor_class(verbose=False)
        self.label_manager = plans_manager.get_label_manager(dataset_json)
        self.route_problem = lp.crop_route_problem(plans_manager, configuration_manager) if crop_route else \
            "crop route switched off"
        self._source: dict = {}
        self._reader_checked = False

    # ------------------------------------------------------------------------------------------- source

    def source(self, case) -> dict:
        """The source case: the plans' reader's properties of its files and its native image ``native``
        (C, Z, Y, X) float32, the stored pixel types, and its preprocessed ``data`` (C, Z, Y, X) / ``seg``
        (1, Z, Y, X) / ``properties`` as nnU-Net stored them."""
        if self._source.get("case_id") == case.source_case:
            return self._source
        files = self.raw.case(case.source_case)
        if files.label is None:
            raise LeFusionInputError(f"case {case.source_case} of {self.raw.folder} has no label file; every "
                                     f"training case needs one.")
        image, label_props = getattr(case, "reference", None), getattr(case, "label_properties", None)
        if image is None or label_props is None:
            image = read_image(files.images)
            label_props = read_label(files.label)[1]
        reader = self.plans_manager.image_reader_writer_class()
        data, seg, _, stored_props = self.source_dataset.load_case(case.source_case)
        if not self._reader_checked or getattr(case, "reference", None) is None:
            array, props = reader.read_images([str(f) for f in files.images])
            if array.shape != image.array.shape or not np.array_equal(array, image.array):
                raise LeFusionInputError(f"the plans' image reader reads {files.images[0]} differently from "
                                         f"LeFusion's reader; plan this dataset with nnU-Net's default SimpleITKIO.")
            self._reader_checked = True
        else:  # checked on the first source: the stored properties hold what the reader gave (spacing, geometry)
            props = {k: copy.deepcopy(stored_props[k]) for k in ("spacing", "sitk_stuff") if k in stored_props}
            array = np.asarray(image.array, np.float32)
        self._source = dict(case_id=case.source_case, properties=props, dtypes=list(image.source_dtypes),
                            label_properties=label_props, data=np.asarray(data[:], np.float32),
                            seg=np.asarray(seg[:]).astype(np.int16, copy=False), stored=stored_props,
                            native=array, label_file=str(files.label), reader=reader,
                            crop_bbox=[[int(a), int(b)] for a, b in stored_props.get("bbox_used_for_cropping") or []])
        return self._source

    def _lazy(self, src: dict, key: str, make):
        if key not in src:
            src[key] = make()
        return src[key]

    def _geometry(self, src: dict) -> dict | str:
        """Transpose, crop box, input/output shapes and the resampling plan of the source (a reason string
        when the stored case does not match what the plans say)."""
        def make():
            pm, cm = self.plans_manager, self.configuration_manager
            from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

            tf = [int(v) for v in pm.transpose_forward]
            bbox = src["crop_bbox"]
            if len(bbox) != 3 or src["native"].ndim != 4:
                return "the stored case has no 3D bbox_used_for_cropping"
            shape_in = tuple(b - a for a, b in bbox)
            spacing_in = [src["properties"]["spacing"][i] for i in tf]
            spacing_out = list(cm.spacing)
            if len(spacing_out) < 3:
                spacing_out = [spacing_in[0]] + spacing_out
            shape_out = tuple(int(v) for v in compute_new_shape(shape_in, spacing_in, spacing_out))
            if shape_out != tuple(src["data"].shape[1:]):
                return "the stored case's shape is not the one the plans give"
            kw = cm.configuration
            plan = lp.resampling_plan(shape_in, shape_out, spacing_in, spacing_out, kw["resampling_fn_data_kwargs"])
            seg_plan = lp.resampling_plan(shape_in, shape_out, spacing_in, spacing_out, kw["resampling_fn_seg_kwargs"])
            if (plan.mode, plan.axis, plan.kinds) != (seg_plan.mode, seg_plan.axis, seg_plan.kinds):
                return "image and segmentation are resampled along different axes"
            return dict(tf=tf, bbox=bbox, shape_in=shape_in, plan=plan)
        return self._lazy(src, "geometry", make)

    def _transposed(self, array: np.ndarray, tf) -> np.ndarray:
        return array.transpose([0, *[i + 1 for i in tf]]) if array.ndim == 4 else array.transpose(tf)

    def _native_seg(self, src: dict) -> np.ndarray:
        return self._lazy(src, "native_seg", lambda: src["reader"].read_seg(src["label_file"])[0][0])

    def _nonzero_mask(self, src: dict, geo: dict) -> np.ndarray:
        """nnU-Net's nonzero mask of the source (binary_fill_holes), cropped: input grid (Z, Y, X) bool."""
        from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

        return self._lazy(src, "mask", lambda: create_nonzero_mask(self._transposed(src["native"], geo["tf"]))[
            _slices(geo["bbox"])])

    def _window_mask(self, src: dict, geo: dict, box, pad: int = 8) -> np.ndarray:
        """nnU-Net's nonzero mask on ``box`` (input grid): from a block ``pad`` voxels larger where that decides
        it, else from the whole case."""
        shape, tf, bbox = geo["shape_in"], geo["tf"], geo["bbox"]
        block = [(max(0, a - pad), min(n, b + pad)) for (a, b), n in zip(box, shape)]
        native = [None] * 3
        for a, (b0, b1) in enumerate(block):
            native[tf[a]] = (b0 + bbox[a][0], b1 + bbox[a][0])
        nonzero = self._transposed((src["native"][(slice(None), *_slices(native))] != 0).any(0), tf)
        open_faces = [(k, side) for k, ((b0, b1), n) in enumerate(zip(block, shape))
                      for side, inside in ((0, b0 > 0), (-1, b1 < n)) if inside]
        inner = _slices([(a - b0, b - b0) for (a, b), (b0, _) in zip(box, block)])
        mask = lp.local_nonzero_mask(nonzero, inner, open_faces)
        return mask if mask is not None else self._nonzero_mask(src, geo)[_slices(box)]

    def _normalised(self, src: dict, geo: dict) -> dict:
        """The source normalised exactly as run_case_npy does (input grid, float32), the per-case statistics
        of each channel, and the resize clip range (per slice along the separate-z axis, else global)."""
        def make():
            cm, pm = self.configuration_manager, self.plans_manager
            data = self._transposed(src["native"].astype(np.float32), geo["tf"])[(slice(None), *_slices(geo["bbox"]))]
            seg = None
            if any(s == "ZScoreNormalization" and m for s, m in zip(cm.normalization_schemes, cm.use_mask_for_norm)):
                seg = np.array(self._transposed(self._native_seg(src), geo["tf"])[_slices(geo["bbox"])])
                seg[(seg == 0) & ~self._nonzero_mask(src, geo)] = -1
            stats, lows, highs = [], [], []
            plan = geo["plan"]
            for c, scheme in enumerate(cm.normalization_schemes):
                scheme_cls = lp.normalizer_class(scheme)
                use_mask = cm.use_mask_for_norm[c]
                props = pm.foreground_intensity_properties_per_channel[str(c)]
                stats.append(lp.case_statistics(scheme_cls.__name__, data[c], seg, use_mask)
                             if scheme_cls.__name__ in lp.PER_CASE_SCHEMES else None)
                data[c] = scheme_cls(use_mask_for_norm=use_mask, intensityproperties=props).run(data[c], seg)
                axes = tuple(k for k in range(3) if plan.mode != "separate" or k != plan.axis)
                lows.append(data[c].min(axis=axes))
                highs.append(data[c].max(axis=axes))
            return dict(data=data, stats=stats, low=lows, high=highs)
        return self._lazy(src, "normalised", make)

    # ------------------------------------------------------------------------------------------- routes

    def __call__(self, case) -> PatchResult:
        """The patch of ``case`` by the crop route, or by the full route when the crop route does not apply."""
        reason = self.route_problem
        if reason is None:
            result = self._crop(case)
            if result.reason is None:
                return result
            reason = result.reason
        patch, warning = self._full(case)
        return PatchResult(patch, warning, "full", reason)

    def _identical(self, case) -> PatchResult:
        return PatchResult(None, f"{case.case_id}: skipped, identical to {case.source_case} after preprocessing",
                           "crop")

    def _full(self, case) -> tuple[Patch | None, str | None]:
        """nnU-Net's ``run_case_npy`` on the whole native variant (the reference route)."""
        src = self.source(case)
        data = np.stack([_to_dtype(np.asarray(ch), dt).astype(np.float32) for ch, dt in
                         zip(case.channels, src["dtypes"])])
        label = np.asarray(case.label)
        seg = _to_dtype(label, label_dtype(label, src["label_properties"])).astype(np.float32)[None]
        pdata, pseg, props = self.preprocessor.run_case_npy(data, seg, copy.deepcopy(src["properties"]),
                                                            self.plans_manager, self.configuration_manager,
                                                            self.dataset_json)
        pdata, pseg = pdata.astype(np.float32, copy=False), pseg.astype(np.int16, copy=False)
        if pdata.shape != src["data"].shape or pseg.shape != src["seg"].shape or \
                [[int(a), int(b)] for a, b in props.get("bbox_used_for_cropping")] != src["crop_bbox"]:
            return None, (f"{case.case_id}: skipped, the variant changes nnU-Net's crop to the nonzero region of "
                          f"{case.source_case}")
        patch = difference_patch(pdata, pseg, props["class_locations"], src["data"], src["seg"])
        if patch is None:
            return None, f"{case.case_id}: skipped, identical to {case.source_case} after preprocessing"
        return patch, None

    def _changed_region(self, case, src: dict):
        """The native box of every voxel the variant changes (after the writer's cast), the cast variant
        channels / label inside a box containing it, or a reason string. Reads only the variant's own box
        (``case.box``: every changed voxel lies inside it)."""
        native = src["native"]
        outer = np.asarray(case.box, np.int64).reshape(3, 2)
        osl = _slices(outer)
        channels = [case.channel_in(c, outer) for c in range(native.shape[0])]
        label = case.label_in(outer)
        rough = np.not_equal(label, self._native_seg(src)[osl].astype(label.dtype))
        for c, ch in enumerate(channels):
            rough |= np.not_equal(ch, native[c][osl])
        inner = lp.bounding_box(rough)
        if inner is None:
            return None
        box = [(int(o) + a, int(o) + b) for (a, b), o in zip(inner, outer[:, 0])]
        local = _slices(inner)
        label_max = max(int(label.max()), self._lazy(src, "label_max", lambda: int(self._native_seg(src).max())))
        dtype = label_dtype(np.array([label_max]), src["label_properties"])
        sl = _slices(box)
        var = np.stack([_to_dtype(ch[local], dt).astype(np.float32) for ch, dt in zip(channels, src["dtypes"])])
        var_label = _to_dtype(label[local], dtype).astype(np.float32)
        changed = (var_label != self._native_seg(src)[sl]) | (var != native[(slice(None), *sl)]).any(0)
        flips = (var != 0).any(0) != (native[(slice(None), *sl)] != 0).any(0)
        if flips.any() and not lp.nonzero_mask_unchanged(
                self._lazy(src, "nonzero", lambda: (native != 0).any(0)), flips, box):
            return ("the variant changes which voxels are nonzero where nnU-Net's nonzero mask (and so its crop) "
                    "could change")
        inner = lp.bounding_box(changed)
        if inner is None:
            return None
        return [(a + i0, a + i1) for (a, _), (i0, i1) in zip(box, inner)], box, var, var_label

    def _crop(self, case) -> PatchResult:
        """The crop route (see the module doc); ``reason`` set when it does not apply to this variant."""
        src = self.source(case)
        geo = self._geometry(src)
        if isinstance(geo, str):
            return PatchResult(None, None, "crop", geo)
        region = self._changed_region(case, src)
        if isinstance(region, str):
            return PatchResult(None, None, "crop", region)
        if region is None:
            return self._identical(case)
        d_native, box, var, var_label = region
        tf, bbox, plan = geo["tf"], geo["bbox"], geo["plan"]
        d_in = [(max(d_native[tf[a]][0] - bbox[a][0], 0), min(d_native[tf[a]][1] - bbox[a][0], geo["shape_in"][a]))
                for a in range(3)]
        if any(b <= a for a, b in d_in):
            return self._identical(case)  # only label changes outside nnU-Net's crop
        windows = lp.axis_windows(plan, d_in)
        geo = dict(geo, d_in=d_in)
        if windows is None:
            return self._identical(case)
        w_native = [None] * 3
        for a, w in enumerate(windows):
            w_native[tf[a]] = (w.w0 + bbox[a][0], w.w1 + bbox[a][0])
        src_w = np.array(src["native"][(slice(None), *_slices(w_native))])
        var_w, lab_w = src_w.copy(), np.array(self._native_seg(src)[_slices(w_native)])
        inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(w_native, box)]
        dst = _slices([(a - w0, b - w0) for (a, b), (w0, _) in zip(inter, w_native)])
        own = _slices([(a - b0, b - b0) for (a, b), (b0, _) in zip(inter, box)])
        var_w[(slice(None), *dst)] = var[(slice(None), *own)]
        src_seg_w = lab_w.copy()
        lab_w[dst] = var_label[own]
        src_w, var_w = self._transposed(src_w, tf), self._transposed(var_w, tf)
        lab_w, src_seg_w = self._transposed(lab_w, tf), self._transposed(src_seg_w, tf)
        if not (src_w != 0).any(0).all():
            mask = self._window_mask(src, geo, [(w.w0, w.w1) for w in windows])
            lab_w[(lab_w == 0) & ~mask] = -1
            src_seg_w[(src_seg_w == 0) & ~mask] = -1
        out_box = [(w.o0, w.o1) for w in windows]
        data, reason = self._resampled_data(src, geo, windows, src_w, var_w, src_seg_w, lab_w)
        if reason is not None:
            return PatchResult(None, None, "crop", reason)
        near, inner = self._near_windows(plan, d_in, windows)
        seg = lp.resample_seg_window(lab_w[inner], plan, near).astype(np.int16)[None]
        stored = (slice(None), *_slices(out_box))
        patch = difference_patch(data, seg, {}, src["data"][stored], src["seg"][stored])
        if patch is None:
            return self._identical(case)
        patch.bbox = patch.bbox + np.array([[a, a] for a, _ in out_box], np.int64)
        patch.class_locations = self._class_locations(patch, src)
        return PatchResult(patch, None, "crop")

    def _resampled_data(self, src, geo, windows, src_w, var_w, src_seg_w, lab_w):
        """The variant's preprocessed image at the outputs of ``windows`` ((C, Zo, Yo, Xo) float32), as
        stored source + resampled change (see local_preprocessing), or a reason string."""
        cm, pm, plan = self.configuration_manager, self.plans_manager, geo["plan"]
        norm = self._normalised(src, geo) if plan.mode != "none" else None
        out_box = [(w.o0, w.o1) for w in windows]
        w_box = [(w.w0, w.w1) for w in windows]
        spline = "spline" in plan.kinds
        result = []
        for c, scheme in enumerate(cm.normalization_schemes):
            name = lp.normalizer_class(scheme).__name__
            use_mask, props = cm.use_mask_for_norm[c], pm.foreground_intensity_properties_per_channel[str(c)]
            stats = norm["stats"][c] if norm is not None else self._stats_without_resampling(src, geo, c, name)
            v = lp.normalise_window(name, var_w[c], lab_w, use_mask, props, stats)
            if not spline:
                result.append(lp.resample_window(v, plan, windows).astype(np.float32))
                continue
            s = lp.normalise_window(name, src_w[c], src_seg_w, use_mask, props, stats)
            low, high = norm["low"][c], norm["high"][c]
            if plan.mode == "3d":
                out_lo, out_hi = lp.min_max_outside(norm["data"][c], w_box, (0, 1, 2))
                new_lo, new_hi = min(out_lo, v.min()), max(out_hi, v.max())
                lo_o, hi_o = low, high
            else:
                a = plan.axis
                axes = tuple(k for k in range(3) if k != a)
                slab = norm["data"][c][tuple(slice(w.w0, w.w1) if k == a else slice(None)
                                             for k, w in enumerate(windows))]
                out_lo, out_hi = lp.min_max_outside(slab, [w_box[k] for k in axes], axes)
                new_lo, new_hi = np.minimum(out_lo, v.min(axis=axes)), np.maximum(out_hi, v.max(axis=axes))
                low, high = low[w_box[a][0]:w_box[a][1]], high[w_box[a][0]:w_box[a][1]]
                shape = [1, 1, 1]
                shape[a] = -1
                lo_o, hi_o = low[windows[a].index].reshape(shape), high[windows[a].index].reshape(shape)
            if not (np.array_equal(new_lo, low) and np.array_equal(new_hi, high)):
                return None, "the variant changes the intensity range that nnU-Net's resampling clips to"
            stored = src["data"][c][_slices(out_box)].astype(np.float64)
            near, inner = self._near_windows(plan, geo["d_in"], windows)  # the change: D + 18 inputs suffice
            change = lp.resample_window(v[inner].astype(np.float64) - s[inner], plan, near)
            at_bound = (stored <= lo_o) | (stored >= hi_o)
            if at_bound.any():  # where skimage clipped the source, its unclipped value comes from the window
                stored = np.where(at_bound, lp.resample_window(s, plan, windows), stored)
            result.append(np.clip(stored + change, lo_o, hi_o).astype(np.float32))
        return np.stack(result), None

    @staticmethod
    def _near_windows(plan, d_in, windows):
        """Windows without the prefilter margin (same outputs) and their slice of ``windows``' arrays: enough
        for what is resampled from the change alone (the crop error scales with the change, ~0.268 ** 18 of it)."""
        near = lp.axis_windows(plan, d_in, prefilter=0)
        return near, tuple(slice(n.w0 - w.w0, n.w1 - w.w0) for n, w in zip(near, windows))

    def _stats_without_resampling(self, src, geo, c, name):
        if name not in lp.PER_CASE_SCHEMES:
            return None
        return self._normalised(src, geo)["stats"][c]

    def _class_locations(self, patch: Patch, src: dict) -> dict:
        """nnU-Net's oversampling locations inside the patch (full-case rows (0, z, y, x)): labels / regions
        the variant adds are sampled in the patch with nnU-Net's own sampler; the others keep the source's
        stored locations that the patch leaves in place."""
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        lm = self.label_manager
        before = src["seg"][(slice(None), *_slices(patch.bbox))]
        added = {int(v) for v in np.unique(patch.seg[patch.seg != before])}
        keys = list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        labels_of = {(tuple(k) if isinstance(k, (list, tuple)) else int(k)):
                     (set(int(v) for v in k) if isinstance(k, (list, tuple)) else {int(k)}) for k in keys}
        lesion = [k for k, labs in labels_of.items() if labs & added]
        sampled = DefaultPreprocessor._sample_foreground_locations(patch.seg, lesion) if lesion else {}
        offset = np.concatenate([[0], patch.bbox[:, 0]]).astype(np.int64)
        out = {}
        for key, value in (src["stored"].get("class_locations") or {}).items():
            if key in lesion:
                continue
            loc = np.asarray(value, np.int64).reshape(-1, 4)
            inside = np.all((loc[:, 1:] >= patch.bbox[:, 0]) & (loc[:, 1:] < patch.bbox[:, 1]), axis=1)
            loc = loc[inside]
            labs = labels_of.get(key, set(key) if isinstance(key, tuple) else {key})
            values = patch.seg[(0, *(loc[:, 1:] - patch.bbox[:, 0]).T)] if len(loc) else np.zeros(0)
            out[key] = loc[np.isin(values, list(labs))]
        for key in lesion:
            out[key] = np.asarray(sampled[key], np.int64).reshape(-1, 4) + offset
        return out
