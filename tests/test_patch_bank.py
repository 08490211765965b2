"""The patch bank of LeFusionTrainer: each variant is stored as the patch of nnU-Net's preprocessed case it changes.

A tiny CT-like dataset of mixed spacings (so nnU-Net resamples every case with its cubic spline) is planned and
preprocessed once by nnU-Net itself; a fake ``make_variants`` paints a lesion in lesion-free cases. The patched
case is compared with the old route: the native variant written as NIfTI files and run through nnU-Net's
``run_case``. The bank's default crop route (only the lesion's neighbourhood preprocessed; separate-z, no
resampling, z-score and fallbacks: tests/test_local_preprocessing.py) gives the segmentation exactly and the image
within :func:`assert_close_to_nnunet`'s tolerance; the full route (``crop_route=False``) is bit for bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import plan_and_preprocess_template, use_template_copy

import lefusion_nnunet.variants as variants_mod
from lefusion_nnunet.integration import bank as bank_mod
from lefusion_nnunet.integration.swap_dataset import PatchedArray, SyntheticSwapDataset, load_patch

DATASET_ID = 986
DATASET = f"Dataset{DATASET_ID:03d}_LFPatch"
SHAPE = (28, 40, 40)  # z, y x
FREE = ("case002", "case003", "case004", "case005")


def assert_close_to_nnunet(ours: np.ndarray, ref: np.ndarray) -> float:
    """The crop route's image tolerance: 2 float32 ulps of the value + 1e-7 (normalised units).

    The crop route stores float32(stored source + resampled change), nnU-Net float32(resampled variant): one
    extra rounding (1 ulp). The order-3 prefilter evaluated on a window misses 0.268 ** 16 ~ 7e-10 of the change,
    and the outputs it does not recompute change by < 0.268 ** 14 ~ 1e-8 of it (changes here < 10 units).
    Returns the largest difference seen.
    """
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    diff = np.abs(ours.astype(np.float64) - ref)
    assert (diff <= 2 * np.spacing(np.abs(ref)) + 1e-7).all(), diff.max()
    return float(diff.max())


def _write_raw(raw_root: Path) -> None:
    """6 cases: body 40 HU, lung (label 1) -850 HU, nodule (label 2) in case000/001; spacings alternate."""
    folder = raw_root / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    for i in range(6):
        rng = np.random.default_rng(i)
        img = np.full(SHAPE, -1000.0)
        lab = np.zeros(SHAPE, np.uint8)
        img[((yy - 20) / 17.0) ** 2 + ((xx - 20) / 17.0) ** 2 <= 1] = 40
        lung = (((yy - 20) / 13.0) ** 2 + ((xx - 20) / 13.0) ** 2 <= 1) & (zz >= 3) & (zz < 25)
        img[lung], lab[lung] = -850, 1
        if i < 2:
            nodule = (zz - 14) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 9
            img[nodule], lab[nodule] = 30, 2
        img = (img + rng.normal(0, 20, SHAPE)).astype(np.int16)
        spacing = (1.5, 1.5, 2.0) if i % 2 else (0.9, 0.9, 1.2)
        for arr, path in ((img, folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"),
                          (lab, folder / "labelsTr" / f"case{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(spacing)
            im.SetOrigin((10.0, -5.0, 3.0))
            sitk.WriteImage(im, str(path), True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1, "nodule": 2}, "numTraining": 6,
        "file_ending": ".nii.gz"}))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return plan_and_preprocess_template(tmp_path_factory.mktemp("lefusion_patch"), _write_raw, DATASET_ID)


def _fake_make_variants(made: list):
    """A lesion (label 2, 30 HU) of radius 2.5 voxels at a k-dependent place in the lung; keeps the cases."""
    from lefusion_nnunet.data.io import read_image, read_label

    def fake(synth, dataset, case_ids, settings, done=()):
        for cid in (c for c in case_ids if c not in done):
            files = dataset.case(cid)
            image = read_image(files.images)
            label, label_props = read_label(files.label)
            zz, yy, xx = np.meshgrid(*(np.arange(s) for s in label.shape), indexing="ij")
            out = []
            for k in range(settings.per_case):
                ball = (zz - 12 - 2 * k) ** 2 + (yy - 18) ** 2 + (xx - 16 - 3 * k) ** 2 <= 6.25
                channels = [c.copy() for c in image.array]
                channels[0][ball] = 30.4 + k  # not an integer: the int16 cast of the NIfTI writer matters
                lab = label.copy()
                lab[ball] = 2
                case = variants_mod.SyntheticCase(f"{cid}_lefusion{k:03d}", cid, channels, lab, {"k": k},
                                                  reference=image, label_properties=label_props)
                made.append(case)
                out.append(case)
            yield out, []
    return fake


@pytest.fixture
def world(template, tmp_path, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    use_template_copy(template, tmp_path, monkeypatch)
    made: list = []
    monkeypatch.setattr(bank_mod, "make_variants", _fake_make_variants(made))
    pre = tmp_path / "nnUNet_preprocessed" / DATASET
    pm = PlansManager(str(pre / "nnUNetPlans.json"))
    return dict(root=tmp_path, pre=pre, data=pre / "nnUNetPlans_3d_fullres", made=made, plans=pm,
                cm=pm.get_configuration("3d_fullres"), dataset_json=load_json(str(pre / "dataset.json")))


def _spec(case_ids=FREE) -> bank_mod.BankSpec:
    return bank_mod.BankSpec(checkpoint_sha256="a" * 64, variants=variants_mod.VariantSettings().to_dict(), fold="0",
                             configuration="3d_fullres", plans_name="nnUNetPlans",
                             data_identifier="nnUNetPlans_3d_fullres", plans_sha256="b" * 64, lesion_labels=(2,),
                             case_ids=tuple(case_ids))


def _build(world, case_ids=FREE, crop_route=True):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from lefusion_nnunet.data.dataset import load_raw_dataset

    def build(folder):
        return bank_mod.build_bank_contents(
            folder, synthesizer_factory=lambda: object(), raw_dataset=load_raw_dataset(DATASET),
            case_ids=list(case_ids), variant_settings=variants_mod.VariantSettings(per_case=2),
            plans_manager=world["plans"], configuration_manager=world["cm"], dataset_json=world["dataset_json"],
            dataset_class=nnUNetDatasetBlosc2, log=lambda m: None,  # default folder: $nnUNet_preprocessed
            crop_route=crop_route)
    root = world["pre"] / (bank_mod.BANK_FOLDER + ("" if crop_route else "_full"))
    return bank_mod.ensure_bank(_spec(case_ids), root, build, log=lambda m: None)


def _file_route(world, case, tmp: Path):
    """The old route: the native variant written as NIfTI files, then nnU-Net's ``run_case``."""
    from lefusion_nnunet.data.io import write_image_channel, write_label

    images = []
    for c, channel in enumerate(case.channels):
        images.append(str(tmp / f"{case.case_id}_{c:04d}.nii.gz"))
        write_image_channel(channel, images[-1], case.reference, c)
    seg_file = str(tmp / f"{case.case_id}.nii.gz")
    write_label(case.label, seg_file, case.label_properties)
    prep = world["cm"].preprocessor_class(verbose=False)
    data, seg, props = prep.run_case(images, seg_file, world["plans"], world["cm"], world["dataset_json"])
    return data.astype(np.float32), seg.astype(np.int16), props


