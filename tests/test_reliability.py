"""Every bad input of ``docs/errors.md``, tried through the real ``lefusion`` command on a generated dataset.

Each row of the table is one entry of :data:`ROWS`: a setup that breaks a fresh copy of a small phantom
dataset (or the environment, a checkpoint, the output) and returns the command line. ``test_bad_input`` runs
``lefusion_nnunet.cli.main.main`` on it and asserts: exit status 2, exactly one ``lefusion: error:`` line that
names the problem (the fragments), and *nothing written*: every file and folder under the test's temporary
folder (nnUNet_raw, nnUNet_preprocessed, nnUNet_results, outputs) is byte-identical before and after.

Set ``LEFUSION_ERRORS_TABLE=path.jsonl`` to record each row's message (used to write docs/errors.md).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lefusion_nnunet.cli.main import main
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.io import read_image
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom
from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer
from lefusion_nnunet.training.lesion import train_lesion_model
from lefusion_nnunet.training.loop import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.5, 1.5, 1.5)
DATASET_ID = 990
NAME = "Dataset990_Tiny"
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A 6-case phantom (24 x 48 x 48 voxels; 2 lesion-free cases) and a tiny lesion checkpoint trained on it."""
    raw = tmp_path_factory.mktemp("template_raw")
    folder = generate_chest_phantom(raw, DATASET_ID, "Tiny", PhantomConfig(
        num_cases=6, lesion_free_fraction=0.34, shape_zyx=(24, 48, 48), spacing_zyx=SPACING,
        nodule_diameter_mm=(8.0, 14.0), seed=1))
    manifest = json.loads((folder / "phantom_manifest.json").read_text())
    free = [c["case_id"] for c in manifest["cases"] if not c["has_lesion"]]
    lesion = [c["case_id"] for c in manifest["cases"] if c["has_lesion"]]
    cfg = TrainConfig(preset="tiny", steps=3, batch_size=2, checkpoint_every=3, num_train_timesteps=20,
                      texture_clusters=2, device="cpu")
    ckpt = train_lesion_model(load_raw_dataset(folder), [2], tmp_path_factory.mktemp("ckpt") / "run", cfg,
                              RoiGeometry((16, 32, 32), SPACING), region_label=1, progress=False)
    return SimpleNamespace(folder=folder, ckpt=ckpt, free=free, lesion=lesion)


@pytest.fixture
def env(template, tmp_path, monkeypatch):
    """nnU-Net env vars in tmp_path and a private copy of the phantom dataset."""
    for var in NNUNET_ENV:
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    ds = tmp_path / "nnUNet_raw" / NAME
    shutil.copytree(template.folder, ds)
    return SimpleNamespace(tmp=tmp_path, raw=tmp_path / "nnUNet_raw", pre=tmp_path / "nnUNet_preprocessed",
                           res=tmp_path / "nnUNet_results", ds=ds, ckpt=template.ckpt, free=list(template.free),
                           lesion=list(template.lesion))


# ------------------------------------------------------------------------------------------------ helpers

def tree(root: Path) -> dict[str, str]:
    """Every file (SHA-256) and folder under ``root``: the test's whole world."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fails(env, capsys, args: list[str], fragments) -> str:
    """Run the command; assert exit 2, one `lefusion: error:` sentence holding ``fragments``, nothing written."""
    before = tree(env.tmp)
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("lefusion: error: ")]
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    assert len(errors) == 1, err
    message = errors[0][len("lefusion: error: "):]
    assert message.endswith(".") and "Traceback" not in err, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert tree(env.tmp) == before, "the failed command wrote or removed files"
    return message


def record(name: str, command: str, message: str, env) -> None:
    out = os.environ.get("LEFUSION_ERRORS_TABLE")
    if not out:
        return
    text = message.replace(str(env.tmp), "<tmp>").replace(str(env.ckpt), "<checkpoint>")
    with open(out, "a") as f:
        f.write(json.dumps({"row": name, "command": command, "message": text}) + "\n")


def train_args(*extra, lesion="2", region: str | None = "1") -> list[str]:
    args = ["train", "-d", str(DATASET_ID), "--lesion-label", lesion, "--preset", "tiny", "--steps", "2",
            "--batch-size", "2", "--roi-size", "32", "32", "16", "--device", "cpu"]
    return args + (["--region-label", region] if region is not None else []) + list(extra)


def enlarge_args(env, *extra, checkpoint=None) -> list[str]:
    return ["enlarge", "-d", str(DATASET_ID), "--destination", "991", "--checkpoint", str(checkpoint or env.ckpt),
            "--per-case", "1", "--steps", "2", "--device", "cpu", "--size-mm", "6", "10", *extra]


def config_args(env, *extra, checkpoint=None) -> list[str]:
    return ["trainer-config", "-d", str(DATASET_ID), "--checkpoint", str(checkpoint or env.ckpt), *extra]


def image_file(env, case: str, channel: int = 0, ending: str = ".nii.gz") -> Path:
    return env.ds / "imagesTr" / f"{case}_{channel:04d}{ending}"


def label_file(env, case: str, ending: str = ".nii.gz") -> Path:
    return env.ds / "labelsTr" / f"{case}{ending}"


def edit_json(env, fn) -> None:
    path = env.ds / "dataset.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2))


def like(array: np.ndarray, ref: sitk.Image, **geometry) -> sitk.Image:
    """An image of ``array`` with ``ref``'s geometry, overridden by ``spacing``/``origin``/``direction``."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(geometry.get("spacing", ref.GetSpacing()))
    img.SetOrigin(geometry.get("origin", ref.GetOrigin()))
    img.SetDirection(geometry.get("direction", ref.GetDirection()))
    return img


