"""Tests for the procedural chest phantom (lefusion_nnunet.phantoms.chest)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lefusion_nnunet.phantoms import chest as ph
from lefusion_nnunet.data.raw_writer import dataset_name
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.phantoms.chest import TEXTURES, PhantomConfig, generate_chest_phantom, make_phantom_case

SMALL = dict(shape_zyx=(24, 48, 48), spacing_zyx=(2.5, 1.5, 1.5))


def small(**kw) -> PhantomConfig:
    return PhantomConfig(**{"num_cases": 4, "lesion_free_fraction": 0.25, **SMALL, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 cases: 1 lesion-free, 3 lesion cases (so all three textures appear)."""
    return generate_chest_phantom(tmp_path_factory.mktemp("raw"), dataset_id=777, config=small())


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / ph.MANIFEST_NAME).read_text())


def _nodule_voxels(image: np.ndarray, label: np.ndarray, center_zyx) -> np.ndarray:
    comps, _ = ndimage.label(label == 2)
    comp = comps[tuple(center_zyx)]
    assert comp > 0, "the manifest centre must lie inside its nodule"
    return image[comps == comp].astype(np.float64)


# ------------------------------------------------------------------------------------------------
def test_same_seed_is_deterministic_and_different_seed_differs(tmp_path):
    cfg = small(num_cases=2)
    a, b = make_phantom_case(cfg, 1), make_phantom_case(cfg, 1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.nodules == b.nodules
    c = make_phantom_case(small(num_cases=2, seed=1), 1)
    assert not np.array_equal(a.image, c.image)

    # files are byte-identical too (no timestamps in the compressed streams)
    f1 = generate_chest_phantom(tmp_path / "r1", config=cfg)
    f2 = generate_chest_phantom(tmp_path / "r2", config=cfg)
    files = sorted(p.relative_to(f1) for p in f1.rglob("*") if p.is_file())
    assert len(files) == 2 * 2 + 2
    for rel in files:
        assert (f1 / rel).read_bytes() == (f2 / rel).read_bytes(), rel
    # and what was written is what make_phantom_case returns
    np.testing.assert_array_equal(_read(f1 / "imagesTr" / "phantom_001_0000.nii.gz"), a.image)
    np.testing.assert_array_equal(_read(f1 / "labelsTr" / "phantom_001.nii.gz"), a.label)


def test_dataset_json_and_label_values(dataset):
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "lung": 1, "nodule": 2}
    assert dj["numTraining"] == 4
    assert dj["file_ending"] == ".nii.gz"
    assert dj["description"]
    assert dj["lefusion_phantom"] == small().to_dict()
    assert PhantomConfig.from_dict(dj["lefusion_phantom"]) == small()
    seen = set()
    for f in sorted((dataset / "labelsTr").iterdir()):
        seen |= set(np.unique(_read(f)).tolist())
    assert seen == {0, 1, 2}
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [f"phantom_{i:03d}_0000.nii.gz" for i in range(4)]


def test_lesion_free_cases_have_no_nodule_label(dataset):
    m = _manifest(dataset)
    kinds = [c["has_lesion"] for c in m["cases"]]
    assert kinds.count(False) == 1 and kinds.count(True) == 3
    for c in m["cases"]:
        lab = _read(dataset / c["label"])
        assert (lab == 1).sum() > 1000, "every case has lungs"
        if c["has_lesion"]:
            assert 1 <= len(c["nodules"]) <= 2
            assert (lab == 2).any()
            comps, n = ndimage.label(lab == 2)
            assert n == len(c["nodules"]), "nodules must not touch each other"
        else:
            assert c["nodules"] == [] and not (lab == 2).any()
    # with two cases there is always one of each kind, whatever the fraction
    for frac in (0.0, 1.0):
        assert PhantomConfig(num_cases=2, lesion_free_fraction=frac).num_lesion_free == 1


def test_nodules_lie_inside_lung_and_body(dataset):
    for c in _manifest(dataset)["cases"]:
        if not c["has_lesion"]:
            continue
        img, lab = _read(dataset / c["image"]), _read(dataset / c["label"])
        nod = lab == 2
        # the nodule is enclosed by lung: its 1-voxel shell holds only lung or nodule labels
        shell = ndimage.binary_dilation(nod, iterations=1) & ~nod
        assert shell.any() and np.all(lab[shell] > 0)
        # body = everything denser than air plus the holes it encloses in each axial slice
        in_plane = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)
        body = ndimage.binary_fill_holes(img > -500, structure=in_plane)
        assert body[nod].all()
        assert not body[:, 0, :].any() and not body[:, :, 0].any(), "air must surround the body"
        # nodules stay off the volume border
        assert not (nod[0].any() or nod[-1].any() or nod[:, 0].any() or nod[:, -1].any())