def _swap(world, bank):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    return SyntheticSwapDataset(nnUNetDatasetBlosc2(str(world["data"]), list(FREE)), bank, 1.0)


@pytest.mark.parametrize("crop_route", [True, False], ids=["crop", "full"])
def test_patched_case_equals_nnunet_preprocessing_of_the_full_variant(world, tmp_path, crop_route):
    bank = _build(world, crop_route=crop_route)
    assert bank.built and bank.num_variants == 8 and bank.warnings == []
    assert {e["route"] for e in bank.manifest["variants"].values()} == {"crop" if crop_route else "full"}
    swap = _swap(world, bank)
    assert world["cm"].spacing != [2.0, 1.5, 1.5] and world["cm"].spacing != [1.2, 0.9, 0.9]  # all resampled
    worst = 0.0
    for case in world["made"]:
        data, seg, _, props = swap.load_variant(case.case_id)
        assert isinstance(data, PatchedArray) and isinstance(seg, PatchedArray)
        ref_data, ref_seg, ref_props = _file_route(world, case, tmp_path)
        if crop_route:
            worst = max(worst, assert_close_to_nnunet(np.asarray(data), ref_data))
        else:
            np.testing.assert_array_equal(np.asarray(data), ref_data)  # exact: no tolerance
        np.testing.assert_array_equal(np.asarray(seg), ref_seg)  # exact in both routes
        assert np.asarray(seg).dtype == np.int16 and np.asarray(data).dtype == np.float32
        # oversampling sees the lesion: exactly nnU-Net's locations of label 2, all inside the patch
        ours = {tuple(v) for v in np.asarray(props["class_locations"][2])}
        assert ours == {tuple(v) for v in np.asarray(ref_props["class_locations"][2])} and len(ours) > 0
        assert all(ref_seg[tuple(v)] == 1 for v in np.asarray(props["class_locations"][1]))
        assert props["lefusion_source_case"] == case.source_case
    assert worst < 1e-6


