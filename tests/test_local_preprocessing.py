"""The crop route of the patch bank (lefusion_nnunet.integration.local_preprocessing + patch_maker), checked
against nnU-Net's own functions.

Part 1 (arrays only): window resampling vs nnU-Net's ``resample_data_or_seg_to_shape`` on the whole array, in 3D
and separate-z mode (including order-0 ties along z). Part 2 (a real nnU-Net dataset, planned and preprocessed by
nnU-Net): the patch pasted into the source vs nnU-Net's ``run_case_npy`` on the full native variant, for separate-z
resampling (thick slices), no resampling and a 2d configuration (3D resampling: tests/test_patch_bank.py), an
MR z-score channel (source statistics: deviation measured), and every fallback to the full route.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import plan_and_preprocess_template, use_template_copy

import lefusion_nnunet.variants as variants_mod
from lefusion_nnunet.integration import bank as bank_mod
from lefusion_nnunet.integration import local_preprocessing as lp
from lefusion_nnunet.integration.patch_maker import PatchMaker

# ------------------------------------------------------------------------------------------ part 1: arrays

GEOMETRIES = [  # shape in, shape out, spacing in, spacing out (z, y, x): mode
    ((48, 60, 56), (24, 72, 67), (1.0, 1.0, 1.0), (2.0, 0.833, 0.836)),   # 3d, z halved (linear ties at .5)
    ((40, 60, 56), (20, 72, 67), (5.0, 1.0, 1.0), (10.0, 0.833, 0.836)),  # separate-z, z halved (order-0 ties)
    ((8, 60, 56), (32, 48, 45), (4.0, 0.8, 0.8), (1.0, 1.0, 1.0)),        # separate-z, z upsampled
]


def _blocky_labels(rng, shape):
    small = rng.integers(-1, 3, size=tuple(max(2, s // 3) for s in shape)).astype(float)
    from skimage.transform import resize

    return resize(small, shape, order=0, mode="edge", anti_aliasing=False)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["3d", "separate-down", "separate-up"])
def test_window_resampling_matches_nnunet_on_the_whole_array(geometry):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    shape_in, shape_out, sp_in, sp_out = geometry
    kw = {"order": 3, "order_z": 0, "force_separate_z": None}
    plan = lp.resampling_plan(shape_in, shape_out, sp_in, sp_out, kw)
    assert plan.mode == ("3d" if sp_in[0] == 1.0 else "separate")
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape_in).astype(np.float32)
    d_box = [(s // 2 - 2, s // 2 + 2) for s in shape_in]
    delta = np.zeros(shape_in, np.float32)
    delta[tuple(slice(a, b) for a, b in d_box)] = rng.uniform(-0.5, 0.5, size=(4, 4, 4))
    seg = _blocky_labels(rng, shape_in)
    seg2 = seg.copy()
    seg2[tuple(slice(a, b) for a, b in d_box)] = 2

    def nn(a, is_seg=False):
        return resample_data_or_seg_to_shape(a[None].astype(np.float64), shape_out, sp_in, sp_out, is_seg=is_seg,
                                             order=1 if is_seg else 3, order_z=0, force_separate_z=None)[0]

    xd = x + delta  # float32: the change actually made is xd - x (float64), not delta
    full0, full1 = nn(x), nn(xd)
    windows = lp.axis_windows(plan, d_box)
    w_sl = tuple(slice(w.w0, w.w1) for w in windows)
    o_sl = tuple(slice(w.o0, w.o1) for w in windows)
    # segmentation: exact (order 1 and 0 are local; the argmax and its nearest tie-break reproduced)
    np.testing.assert_array_equal(lp.resample_seg_window(seg2[w_sl], plan, windows), nn(seg2, True)[o_sl])
    assert not np.array_equal(nn(seg2, True), nn(seg, True))
    # image: where nnU-Net's clip does not act, the window gives nnU-Net's value up to the prefilter's crop error
    low, high = xd.min(), xd.max()
    if plan.mode == "separate":
        low, high = xd.min(axis=(1, 2))[:, None, None], xd.max(axis=(1, 2))[:, None, None]
        index = windows[0].index + windows[0].w0
        low, high = low[index], high[index]
    free = (full1[o_sl] > low) & (full1[o_sl] < high)
    assert free.mean() > 0.9
    ours = lp.resample_window(xd[w_sl], plan, windows)
    assert np.abs(ours - full1[o_sl])[free].max() < 1e-8
    change = lp.resample_window((xd.astype(np.float64) - x)[w_sl], plan, windows)
    free &= (full0[o_sl] > low) & (full0[o_sl] < high)
    assert np.abs(change - (full1 - full0)[o_sl])[free].max() < 1e-12  # crop error scales with the change
    outside = np.ones(shape_out, bool)
    outside[o_sl] = False  # beyond the recomputed block the change is below 0.268 ** 14 of its size
    assert np.abs(full1 - full0)[outside].max() < 1e-8 * np.abs(delta).max()


def test_nearest_index_breaks_ties_as_nnunet_does():
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    for n_in, n_out in ((20, 10), (9, 6), (7, 14), (5, 13)):
        index = lp._nearest_index(n_in, n_out)
        vol = np.broadcast_to(np.arange(n_in, dtype=float)[None, :, None, None], (1, n_in, 3, 3)).copy()
        ref = resample_data_or_seg(vol, (n_out, 3, 3), False, 0, 3, True, order_z=0)[0, :, 0, 0]
        np.testing.assert_array_equal(index, ref)


def test_min_max_outside_a_box():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 7, 8))
    box = [(1, 3), (2, 6), (0, 5)]
    lo_ref, hi_ref = a.copy(), a.copy()
    lo_ref[1:3, 2:6, 0:5], hi_ref[1:3, 2:6, 0:5] = np.inf, -np.inf
    lo, hi = lp.min_max_outside(a, box, (0, 1, 2))
    assert lo == lo_ref.min() and hi == hi_ref.max()
    lo_ref, hi_ref = a.copy(), a.copy()  # per slice along axis 0, the box in-plane
    lo_ref[:, 2:6, 0:5], hi_ref[:, 2:6, 0:5] = np.inf, -np.inf
    lo, hi = lp.min_max_outside(a, box[1:], (1, 2))
    np.testing.assert_array_equal(lo, lo_ref.min(axis=(1, 2)))
    np.testing.assert_array_equal(hi, hi_ref.max(axis=(1, 2)))


# ------------------------------------------------------------------------------------------ part 2: nnU-Net

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID:03d}_LFLocal"
THIN, THICK = ("case001", "case002"), ("case003", "case004")  # lesion-free: 1 mm (not resampled), 4 mm slices


def _write_raw(raw_root: Path) -> None:
    """5 cases, channels CT + T2 (z-score), zero background outside an elliptic body (so nnU-Net's nonzero
    mask, its -1 label and use_mask_for_norm all matter), organ label 1, nodule label 2 in case000. Cases 0-2:
    24 x 32 x 32 at 1 mm (the median spacing: not resampled); cases 3-4: 8 slices of 4 mm, 0.8 mm in-plane
    (anisotropic: separate-z resampling)."""
    folder = raw_root / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i in range(5):
        rng = np.random.default_rng(i)
        shape, spacing = ((24, 32, 32), (1.0, 1.0, 1.0)) if i < 3 else ((8, 32, 32), (0.8, 0.8, 4.0))
        zz, yy, xx = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
        body = ((yy - 16) / 11.0) ** 2 + ((xx - 16) / 10.0) ** 2 <= 1
        organ = ((yy - 16) / 7.0) ** 2 + ((xx - 16) / 6.0) ** 2 <= 1
        ct, t2, lab = np.zeros(shape), np.zeros(shape), np.zeros(shape, np.uint8)
        ct[body], t2[body] = 40 + rng.normal(0, 20, body.sum()), 300 + rng.normal(0, 30, body.sum())
        ct[organ], t2[organ] = -600 + rng.normal(0, 20, organ.sum()), 150 + rng.normal(0, 20, organ.sum())
        lab[organ] = 1
        if i == 0:
            nodule = (zz - 12) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 6
            ct[nodule], t2[nodule], lab[nodule] = 30, 250, 2
        t2 = np.clip(t2, 1, None).astype(np.int16) * body  # nonzero exactly in the body
        for arr, path in ((ct.astype(np.int16), folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"),
                          (t2, folder / "imagesTr" / f"case{i:03d}_0001.nii.gz"),
                          (lab, folder / "labelsTr" / f"case{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing)
            sitk.WriteImage(im, str(path), True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "organ": 1, "nodule": 2},
        "numTraining": 5, "file_ending": ".nii.gz"}))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return plan_and_preprocess_template(tmp_path_factory.mktemp("lefusion_local"), _write_raw, DATASET_ID,
                                        ("3d_fullres", "2d"))


@pytest.fixture
def world(template, tmp_path, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from lefusion_nnunet.data.dataset import load_raw_dataset

    use_template_copy(template, tmp_path, monkeypatch)
    pre = tmp_path / "nnUNet_preprocessed" / DATASET
    pm = PlansManager(str(pre / "nnUNetPlans.json"))
    return dict(root=tmp_path, pre=pre, plans=pm, dataset_json=load_json(str(pre / "dataset.json")),
                raw=load_raw_dataset(DATASET), tmp=tmp_path)


def _variant(world, cid: str, k: int, centre_zyx_mm, radius_mm: float, ct: float, t2: float, label: int = 2):
    """Case ``cid`` with a ball (world mm around the volume's origin) painted: CT ``ct``, T2 ``t2``, ``label``."""
    from lefusion_nnunet.data.io import read_image, read_label

    files = world["raw"].case(cid)
    image = read_image(files.images)
    lab, label_props = read_label(files.label)
    grid = np.ogrid[tuple(slice(0, n) for n in lab.shape)]
    ball = sum(((g * s - c) ** 2) for g, s, c in zip(grid, image.spacing, centre_zyx_mm)) <= radius_mm ** 2
    channels = [c.copy() for c in image.array]
    channels[0][ball], channels[1][ball] = ct, t2
    lab = lab.copy()
    lab[ball] = label
    return variants_mod.SyntheticCase(f"{cid}_lefusion{k:03d}", cid, channels, lab, {"k": k}, reference=image,
                                      label_properties=label_props)


def _maker(world, configuration="3d_fullres", plans=None, **kw) -> PatchMaker:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = world["plans"] if plans is None else PlansManager(plans)
    cm = pm.get_configuration(configuration)
    folder = world["pre"] / world["plans"].get_configuration(configuration).data_identifier
    return PatchMaker(world["raw"], pm, cm, world["dataset_json"],
                      nnUNetDatasetBlosc2(str(folder), list(THIN + THICK)), **kw)


def _reference(world, maker: PatchMaker, case):
    """nnU-Net's own preprocessing of the full variant: written as NIfTI files, then ``run_case``."""
    from lefusion_nnunet.data.io import write_image_channel, write_label

    images = []
    for c, channel in enumerate(case.channels):
        images.append(str(world["tmp"] / f"{case.case_id}_{c:04d}.nii.gz"))
        write_image_channel(channel, images[-1], case.reference, c)
    seg_file = str(world["tmp"] / f"{case.case_id}.nii.gz")
    write_label(case.label, seg_file, case.label_properties)
    data, seg, props = maker.configuration_manager.preprocessor_class(verbose=False).run_case(
        images, seg_file, maker.plans_manager, maker.configuration_manager, world["dataset_json"])
    return data.astype(np.float32), seg.astype(np.int16), props


def _pasted(maker: PatchMaker, case, result):
    """The source as nnU-Net stored it with the patch pasted, and the mask of the patch's box."""
    src = maker.source(case)
    data, seg = src["data"].copy(), src["seg"].copy()
    box = (slice(None), *(slice(int(a), int(b)) for a, b in result.patch.bbox))
    data[box], seg[box] = result.patch.data, result.patch.seg
    inside = np.zeros(data.shape[1:], bool)
    inside[box[1:]] = True
    # (2) outside the patch: the stored source, bit for bit
    assert data[:, ~inside].tobytes() == src["data"][:, ~inside].tobytes()
    return data, seg, inside


def _lesion_variants(world, cid):
    z_mid = 12.0 if cid in THIN else 16.0
    mm = 1.0 if cid in THIN else 0.8  # in-plane spacing; the second ball sits on the organ's edge, inside the body
    return [_variant(world, cid, 0, (z_mid, 15.0, 15.5), 3.0, 30.4, 250.3),
            _variant(world, cid, 1, (z_mid - 3.0, 16.0 * mm, 22.5 * mm), 2.5 * mm, 20.0, 260.0)]


@pytest.mark.parametrize("configuration, cid", [("3d_fullres", "case003"), ("3d_fullres", "case001"),
                                                ("2d", "case004"), ("2d", "case002")],
                         ids=["separate-z", "no-resampling", "2d-thick", "2d-thin"])
def test_crop_route_equals_nnunet_on_the_full_variant(world, configuration, cid):
    """(1) CT channel within the stated tolerance, segmentation exact, lesion locations nnU-Net's; (2) outside
    the patch bit-identical. (The T2 channel uses the source's z-score statistics: next test.)"""
    from test_patch_bank import assert_close_to_nnunet

    maker = _maker(world, configuration)
    plan = maker._geometry(maker.source(_lesion_variants(world, cid)[0]))["plan"]
    expected = {"case003": "separate", "case001": "none", "case004": "separate", "case002": "none"}[cid]
    assert plan.mode == expected
    if configuration == "2d" and cid == "case004":
        assert plan.kinds[0] == "identity" and plan.kinds[1] == "spline"  # 2d keeps the slice spacing
    for case in _lesion_variants(world, cid):
        result = maker(case)
        assert result.route == "crop" and result.reason is None and result.patch is not None, result
        data, seg, inside = _pasted(maker, case, result)
        ref_data, ref_seg, ref_props = _reference(world, maker, case)
        np.testing.assert_array_equal(seg, ref_seg)
        if plan.mode == "none":
            np.testing.assert_array_equal(data[0], ref_data[0])  # no resampling: exact
        else:
            assert_close_to_nnunet(data[:1], ref_data[:1])
        assert inside.mean() < 0.5
        ours = {tuple(v) for v in result.patch.class_locations[2]}
        assert ours == {tuple(v) for v in np.asarray(ref_props["class_locations"][2])} and len(ours) > 0
        assert all(seg[tuple(v)] == 1 for v in result.patch.class_locations[1])


@pytest.mark.parametrize("cid", ["case003", "case001"], ids=["separate-z", "no-resampling"])
def test_zscore_channel_keeps_the_source_statistics(world, cid):
    """(3) T2 is z-scored over nnU-Net's mask (seg >= 0). The crop route normalises with the SOURCE's mean/std,
    so the patch stays local; nnU-Net's full re-run would use the variant's, shifting every voxel of the case by
    the lesion's effect on them. Measured: that deviation, bounded by its value at the extremes of the native
    range times the interpolation's amplification (< 3 for a 2D cubic spline)."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    maker = _maker(world)
    cm = maker.configuration_manager
    assert cm.normalization_schemes[1] == "ZScoreNormalization" and cm.use_mask_for_norm[1]
    case = _lesion_variants(world, cid)[0]
    src = maker.source(case)
    geo = maker._geometry(src)
    norm = maker._normalised(src, geo)
    if geo["plan"].mode == "none":  # the source statistics are nnU-Net's own: the stored case, bit for bit
        assert norm["data"].tobytes() == np.ascontiguousarray(src["data"]).tobytes()
    result = maker(case)
    assert result.route == "crop"
    data, seg, inside = _pasted(maker, case, result)
    ref_data, ref_seg, _ = _reference(world, maker, case)
    np.testing.assert_array_equal(seg, ref_seg)
    assert inside.mean() < 0.5  # local, although nnU-Net's own re-run changes every voxel of the case:
    assert (ref_data[1][~inside & (ref_seg[0] >= 0)] != src["data"][1][~inside & (ref_seg[0] >= 0)]).mean() > 0.9
    deviation = float(np.abs(data[1].astype(np.float64) - ref_data[1]).max())
    # the variant's statistics as nnU-Net computes them on the full variant
    native = np.stack([np.rint(np.asarray(c)).astype(np.float32) for c in case.channels])
    vdata, vseg, _ = crop_to_nonzero(native.copy(), np.asarray(case.label, np.float32)[None].copy())
    mask = vseg[0] >= 0
    m_v, s_v = vdata[1][mask].mean(), vdata[1][mask].std()
    m_s, s_s = norm["stats"][1]["mean"], norm["stats"][1]["std"]
    extremes = np.array([vdata[1][mask].min(), vdata[1][mask].max()], np.float64)
    predicted = float(np.abs((extremes - m_v) / s_v - (extremes - m_s) / s_s).max())
    assert m_v != m_s and 0 < predicted < 0.05  # the lesion's effect on the case's statistics: tiny
    assert 0 < deviation <= (1 if geo["plan"].mode == "none" else 3) * predicted + 1e-6, (deviation, predicted)
    print(f"z-score deviation from nnU-Net's full re-run ({geo['plan'].mode}): {deviation:.2e} (bound from the "
          f"statistics {predicted:.2e}; mean {m_s:.3f} -> {m_v:.3f}, std {s_s:.3f} -> {s_v:.3f})")


def _fallback_variants(world):
    return {"case003": [_lesion_variants(world, "case003")[0],
                        _variant(world, "case003", 1, (16.0, 12.8, 12.8), 2.0, 0.0, 0.0, label=0),  # zeros inside
                        _variant(world, "case003", 2, (16.0, 12.8, 12.8), 2.0, 30.0, 3000.0)],  # T2 off the range
            "case001": [_variant(world, "case001", 0, (12.0, 7.5, 8.5), 1.5, 30.0, 250.0)]}  # in the background


def _build_bank(world, monkeypatch, made: dict, plans=None, crop_route=True):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    def fake(synth, dataset, case_ids, settings, done=()):
        for cid in case_ids:
            yield made.get(cid, []), []
    monkeypatch.setattr(bank_mod, "make_variants", fake)
    pm = world["plans"] if plans is None else PlansManager(plans)
    out = world["tmp"] / ("bank_crop" if crop_route else "bank_full")
    out.mkdir()
    return bank_mod.build_bank_contents(
        out, synthesizer_factory=lambda: object(), raw_dataset=world["raw"], case_ids=sorted(made),
        variant_settings=variants_mod.VariantSettings(per_case=1), plans_manager=pm,
        configuration_manager=pm.get_configuration("3d_fullres"), dataset_json=world["dataset_json"],
        dataset_class=nnUNetDatasetBlosc2, log=lambda m: None, crop_route=crop_route), out


def test_each_fallback_takes_the_full_route_and_says_so(world, monkeypatch):
    """(4) Variants the crop route cannot reproduce go the full route (the reference), recorded in the manifest."""
    variants, warnings = _build_bank(world, monkeypatch, _fallback_variants(world))[0]
    assert variants["case003_lefusion000"]["route"] == "crop" and "route_reason" not in variants["case003_lefusion000"]
    # zeros enclosed by the body leave nnU-Net's nonzero mask alone, but a T2 of 0 inside the z-scored body is far
    # below the slice's range, which skimage's per-slice resize clips to
    assert variants["case003_lefusion001"]["route"] == "full"
    assert "intensity range" in variants["case003_lefusion001"]["route_reason"]
    assert variants["case003_lefusion002"]["route"] == "full"
    assert "intensity range" in variants["case003_lefusion002"]["route_reason"]
    background = variants.get("case001_lefusion000")  # the full route keeps it unless nnU-Net's crop changes
    assert background is not None or any("case001_lefusion000" in w for w in warnings)
    if background is not None:
        assert background["route"] == "full" and "nonzero" in background["route_reason"]


def test_zeros_inside_the_body_keep_the_crop_route_and_equal_nnunet(world):
    """A lesion painted with exact zeros in every channel (CT 0 HU happens in int16 scans) inside the body:
    nnU-Net's binary_fill_holes gives the source's nonzero mask again, so the crop route applies and agrees with
    nnU-Net (case001: not resampled, so resize's clip range plays no part)."""
    case = _variant(world, "case001", 5, (12.0, 15.0, 15.5), 3.0, 0.0, 0.0)
    assert (np.asarray(case.channels[0])[np.asarray(case.label) == 2] == 0).all()
    maker = _maker(world)
    result = maker(case)
    assert result.route == "crop" and result.reason is None and result.patch is not None, result
    data, seg, _ = _pasted(maker, case, result)
    ref_data, ref_seg, _ = _reference(world, maker, case)
    np.testing.assert_array_equal(seg, ref_seg)
    np.testing.assert_array_equal(data[0], ref_data[0])


def test_nonzero_mask_unchanged_check():
    body = np.zeros((12, 12, 12), bool)
    body[2:10, 2:10, 2:10] = True
    flips = np.zeros((3, 3, 3), bool)
    flips[1, 1, 1] = True
    assert lp.nonzero_mask_unchanged(body, flips, [(4, 7)] * 3)              # deep inside: stays filled
    assert not lp.nonzero_mask_unchanged(body, flips, [(1, 4), (4, 7), (4, 7)])  # on the body's surface
    assert not lp.nonzero_mask_unchanged(body, flips, [(8, 11), (4, 7), (4, 7)])  # outside the body
    edge = np.ones((6, 6, 6), bool)
    one = np.ones((1, 1, 1), bool)
    assert not lp.nonzero_mask_unchanged(edge, one, [(0, 1), (2, 3), (2, 3)])   # on the case's edge
    assert lp.nonzero_mask_unchanged(edge, one, [(2, 3)] * 3)


def test_configurations_the_crop_route_does_not_reproduce(world, monkeypatch):
    plans = copy.deepcopy(world["plans"].plans)
    cfg = plans["configurations"]["3d_fullres"]
    assert lp.crop_route_problem(world["plans"], world["plans"].get_configuration("3d_fullres")) is None
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for change, words in ((dict(preprocessor_name="MyPreprocessor"), "custom preprocessor"),
                          (dict(normalization_schemes=["CTNormalization", "MyNormalization"]), "normalisation"),
                          (dict(resampling_fn_data="resample_data_or_seg_to_spacing"), "resampling function"),
                          (dict(resampling_fn_seg_kwargs={**cfg["resampling_fn_seg_kwargs"], "order": 3}), "seg"),
                          (dict(resampling_fn_data_kwargs={**cfg["resampling_fn_data_kwargs"], "order": 2}), "data"),
                          (dict(resampling_fn_data_kwargs={**cfg["resampling_fn_data_kwargs"], "cval": 0}), "unknown")):
        custom = copy.deepcopy(plans)
        custom["configurations"]["3d_fullres"].update(change)
        pm = PlansManager(custom)
        problem = lp.crop_route_problem(pm, pm.get_configuration("3d_fullres"))
        assert problem is not None and words in problem, (change, problem)
    # in a bank: every variant goes the full route, with the reason (no resampling here, so order 2 is harmless)
    custom = copy.deepcopy(plans)
    custom["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"]["order"] = 2
    made = {"case001": [_lesion_variants(world, "case001")[0]]}
    variants, _ = _build_bank(world, monkeypatch, made, plans=custom)[0]
    assert variants["case001_lefusion000"]["route"] == "full"
    assert "non-default data resampling" in variants["case001_lefusion000"]["route_reason"]
    variants, _ = _build_bank(world, monkeypatch, made, crop_route=False)[0]
    assert variants["case001_lefusion000"]["route"] == "full"
    assert variants["case001_lefusion000"]["route_reason"] == "crop route switched off"


def test_local_nonzero_mask_is_nnunets_or_defers():
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    rng = np.random.default_rng(3)
    decided = 0
    for trial in range(40):
        vol = (rng.random((30, 30, 30)) > (0.05 if trial % 2 else 0.2)).astype(np.float32)  # isolated zeros
        vol[:, :, :2] = 0  # a zero border region connected to the case's edge
        full = create_nonzero_mask(vol[None])
        lo = rng.integers(0, 20, 3)
        block = [(int(a), int(a) + 10) for a in lo]
        box = [(a + 2, b - 2) for a, b in block]
        open_faces = [(k, side) for k, (a, b) in enumerate(block) for side, inside in ((0, a > 0), (-1, b < 30))
                      if inside]
        inner = tuple(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(box, block))
        mask = lp.local_nonzero_mask(vol[tuple(slice(a, b) for a, b in block)] != 0, inner, open_faces)
        if mask is not None:
            decided += 1
            np.testing.assert_array_equal(mask, full[tuple(slice(a, b) for a, b in box)])
    assert decided >= 10