def rewrite(path: Path, array=None, **geometry) -> None:
    ref = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(ref) if array is None else array
    sitk.WriteImage(like(arr, ref, **geometry), str(path), True)


def convert_dataset(env, ending: str) -> None:
    """Rewrite every file of the dataset with another file ending (e.g. .mha, which can hold NaN)."""
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((env.ds / sub).glob("*.nii.gz")):
            sitk.WriteImage(sitk.ReadImage(str(f)), str(f.with_name(f.name[:-len(".nii.gz")] + ending)), True)
            f.unlink()
    edit_json(env, lambda d: d.update(file_ending=ending))


def put_value(env, case: str, value: float) -> Path:
    """Convert the dataset to .mha and put ``value`` (NaN, Inf) into one voxel of ``case``'s image."""
    convert_dataset(env, ".mha")
    path = image_file(env, case, ending=".mha")
    ref = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(ref).astype(np.float32)
    arr[5, 20, 20] = value
    sitk.WriteImage(like(arr, ref), str(path), True)
    return path


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def remove_case(env, case: str) -> None:
    image_file(env, case).unlink()
    label_file(env, case).unlink()
    edit_json(env, lambda d: d.update(numTraining=d["numTraining"] - 1))


def forge_checkpoint(src: Path, dst: Path, content_fn=None, outer_fn=None) -> Path:
    """Re-save a checkpoint with its content and/or outer dict changed (content changes get a valid hash)."""
    outer = torch.load(src, weights_only=True)
    if content_fn is not None:
        content = torch.load(io.BytesIO(outer["payload"].numpy().tobytes()), weights_only=True)
        content = content_fn(content) or content
        buf = io.BytesIO()
        torch.save(content, buf)
        raw = buf.getvalue()
        outer["payload"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        outer["sha256"] = hashlib.sha256(raw).hexdigest()
    if outer_fn is not None:
        outer_fn(outer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(outer, dst)
    return dst


class CodeOnLoad:
    """Pickles as a call to ``os.mkdir(marker)``: a checkpoint loader that runs pickled code creates the folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def synth_inputs(env, case: str | None = None, radius: int = 2, crop=None) -> SimpleNamespace:
    """Image, label and a small ball mask inside the lung of a lesion-free case, as files in tmp/synth_in."""
    case = case or env.free[0]
    folder = env.tmp / "synth_in"
    folder.mkdir(exist_ok=True)
    img = sitk.ReadImage(str(image_file(env, case)))
    lab = sitk.ReadImage(str(label_file(env, case)))
    image, label = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
    if crop is not None:
        image, label = image[crop], label[crop]
    lung = np.argwhere(label == 1)
    center = lung[len(lung) // 2]
    zz, yy, xx = np.indices(label.shape)
    mask = ((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius ** 2).astype(np.uint8)
    files = SimpleNamespace(image=folder / f"{case}_0000.nii.gz", label=folder / f"{case}.nii.gz",
                            mask=folder / f"{case}_mask.nii.gz", out=env.tmp / "synth_out", array=image,
                            mask_array=mask)
    sitk.WriteImage(like(image, img), str(files.image), True)
    sitk.WriteImage(like(label, lab), str(files.label), True)
    sitk.WriteImage(like(mask, lab), str(files.mask), True)
    return files


def synth_args(env, f, *extra, checkpoint=None) -> list[str]:
    return ["synthesize", "--checkpoint", str(checkpoint or env.ckpt), "-i", str(f.image), "-l", str(f.label),
            "--mask", str(f.mask), "-o", str(f.out), "--steps", "2", "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------------ the rows

ROWS: dict[str, tuple[str, tuple[str, ...], object]] = {}


def row(name: str, command: str, *fragments: str):
    def deco(fn):
        assert name not in ROWS
        ROWS[name] = (command, fragments, fn)
        return fn
    return deco


# -- environment and dataset.json
@row("env-var-unset", "train", "environment variable nnUNet_raw is not set", "export nnUNet_raw=")
def _(env, mp):
    mp.delenv("nnUNet_raw")
    return train_args()


@row("env-var-not-a-folder", "train", "nnUNet_raw=", "does not name an existing folder")
def _(env, mp):
    mp.setenv("nnUNet_raw", str(env.tmp / "no_such_folder"))
    return train_args()


@row("unknown-dataset-id", "train", "no dataset with id 777", "nnUNet_raw")
def _(env, mp):
    return ["train", "-d", "777", "--lesion-label", "2"]


@row("dataset-json-missing", "enlarge", "dataset.json is missing")
def _(env, mp):
    (env.ds / "dataset.json").unlink()
    return enlarge_args(env)


@row("dataset-json-invalid", "train", "dataset.json is not valid JSON", "line 1")
def _(env, mp):
    (env.ds / "dataset.json").write_text('{"labels": {"background": 0,')
    return train_args()


@row("dataset-json-no-labels", "train", "has no 'labels' entry")
def _(env, mp):
    edit_json(env, lambda d: d.pop("labels"))
    return train_args()


@row("dataset-json-regions-without-order", "train", "regions_class_order", "one integer per foreground region")
def _(env, mp):
    edit_json(env, lambda d: d["labels"].update(lung=[1, 2]))
    return train_args()


@row("dataset-json-region-not-integers", "train", "a region must list one or more integer label values")
def _(env, mp):
    edit_json(env, lambda d: d["labels"].update(lung=[1, "x"], nodule=2) or d.update(regions_class_order=[1, 2]))
    return train_args()


@row("dataset-json-no-cases", "train", "lists no training cases", "file ending")
def _(env, mp):
    edit_json(env, lambda d: d.update(file_ending=".nrrd"))
    return train_args()


@row("unsupported-file-ending", "train", "has file_ending '.nii'", "convert the dataset")
def _(env, mp):
    convert_dataset(env, ".nii")
    return train_args()


# -- labels
@row("lesion-label-not-in-dataset-json", "train", "--lesion-label 7 is not a foreground label", "dataset.json")
def _(env, mp):
    return train_args(lesion="7")


@row("region-label-not-in-dataset-json", "train", "--region-label 9 is not a foreground label")
def _(env, mp):
    return train_args(region="9")


@row("region-label-is-lesion-label", "train", "--region-label 2 is also a lesion label")
def _(env, mp):
    return train_args(region="2")


@row("lesion-label-absent-from-every-case", "train", "lesion label 3 is declared", "occurs in no label map")
def _(env, mp):
    edit_json(env, lambda d: d["labels"].update(cyst=3))
    return train_args(lesion="3")


@row("region-label-absent-from-every-case", "train", "region label 3 is declared", "occurs in no label map")
def _(env, mp):
    edit_json(env, lambda d: d["labels"].update(heart=3))
    return train_args(region="3")


@row("region-label-absent-from-lesion-free-cases", "enlarge", "occurs in none of the", "case(s) that would receive")
def _(env, mp):
    edit_json(env, lambda d: d["labels"].update(heart=3))
    path = label_file(env, env.lesion[0])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    arr[0, 0, 0] = 3  # label 3 exists, but only in a lesion case
    rewrite(path, arr)
    return enlarge_args(env, "--region-label", "3")


@row("label-value-not-in-dataset-json", "train", "holds value(s) [5]", "does not declare")
def _(env, mp):
    path = label_file(env, env.free[0])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    arr[0, 0, 0] = 5
    rewrite(path, arr)
    return train_args()


@row("label-not-integer", "train", "holds non-integer values")
def _(env, mp):
    path = label_file(env, env.free[0])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    arr[0, 0, 0] = 0.5
    rewrite(path, arr)
    return train_args()


@row("no-lesion-free-case", "enlarge", "no lesion-free case", "--cases-from all")
def _(env, mp):
    for case in env.free:
        remove_case(env, case)
    return enlarge_args(env)


@row("no-lesion-free-case-trainer", "trainer-config", "no lesion-free case", "LeFusionTrainer only adds lesions")
def _(env, mp):
    for case in env.free:
        remove_case(env, case)
    return config_args(env)


@row("real-masks-without-lesions", "enlarge", "lesion label 2 is declared", "occurs in no label map")
def _(env, mp):
    for case in env.lesion:
        remove_case(env, case)
    return enlarge_args(env, "--mask-source", "real")


# -- geometry and channels
@row("label-size-mismatch", "train", "has size [47, 48, 24] (x, y, z)", "resample the label")
def _(env, mp):
    path = label_file(env, env.free[0])
    rewrite(path, sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[:, :, :47])
    return train_args()


@row("label-spacing-mismatch", "train", "differ in spacing", "resample the label")
def _(env, mp):
    rewrite(label_file(env, env.lesion[0]), spacing=(1.5, 1.5, 3.0))
    return train_args()


@row("label-origin-mismatch", "enlarge", "differ in origin", "resample the label")
def _(env, mp):
    path = label_file(env, env.free[0])
    origin = np.asarray(sitk.ReadImage(str(path)).GetOrigin()) + (0.0, 2.0, 0.0)
    rewrite(path, origin=tuple(origin))
    return enlarge_args(env)


@row("label-direction-mismatch", "train", "differ in direction", "resample the label")
def _(env, mp):
    rewrite(label_file(env, env.free[0]), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    return train_args()


@row("channel-files-on-different-grids", "train", "differ in spacing", "channel files of a case must share one grid")
def _(env, mp):
    for f in sorted((env.ds / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(f, f.with_name(f.name.replace("_0000", "_0001")))
    rewrite(image_file(env, env.lesion[0], 1), spacing=(1.5, 1.5, 2.0))
    edit_json(env, lambda d: d["channel_names"].update({"1": "CT2"}))
    return train_args()


@row("channel-file-missing", "train", "has 1 image file(s)", "declares 2 channel(s)", "add the missing")
def _(env, mp):
    edit_json(env, lambda d: d["channel_names"].update({"1": "T2"}))
    return train_args()


@row("channel-out-of-range", "train", "--channel 1 was requested", "declares 1 channel(s)")
def _(env, mp):
    return train_args("--channel", "1")


@row("vector-image", "train", "holds 3 values per voxel", "one file per channel")
def _(env, mp):
    path = image_file(env, env.lesion[0])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    ref = sitk.ReadImage(str(path))
    img = sitk.GetImageFromArray(np.stack([arr] * 3, -1), isVector=True)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path), True)
    return train_args()


@row("image-2d", "train", "is a 2D image", "3D volumes")
def _(env, mp):
    path = image_file(env, env.free[0])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((48, 48), np.int16)), str(path), True)
    return train_args()


@row("image-4d", "enlarge", "is a 4D image", "split it into one 3D file per channel")
def _(env, mp):
    path = image_file(env, env.free[0])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr]), isVector=False), str(path), True)
    return enlarge_args(env)


@row("image-nan-voxels", "train", "contains 1 NaN or infinite voxel(s)", ".mha")
def _(env, mp):
    put_value(env, env.lesion[0], np.nan)
    return train_args()


@row("image-inf-voxels", "enlarge", "contains 1 NaN or infinite voxel(s)", ".mha")
def _(env, mp):
    put_value(env, env.free[0], np.inf)
    return enlarge_args(env)


@row("image-truncated", "enlarge", "is truncated", "re-export or replace it")
def _(env, mp):
    truncate(image_file(env, env.free[1]))
    return enlarge_args(env)


@row("image-truncated-nrrd", "train", "cannot be read (truncated, corrupt or not an image)")
def _(env, mp):
    convert_dataset(env, ".nrrd")
    truncate(image_file(env, env.lesion[0], ending=".nrrd"), 0.7)
    return train_args()


@row("image-not-an-image", "train", "cannot be read (truncated, corrupt or not an image)")
def _(env, mp):
    image_file(env, env.free[0]).write_bytes(b"this is not a NIfTI file" * 10)
    return train_args()


@row("label-truncated", "train", "label file", "is truncated")
def _(env, mp):
    truncate(label_file(env, env.free[0]))
    return train_args()


@row("label-file-missing", "train", "label file", "does not exist")
def _(env, mp):
    label_file(env, env.free[0]).unlink()
    return train_args()


# -- region masks (enlarge)
def _region_masks(env, cases) -> Path:
    folder = env.tmp / "regions"
    folder.mkdir(exist_ok=True)
    for case in cases:
        lab = sitk.ReadImage(str(label_file(env, case)))
        sitk.WriteImage(like((sitk.GetArrayFromImage(lab) == 1).astype(np.uint8), lab), str(folder / f"{case}.nii.gz"))
    return folder


@row("region-mask-folder-missing", "enlarge", "region mask folder", "does not exist")
def _(env, mp):
    return enlarge_args(env, "--region-masks", str(env.tmp / "no_regions"))


@row("region-mask-missing-for-a-case", "enlarge", "region mask", "is missing")
def _(env, mp):
    return enlarge_args(env, "--region-masks", str(_region_masks(env, env.free[:1])))


@row("region-mask-other-grid", "enlarge", "has size", "resample the mask")
def _(env, mp):
    folder = _region_masks(env, env.free)
    rewrite(folder / f"{env.free[0]}.nii.gz", np.ones((24, 40, 48), np.uint8))
    return enlarge_args(env, "--region-masks", str(folder))


@row("region-mask-empty", "enlarge", "is empty", "--region-masks")
def _(env, mp):
    folder = _region_masks(env, env.free)
    rewrite(folder / f"{env.free[1]}.nii.gz", np.zeros((24, 48, 48), np.uint8))
    return enlarge_args(env, "--region-masks", str(folder))


# -- synthesize: one case given as files
@row("mask-empty", "synthesize", "is empty", "non-zero voxels")
def _(env, mp):
    f = synth_inputs(env)
    rewrite(f.mask, np.zeros_like(f.mask_array))
    return synth_args(env, f)


@row("mask-on-another-grid", "synthesize", "has size [40, 48, 24] (x, y, z)", "resample the mask")
def _(env, mp):
    f = synth_inputs(env)
    rewrite(f.mask, f.mask_array[:, :, :40])
    return synth_args(env, f)


@row("mask-larger-than-the-model-roi", "synthesize", "does not fit the model ROI", "--roi-size")
def _(env, mp):
    f = synth_inputs(env)
    rewrite(f.mask, (sitk.GetArrayFromImage(sitk.ReadImage(str(f.label))) == 1).astype(np.uint8))
    return synth_args(env, f)


@row("image-files-fewer-than-channels", "synthesize", "trained on image channel 1 but 1 image file(s)")
def _(env, mp):
    ckpt = forge_checkpoint(env.ckpt, env.tmp / "ckpts" / "channel1.pt",
                            content_fn=lambda c: c["data_config"].update(channel=1))
    return synth_args(env, synth_inputs(env), checkpoint=ckpt)


@row("synthesize-image-nan", "synthesize", "contains 1 NaN or infinite voxel(s)")
def _(env, mp):
    f = synth_inputs(env)
    arr = f.array.astype(np.float32)
    arr[3, 3, 3] = np.nan
    nan_file = f.image.with_name("nan_0000.mha")
    sitk.WriteImage(like(arr, sitk.ReadImage(str(f.image))), str(nan_file))
    return [str(nan_file) if a == str(f.image) else a for a in synth_args(env, f)]


@row("synthesize-image-4d", "synthesize", "is a 4D image")
def _(env, mp):
    f = synth_inputs(env)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([f.array, f.array]), isVector=False), str(f.image), True)
    return synth_args(env, f)


# -- outputs that exist
@row("train-output-exists", "train", "already holds a training run", "--resume", "--overwrite")
def _(env, mp):
    run = env.tmp / "run"
    run.mkdir()
    shutil.copy(env.ckpt, run / "checkpoint_final.pt")
    return train_args("-o", str(run))


@row("enlarge-output-exists", "enlarge", "Dataset991_TinyLeFusion already exists", "--overwrite")
def _(env, mp):
    (env.raw / "Dataset991_TinyLeFusion").mkdir()
    return enlarge_args(env)


@row("enlarge-output-id-taken", "enlarge", "dataset id 991 is already used by", "choose another destination id")
def _(env, mp):
    (env.raw / "Dataset991_Other").mkdir()
    return enlarge_args(env)


@row("synthesize-output-exists", "synthesize", "output folder", "already exists", "--overwrite")
def _(env, mp):
    f = synth_inputs(env)
    f.out.mkdir()
    return synth_args(env, f)


@row("trainer-config-output-exists", "trainer-config", "lefusion_trainer.json already exists", "--overwrite")
def _(env, mp):
    (env.pre / NAME).mkdir()
    (env.pre / NAME / "lefusion_trainer.json").write_text("{}")
    return config_args(env)


@row("phantom-output-exists", "phantom", "already exists", "--overwrite")
def _(env, mp):
    return ["phantom", "-o", str(env.raw), "--id", str(DATASET_ID), "--name", "Tiny", "--cases", "2"]


@row("demo-output-exists", "demo", "already exists", "--overwrite")
def _(env, mp):
    (env.tmp / "demo").mkdir()
    (env.tmp / "demo" / "keep.txt").write_text("mine")
    return ["demo", "-o", str(env.tmp / "demo")]


# -- checkpoints
@row("checkpoint-missing", "enlarge", "does not exist", "check the path")
def _(env, mp):
    return enlarge_args(env, checkpoint=env.tmp / "nothing.pt")


@row("checkpoint-truncated", "enlarge", "cannot be read (truncated, or not a LeFusion checkpoint)")
def _(env, mp):
    dst = env.tmp / "ckpts" / "truncated.pt"
    dst.parent.mkdir()
    dst.write_bytes(env.ckpt.read_bytes()[:5000])
    return enlarge_args(env, checkpoint=dst)


@row("checkpoint-not-ours", "synthesize", "is not a lefusion-nnunet checkpoint")
def _(env, mp):
    dst = env.tmp / "ckpts" / "foreign.pt"
    dst.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, dst)
    return synth_args(env, synth_inputs(env), checkpoint=dst)


@row("checkpoint-newer-format", "enlarge", "format version 99, newer than", "upgrade lefusion-nnunet")
def _(env, mp):
    dst = forge_checkpoint(env.ckpt, env.tmp / "ckpts" / "newer.pt", outer_fn=lambda o: o.update(format_version=99))
    return enlarge_args(env, checkpoint=dst)


@row("checkpoint-modified", "trainer-config", "fails its content hash check")
def _(env, mp):
    def flip(outer):
        outer["payload"] = outer["payload"].clone()
        outer["payload"][-100] ^= 1
    return config_args(env, checkpoint=forge_checkpoint(env.ckpt, env.tmp / "ckpts" / "flipped.pt", outer_fn=flip))


@row("checkpoint-unexpected-keys", "enlarge", "has unexpected keys ['evil']")
def _(env, mp):
    dst = forge_checkpoint(env.ckpt, env.tmp / "ckpts" / "keys.pt", content_fn=lambda c: c.update(evil="x"))
    return enlarge_args(env, checkpoint=dst)


@row("checkpoint-unexpected-weights", "enlarge", "weights do not fit its model configuration")
def _(env, mp):
    def extra_weight(content):
        content["ema_state"]["extra.weight"] = torch.zeros(3)
    dst = forge_checkpoint(env.ckpt, env.tmp / "ckpts" / "weights.pt", content_fn=extra_weight)
    return enlarge_args(env, checkpoint=dst)


@row("checkpoint-runs-code-on-load", "enlarge", "cannot be read (truncated, or not a LeFusion checkpoint)")
def _(env, mp):
    dst = env.tmp / "ckpts" / "code.pt"
    dst.parent.mkdir()
    torch.save({"format": "lefusion-nnunet", "payload": CodeOnLoad(str(env.tmp / "pwned"))}, dst)
    return enlarge_args(env, checkpoint=dst)


@row("checkpoint-payload-runs-code-on-load", "enlarge", "holds objects that cannot be loaded safely")
def _(env, mp):
    dst = forge_checkpoint(env.ckpt, env.tmp / "ckpts" / "code_payload.pt",
                           content_fn=lambda c: {**c, "training_summary": CodeOnLoad(str(env.tmp / "pwned"))})
    return enlarge_args(env, checkpoint=dst)


@row("checkpoint-for-other-labels", "enlarge", "trained for lesion label(s) [2]", "has no label [2]")
def _(env, mp):
    edit_json(env, lambda d: d.update(labels={"background": 0, "lung": 1, "nodule": 3}))
    return enlarge_args(env)


@row("checkpoint-for-other-modality", "enlarge", "trained on CT images", "is MR")
def _(env, mp):
    edit_json(env, lambda d: d.update(channel_names={"0": "T1"}))
    return enlarge_args(env)


@row("checkpoint-for-other-modality-trainer", "trainer-config", "trained on CT images", "is MR")
def _(env, mp):
    edit_json(env, lambda d: d.update(channel_names={"0": "T1"}))
    return config_args(env)


@row("no-checkpoint-trained-yet", "trainer-config", "no LeFusion lesion checkpoint found", "lefusion train")
def _(env, mp):
    return ["trainer-config", "-d", str(DATASET_ID)]


@row("resume-checkpoint-for-other-labels", "train", "was trained on Dataset990_Tiny labels [2]",
     "not Dataset990_Tiny labels [1]")
def _(env, mp):
    run = env.tmp / "run"
    run.mkdir()
    shutil.copy(env.ckpt, run / "checkpoint_latest.pt")
    return train_args("-o", str(run), "--resume", lesion="1", region=None)


@row("resume-checkpoint-truncated", "train", "checkpoint_latest.pt cannot be read")
def _(env, mp):
    run = env.tmp / "run"
    run.mkdir()
    (run / "checkpoint_latest.pt").write_bytes(env.ckpt.read_bytes()[:20000])
    return train_args("-o", str(run), "--resume")


# -- disk full and permissions on output (simulated; see test_disk_full_on_a_real_small_file_system too)
@row("disk-full-enlarge", "enlarge", "no space left on the device while writing", "partial output was removed")
def _(env, mp):
    real_write = sitk.WriteImage

    def fills_disk(image, path, *args, **kwargs):  # what ITK's NIfTI writer does on a full disk: a short file
        real_write(image, path, *args, **kwargs)
        truncate(Path(path), 0.3)
    mp.setattr(sitk, "WriteImage", fills_disk)
    mp.setattr("lefusion_nnunet.data.io._disk_nearly_full", lambda folder, margin=0: True)
    return enlarge_args(env)


@row("permission-denied-enlarge", "enlarge", "permission denied while writing", "partial output was removed")
def _(env, mp):
    def denied(image, path, *args, **kwargs):  # ITK's error text for an unwritable file
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: ITK ERROR: File cannot be "
                           f"written: {path}\nReason: Permission denied")
    mp.setattr(sitk, "WriteImage", denied)
    return enlarge_args(env)


@row("disk-full-train-checkpoint", "train", "no space left on the device while writing", "checkpoint_latest.pt")
def _(env, mp):
    real_fsync = os.fsync

    def no_space_for_checkpoints(fd):  # the disk fills up when the first checkpoint is written
        if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell checkpoint writes apart")
    mp.setattr(os, "fsync", no_space_for_checkpoints)
    return train_args("-o", str(env.tmp / "run"))


@row("disk-full-synthesize", "synthesize", "no space left on the device while writing", "partial output was removed")
def _(env, mp):
    f = synth_inputs(env)
    real_write = sitk.WriteImage

    def fills_disk(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        truncate(Path(path), 0.3)
    mp.setattr(sitk, "WriteImage", fills_disk)
    mp.setattr("lefusion_nnunet.data.io._disk_nearly_full", lambda folder, margin=0: True)
    return synth_args(env, f)


@row("permission-denied-trainer-config", "trainer-config", "permission denied while writing",
     "lefusion_trainer.json")
def _(env, mp):
    def denied(fd):
        raise PermissionError(errno.EACCES, "Permission denied")
    mp.setattr(os, "fsync", denied)
    return config_args(env)


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, env, monkeypatch, capsys):
    command, fragments, setup = ROWS[name]
    args = setup(env, monkeypatch)
    assert args[0] == command
    message = fails(env, capsys, args, fragments)
    assert not (env.tmp / "pwned").exists(), "a checkpoint ran code while loading"
    record(name, command, message, env)


def test_docs_table_lists_every_row():
    text = (REPO / "docs" / "errors.md").read_text()
    listed = set(re.findall(r"test_bad_input\[([\w-]+)\]", text))
    assert set(ROWS) <= listed, f"rows missing from docs/errors.md: {sorted(set(ROWS) - listed)}"
    assert listed <= set(ROWS), f"docs/errors.md names unknown rows: {sorted(listed - set(ROWS))}"


def test_roi_larger_than_the_image_is_padded(env, capsys, caplog):
    """Not an error: an 8 x 16 x 16 voxel image (20 x 24 x 24 mm) with a 40 x 48 x 48 mm model ROI works, the
    ROI is padded by repeating edge voxels, only mask voxels change, and a warning says so."""
    f = synth_inputs(env, radius=2, crop=(slice(8, 16), slice(16, 32), slice(16, 32)))
    assert f.array.shape == (8, 16, 16)
    with caplog.at_level("WARNING"):
        assert main(synth_args(env, f)) == 0, capsys.readouterr().err
    assert "larger than image" in caplog.text and "padded by repeating" in caplog.text
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(f.out / f.image.name)))
    mask = f.mask_array.astype(bool)
    assert out.dtype == f.array.dtype and out.shape == f.array.shape
    vol = read_image([f.image])
    [region] = LesionSynthesizer(env.ckpt, device="cpu").generation_regions(
        [LesionRequest(vol.channel(0), vol.spacing, mask[None])])  # the mask and its border ring
    assert region[mask].all()
    np.testing.assert_array_equal(out[~region], f.array[~region])
    assert (out[mask] != f.array[mask]).any()


def test_valid_dataset_passes_every_check(env, capsys):
    """The checks do not reject good input: trainer-config writes its settings on the untouched phantom."""
    assert main(config_args(env, "--per-case", "1")) == 0, capsys.readouterr().err
    assert json.loads((env.pre / NAME / "lefusion_trainer.json").read_text())["variants"]["per_case"] == 1
    assert main(config_args(env, "--per-case", "2", "--overwrite")) == 0
    assert json.loads((env.pre / NAME / "lefusion_trainer.json").read_text())["variants"]["per_case"] == 2


def test_checkpoints_never_run_code_on_load(env):
    from lefusion_nnunet.checkpoints.format import load_checkpoint_content

    marker = env.tmp / "pwned"
    dst = env.tmp / "code.pt"
    torch.save({"format": "lefusion-nnunet", "payload": CodeOnLoad(str(marker))}, dst)
    with pytest.raises(LeFusionCheckpointError):
        load_checkpoint_content(dst)
    assert not marker.exists()
    torch.load(dst, weights_only=False)  # the file really does run code when loaded unsafely
    assert marker.is_dir()


def test_disk_full_on_a_real_small_file_system(env, capsys):
    """A real 48 KiB tmpfs as output: ITK's NIfTI writer would leave a short file without an error; LeFusion
    reports the full disk in one sentence and leaves the file system empty. Needs mount rights (root)."""
    small = env.tmp / "small_fs"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount rights")
    try:
        f = synth_inputs(env)
        f.out = small / "out"
        capsys.readouterr()
        assert main(synth_args(env, f)) == 2
        err = capsys.readouterr().err
        assert "lefusion: error: no space left on the device while writing" in err, err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_atomic_write_removes_temporary_file_on_disk_full(tmp_path, monkeypatch):
    from lefusion_nnunet.utils import atomic_write_bytes

    (tmp_path / "keep.json").write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(LeFusionInputError, match="no space left on the device while writing .*keep.json"):
        atomic_write_bytes(tmp_path / "keep.json", b"new")
    assert (tmp_path / "keep.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_validation_runs_before_any_work(env, monkeypatch):
    """Bad input late in the case list is found before the first case is synthesised: enlarge never builds
    a partial folder and the synthesizer is never called."""
    import lefusion_nnunet.enlargement.run as enl

    calls = []
    monkeypatch.setattr(enl, "make_variants", lambda *a, **k: calls.append(a) or iter(()))
    truncate(image_file(env, sorted(env.free)[-1]))
    with pytest.raises(LeFusionInputError, match="truncated"):
        enl.enlarge(DATASET_ID, 991, checkpoint=env.ckpt, progress=False)
    assert calls == [] and not any(p.name.startswith(".Dataset991") for p in env.raw.iterdir())


def test_unanticipated_os_errors_are_one_sentence(env, monkeypatch, capsys):
    """An OS error in a place no check anticipated still ends as one `lefusion: error:` sentence, exit 2."""
    import lefusion_nnunet.cli.train as train_cli

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(env.tmp / "somewhere"))
    monkeypatch.setattr(train_cli, "run", disk_full)
    rc = main(train_args())
    err = capsys.readouterr().err
    assert rc == 2 and err.count("lefusion: error: ") == 1
    assert "no space left on the device" in err and "somewhere" in err