def test_textures_are_distinct(dataset):
    m = _manifest(dataset)
    stats: dict[str, list] = {t: [] for t in TEXTURES}
    for c in m["cases"]:
        if not c["has_lesion"]:
            continue
        img, lab = _read(dataset / c["image"]), _read(dataset / c["label"])
        for n in c["nodules"]:
            v = _nodule_voxels(img, lab, n["center_zyx"])
            assert v.size == n["num_voxels"]
            assert n["mean_hu"] == pytest.approx(v.mean(), abs=1e-2)
            hist = np.histogram(np.clip(v, -1000, 400), bins=16, range=(-1000, 400))[0] / v.size
            stats[n["texture"]].append((v, hist))
    assert all(stats[t] for t in TEXTURES), "all three textures must appear with >= 3 lesion cases"
    mean = {t: np.mean([v.mean() for v, _ in stats[t]]) for t in TEXTURES}
    assert -720 < mean["ground_glass"] < -500
    assert -150 < mean["solid"] < 100
    assert mean["ground_glass"] + 20 < mean["part_solid"] < mean["solid"] - 300
    for v, hist in stats["part_solid"]:      # bimodal: solid core and ground-glass rim
        assert (v > -200).sum() >= 3 and (v < -400).sum() >= 3
        assert hist[9:].sum() > 0.03          # mass above -212.5 HU
    for v, hist in stats["ground_glass"]:
        assert hist[9:].sum() < 0.01 and np.median(v) < -500
    for v, hist in stats["solid"]:
        assert np.median(v) > -100 and hist[:5].sum() < 0.25


def test_geometry_read_back(dataset):
    img = sitk.ReadImage(str(dataset / "imagesTr" / "phantom_000_0000.nii.gz"))
    lab = sitk.ReadImage(str(dataset / "labelsTr" / "phantom_000.nii.gz"))
    for im in (img, lab):
        assert im.GetSize() == (48, 48, 24)                                  # SimpleITK: (x, y, z)
        assert im.GetSpacing() == pytest.approx((1.5, 1.5, 2.5))             # (x, y, z)
        assert im.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        assert any(abs(o) > 1 for o in im.GetOrigin())
    assert img.GetOrigin() == lab.GetOrigin()
    assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == (24, 48, 48)
    assert arr.min() >= -1024 and arr[:, 0, 0].mean() == pytest.approx(-1000, abs=25)   # air corner


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_other_file_endings(tmp_path, ending):
    folder = generate_chest_phantom(tmp_path, config=small(num_cases=2, file_ending=ending))
    assert json.loads((folder / "dataset.json").read_text())["file_ending"] == ending
    files = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert files == [f"phantom_000_0000{ending}", f"phantom_001_0000{ending}"]
    im = sitk.ReadImage(str(folder / "imagesTr" / files[0]))
    assert im.GetSpacing() == pytest.approx((1.5, 1.5, 2.5))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(im), make_phantom_case(small(num_cases=2), 0).image)


def test_overwrite_refusal_and_atomic_replace(tmp_path):
    cfg = small(num_cases=2)
    folder = generate_chest_phantom(tmp_path, config=cfg)
    before = (folder / "imagesTr" / "phantom_000_0000.nii.gz").read_bytes()
    with pytest.raises(LeFusionInputError, match="already exists"):
        generate_chest_phantom(tmp_path, config=small(num_cases=2, seed=5))
    assert (folder / "imagesTr" / "phantom_000_0000.nii.gz").read_bytes() == before
    # another name with the same id would confuse nnU-Net
    with pytest.raises(LeFusionInputError, match="dataset id"):
        generate_chest_phantom(tmp_path, name="Other", config=cfg)
    again = generate_chest_phantom(tmp_path, config=small(num_cases=2, seed=5), overwrite=True)
    assert again == folder
    assert (folder / "imagesTr" / "phantom_000_0000.nii.gz").read_bytes() != before
    assert _manifest(folder)["config"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name], "no partial or old folders left"


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sitk.WriteImage

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("Exception thrown in SimpleITK WriteImage: disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", flaky)
    with pytest.raises(LeFusionInputError, match="could not write"):
        generate_chest_phantom(tmp_path, config=small(num_cases=2))
    assert list(tmp_path.iterdir()) == []


def test_config_validation_and_round_trip():
    d = PhantomConfig().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert PhantomConfig.from_dict(json.loads(json.dumps(d))) == PhantomConfig()
    for bad in (dict(file_ending=".png"), dict(num_cases=0), dict(shape_zyx=(8, 96, 96)),
                dict(spacing_zyx=(2.5, 0.0, 0.9)), dict(nodules_per_case=(2, 1)), dict(lesion_free_fraction=1.5),
                dict(nodule_diameter_mm=(20.0, 8.0)), dict(noise_hu=-1.0)):
        with pytest.raises(LeFusionInputError):
            PhantomConfig(**bad)
    with pytest.raises(LeFusionInputError):
        PhantomConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(LeFusionInputError):
        dataset_name(1000, "X")


def test_nnunet_verify_dataset_integrity_accepts_it(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset), num_processes=1)   # raises on any problem
    assert not any(p.name.startswith(".") for p in dataset.parent.iterdir()), os.listdir(dataset.parent)
