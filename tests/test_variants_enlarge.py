"""Synthetic variants and offline dataset enlargement, with a fake synthesizer (and two slow real checks)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import block_edit
from scipy import ndimage

from lefusion_nnunet.checkpoints.loaders import LoadedCheckpoint
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.mask_library import MaskLibrary
from lefusion_nnunet.data.raw_writer import derived_dataset_name
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.enlargement.run import EnlargeSummary, enlarge
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.synthesis.lesion import LesionSynthesizer
from lefusion_nnunet.variant_settings import VariantSettings
from lefusion_nnunet.variants import make_variants, variant_chunks

SPACING_ZYX = (2.5, 0.8, 0.9)
SHAPE_ZYX = (14, 40, 36)
# a rotation about z by 30 degrees followed by a flip of y: non-identity, orthonormal
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = (_C, -_S, 0.0, -_S, -_C, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (-12.5, 30.0, 101.25)


# ------------------------------------------------------------------------------------------------------------
# a tiny chest-like dataset: body (40 HU) in air, two lungs (label 1, -850 HU), nodules (label 2) in some cases
def _write(arr: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_ZYX[::-1])
    img.SetDirection(DIRECTION)
    img.SetOrigin(ORIGIN)
    sitk.WriteImage(img, str(path), useCompression=True)


def make_toy_dataset(raw_root: Path, dataset_id: int = 601, name: str = "Toy", n_cases: int = 7,
                     lesion_cases: tuple[int, ...] = (0, 3), seed: int = 0) -> Path:
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(SHAPE_ZYX).astype(np.float32)
    for i in range(n_cases):
        body = ((yy - 20) / 18.0) ** 2 + ((xx - 18) / 16.5) ** 2 <= 1
        label = np.zeros(SHAPE_ZYX, np.uint8)
        for cx in (10.5, 25.5):
            lung = ((zz - 7) / 6.0) ** 2 + ((yy - 20 + rng.uniform(-1, 1)) / 12.0) ** 2 + ((xx - cx) / 6.0) ** 2 <= 1
            label[lung] = 1
        ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, SHAPE_ZYX)
        ct[label == 1] = -850.0 + rng.normal(0, 20, int((label == 1).sum()))
        if i in lesion_cases:
            nod = ((zz - 7) / 1.6) ** 2 + ((yy - 18) / 4.0) ** 2 + ((xx - 10.5) / 3.5) ** 2 <= 1
            label[nod] = 2
            ct[nod] = 20.0
        second = (ct * 0.5 + 7.25).astype(np.float32)          # another channel that must stay unchanged
        _write(np.round(ct).astype(np.int16), folder / "imagesTr" / f"toy_{i:03d}_0000.nii.gz")
        _write(second, folder / "imagesTr" / f"toy_{i:03d}_0001.nii.gz")
        _write(label, folder / "labelsTr" / f"toy_{i:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "aux"}, "labels": {"background": 0, "lung": 1, "nodule": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz", "name": name}, indent=2))
    return folder


def toy_data_config(name: str = "Dataset601_Toy") -> DataConfig:
    return DataConfig(dataset_name=name, lesion_labels=(2,), label_names=("nodule",), region_label=1, channel=0,
                      modality="CT", roi=RoiGeometry((8, 32, 32), SPACING_ZYX), intensity=IntensitySpace())


class FakeSynth:
    """Same attributes and methods as LesionSynthesizer; fills the lesion with seeded noise around 20 HU."""

    def __init__(self, data: DataConfig, batch_size: int = 2, fail_on_call: int | None = None):
        self.checkpoint = SimpleNamespace(data=data, file_sha256="ab" * 32, path=Path("/nowhere/fake.pt"))
        self.batch_size, self.device, self.guidance_scale, self.sampler_config = batch_size, "cpu", 1.0, None
        self.fail_on_call, self.calls, self.requests = fail_on_call, 0, 0

    def texture_condition(self, specs, rng):
        h = rng.random(16 * self.checkpoint.data.num_classes)
        return (h / h.sum()).astype(np.float32)

    def synthesize_edits(self, requests, generator=None, rng=None, progress=False):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("simulated crash")
        assert isinstance(generator, list) and len(generator) == len(requests)
        self.requests += len(requests)
        return [block_edit(r, lambda n, g=g: 20.0 + 40.0 * torch.rand(n, generator=g).numpy())
                for r, g in zip(requests, generator)]


@pytest.fixture
def env(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    src = make_toy_dataset(raw)
    return SimpleNamespace(raw=raw, src=src, tmp=tmp_path)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sitk(path: Path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


# ------------------------------------------------------------------------------------------------------------
def test_settings_roundtrip_and_validation():
    s = VariantSettings(per_case=3, mask_source="real", size_mm=(5, 9), region_label=1, textures=("2=cluster:1",),
                        boundary=0.7, sampler={"num_steps": 5}, guidance_scale=2.0, seed=9)
    d = json.loads(json.dumps(s.to_dict()))
    assert VariantSettings.from_dict(d) == s
    for bad in (dict(per_case=0), dict(mask_source="gan"), dict(size_mm=(9, 5)), dict(boundary=2.0),
                dict(center_mm=(1.0, 2.0)), dict(center_mm=(1.0, 2.0, float("nan"))),
                dict(textures=("clusters",)), dict(sampler={"steps": 3}), dict(guidance_scale=-1)):
        with pytest.raises(LeFusionInputError):
            VariantSettings(**bad)


def test_destination_names():
    assert derived_dataset_name(502, "Dataset501_Chest") == "Dataset502_ChestLeFusion"
    assert derived_dataset_name("Dataset777_Mine", "Dataset501_Chest") == "Dataset777_Mine"
    with pytest.raises(LeFusionInputError):
        derived_dataset_name("Data502", "Dataset501_Chest")


def test_variants_stay_in_region_and_change_only_the_lesion(env):
    ds = load_raw_dataset(601)
    synth = FakeSynth(toy_data_config())
    settings = VariantSettings(per_case=2, size_mm=(4.0, 7.0), boundary=0.5, seed=3)
    ids = ["toy_001", "toy_002", "toy_003"]
    chunks = list(make_variants(synth, ds, ids, settings))
    assert len(chunks) == len(variant_chunks(ids, 2, synth.batch_size)) == 3
    cases = [c for cs, _ in chunks for c in cs]
    assert sorted(c.case_id for c in cases) == sorted(f"{i}_lefusion{k:03d}" for i in ids for k in range(2))
    for case in cases:
        src = ds.case(case.source_case)
        _, ct = _sitk(src.images[0])
        _, aux = _sitk(src.images[1])
        _, lab = _sitk(src.label)
        lesion = (case.label == 2) & (lab != 2)
        assert lesion.any()
        # every lesion voxel inside the lung, none on or next to an existing nodule
        assert (lab[lesion] == 1).all()
        assert not (lesion & ndimage.binary_dilation(lab == 2, structure=np.ones((3, 3, 3)))).any()
        # only the model channel changed, and only inside the lesion; label = source + lesion
        assert np.array_equal(case.channels[0][~lesion], ct[~lesion].astype(np.float32))
        assert not np.array_equal(case.channels[0][lesion], ct[lesion].astype(np.float32))
        assert np.array_equal(case.channels[1], aux)
        assert np.array_equal(case.label[~lesion], lab[~lesion])
        # stored sparsely: the box holds every change, and reading a box equals cutting the whole arrays
        inside = np.zeros(lab.shape, bool)
        inside[tuple(slice(int(a), int(b)) for a, b in case.box)] = True
        assert inside.sum() < inside.size / 4 and not (lesion & ~inside).any()
        box = np.array([[0, lab.shape[0]], [2, 9], [case.box[2, 0] - 3, case.box[2, 1]]])  # partly outside it
        cut = tuple(slice(int(a), int(b)) for a, b in box)
        assert np.array_equal(case.channel_in(0, box), case.channels[0][cut])
        assert np.array_equal(case.label_in(box), case.label[cut]) and case.channel(1) is case.channel(1)
        p = case.provenance
        assert p["source_case"] == case.source_case and p["voxels"] == int(lesion.sum())
        assert abs(p["volume_mm3"] - lesion.sum() * np.prod(SPACING_ZYX)) < 1e-3
        assert 3.0 <= p["diameter_mm"] <= 8.0 and len(p["texture_histogram"]) == 16
        assert p["checkpoint_sha256"] == "ab" * 32 and len(p["center_world_xyz_mm"]) == 3
    # same seed -> same variants; another seed -> others
    again = [c for cs, _ in make_variants(FakeSynth(toy_data_config()), ds, ids, settings) for c in cs]
    for a, b in zip(cases, again):
        assert np.array_equal(a.channels[0], b.channels[0]) and np.array_equal(a.label, b.label)
    other = [c for cs, _ in make_variants(FakeSynth(toy_data_config()), ds, ids[:1],
                                          VariantSettings(per_case=2, size_mm=(4.0, 7.0), seed=4)) for c in cs]
    assert not np.array_equal(other[0].label, cases[0].label)
    # a resumed run (cases done) yields an empty chunk and leaves the others unchanged
    part = list(make_variants(FakeSynth(toy_data_config()), ds, ids, settings, done={"toy_001"}))
    assert part[0] == ([], []) and np.array_equal(part[1][0][0].channels[0], chunks[1][0][0].channels[0])


def test_real_masks_and_skips(env):
    ds = load_raw_dataset(601)
    lib = MaskLibrary.from_dataset(ds, [2])
    assert len(lib) == 2 and {e.case_id for e in lib.entries} == {"toy_000", "toy_003"}
    synth = FakeSynth(toy_data_config())
    cases = [c for cs, _ in make_variants(synth, ds, ["toy_004"], VariantSettings(per_case=2, mask_source="real",
                                                                                size_mm=(4, 6))) for c in cs]
    assert len(cases) == 2 and all(c.provenance["mask"]["case"] in ("toy_000", "toy_003") for c in cases)
    # region masks too small for any lesion: every variant is skipped with a reason, nothing synthesised
    rdir = env.tmp / "regions"
    rdir.mkdir()
    tiny = np.zeros(SHAPE_ZYX, np.uint8)
    tiny[6:8, 20:22, 10:12] = 1
    _write(tiny, rdir / "toy_005.nii.gz")
    out = list(make_variants(synth, ds, ["toy_005"], VariantSettings(per_case=2, size_mm=(6, 7),
                                                                     region_masks_dir=str(rdir))))
    assert out[0][0] == [] and len(out[0][1]) == 2
    assert all(w.skipped and w.reason == "no valid position inside the allowed region" for w in out[0][1])
    with pytest.raises(LeFusionInputError, match="missing"):
        list(make_variants(synth, ds, ["toy_006"], VariantSettings(region_masks_dir=str(rdir))))
    # lesions larger than the ROI are reduced (warning) rather than failing
    body = FakeSynth(dataclasses.replace(toy_data_config(), region_label=None))   # region: the body
    big = [x for x in make_variants(body, ds, ["toy_006"], VariantSettings(per_case=1, size_mm=(40, 40)))]
    assert big[0][0] and any("reduced" in w for w in big[0][1])
    assert big[0][0][0].provenance["diameter_capped"] is True


def test_enlarge_writes_an_nnunet_dataset(env):
    before = _hashes(env.src)
    synth = FakeSynth(toy_data_config())
    summary = enlarge(601, 602, settings=VariantSettings(per_case=2, size_mm=(4, 7), seed=1), synthesizer=synth,
                      progress=False)
    assert isinstance(summary, EnlargeSummary)
    dst = env.raw / "Dataset602_ToyLeFusion"
    assert summary.destination == dst and summary.cases_written == 10 and summary.source_cases == 5
    assert "Dataset602_ToyLeFusion" in summary.format() and summary.seconds_per_lesion is not None
    assert _hashes(env.src) == before                                  # the source is never written
    assert not any(p.name.startswith(".") for p in env.raw.iterdir())  # no partial folder left
    dj = json.loads((dst / "dataset.json").read_text())
    assert dj["numTraining"] == 17 and dj["file_ending"] == ".nii.gz"
    assert dj["labels"] == {"background": 0, "lung": 1, "nodule": 2} and dj["channel_names"] == {"0": "CT", "1": "aux"}
    assert dj["dataset"]["toy_000"]["label"] == "../Dataset601_Toy/labelsTr/toy_000.nii.gz"
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    files = get_filenames_of_train_images_and_targets(str(dst), dj)
    assert len(files) == 17 and all(os.path.isfile(f) for v in files.values() for f in v["images"] + [v["label"]])
    prov = json.loads((dst / "lefusion_provenance.json").read_text())
    assert prov["checkpoint"]["sha256"] == "ab" * 32 and prov["settings"]["seed"] == 1
    assert set(prov["synthetic_cases"]) == {f"toy_{i:03d}_lefusion{k:03d}" for i in (1, 2, 4, 5, 6) for k in (0, 1)}
    splits = json.loads((dst / "splits_final.json").read_text())
    assert len(splits) == 5
    for s, p in prov["synthetic_cases"].items():
        assert not any(s in f["val"] for f in splits)
        assert [s in f["train"] for f in splits] == [p["source_case"] in f["train"] for f in splits]
    assert (dst / "lefusion_montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # synthetic files: the source's geometry and pixel types; only lesion voxels of channel 0 differ
    for s, p in prov["synthetic_cases"].items():
        src_ct, src_ct_arr = _sitk(env.src / "imagesTr" / f"{p['source_case']}_0000.nii.gz")
        new_ct, new_ct_arr = _sitk(dst / "imagesTr" / f"{s}_0000.nii.gz")
        src_lab, src_lab_arr = _sitk(env.src / "labelsTr" / f"{p['source_case']}.nii.gz")
        new_lab, new_lab_arr = _sitk(dst / "labelsTr" / f"{s}.nii.gz")
        for a, b in ((src_ct, new_ct), (src_lab, new_lab)):
            assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            assert a.GetDirection() == b.GetDirection() and a.GetSize() == b.GetSize()
            assert a.GetPixelID() == b.GetPixelID()
        lesion = new_lab_arr != src_lab_arr
        assert lesion.sum() == p["voxels"] and (new_lab_arr[lesion] == 2).all() and (src_lab_arr[lesion] == 1).all()
        assert np.array_equal(new_ct_arr[~lesion], src_ct_arr[~lesion])
        assert (dst / "imagesTr" / f"{s}_0001.nii.gz").read_bytes() == \
            (env.src / "imagesTr" / f"{p['source_case']}_0001.nii.gz").read_bytes()


def test_enlarge_refuses_existing_or_clashing_destinations(env):
    dst = env.raw / "Dataset602_ToyLeFusion"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    synth = FakeSynth(toy_data_config())
    with pytest.raises(LeFusionInputError, match="already exists"):
        enlarge(601, 602, synthesizer=synth, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert synth.calls == 0
    with pytest.raises(LeFusionInputError, match="same dataset id"):
        enlarge(601, "Dataset601_Other", synthesizer=synth, progress=False)
    (env.raw / "Dataset603_Else").mkdir()
    with pytest.raises(LeFusionInputError, match="already used"):
        enlarge(601, 603, synthesizer=synth, progress=False)
    with pytest.raises(LeFusionInputError, match="cases-from"):
        enlarge(601, 604, cases_from="some", synthesizer=synth, progress=False)
    summary = enlarge(601, 602, settings=VariantSettings(per_case=1, size_mm=(4, 5)), synthesizer=synth,
                      overwrite=True, progress=False)
    assert summary.cases_written == 5 and not (dst / "keep.txt").exists()


def test_interrupted_run_resumes_byte_identical(env):
    settings = VariantSettings(per_case=2, size_mm=(4, 7), seed=5)
    dst = env.raw / "Dataset602_ToyLeFusion"
    enlarge(601, 602, settings=settings, synthesizer=FakeSynth(toy_data_config()), progress=False)
    reference = _hashes(dst)
    shutil.rmtree(dst)

    crashing = FakeSynth(toy_data_config(), fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        enlarge(601, 602, settings=settings, synthesizer=crashing, progress=False)
    assert not dst.exists()
    partial = env.raw / ".Dataset602_ToyLeFusion.partial"
    assert (partial / "lefusion_progress.json").is_file()
    # resuming with other settings is refused and keeps the partial output
    with pytest.raises(LeFusionInputError, match="other settings"):
        enlarge(601, 602, settings=VariantSettings(per_case=2, size_mm=(4, 7), seed=6),
                synthesizer=FakeSynth(toy_data_config()), resume=True, progress=False)
    resumed = FakeSynth(toy_data_config())
    summary = enlarge(601, 602, settings=settings, synthesizer=resumed, resume=True, progress=False)
    assert summary.resumed_cases == 2 and resumed.requests == 6        # 2 of 5 cases were done before the crash
    assert _hashes(dst) == reference
    assert not partial.exists()


def test_resume_merges_the_journals_of_a_sharded_run(env):
    """A sharded run killed midway leaves rank 0's journal plus one per other rank; resuming (with any number
    of ranks) merges them, redoes nothing that was done and ends byte-identical to an uninterrupted run."""
    settings = VariantSettings(per_case=2, size_mm=(4, 7), seed=5)
    dst = env.raw / "Dataset602_ToyLeFusion"
    enlarge(601, 602, settings=settings, synthesizer=FakeSynth(toy_data_config()), progress=False)
    reference = _hashes(dst)
    shutil.rmtree(dst)
    with pytest.raises(RuntimeError, match="simulated crash"):
        enlarge(601, 602, settings=settings, synthesizer=FakeSynth(toy_data_config(), fail_on_call=3), progress=False)
    partial = env.raw / ".Dataset602_ToyLeFusion.partial"
    journal = json.loads((partial / "lefusion_progress.json").read_text())
    assert len(journal["completed"]) == 2
    moved = journal["completed"].pop()                    # pretend rank 1 made the second case
    written = journal["written"].pop(moved)
    rank1 = {**journal, "completed": [moved], "written": {moved: written},
             "provenance": {s: journal["provenance"].pop(s) for s in written},
             "warnings": {moved: journal["warnings"].pop(moved, [])}}
    (partial / "lefusion_progress.json").write_text(json.dumps(journal))
    (partial / "lefusion_progress.rank1.json").write_text(json.dumps(rank1))
    resumed = FakeSynth(toy_data_config())
    summary = enlarge(601, 602, settings=settings, synthesizer=resumed, resume=True, progress=False)
    assert summary.resumed_cases == 2 and resumed.requests == 6
    assert _hashes(dst) == reference                      # no rank journal left in the output either


def test_enlarge_copy_originals_and_all_cases(env):
    summary = enlarge(601, 605, settings=VariantSettings(per_case=1, size_mm=(4, 5)), cases_from="all",
                      copy_originals=True, synthesizer=FakeSynth(toy_data_config()), progress=False)
    dst = summary.destination
    dj = json.loads((dst / "dataset.json").read_text())
    assert "dataset" not in dj and dj["numTraining"] == 14 and summary.cases_written == 7
    assert (dst / "labelsTr" / "toy_000.nii.gz").read_bytes() == (env.src / "labelsTr" / "toy_000.nii.gz").read_bytes()
    # a case that already had a nodule keeps it and gets a second one elsewhere
    _, lab = _sitk(dst / "labelsTr" / "toy_000_lefusion000.nii.gz")
    assert ndimage.label(lab == 2, structure=np.ones((3, 3, 3)))[1] == 2


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_synthesizer_path(env):
    from lefusion_nnunet.data.histogram import Prototypes
    from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, NoiseSchedule, SamplerConfig, ScheduleConfig

    torch.manual_seed(0)
    model = LesionDenoiser(DenoiserConfig.from_preset("tiny")).eval()
    hist = np.full((3, 16), 1 / 16, np.float32)
    loaded = LoadedCheckpoint(
        path=Path("untrained.pt"), file_sha256="cd" * 32, data=toy_data_config(),
        prototypes=[Prototypes(hist[:1], np.array([3]))], training_histograms=hist, training_summary={},
        model=model, schedule=NoiseSchedule(ScheduleConfig(num_train_timesteps=10)))
    synth = LesionSynthesizer(loaded, device="cpu", sampler=SamplerConfig(num_steps=2), batch_size=2)
    settings = VariantSettings(per_case=1, size_mm=(4, 6), seed=2)
    summary = enlarge(601, 606, settings=settings, synthesizer=synth, progress=False)
    prov = json.loads((summary.destination / "lefusion_provenance.json").read_text())
    assert summary.cases_written == 5 and prov["synthetic_cases"]["toy_001_lefusion000"]["sampler"]["num_steps"] == 2
    for s, p in prov["synthetic_cases"].items():
        _, src = _sitk(env.src / "imagesTr" / f"{p['source_case']}_0000.nii.gz")
        _, new = _sitk(summary.destination / "imagesTr" / f"{s}_0000.nii.gz")
        _, lab = _sitk(summary.destination / "labelsTr" / f"{s}.nii.gz")
        _, src_lab = _sitk(env.src / "labelsTr" / f"{p['source_case']}.nii.gz")
        lesion = lab != src_lab
        assert lesion.any() and np.array_equal(new[~lesion], src[~lesion])
    again = enlarge(601, 607, settings=settings, synthesizer=synth, progress=False).destination
    assert _hashes(again / "imagesTr") == _hashes(summary.destination / "imagesTr")   # deterministic


@pytest.mark.slow
def test_nnunet_plan_and_preprocess_accepts_enlarged_dataset(env):
    enlarge(601, 602, settings=VariantSettings(per_case=1, size_mm=(4, 6)), synthesizer=FakeSynth(toy_data_config()),
            progress=False)
    exe = (shutil.which("nnUNetv2_plan_and_preprocess")
           or str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"))
    environ = dict(os.environ, nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1")
    cmd = [exe, "-d", "602", "--verify_dataset_integrity", "-c", "3d_fullres", "-np", "1", "-npfp", "1"]
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pre = env.tmp / "pre" / "Dataset602_ToyLeFusion"
    raw_splits = json.loads((env.raw / "Dataset602_ToyLeFusion" / "splits_final.json").read_text())
    assert json.loads((pre / "splits_final.json").read_text()) == raw_splits
    written = {p.name.split(".")[0] for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl")}
    assert len(written) == 12 and "toy_001_lefusion000" in written and "toy_000" in written