def test_outside_the_patch_bit_identical_to_the_stored_source_and_crops_agree(world):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    bank = _build(world)
    swap = _swap(world, bank)
    rng = np.random.default_rng(0)
    for vid, source in ((v, s) for s, vs in bank.variants_by_source.items() for v in vs):
        src_data, src_seg, _, _ = swap.real.load_case(source)
        data, seg, _, _ = swap.load_variant(vid)
        patch = load_patch(bank.folder / f"{vid}.npz")
        inside = np.zeros(data.shape[1:], bool)
        inside[tuple(slice(int(a), int(b)) for a, b in patch.bbox)] = True
        full, full_src = np.asarray(data), np.asarray(src_data[:])
        assert full[:, ~inside].tobytes() == full_src[:, ~inside].tobytes()
        assert np.asarray(seg)[:, ~inside].tobytes() == np.asarray(src_seg[:])[:, ~inside].tobytes()
        assert bank.manifest["variants"][vid]["bbox"] == patch.bbox.tolist()
        for _ in range(20):  # the data loader's crops (overlapping the case, maybe padded) read the full case's
            lo = [int(rng.integers(-8, s)) for s in data.shape[1:]]
            box = [[a, max(a + int(rng.integers(1, 24)), 1)] for a in lo]
            np.testing.assert_array_equal(crop_and_pad_nd(data, box, 0), crop_and_pad_nd(full, box, 0))
            np.testing.assert_array_equal(crop_and_pad_nd(seg, box, -1, cast_cropped_to=np.int16),
                                          crop_and_pad_nd(np.asarray(seg), box, -1, cast_cropped_to=np.int16))
        assert np.array_equal(data[0, 3], full[0, 3]) and np.array_equal(data[:, ::2, 1:5], full[:, ::2, 1:5])


def test_storage_per_variant_is_bounded_by_the_lesion_not_the_case(world):
    """The patch spans the lesion plus the reach of nnU-Net's cubic spline resampling (its prefilter decays by
    0.27 per source voxel: below float32 resolution after ~14 of them, here < 24 target voxels), whatever the case's size. On these tiny cases that
    is a good part of the case; on clinical sizes a small fraction (the case without resampling, a few voxels:
    tests/test_nnunet_trainer.py)."""
    bank = _build(world)
    assert sorted(str(p.relative_to(bank.folder)) for p in bank.folder.rglob("*") if p.is_file()) == sorted(
        [f"{v}.npz" for v in bank.manifest["variants"]] + ["bank.json"] + [f"cases/{c}.json" for c in FREE])
    for vid, entry in bank.manifest["variants"].items():
        source = entry["source_case"]
        case_bytes = sum(os.path.getsize(world["data"] / f"{source}{s}") for s in (".b2nd", "_seg.b2nd", ".pkl"))
        patch = load_patch(bank.folder / f"{vid}.npz")
        assert os.path.getsize(bank.folder / f"{vid}.npz") == entry["patch_bytes"] < 0.5 * case_bytes
        lesion = np.argwhere(patch.seg[0] == 2) + patch.bbox[:, 0]
        assert len(lesion) > 0
        assert (patch.bbox[:, 0] >= lesion.min(0) - 24).all() and (patch.bbox[:, 1] <= lesion.max(0) + 25).all()


def test_old_full_case_bank_is_ignored_and_rebuilt(world):
    spec = _spec()
    old = world["pre"] / bank_mod.BANK_FOLDER / spec.key
    old.mkdir(parents=True)
    for v in ("case002_lefusion000", "case002_lefusion001"):  # a format-1 bank: full preprocessed cases
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (old / f"{v}{suffix}").write_bytes(b"old")
    (old / "bank.json").write_text(json.dumps({
        "format": bank_mod.FORMAT, "format_version": 1, "key": spec.key, "spec": spec.to_dict(),
        "variants": {"case002_lefusion000": {"source_case": "case002"},
                     "case002_lefusion001": {"source_case": "case002"}}, "warnings": []}))
    assert bank_mod.SyntheticBank.load(old, spec.key) is None
    bank = _build(world)
    assert bank.built and bank.folder == old and bank.num_variants == 8
    assert not list(old.glob("*.b2nd")) and json.loads((old / "bank.json").read_text())["format_version"] == bank_mod.FORMAT_VERSION
    assert not _build(world).built  # and reused from then on
