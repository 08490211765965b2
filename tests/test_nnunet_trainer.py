"""LeFusionTrainer: settings, the synthetic bank, the swapping training dataset, and an end-to-end run.

Fast tests use a tiny nnU-Net dataset preprocessed once per session by nnU-Net itself and a fake
``make_variants`` that paints a constant lesion (the real sampler is exercised by the slow end-to-end test).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import NNUNET_ENV, plan_and_preprocess_template, use_template_copy

import lefusion_nnunet.variants as variants_mod  # noqa: E402
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration import bank as bank_mod  # noqa: E402
from lefusion_nnunet.integration.swap_dataset import SyntheticSwapDataset, read_draws  # noqa: E402
from lefusion_nnunet.integration.trainer_settings import (DEFAULT_PER_CASE, TrainerSettings,  # noqa: E402
                                                          load_trainer_settings, write_trainer_settings)

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID:03d}_LFTiny"
LESION_CASES = ("case000", "case001", "case002")
SPLITS = [{"train": ["case000", "case001", "case003", "case004"], "val": ["case002", "case005"]},
          {"train": ["case000", "case002", "case004", "case005"], "val": ["case001", "case003"]}]


# ------------------------------------------------------------------------------------------------ fixtures

def _write_tiny_raw(raw_root: Path) -> Path:
    """6 CT-like cases of 20 x 24 x 24 voxels: labels 1 (lung) everywhere, 2 (nodule) in case000-002."""
    folder = raw_root / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shape = (20, 24, 24)
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    for i in range(6):
        rng = np.random.default_rng(i)
        img = np.full(shape, -1000.0)
        lab = np.zeros(shape, np.uint8)
        img[((yy - 12) / 10.0) ** 2 + ((xx - 12) / 10.0) ** 2 <= 1] = 40
        lung = (((yy - 12) / 7.0) ** 2 + ((xx - 12) / 7.0) ** 2 <= 1) & (zz >= 3) & (zz < 17)
        img[lung], lab[lung] = -850, 1
        if f"case{i:03d}" in LESION_CASES:
            nodule = (zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 9
            img[nodule], lab[nodule] = 30, 2
        img = (img + rng.normal(0, 10, shape)).astype(np.int16)
        for arr, path in ((img, folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"),
                          (lab, folder / "labelsTr" / f"case{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.5, 1.5, 2.0))
            sitk.WriteImage(im, str(path), True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1, "nodule": 2}, "numTraining": 6,
        "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    """nnUNet_raw + nnUNet_preprocessed (3d_fullres, made by nnU-Net) of the tiny dataset, with fixed splits."""
    root = plan_and_preprocess_template(tmp_path_factory.mktemp("lefusion_tiny"), _write_tiny_raw, DATASET_ID)
    (root / "nnUNet_preprocessed" / DATASET / "splits_final.json").write_text(json.dumps(SPLITS))
    return root


def _fake_checkpoint(path: Path, lesion_labels=(2,)) -> Path:
    """A minimal lesion checkpoint: only its metadata is read when the synthesizer is faked."""
    from lefusion_nnunet.checkpoints.format import save_checkpoint
    from lefusion_nnunet.data.config import DataConfig
    from lefusion_nnunet.data.intensity import IntensitySpace
    from lefusion_nnunet.data.roi import RoiGeometry

    data = DataConfig(dataset_name=DATASET, lesion_labels=tuple(lesion_labels), label_names=("nodule",),
                      region_label=1, channel=0, modality="CT", roi=RoiGeometry(), intensity=IntensitySpace())
    save_checkpoint(path, {"kind": "lesion", "model_config": {}, "schedule_config": {},
                           "data_config": data.to_dict(), "ema_state": {}, "step": 0})
    return path


class Calls:
    def __init__(self):
        self.make_variants: list[list[str]] = []  # per call: the source cases to make (those not done)
        self.fail_after: int | None = None
        self.delay_s = 0.0  # per source case (a slow build)
        self.error: BaseException | None = None  # raised at the first source case


def _fake_make_variants(calls: Calls):
    """Paints a constant 'lesion' (label 2, 30 HU) in a 3^3 cube, at a k-dependent place; skips ``done`` cases as
    :func:`lefusion_nnunet.variants.make_variants` does (one chunk per case)."""
    from lefusion_nnunet.data.io import read_image, read_label

    def fake(synth, dataset, case_ids, settings, done=()):
        calls.make_variants.append([c for c in case_ids if c not in done])
        made = 0
        for cid in case_ids:
            if cid in done:
                yield [], []
                continue
            if calls.error is not None:
                raise calls.error
            time.sleep(calls.delay_s)
            files = dataset.case(cid)
            image = read_image(files.images)
            label, label_props = read_label(files.label)
            out = []
            for k in range(settings.per_case):
                if calls.fail_after is not None and made >= calls.fail_after:
                    raise RuntimeError("simulated crash during the bank build")
                channels = [c.copy() for c in image.array]
                lab = label.copy()
                sl = (slice(8, 11), slice(9 + 2 * k, 12 + 2 * k), slice(10, 13))
                channels[0][sl] = 30.0
                lab[sl] = 2
                out.append(variants_mod.SyntheticCase(f"{cid}_lefusion{k:03d}", cid, channels, lab,
                                                      {"k": k, "center": np.array([9, 10 + 2 * k, 11])},
                                                      reference=image, label_properties=label_props))
                made += 1
            yield out, ([f"{cid}: fake warning"] if cid.endswith("4") else [])
    return fake


@pytest.fixture
def tiny(tiny_template, tmp_path, monkeypatch):
    """A private copy of the tiny dataset with nnU-Net env vars set, a fake checkpoint and a fake sampler."""
    use_template_copy(tiny_template, tmp_path, monkeypatch)
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    for var in ("LEFUSION_SETTINGS", "LEFUSION_CHECKPOINT", "LEFUSION_PROBABILITY", "LEFUSION_PER_CASE",
                "LEFUSION_SEED", "LEFUSION_BATCH_SIZE", "LEFUSION_DEVICE", "LEFUSION_ITERATIONS_PER_EPOCH",
                "LEFUSION_VAL_ITERATIONS_PER_EPOCH", "LEFUSION_BANK_BUILD", "nnUNet_extTrainer"):
        monkeypatch.delenv(var, raising=False)
    ckpt = _fake_checkpoint(tmp_path / "nnUNet_results" / DATASET / "LeFusion_tiny" / "checkpoint_final.pt")
    calls = Calls()
    monkeypatch.setattr(bank_mod, "make_variants", _fake_make_variants(calls))
    monkeypatch.setattr(bank_mod, "make_synthesizer", lambda *a, **k: object())
    pre = tmp_path / "nnUNet_preprocessed" / DATASET
    return dict(root=tmp_path, ckpt=ckpt, calls=calls, pre=pre, data=pre / "nnUNetPlans_3d_fullres",
                raw=tmp_path / "nnUNet_raw" / DATASET)


def _make_trainer(cls_name: str = "LeFusionTrainer", fold: int = 0):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from lefusion_nnunet.integration import nnunet_trainer

    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    cls = getattr(nnunet_trainer, cls_name)
    return cls(plans, "3d_fullres", fold, load_json(str(pre / "dataset.json")), torch.device("cpu"))


def _tree_hashes(folder: Path, skip=()) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part in skip for part in rel.parts):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ settings

def test_settings_defaults_and_json_round_trip():
    s = TrainerSettings()
    assert s.checkpoint is None and s.probability == 0.5 and s.variants.per_case == DEFAULT_PER_CASE == 16
    assert variants_mod.VariantSettings().per_case == 2  # enlarge's K is not the trainer's
    assert TrainerSettings.from_dict({"variants": {"seed": 3}}).variants.per_case == DEFAULT_PER_CASE
    assert TrainerSettings.from_dict({"variants": {"per_case": 3}}).variants.per_case == 3
    assert s.batch_size == 4 and s.device == "auto" and s.bank_build == "background"
    s2 = TrainerSettings(checkpoint="/x/c.pt", probability=0.25,
                         variants=variants_mod.VariantSettings(per_case=3, sampler={"num_steps": 5}),
                         num_iterations_per_epoch=7, bank_build="before-training")
    d = json.loads(json.dumps(s2.to_dict()))
    assert TrainerSettings.from_dict(d) == s2


@pytest.mark.parametrize("kwargs, match", [
    (dict(probability=1.5), "between 0 and 1"), (dict(batch_size=0), "batch size"),
    (dict(device="tpu"), "device"), (dict(num_iterations_per_epoch=0), "num_iterations_per_epoch"),
    (dict(bank_build="later"), r"^LeFusion bank build 'later' is unknown; use background or before-training\.$")])
def test_settings_validation(kwargs, match):
    with pytest.raises(LeFusionInputError, match=match):
        TrainerSettings(**kwargs)


def test_settings_file_then_env_then_defaults(tiny, monkeypatch):
    ckpt = tiny["ckpt"]
    with pytest.raises(LeFusionInputError):  # no checkpoint anywhere -> the default one must exist
        monkeypatch.setenv("nnUNet_results", str(tiny["root"] / "empty_results"))
        load_trainer_settings(DATASET)
    monkeypatch.setenv("nnUNet_results", str(tiny["root"] / "nnUNet_results"))
    assert load_trainer_settings(DATASET).checkpoint == str(ckpt)  # dataset default checkpoint
    assert load_trainer_settings(DATASET_ID, require_checkpoint=False).checkpoint is None

    path = write_trainer_settings(DATASET, TrainerSettings(checkpoint=str(ckpt), probability=0.3,
                                                           variants=variants_mod.VariantSettings(per_case=4)))
    assert path == tiny["pre"] / "lefusion_trainer.json"
    s = load_trainer_settings(DATASET)
    assert (s.probability, s.variants.per_case, s.checkpoint) == (0.3, 4, str(ckpt))

    monkeypatch.setenv("LEFUSION_PROBABILITY", "0.9")
    monkeypatch.setenv("LEFUSION_PER_CASE", "1")
    monkeypatch.setenv("LEFUSION_SEED", "5")
    monkeypatch.setenv("LEFUSION_DEVICE", "cpu")
    monkeypatch.setenv("LEFUSION_ITERATIONS_PER_EPOCH", "3")
    monkeypatch.setenv("LEFUSION_BANK_BUILD", "before-training")
    s = load_trainer_settings(DATASET)
    assert (s.probability, s.variants.per_case, s.variants.seed, s.device, s.num_iterations_per_epoch,
            s.bank_build) == (0.9, 1, 5, "cpu", 3, "before-training")
    monkeypatch.delenv("LEFUSION_BANK_BUILD")

    other = tiny["root"] / "other.json"
    other.write_text(json.dumps({"probability": 0.1, "checkpoint": "missing.pt"}))
    monkeypatch.setenv("LEFUSION_SETTINGS", str(other))
    monkeypatch.delenv("LEFUSION_PROBABILITY")
    with pytest.raises(LeFusionInputError, match="does not exist"):
        load_trainer_settings(DATASET)
    monkeypatch.setenv("LEFUSION_CHECKPOINT", str(ckpt))
    assert load_trainer_settings(DATASET).probability == 0.1


@pytest.mark.parametrize("content, env, match", [
    ("{not json", {}, "not valid JSON"), ('{"probabilty": 0.2}', {}, "unknown LeFusion trainer setting"),
    ("{}", {"LEFUSION_PROBABILITY": "half"}, "LEFUSION_PROBABILITY"),
    ("{}", {"LEFUSION_PROBABILITY": "2"}, "between 0 and 1"),
    ("{}", {"LEFUSION_BANK_BUILD": "soon"}, "bank build 'soon' is unknown.*LEFUSION_"),
    ('{"bank_build": "soon"}', {}, "lefusion_trainer.json: LeFusion bank build 'soon' is unknown"),
    ("{}", {"LEFUSION_SETTINGS": "/nonexistent/x.json"}, "LEFUSION_SETTINGS")])
def test_bad_settings_are_one_sentence_errors(tiny, monkeypatch, content, env, match):
    (tiny["pre"] / "lefusion_trainer.json").write_text(content)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LeFusionInputError, match=match):
        load_trainer_settings(DATASET)


# ------------------------------------------------------------------------------------------------ bank

def _spec(tiny, **changes) -> bank_mod.BankSpec:
    base = dict(checkpoint_sha256="a" * 64, variants=variants_mod.VariantSettings().to_dict(), fold="0",
                configuration="3d_fullres", plans_name="nnUNetPlans", data_identifier="nnUNetPlans_3d_fullres",
                plans_sha256="b" * 64, lesion_labels=(2,), case_ids=("case003", "case004"))
    base.update(changes)
    return bank_mod.BankSpec(**base)


def _build_fn(tiny, case_ids=("case003", "case004"), per_case=2):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from lefusion_nnunet.data.dataset import load_raw_dataset

    pm = PlansManager(str(tiny["pre"] / "nnUNetPlans.json"))
    djson = load_json(str(tiny["pre"] / "dataset.json"))

    def build(folder):
        return bank_mod.build_bank_contents(
            folder, synthesizer_factory=lambda: object(), raw_dataset=load_raw_dataset(DATASET),
            case_ids=list(case_ids), variant_settings=variants_mod.VariantSettings(per_case=per_case),
            plans_manager=pm, configuration_manager=pm.get_configuration("3d_fullres"), dataset_json=djson,
            dataset_class=nnUNetDatasetBlosc2, preprocessed_folder=tiny["data"], log=lambda m: None)
    return build


def test_lesion_free_cases_from_class_locations(tiny):
    ids = [f"case{i:03d}" for i in range(6)]
    assert bank_mod.lesion_free_cases(tiny["data"], ids, [2]) == ["case003", "case004", "case005"]
    assert bank_mod.lesion_free_cases(tiny["data"], ids, [1]) == []
    with pytest.raises(LeFusionInputError, match="not a label"):
        bank_mod.lesion_free_cases(tiny["data"], ids, [7])


def test_bank_key_changes_with_every_input(tiny):
    base = _spec(tiny)
    keys = {base.key}
    for change in (dict(checkpoint_sha256="c" * 64), dict(fold="1"), dict(configuration="3d_lowres"),
                   dict(plans_sha256="d" * 64), dict(case_ids=("case003",)), dict(lesion_labels=(1, 2)),
                   dict(variants=variants_mod.VariantSettings(per_case=3).to_dict()),
                   dict(mask_checkpoint_sha256="e" * 64), dict(mask_checkpoint_sha256="f" * 64)):
        keys.add(_spec(tiny, **change).key)
    assert len(keys) == 10
    assert _spec(tiny, case_ids=("case004", "case003")).key == base.key  # sorted case list
    assert base.key.startswith("3d_fullres_fold0_")


def test_bank_matches_nnunet_preprocessing_and_is_reused(tiny):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    root = tiny["pre"] / bank_mod.BANK_FOLDER
    spec = _spec(tiny)
    bank = bank_mod.ensure_bank(spec, root, _build_fn(tiny), log=lambda m: None)
    assert bank.built and bank.folder == root / spec.key and bank.num_variants == 4
    assert bank.variants_by_source == {"case003": ["case003_lefusion000", "case003_lefusion001"],
                                       "case004": ["case004_lefusion000", "case004_lefusion001"]}
    assert bank.warnings == ["case004: fake warning"]
    manifest = json.loads((bank.folder / "bank.json").read_text())
    assert manifest["format_version"] == 4 and manifest["spec"]["case_ids"] == ["case003", "case004"]
    assert manifest["variants"]["case003_lefusion001"]["provenance"]["center"] == [9, 12, 11]

    assert sorted(str(p.relative_to(bank.folder)) for p in bank.folder.rglob("*") if p.is_file()) == sorted(
        [f"{v}.npz" for v in manifest["variants"]] + ["bank.json", "cases/case003.json", "cases/case004.json"])
    for source in ("case003", "case004"):  # patches only (no full cases) and one record per source
        record = json.loads((bank.folder / "cases" / f"{source}.json").read_text())
        assert record["variants"] == {v: e for v, e in manifest["variants"].items() if e["source_case"] == source}
        assert record["warnings"] == (["case004: fake warning"] if source == "case004" else [])
    for vid, entry in manifest["variants"].items():  # no resampling here: the patch is the painted 3^3 cube
        case_bytes = sum((tiny["data"] / f"{entry['source_case']}{s}").stat().st_size  # what format 1 stored
                         for s in (".b2nd", "_seg.b2nd", ".pkl"))
        assert np.prod(np.diff(entry["bbox"], axis=1)) == 27 and entry["patch_bytes"] < 0.1 * case_bytes, (
            entry["patch_bytes"], case_bytes)
    real = nnUNetDatasetBlosc2(str(tiny["data"]), ["case003"])
    swap = SyntheticSwapDataset(real, bank, 1.0)
    d_real, s_real, _, p_real = real.load_case("case003")
    d_syn, s_syn, _, p_syn = swap.load_variant("case003_lefusion000")
    d_real, s_real, d_syn, s_syn = (np.asarray(a[:]) for a in (d_real, s_real, d_syn, s_syn))
    assert d_syn.shape == d_real.shape and d_syn.dtype == np.float32 and s_syn.dtype == s_real.dtype
    lesion = s_syn[0] == 2
    assert lesion.sum() == 27 and not (s_real == 2).any()
    assert len(p_syn["class_locations"][2]) > 0 and p_syn["lefusion_source_case"] == "case003"
    assert all(s_syn[0][tuple(loc[1:])] == 2 for loc in p_syn["class_locations"][2])
    # same preprocessing as nnU-Net's: identical outside the painted lesion, lesion intensity as for 30 HU
    np.testing.assert_array_equal(d_syn[0][~lesion], d_real[0][~lesion])
    np.testing.assert_array_equal(s_syn[0][~lesion], s_real[0][~lesion])
    assert (d_syn[0][lesion] > d_real[0][lesion] + 1).all()

    calls = tiny["calls"].make_variants
    n = len(calls)
    again = bank_mod.ensure_bank(spec, root, _build_fn(tiny), log=lambda m: None)
    assert not again.built and len(calls) == n and again.variants_by_source == bank.variants_by_source


def _patch_arrays(folder: Path) -> dict:
    from lefusion_nnunet.integration.swap_dataset import load_patch

    out = {}
    for path in sorted(folder.glob("*.npz")):
        patch = load_patch(path)
        out[path.stem] = (patch.data, patch.seg, patch.bbox, {k: v.tolist() for k, v in patch.class_locations.items()})
    return out


def _assert_same_patches(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for vid in a:
        for x, y in zip(a[vid][:3], b[vid][:3]):
            np.testing.assert_array_equal(x, y)
        assert a[vid][3] == b[vid][3]


def test_killed_build_keeps_finished_cases_and_resumes_to_the_same_bank(tiny, tmp_path):
    """The build dies inside case004 (after case003's variants and record): only case003 has a record, nothing is
    complete; the next build makes case004 only and equals an uninterrupted build patch for patch."""
    root = tiny["pre"] / bank_mod.BANK_FOLDER
    spec = _spec(tiny)
    folder = root / spec.key
    tiny["calls"].fail_after = 3  # 2 variants of case003, one of case004, then the crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        bank_mod.ensure_bank(spec, root, _build_fn(tiny), log=lambda m: None)
    assert bank_mod.SyntheticBank.load(folder, spec.key) is None and not (folder / "bank.json").exists()
    assert sorted(p.name for p in (folder / "cases").iterdir()) == ["case003.json"]
    (folder / ".case004_lefusion000.npz.tmp-999").write_bytes(b"half a patch")  # as a SIGKILL would leave them
    (folder / "cases" / ".case004.json.tmp-999").write_text("{not json")
    (folder / "case004_lefusion001.npz").write_bytes(b"a patch of a case without record")

    tiny["calls"].fail_after = None
    logs: list[str] = []
    bank = bank_mod.ensure_bank(spec, root, _build_fn(tiny), log=logs.append)
    assert tiny["calls"].make_variants == [["case003", "case004"], ["case004"]]  # case003 was not made again
    assert bank.built and bank.num_variants == 4 and bank.warnings == ["case004: fake warning"]
    assert any("continuing an interrupted build" in m and "1 of 2 source cases done" in m for m in logs)
    assert not [p for p in folder.rglob(".*")]  # temporary files removed

    other = dataclasses.replace(spec, checkpoint_sha256="f" * 64)  # same content, another folder
    fresh = bank_mod.ensure_bank(other, root, _build_fn(tiny), log=lambda m: None)
    _assert_same_patches(_patch_arrays(folder), _patch_arrays(fresh.folder))
    strip = lambda m: {k: v for k, v in m.items() if k not in ("key", "spec", "build_seconds", "created")}  # noqa
    assert strip(bank.manifest) == strip(fresh.manifest)

    (folder / "case003_lefusion000.npz").unlink()  # damaged complete bank -> case003 is made again
    assert bank_mod.SyntheticBank.load(folder, spec.key) is None
    again = bank_mod.ensure_bank(spec, root, _build_fn(tiny), log=lambda m: None)
    assert again.built and again.num_variants == 4 and tiny["calls"].make_variants[-1] == ["case003"]


def test_second_builder_does_not_build_while_the_lock_is_held(tiny):
    """A process that cannot take the bank's lock (another rank or run builds it) starts nothing; once the lock is
    free, the next one builds (continuing what is there)."""
    from lefusion_nnunet.integration.bank_build import start_bank_build
    from lefusion_nnunet.integration.bank_store import BankLock

    root = tiny["pre"] / bank_mod.BANK_FOLDER
    spec = _spec(tiny)
    held = BankLock.acquire(bank_mod.lock_path(root, spec.key))
    job = start_bank_build(spec, root, _build_fn(tiny), log=lambda m: None)
    assert not job.building and job.done and job.join() is None and tiny["calls"].make_variants == []
    held.release()
    done: list = []
    job = start_bank_build(spec, root, _build_fn(tiny), log=lambda m: None, on_done=done.append)
    assert job.building
    bank = job.join(timeout=120)
    assert job.done and job.error is None and bank is not None and bank.num_variants == 4 and done == [bank]
    lock = BankLock.acquire(bank_mod.lock_path(root, spec.key), blocking=False)
    assert lock is not None  # released by the build
    lock.release()


def test_non_zero_rank_waits_for_rank_zero(tiny):
    root = tiny["pre"] / bank_mod.BANK_FOLDER
    spec = _spec(tiny)

    def never(folder):
        raise AssertionError("rank 1 must not build")

    (root / f".{spec.key}.failed").parent.mkdir(parents=True, exist_ok=True)
    (root / f".{spec.key}.failed").write_text("RuntimeError: boom")
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        bank_mod.ensure_bank(spec, root, never, rank=1, poll_seconds=0.01)
    bank_mod.ensure_bank(spec, root, _build_fn(tiny), rank=0, barrier=lambda: None, log=lambda m: None)
    assert bank_mod.ensure_bank(spec, root, never, rank=1, barrier=lambda: None).num_variants == 4


# ------------------------------------------------------------------------------------------------ loader

def _swap_dataset(tiny, probability, log=None):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    root = tiny["pre"] / bank_mod.BANK_FOLDER
    bank = bank_mod.ensure_bank(_spec(tiny), root, _build_fn(tiny), log=lambda m: None)
    real = nnUNetDatasetBlosc2(str(tiny["data"]), ["case000", "case001", "case003", "case004"])
    return SyntheticSwapDataset(real, bank, probability, log)


def _draw_in_child(dataset, n, queue):
    queue.put([dataset.load_case(k)[3].get("lefusion_source_case", "real") for k in ["case003"] * n])


def test_swap_dataset_draws_variants_with_probability_p(tiny):
    log = tiny["root"] / "draws.log"
    ds = _swap_dataset(tiny, 1.0, str(log))
    assert ds.identifiers == ["case000", "case001", "case003", "case004"]
    for _ in range(5):
        assert ds.load_case("case003")[3]["lefusion_source_case"] == "case003"
        assert "lefusion_source_case" not in ds.load_case("case000")[3]  # lesion case: always real
    stats = read_draws(log)
    assert (stats.loads, stats.synthetic, stats.sources) == (10, 5, ("case003",))

    ds0 = _swap_dataset(tiny, 0.0)
    assert all("lefusion_source_case" not in ds0.load_case("case004")[3] for _ in range(10))

    half = _swap_dataset(tiny, 0.5)
    n_syn = sum("lefusion_source_case" in half.load_case("case004")[3] for _ in range(400))
    assert 140 < n_syn < 260


def test_swap_dataset_pickles_and_forked_workers_log_and_differ(tiny):
    log = tiny["root"] / "draws.log"
    ds = _swap_dataset(tiny, 0.5, str(log))
    ds.load_case("case003")  # parent state (rng, fd) must not leak into pickles or children
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._rng is None and clone._fd is None and clone.variants_by_source == ds.variants_by_source
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_draw_in_child, args=(ds, 60, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results[0] != results[1]  # each process draws from its own generator
    assert read_draws(log).loads == 121


def _load_in_child(dataset, case, n, queue):
    queue.put(sum("lefusion_source_case" in dataset.load_case(case)[3] for _ in range(n)))


def _forked_draws(dataset, case: str, n: int = 10) -> int:
    """How many of ``n`` loads of ``case`` were synthetic in a forked process (as nnU-Net's loader workers)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_in_child, args=(pickle.loads(pickle.dumps(dataset)), case, n, queue))
    proc.start()
    out = queue.get(timeout=60)
    proc.join(timeout=60)
    return out


def test_swap_dataset_of_a_growing_bank_takes_up_recorded_sources_only(tiny, monkeypatch):
    """Only sources with a record are drawn (a patch without record and temporary files are never read); a
    record that appears is taken up at the next refresh, in the main process and in forked workers; once
    bank.json exists it is read once and the records are no longer looked at."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from lefusion_nnunet.integration import bank_store

    monkeypatch.setattr(SyntheticSwapDataset, "REFRESH_SECONDS", 0.2)
    root = tiny["pre"] / bank_mod.BANK_FOLDER
    complete = bank_mod.ensure_bank(_spec(tiny, checkpoint_sha256="f" * 64), root, _build_fn(tiny),
                                    log=lambda m: None)
    spec = _spec(tiny)
    folder = root / spec.key
    (folder / "cases").mkdir(parents=True)
    entries = complete.manifest["variants"]
    for vid in entries:
        shutil.copy(complete.folder / f"{vid}.npz", folder / f"{vid}.npz")  # every patch, case004's unrecorded
    by_source = lambda src: {v: e for v, e in entries.items() if e["source_case"] == src}  # noqa: E731
    bank_store.write_record(folder, "case003", by_source("case003"), [])
    (folder / "cases" / ".case004.json.tmp-7").write_text("{half a record")
    (folder / ".case004_lefusion000.npz.tmp-7").write_bytes(b"half a patch")

    real = nnUNetDatasetBlosc2(str(tiny["data"]), ["case000", "case001", "case003", "case004"])
    log = tiny["root"] / "draws.log"
    ds = SyntheticSwapDataset.growing(real, folder, spec.key, 1.0, str(log))
    assert ds.growing_key == spec.key and ds.variants_by_source == {
        "case003": ["case003_lefusion000", "case003_lefusion001"]}
    assert all(ds.load_case("case003")[3]["lefusion_source_case"] == "case003" for _ in range(3))
    assert not any("lefusion_source_case" in ds.load_case("case004")[3] for _ in range(10))
    assert _forked_draws(ds, "case004") == 0

    bank_store.write_record(folder, "case004", by_source("case004"), ["case004: fake warning"])
    time.sleep(0.3)
    assert _forked_draws(ds, "case004") == 10  # the worker's copy refreshes on its own
    assert "lefusion_source_case" in ds.load_case("case004")[3]
    assert ds.growing_key is not None  # still growing: no manifest yet
    stats = read_draws(log)
    assert (stats.loads, stats.synthetic, stats.sources) == (3 + 10 + 10 + 10 + 1, 3 + 10 + 1, ("case003", "case004"))

    manifest = dict(complete.manifest, key=spec.key, spec=spec.to_dict())
    (folder / "bank.json").write_text(json.dumps(manifest))
    time.sleep(0.3)
    ds.load_case("case000")
    assert ds.growing_key is None and ds.variants_by_source == complete.variants_by_source
    shutil.rmtree(folder / "cases")  # no longer read
    time.sleep(0.3)
    assert "lefusion_source_case" in ds.load_case("case004")[3]


def test_swap_dataset_refreshes_at_most_every_refresh_seconds(tiny, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from lefusion_nnunet.integration import bank_store

    monkeypatch.setattr(SyntheticSwapDataset, "REFRESH_SECONDS", 3600.0)
    root = tiny["pre"] / bank_mod.BANK_FOLDER
    complete = bank_mod.ensure_bank(_spec(tiny, checkpoint_sha256="f" * 64), root, _build_fn(tiny),
                                    log=lambda m: None)
    folder = root / _spec(tiny).key
    real = nnUNetDatasetBlosc2(str(tiny["data"]), ["case003", "case004"])
    ds = SyntheticSwapDataset.growing(real, folder, _spec(tiny).key, 1.0)  # no folder yet: real only
    assert ds.variants_by_source == {} and "lefusion_source_case" not in ds.load_case("case003")[3]
    folder.mkdir()
    for vid in complete.manifest["variants"]:
        shutil.copy(complete.folder / f"{vid}.npz", folder / f"{vid}.npz")
    bank_store.write_record(folder, "case003", {v: e for v, e in complete.manifest["variants"].items()
                                                if e["source_case"] == "case003"}, [])
    assert "lefusion_source_case" not in ds.load_case("case003")[3]  # not re-read within the interval
    ds._next_refresh = 0.0
    assert "lefusion_source_case" in ds.load_case("case003")[3]


# ------------------------------------------------------------------------------------------------ trainer

def test_trainer_variants_and_settings(tiny, monkeypatch):
    monkeypatch.setenv("LEFUSION_ITERATIONS_PER_EPOCH", "3")
    monkeypatch.setenv("LEFUSION_VAL_ITERATIONS_PER_EPOCH", "2")
    t = _make_trainer("LeFusionTrainer_1epoch")
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (1, 3, 2)
    assert t.lefusion_settings.probability == 0.5
    monkeypatch.setenv("LEFUSION_PROBABILITY", "0.9")
    assert _make_trainer("LeFusionTrainer_p025").lefusion_settings.probability == 0.25
    assert _make_trainer("LeFusionTrainer_p075").lefusion_settings.probability == 0.75
    t5 = _make_trainer("LeFusionTrainer_5epochs")
    assert t5.num_epochs == 5 and t5.lefusion_settings.probability == 0.9
    assert "LeFusionTrainer_5epochs__nnUNetPlans__3d_fullres" in t5.output_folder


def test_trainer_trains_on_synthetic_cases_of_training_split_only(tiny, monkeypatch):
    monkeypatch.setenv("LEFUSION_BANK_BUILD", "before-training")  # the whole bank before the first batch
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setenv("LEFUSION_PER_CASE", "2")
    data_before = _tree_hashes(tiny["data"])
    raw_before = _tree_hashes(tiny["raw"])
    t = _make_trainer("LeFusionTrainer_1epoch")
    t.on_train_start()
    assert tiny["calls"].make_variants == [["case003", "case004"]]  # fold 0 training split, lesion-free only
    swap = t.dataloader_train.data_loader._data
    assert isinstance(swap, SyntheticSwapDataset)
    assert t.dataloader_val.data_loader._data.identifiers == ["case002", "case005"]
    assert not isinstance(t.dataloader_val.data_loader._data, SyntheticSwapDataset)
    for _ in range(6):
        batch = next(t.dataloader_train)
        assert batch["data"].shape[0] == t.batch_size
    t.on_train_end()
    stats = read_draws(Path(t.output_folder) / "lefusion_draws.log")
    assert stats.synthetic > 0 and set(stats.sources) <= {"case003", "case004"}
    log_text = Path(t.log_file).read_text()
    assert "LeFusion: 4 synthetic cases of 2 lesion-free training cases (of 4)" in log_text
    assert f"LeFusion: {stats.synthetic} of {stats.loads} training case loads used a synthetic case" in log_text
    assert (Path(t.output_folder) / "checkpoint_final.pth").is_file()
    assert _tree_hashes(tiny["data"]) == data_before and _tree_hashes(tiny["raw"]) == raw_before

    # --c / next run: same bank reused, nothing synthesised again; another fold makes its own bank
    t2 = _make_trainer("LeFusionTrainer_1epoch")
    t2.on_train_start()
    assert len(tiny["calls"].make_variants) == 1 and t2.lefusion_bank.folder == t.lefusion_bank.folder
    assert "reused" in Path(t2.log_file).read_text()
    t2.on_train_end()
    t3 = _make_trainer("LeFusionTrainer_1epoch", fold=1)
    t3.on_train_start()
    assert tiny["calls"].make_variants[-1] == ["case004", "case005"]
    assert t3.lefusion_bank.folder != t.lefusion_bank.folder
    t3.on_train_end()


def test_trainer_with_forked_augmentation_workers(tiny, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    monkeypatch.setenv("LEFUSION_BANK_BUILD", "before-training")
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setenv("LEFUSION_PER_CASE", "2")
    t = _make_trainer("LeFusionTrainer_1epoch")
    t.on_train_start()
    for _ in range(4):
        next(t.dataloader_train)
    t.on_train_end()
    stats = read_draws(Path(t.output_folder) / "lefusion_draws.log")
    assert stats.synthetic > 0 and set(stats.sources) <= {"case003", "case004"}


def _log_index(text: str, pattern: str) -> int:
    lines = text.splitlines()
    return next(i for i, line in enumerate(lines) if pattern in line)


def test_trainer_trains_while_the_bank_builds_in_the_background(tiny, monkeypatch):
    """Default mode, a slow build: nnU-Net's first epoch starts before the bank is complete, the run waits for the
    build at the end (the bank is then complete) and the next run reuses it; the thread does not outlive it."""
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setenv("LEFUSION_PER_CASE", "2")
    monkeypatch.setenv("LEFUSION_ITERATIONS_PER_EPOCH", "2")
    monkeypatch.setenv("LEFUSION_VAL_ITERATIONS_PER_EPOCH", "1")
    tiny["calls"].delay_s = 4.0
    t = _make_trainer("LeFusionTrainer_1epoch")
    assert t.lefusion_settings.bank_build == "background"
    t.run_training()
    log_text = Path(t.log_file).read_text()
    summary = "LeFusion: 4 synthetic cases of 2 lesion-free training cases (of 4)"
    assert "is built in the background; training starts now" in log_text
    assert _log_index(log_text, "Epoch 0") < _log_index(log_text, summary)
    assert _log_index(log_text, "training ended before the bank was complete") < _log_index(log_text, summary)
    assert "built in" in log_text[log_text.index(summary):].splitlines()[0]
    assert "training case loads used a synthetic case" in log_text
    assert t.lefusion_build.done and not any(th.name.startswith("lefusion-bank") for th in threading.enumerate())
    assert t.lefusion_bank is not None and t.lefusion_bank.num_variants == 4
    assert bank_mod.SyntheticBank.load(t.lefusion_bank.folder, t.lefusion_bank.key) is not None
    stats = read_draws(Path(t.output_folder) / "lefusion_draws.log")
    assert stats.loads > 0 and set(stats.sources) <= {"case003", "case004"}
    assert (Path(t.output_folder) / "checkpoint_final.pth").is_file()

    tiny["calls"].delay_s = 0.0
    t2 = _make_trainer("LeFusionTrainer_1epoch")
    t2.on_train_start()
    assert t2.lefusion_build is None and len(tiny["calls"].make_variants) == 1
    assert isinstance(t2.dataloader_train.data_loader._data, SyntheticSwapDataset)
    assert t2.dataloader_train.data_loader._data.growing_key is None  # the complete bank, no refreshing
    assert "(reused, " in Path(t2.log_file).read_text()
    t2.on_train_end()


def test_under_ddp_training_end_does_not_wait_for_the_build(tiny, monkeypatch):
    """DDP: rank 0 must not block in on_train_end while the other ranks wait at nnU-Net's validation barriers; the
    build goes on, and what a process exit leaves unfinished is continued by the next run."""
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setenv("LEFUSION_PER_CASE", "2")
    tiny["calls"].delay_s = 6.0
    t = _make_trainer("LeFusionTrainer_1epoch")
    t.on_train_start()
    t.is_ddp, t.disable_checkpointing = True, True  # (a DDP-wrapped network is not built on CPU)
    start = time.perf_counter()
    t.on_train_end()
    assert time.perf_counter() - start < 5.0 and not t.lefusion_build.done
    assert "under DDP rank 0 does not wait" in Path(t.log_file).read_text()
    assert t.lefusion_build.join(timeout=120) is not None and t.lefusion_build.error is None


def test_failed_background_build_stops_training(tiny, monkeypatch):
    """A build that fails in its thread is logged and raised in the training thread at the epoch's end: no
    training on real cases only, no final checkpoint."""
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setenv("LEFUSION_ITERATIONS_PER_EPOCH", "1")
    monkeypatch.setenv("LEFUSION_VAL_ITERATIONS_PER_EPOCH", "1")
    tiny["calls"].error = RuntimeError("boom in the bank build")
    t = _make_trainer("LeFusionTrainer_5epochs")
    with pytest.raises(RuntimeError, match="boom in the bank build"):
        t.run_training()
    assert t.current_epoch == 0  # raised at the first epoch boundary
    log_text = Path(t.log_file).read_text()
    assert "LeFusion: error: the background bank build failed" in log_text and "boom in the bank build" in log_text
    assert "stopping training because the background bank build failed" in log_text
    assert not (Path(t.output_folder) / "checkpoint_final.pth").exists()
    assert not (tiny["pre"] / bank_mod.BANK_FOLDER / t.lefusion_build.spec.key / "bank.json").exists()


def test_other_ranks_read_the_growing_bank_rank_zero_builds(tiny, monkeypatch):
    """Background mode under DDP: a rank other than 0 starts no build and reads what rank 0 makes."""
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setattr(SyntheticSwapDataset, "REFRESH_SECONDS", 0.0)
    rank1 = _make_trainer()
    rank1.local_rank = 1
    swap, _ = rank1.get_tr_and_val_datasets()
    assert rank1.lefusion_build is None and swap.growing_key is not None and swap.variants_by_source == {}
    rank0 = _make_trainer()
    rank0.get_tr_and_val_datasets()
    assert rank0.lefusion_build.start() and rank0.lefusion_build.join(timeout=120) is not None
    assert tiny["calls"].make_variants == [["case003", "case004"]]
    swap.load_case("case000")
    assert swap.growing_key is None and sorted(swap.variants_by_source) == ["case003", "case004"]


def test_trainer_config_cli_choices_are_the_settings_modes():
    import argparse

    from lefusion_nnunet.cli.main import build_parser
    from lefusion_nnunet.integration.trainer_settings import BANK_BUILD_MODES

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    action = next(a for a in subs["trainer-config"]._actions if a.dest == "bank_build")
    assert tuple(action.choices) == BANK_BUILD_MODES and action.default == TrainerSettings().bank_build


def test_trainer_without_lesion_free_training_cases_trains_real_only(tiny, monkeypatch):
    splits = [{"train": ["case000", "case001"], "val": ["case002", "case003"]}]
    (tiny["pre"] / "splits_final.json").write_text(json.dumps(splits))
    t = _make_trainer()
    t.on_train_start()
    assert not isinstance(t.dataloader_train.data_loader._data, SyntheticSwapDataset)
    assert tiny["calls"].make_variants == []
    assert "no lesion-free case" in Path(t.log_file).read_text()
    t.on_train_end()


def test_trainer_reports_bad_input_before_building_the_bank(tiny, monkeypatch):
    """A truncated raw image of a lesion-free training case, or a checkpoint made for MR, is one sentence
    (also in the nnU-Net log) raised before any variant is made and before a bank folder exists. In background
    mode the checks (they read every label and image voxel) are the build thread's first step: training has started, and the
    sentence stops it at the first iteration, still before any variant is made."""
    monkeypatch.setenv("LEFUSION_PROBABILITY", "1")
    monkeypatch.setenv("LEFUSION_BANK_BUILD", "before-training")
    image = tiny["raw"] / "imagesTr" / "case003_0000.nii.gz"  # fold 0 training split, lesion-free
    intact = image.read_bytes()
    image.write_bytes(intact[: len(intact) // 2])
    t = _make_trainer("LeFusionTrainer_1epoch")
    with pytest.raises(LeFusionInputError, match=r"case003_0000.nii.gz is truncated"):
        t.on_train_start()
    assert tiny["calls"].make_variants == []
    assert not (tiny["pre"] / "lefusion_bank").exists()
    assert "LeFusion: error: image file" in Path(t.log_file).read_text()
    monkeypatch.setenv("LEFUSION_BANK_BUILD", "background")
    monkeypatch.setenv("LEFUSION_ITERATIONS_PER_EPOCH", "1")
    monkeypatch.setenv("LEFUSION_VAL_ITERATIONS_PER_EPOCH", "1")
    t = _make_trainer("LeFusionTrainer_5epochs")
    with pytest.raises(LeFusionInputError, match=r"case003_0000.nii.gz is truncated"):
        t.run_training()
    assert t.current_epoch == 0 and tiny["calls"].make_variants == []
    assert "LeFusion: error: image file" in Path(t.log_file).read_text()
    image.write_bytes(intact)
    monkeypatch.setenv("LEFUSION_BANK_BUILD", "before-training")
    shutil.rmtree(tiny["pre"] / "lefusion_bank")  # (the background build had made its folder before the check)

    from lefusion_nnunet.checkpoints.format import save_checkpoint
    from lefusion_nnunet.data.config import DataConfig
    from lefusion_nnunet.data.intensity import IntensitySpace
    from lefusion_nnunet.data.roi import RoiGeometry

    mr = DataConfig(dataset_name=DATASET, lesion_labels=(2,), label_names=("nodule",), region_label=1, channel=0,
                    modality="MR", roi=RoiGeometry(), intensity=IntensitySpace("percentile"))
    save_checkpoint(tiny["ckpt"], {"kind": "lesion", "model_config": {}, "schedule_config": {},
                                   "data_config": mr.to_dict(), "ema_state": {}, "step": 0})
    t = _make_trainer("LeFusionTrainer_1epoch")
    with pytest.raises(LeFusionInputError, match="trained on MR images but .* is CT"):
        t.on_train_start()
    assert tiny["calls"].make_variants == [] and not (tiny["pre"] / "lefusion_bank").exists()


# ------------------------------------------------------------------------------------------------ end to end

def _lefusion_cmd() -> list[str]:
    exe = shutil.which("lefusion")
    return [exe] if exe else [sys.executable, "-m", "lefusion_nnunet.cli.main"]


@pytest.fixture
def installed_shim():
    from lefusion_nnunet.integration.install import shim_installed, uninstall_trainer_shim

    was_installed = shim_installed()
    yield
    if not was_installed:
        uninstall_trainer_shim()
    assert shim_installed() == was_installed


@pytest.mark.slow
def test_end_to_end_real_commands(tmp_path, installed_shim):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEFUSION_") and k != "nnUNet_extTrainer"}
    for var in NNUNET_ENV:
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               # short but complete nnU-Net run: 1 epoch (LeFusionTrainer_1epoch) of 4 + 2 iterations
               LEFUSION_ITERATIONS_PER_EPOCH="4", LEFUSION_VAL_ITERATIONS_PER_EPOCH="2",
               LEFUSION_PROBABILITY="1", LEFUSION_BATCH_SIZE="8",
               LEFUSION_BANK_BUILD="before-training")  # synthetic draws in 4 iterations (background: tested above)

    def run(*cmd, timeout=900):
        out = subprocess.run(list(cmd), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    did = 961
    run(*_lefusion_cmd(), "phantom", "-o", str(tmp_path / "nnUNet_raw"), "--id", str(did), "--cases", "8",
        "--lesion-free-fraction", "0.5", "--shape", "48", "48", "32")
    raw = next((tmp_path / "nnUNet_raw").glob(f"Dataset{did}_*"))
    name = raw.name
    run("nnUNetv2_plan_and_preprocess", "-d", str(did), "-c", "3d_fullres", "-np", "1",
        "--verify_dataset_integrity")
    run(*_lefusion_cmd(), "train", "-d", str(did), "--lesion-label", "2", "--preset", "tiny", "--steps", "20",
        "--roi-size", "32", "32", "16")
    pre = tmp_path / "nnUNet_preprocessed" / name
    run(*_lefusion_cmd(), "trainer-config", "-d", str(did), "--per-case", "2", "--steps", "5")
    assert json.loads((pre / "lefusion_trainer.json").read_text())["variants"]["sampler"] == {"num_steps": 5}
    data_folder = pre / "nnUNetPlans_3d_fullres"
    raw_before, data_before = _tree_hashes(raw), _tree_hashes(data_folder)
    gt_before = _tree_hashes(pre / "gt_segmentations")

    run(*_lefusion_cmd(), "install-trainer")
    run("nnUNetv2_train", str(did), "3d_fullres", "0", "-tr", "LeFusionTrainer_1epoch", "-device", "cpu",
        timeout=1500)
    fold = tmp_path / "nnUNet_results" / name / "LeFusionTrainer_1epoch__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file()

    splits = json.loads((pre / "splits_final.json").read_text())[0]
    stats = read_draws(fold / "lefusion_draws.log")
    assert stats.synthetic > 0, "no synthetic case was drawn during training"
    assert set(stats.sources) <= set(splits["train"]) and not set(stats.sources) & set(splits["val"])
    banks = [b for b in (pre / "lefusion_bank").iterdir() if not b.name.startswith(".")]
    assert len(banks) == 1
    manifest = json.loads((banks[0] / "bank.json").read_text())
    sources = {v["source_case"] for v in manifest["variants"].values()}
    assert sources and sources <= set(splits["train"]) and not sources & set(splits["val"])
    log_text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "synthetic cases of" in log_text and "training case loads used a synthetic case" in log_text
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["metric_per_case"][i]["prediction_file"].split("/")[-1].split(".")[0]
               for i in range(len(summary["metric_per_case"]))) == set(splits["val"])

    case = splits["val"][0]
    inp = tmp_path / "predict_in"
    inp.mkdir()
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    shutil.copy(raw / "imagesTr" / f"{case}_0000{ending}", inp / f"{case}_0000{ending}")
    run("nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "predict_out"), "-d", str(did), "-c", "3d_fullres",
        "-f", "0", "-tr", "LeFusionTrainer_1epoch", "-device", "cpu", "-npp", "1", "-nps", "1")
    assert (tmp_path / "predict_out" / f"{case}{ending}").is_file()

    assert _tree_hashes(raw) == raw_before
    assert _tree_hashes(data_folder) == data_before
    assert _tree_hashes(pre / "gt_segmentations") == gt_before
