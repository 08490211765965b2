"""Every nnU-Net setup users run, with LeFusionTrainer and nnU-Net's own commands on CPU (issue 14).

One module fixture makes a chest phantom (8 cases of 48 x 48 x 32 voxels, half lesion-free), plans it with
nnU-Net's default planner (2d, 3d_fullres, plus a 3d_lowres configuration added to the plans JSON by hand, as
nnU-Net's documentation allows editing plans: nnU-Net plans one only for large images) and with the ResEnc M
preset, preprocesses everything with nnU-Net's commands, trains a tiny lesion model once (`lefusion train`) and
writes the trainer settings (`lefusion trainer-config`, K = 2). A copy of the phantom with region-based labels
(``"lung": [1, 2], "nodule": 2`` and ``regions_class_order``) is planned and preprocessed too.

Each setup is then one short `nnUNetv2_train ... -tr LeFusionTrainer_1epoch` (1 epoch of 4 + 2 iterations,
``LEFUSION_*ITERATIONS_PER_EPOCH``; 1 + 1 for the heavier ResEnc network) followed by nnU-Net's final
validation. The cascade is refused with one sentence. The region-based run is continued (`--c`), validated
again (`--val`) and predicted from with `-tr LeFusionTrainer`.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import NNUNET_ENV

from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration import bank as bank_mod
from lefusion_nnunet.integration.nnunet_trainer import BankProgress
from lefusion_nnunet.integration.swap_dataset import PATCH_SUFFIX, load_patch, read_draws
from lefusion_nnunet.validation import validate_dataset

REPO = Path(__file__).resolve().parents[1]
DID, RID = 962, 963  # the phantom, and its copy with region-based labels
TRAINER = "LeFusionTrainer_1epoch"
PER_CASE = 2  # K, set explicitly (the trainer's default is 16)
REGION_LABELS = {"background": 0, "lung": [1, 2], "nodule": 2}


def _lefusion_cmd() -> list[str]:
    exe = shutil.which("lefusion")
    return [exe] if exe else [sys.executable, "-m", "lefusion_nnunet.cli.main"]


# ------------------------------------------------------------------------------------------------ fast checks

def _tiny_raw(root: Path, labels: dict, label_values=(0, 1, 2), extra: dict | None = None) -> Path:
    """A one-case raw dataset of 8^3 voxels whose label map holds ``label_values``."""
    folder = root / "Dataset970_Regions"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    lab = np.zeros((8, 8, 8), np.uint8)
    for i, v in enumerate(label_values):
        lab[i] = v
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16)),
                    str(folder / "imagesTr" / "c000_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(folder / "labelsTr" / "c000.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz", **(extra or {})}))
    return folder


def test_region_based_labels_are_read_as_label_map_values(tmp_path):
    folder = _tiny_raw(tmp_path, REGION_LABELS, extra={"regions_class_order": [1, 2]})
    ds = load_raw_dataset(folder)
    assert ds.region_based and ds.regions == {"background": (0,), "lung": (1, 2), "nodule": (2,)}
    assert ds.labels == {"background": 0, "nodule": 2, "lung": 1}
    check = validate_dataset(ds, [2], region_label=1, need_lesions=True)
    assert check.label_values["c000"] == {0, 1, 2} and check.lesion_cases == ["c000"]
    brats = load_raw_dataset(_tiny_raw(tmp_path / "b", {"background": 0, "wt": [1, 2, 3], "tc": [2, 3],
                                                         "et": [3]}, (0, 1, 2, 3), {"regions_class_order": [1, 2, 3]}))
    assert brats.labels == {"background": 0, "et": 3, "wt": 1, "tc": 2}


@pytest.mark.parametrize("labels, extra, match", [
    (REGION_LABELS, {}, "regions_class_order"),
    (REGION_LABELS, {"regions_class_order": [1]}, "one integer per foreground region"),
    ({"background": 0, "lung": [], "nodule": 2}, {}, "one or more integer label values"),
    ({"background": 0, "lung": [1, "2"], "nodule": 2}, {}, "one or more integer label values"),
    ({"background": 0, "lung": 1.5}, {}, "not an integer")])
def test_bad_region_based_labels_are_one_sentence_errors(tmp_path, labels, extra, match):
    with pytest.raises(LeFusionInputError, match=match):
        load_raw_dataset(_tiny_raw(tmp_path, labels, extra=extra))


def test_region_label_value_outside_every_region_is_refused(tmp_path):
    folder = _tiny_raw(tmp_path, REGION_LABELS, (0, 1, 3), {"regions_class_order": [1, 2]})
    with pytest.raises(LeFusionInputError, match=r"value\(s\) \[3\]"):
        validate_dataset(load_raw_dataset(folder), [2])


def test_bank_progress_lines_are_rate_limited_with_eta():
    now = [100.0]
    lines: list[str] = []
    progress = BankProgress(10, lines.append, every_seconds=30.0, clock=lambda: now[0])
    for step in (2, 2, 2, 2):  # 2 variants every 10 s
        now[0] += 10.0
        progress.add(step)
    assert lines == ["LeFusion bank progress: 2/10 variants (20 %), 5.00 s per variant, ETA 40 s",
                     "LeFusion bank progress: 8/10 variants (80 %), 5.00 s per variant, ETA 10 s"]
    now[0] += 5.0
    progress.add(1)  # 9/10 within 30 s of the last line: quiet
    progress.finish()  # a skipped variant: 9 is the final count
    assert lines[-1] == "LeFusion bank progress: 9/10 variants (90 %), 5.00 s per variant, ETA 5 s"
    progress.finish()
    assert len(lines) == 3
    progress.add(1)
    assert lines[-1].startswith("LeFusion bank progress: 10/10 variants (100 %)")


# ------------------------------------------------------------------------------------------------ real nnU-Net

class World:
    """The module's nnU-Net folders and a runner for commands in its environment."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LEFUSION_") and k != "nnUNet_extTrainer"}
        for var in NNUNET_ENV:
            (root / var).mkdir()
            self.env[var] = str(root / var)
        self.env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                        LEFUSION_ITERATIONS_PER_EPOCH="4", LEFUSION_VAL_ITERATIONS_PER_EPOCH="2",
                        LEFUSION_PROBABILITY="1", LEFUSION_BATCH_SIZE="8",
                        LEFUSION_BANK_BUILD="before-training")  # 4-iteration runs: draw from the whole bank
        self.names: dict[int, str] = {}
        self.seconds: list[tuple[str, float]] = []  # (command, wall seconds), shown with -s

    def run(self, *cmd, ok: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        out = subprocess.run([str(c) for c in cmd], env={**self.env, **(env or {})}, cwd=self.root,
                             capture_output=True, text=True, timeout=timeout)
        self.seconds.append((" ".join(Path(str(c)).name if i == 0 else str(c) for i, c in enumerate(cmd[:6])),
                             time.perf_counter() - start))
        if ok:
            assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    def raw(self, did: int) -> Path:
        return self.root / "nnUNet_raw" / self.names[did]

    def pre(self, did: int) -> Path:
        return self.root / "nnUNet_preprocessed" / self.names[did]

    def fold(self, did: int, configuration: str, plans: str = "nnUNetPlans", trainer: str = TRAINER) -> Path:
        return self.root / "nnUNet_results" / self.names[did] / f"{trainer}__{plans}__{configuration}" / "fold_0"

    def train(self, did: int, configuration: str, *extra: str, plans: str = "nnUNetPlans", ok: bool = True,
              env: dict | None = None):
        """``nnUNetv2_train DID CONFIGURATION 0 -tr LeFusionTrainer_1epoch``; returns (process, new log text)."""
        fold = self.fold(did, configuration, plans)
        before = set(fold.glob("training_log_*.txt")) if fold.is_dir() else set()
        out = self.run("nnUNetv2_train", did, configuration, 0, "-tr", TRAINER, "-p", plans, "-device", "cpu",
                       *extra, ok=ok, env={"nnUNet_n_proc_DA": "0", **(env or {})})  # augmentation in-process
        logs = sorted(set(fold.glob("training_log_*.txt")) - before) if fold.is_dir() else []
        return out, "".join(p.read_text() for p in logs)

    def banks(self, did: int) -> dict[str, dict]:
        """Bank folder name -> manifest, for every complete bank of the dataset."""
        root = self.pre(did) / bank_mod.BANK_FOLDER
        if not root.is_dir():
            return {}
        return {b.name: json.loads((b / bank_mod.MANIFEST_NAME).read_text())
                for b in sorted(root.iterdir()) if not b.name.startswith(".")}

    def bank_of(self, did: int, configuration: str, plans: str = "nnUNetPlans") -> tuple[Path, dict]:
        found = [(self.pre(did) / bank_mod.BANK_FOLDER / k, m) for k, m in self.banks(did).items()
                 if m["spec"]["configuration"] == configuration and m["spec"]["plans_name"] == plans]
        assert len(found) == 1, (configuration, plans, list(self.banks(did)))
        return found[0]

    def splits(self, did: int) -> dict:
        return json.loads((self.pre(did) / "splits_final.json").read_text())[0]


def _add_lowres(plans_file: Path) -> None:
    """A 3d_lowres configuration (half the resolution of 3d_fullres) and the cascade, as nnU-Net writes them."""
    plans = json.loads(plans_file.read_text())
    full = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
        "spacing": [2 * s for s in full["spacing"]],
        "median_image_size_in_voxels": [int(np.ceil(m / 2)) for m in full["median_image_size_in_voxels"]],
        "patch_size": [16, 32, 32], "batch_dice": False, "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_file.write_text(json.dumps(plans, indent=2))


def _one_val_case_split(raw: Path) -> dict:
    """Fold 0 with one validation case (a lesion case; nnU-Net's validation costs seconds per case on CPU)."""
    from lefusion_nnunet.data.io import read_label

    cases = sorted(p.name.split(".")[0] for p in (raw / "labelsTr").glob("*.nii.gz"))
    val = next(c for c in cases if (read_label(raw / "labelsTr" / f"{c}.nii.gz")[0] == 2).any())
    return {"train": [c for c in cases if c != val], "val": [val]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lefusion_nnunet.integration.install import install_trainer_shim, shim_installed, uninstall_trainer_shim

    w = World(tmp_path_factory.mktemp("setups"))
    was_installed = shim_installed()
    w.run(*_lefusion_cmd(), "install-trainer")
    try:
        w.run(*_lefusion_cmd(), "phantom", "-o", w.root / "nnUNet_raw", "--id", DID, "--cases", 8,
              "--lesion-free-fraction", "0.5", "--shape", 48, 48, 32)
        w.names[DID] = next((w.root / "nnUNet_raw").glob(f"Dataset{DID}_*")).name
        # the default planner, a hand-added 3d_lowres, one preprocessing run for three configurations
        w.run("nnUNetv2_extract_fingerprint", "-d", DID, "-np", 1)
        w.run("nnUNetv2_plan_experiment", "-d", DID)
        (w.pre(DID) / "splits_final.json").write_text(json.dumps([_one_val_case_split(w.raw(DID))]))
        _add_lowres(w.pre(DID) / "nnUNetPlans.json")
        w.run("nnUNetv2_preprocess", "-d", DID, "-c", "2d", "3d_fullres", "3d_lowres", "-np", 1, 1, 1)
        # the ResEnc M preset; batch size 8 (planned for a 9-11 GB GPU) lowered to 2 in its plans for CPU
        w.run("nnUNetv2_plan_experiment", "-d", DID, "-pl", "nnUNetPlannerResEncM")
        resenc = w.pre(DID) / "nnUNetResEncUNetMPlans.json"
        plans = json.loads(resenc.read_text())
        plans["configurations"]["3d_fullres"]["batch_size"] = 2
        resenc.write_text(json.dumps(plans, indent=2))
        w.run("nnUNetv2_preprocess", "-d", DID, "-plans_name", "nnUNetResEncUNetMPlans", "-c", "3d_fullres",
              "-np", 1)
        w.run(*_lefusion_cmd(), "train", "-d", DID, "--lesion-label", 2, "--preset", "tiny", "--steps", 20,
              "--roi-size", 32, 32, 16)
        w.run(*_lefusion_cmd(), "trainer-config", "-d", DID, "--per-case", PER_CASE, "--steps", 5)
        w.checkpoint = json.loads((w.pre(DID) / "lefusion_trainer.json").read_text())["checkpoint"]

        # the same cases with region-based labels; the lesion model of the phantom is used for them too
        w.names[RID] = f"Dataset{RID}_LFRegions"
        shutil.copytree(w.raw(DID), w.raw(RID))
        djson = json.loads((w.raw(RID) / "dataset.json").read_text())
        djson.update(labels=REGION_LABELS, regions_class_order=[1, 2], name=w.names[RID])
        (w.raw(RID) / "dataset.json").write_text(json.dumps(djson, indent=2))
        # byte-identical images: the fingerprint is the phantom's (nnU-Net reuses one it finds, without --clean)
        (w.pre(RID)).mkdir()
        shutil.copy(w.pre(DID) / "dataset_fingerprint.json", w.pre(RID) / "dataset_fingerprint.json")
        w.run("nnUNetv2_plan_and_preprocess", "-d", RID, "-c", "3d_fullres", "-np", 1)
        (w.pre(RID) / "splits_final.json").write_text((w.pre(DID) / "splits_final.json").read_text())
        w.run(*_lefusion_cmd(), "trainer-config", "-d", RID, "--checkpoint", w.checkpoint, "--per-case", PER_CASE,
              "--steps", 5)
        yield w
    finally:
        print("\n".join(f"{t:6.1f} s  {c}" for c, t in w.seconds))
        if not was_installed:
            uninstall_trainer_shim()
        else:
            install_trainer_shim()


def _check_run(w: World, did: int, configuration: str, log: str, plans: str = "nnUNetPlans") -> dict:
    """The run trained on synthetic cases of its training split from its own bank and finished with nnU-Net's
    validation; returns the bank manifest."""
    fold = w.fold(did, configuration, plans)
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    split = w.splits(did)
    stats = read_draws(fold / bank_mod.DRAWS_LOG_NAME)
    assert stats.synthetic > 0 and set(stats.sources) <= set(split["train"])
    folder, manifest = w.bank_of(did, configuration, plans)
    spec = manifest["spec"]
    pre_plans = json.loads((w.pre(did) / f"{plans}.json").read_text())
    assert spec["data_identifier"] == _data_identifier(pre_plans, configuration)
    sources = {v["source_case"] for v in manifest["variants"].values()}
    assert sources and sources <= set(split["train"]) and not sources & set(split["val"])
    n = len(manifest["variants"])
    assert n == PER_CASE * len(spec["case_ids"]) - len([x for x in manifest["warnings"] if "skipped" in x])
    assert f"LeFusion: {n} synthetic cases of {len(spec['case_ids'])} lesion-free training cases" in log
    assert "(built in" in log and str(folder) in log
    assert re.search(rf"LeFusion bank progress: {n}/{PER_CASE * len(spec['case_ids'])} variants \(\d+ %\), "
                     r"[\d.]+ s per variant, ETA \d+ s", log), log[-3000:]
    assert "training case loads used a synthetic case" in log
    return manifest


def _data_identifier(plans: dict, configuration: str) -> str:
    cfg = plans["configurations"][configuration]
    while "data_identifier" not in cfg:
        cfg = plans["configurations"][cfg["inherits_from"]]
    return cfg["data_identifier"]


@pytest.mark.slow
def test_resenc_preset_plans(world):
    # ResEnc M is ~5x the compute of the default U-Net on CPU: 1 + 1 iterations (and batch 2, see the fixture)
    _, log = world.train(DID, "3d_fullres", plans="nnUNetResEncUNetMPlans",
                         env={"LEFUSION_ITERATIONS_PER_EPOCH": "1", "LEFUSION_VAL_ITERATIONS_PER_EPOCH": "1"})
    assert "ResidualEncoderUNet" in log and "'plans_name': 'nnUNetResEncUNetMPlans'" in log
    manifest = _check_run(world, DID, "3d_fullres", log, plans="nnUNetResEncUNetMPlans")
    assert manifest["spec"]["plans_name"] == "nnUNetResEncUNetMPlans"


def _first_patch(w: World, did: int, configuration: str, manifest: dict):
    """The first variant's patch and the shape (Z, Y, X) of its source case as nnU-Net stored it."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder, _ = w.bank_of(did, configuration)
    vid, entry = next(iter(manifest["variants"].items()))
    data_folder = str(w.pre(did) / manifest["spec"]["data_identifier"])
    source = infer_dataset_class(data_folder)(data_folder, [entry["source_case"]]).load_case(entry["source_case"])
    patch = load_patch(folder / f"{vid}{PATCH_SUFFIX}")
    shape = np.asarray(source[0].shape[1:])
    assert (patch.bbox[:, 1] <= shape).all() and patch.data.shape[1:] == tuple(np.diff(patch.bbox, axis=1)[:, 0])
    assert (patch.seg == 2).any()  # the synthetic lesion, on the configuration's own grid
    return patch, shape


@pytest.mark.slow
def test_2d_configuration(world):
    _, log = world.train(DID, "2d")
    manifest = _check_run(world, DID, "2d", log)
    assert manifest["spec"]["data_identifier"] == "nnUNetPlans_2d"
    _first_patch(world, DID, "2d", manifest)


@pytest.mark.slow
def test_3d_lowres_configuration(world):
    _, log = world.train(DID, "3d_lowres")
    manifest = _check_run(world, DID, "3d_lowres", log)
    assert manifest["spec"]["data_identifier"] == "nnUNetPlans_3d_lowres"
    _, shape = _first_patch(world, DID, "3d_lowres", manifest)
    assert (shape < np.array([32, 48, 48])).all()  # really the low-resolution grid
    # nnU-Net's validation of 3d_lowres also exported the cascade's input
    assert any((world.fold(DID, "3d_lowres").parent / "predicted_next_stage" / "3d_cascade_fullres").iterdir())


@pytest.mark.slow
def test_cascade_is_refused_in_one_sentence(world):
    banks = set(world.banks(DID))
    out, log = world.train(DID, "3d_cascade_fullres", ok=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "LeFusionInputError: LeFusionTrainer does not support nnU-Net's cascade (3d_cascade_fullres takes " \
           "the 3d_lowres prediction" in text, text[-3000:]
    assert "train 3d_fullres or 3d_lowres with LeFusionTrainer, or the cascade with nnUNetTrainer." in text
    assert "LeFusion: error: LeFusionTrainer does not support" in log
    assert set(world.banks(DID)) == banks
    assert not (world.fold(DID, "3d_cascade_fullres") / "checkpoint_final.pth").exists()


@pytest.mark.slow
def test_lesion_free_cases_of_a_region_based_dataset(world):
    """class_locations keyed by regions: label 2 is its own region; label 1 lies only in region (1, 2)."""
    from lefusion_nnunet.data.io import read_label

    folder = world.pre(RID) / "nnUNetPlans_3d_fullres"
    ids = sorted(p.name[:-4] for p in folder.glob("*.pkl"))
    truth = {}
    for cid in ids:
        lab, _ = read_label(world.raw(RID) / "labelsTr" / f"{cid}.nii.gz")
        truth[cid] = (not (lab == 2).any(), not (lab == 1).any())
    keys = set(pickle.loads((folder / f"{ids[0]}.pkl").read_bytes())["class_locations"])
    assert keys == {(1, 2), 2}
    free2 = bank_mod.lesion_free_cases(folder, ids, [2])
    assert free2 == [c for c in ids if truth[c][0]] and 0 < len(free2) < len(ids)
    assert bank_mod.lesion_free_cases(folder, ids, [1]) == [c for c in ids if truth[c][1]] == []
    with pytest.raises(LeFusionInputError, match="not a label"):
        bank_mod.lesion_free_cases(folder, ids, [3])


@pytest.fixture(scope="module")
def region_run(world):
    _, log = world.train(RID, "3d_fullres")
    return log


@pytest.mark.slow
def test_region_based_labels(world, region_run):
    manifest = _check_run(world, RID, "3d_fullres", region_run)
    folder, _ = world.bank_of(RID, "3d_fullres")
    patch = load_patch(folder / f"{next(iter(manifest['variants']))}{PATCH_SUFFIX}")
    assert set(patch.class_locations) == {(1, 2), 2} and len(patch.class_locations[2]) > 0
    assert (patch.seg == 2).any()
    assert "regions_class_order" in json.loads((world.pre(RID) / "dataset.json").read_text())


@pytest.mark.slow
def test_continue_reuses_the_bank(world, region_run):
    folder, manifest = world.bank_of(RID, "3d_fullres")
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    _, log = world.train(RID, "3d_fullres", "--c")
    assert log and "(reused, " in log and "building the synthetic bank" not in log
    assert "LeFusion bank progress" not in log
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert world.bank_of(RID, "3d_fullres")[1] == manifest and len(world.banks(RID)) == 1


@pytest.mark.slow
def test_validation_only(world, region_run):
    summary = world.fold(RID, "3d_fullres") / "validation" / "summary.json"
    summary.unlink()
    banks = world.banks(RID)
    _, log = world.train(RID, "3d_fullres", "--val")
    assert summary.is_file() and "Validation complete" in log
    cases = {c["reference_file"].split("/")[-1].split(".")[0]
             for c in json.loads(summary.read_text())["metric_per_case"]}
    assert cases == set(world.splits(RID)["val"])
    assert "LeFusion: " not in log.replace("LeFusion settings:", "")  # no bank needed for validation
    assert world.banks(RID) == banks


@pytest.mark.slow
def test_predict_with_the_plain_trainer_class(world, region_run):
    """``nnUNetv2_predict -tr LeFusionTrainer``: the folder of a plain-class run is the 1-epoch run's folder with
    the checkpoint's trainer name set to ``LeFusionTrainer`` (nnU-Net's predictor builds the network through the
    class of that name; the _1epoch variant differs only in ``num_epochs``, which inference does not read)."""
    import torch

    src = world.fold(RID, "3d_fullres").parent
    dst = src.parent / src.name.replace(TRAINER, "LeFusionTrainer")
    shutil.copytree(src, dst)
    ckpt = dst / "fold_0" / "checkpoint_final.pth"
    content = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert content["trainer_name"] == TRAINER
    content["trainer_name"] = "LeFusionTrainer"
    torch.save(content, ckpt)
    case = world.splits(RID)["val"][0]
    inp, outp = world.root / "predict_in", world.root / "predict_out"
    inp.mkdir()
    shutil.copy(world.raw(RID) / "imagesTr" / f"{case}_0000.nii.gz", inp)
    out = world.run("nnUNetv2_predict", "-i", inp, "-o", outp, "-d", RID, "-c", "3d_fullres", "-f", 0,
                    "-tr", "LeFusionTrainer", "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_tta")
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(outp / f"{case}.nii.gz")))
    assert pred.shape == (32, 48, 48) and set(np.unique(pred)) <= {0, 1, 2}, out.stdout[-2000:]
