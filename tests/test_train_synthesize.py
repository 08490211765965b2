"""Training, checkpoints, the synthesis path and the train/synthesize commands, on a tiny phantom."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import rotation_direction, write_sitk

from lefusion_nnunet.checkpoints.format import FORMAT, load_checkpoint_content
from lefusion_nnunet.cli.main import main
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.histogram import TextureSpec
from lefusion_nnunet.data.io import read_image
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import SamplerConfig
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom
from lefusion_nnunet.seeding import seeded_generator
from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer
from lefusion_nnunet.training.lesion import train_lesion_model
from lefusion_nnunet.training.loop import TrainConfig

SPACING = (2.5, 1.5, 1.5)
ROI = RoiGeometry((16, 32, 32), SPACING)
FAST = SamplerConfig(name="ddim", num_steps=4)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    return generate_chest_phantom(raw, 990, "Tiny", PhantomConfig(num_cases=6, lesion_free_fraction=0.34,
                                                                 shape_zyx=(24, 48, 48), spacing_zyx=SPACING,
                                                                 nodule_diameter_mm=(8.0, 14.0), seed=1))


def _train(dataset, out: Path, steps: int, resume: bool = False, **kw) -> Path:
    cfg = TrainConfig(preset="tiny", steps=steps, batch_size=2, checkpoint_every=3, num_train_timesteps=20,
                      texture_clusters=2, device="cpu", **kw)
    return train_lesion_model(dataset, [2], out, cfg, ROI, region_label=1, resume=resume, progress=False)


@pytest.fixture(scope="module")
def checkpoint(phantom, tmp_path_factory) -> Path:
    return _train(load_raw_dataset(phantom), tmp_path_factory.mktemp("run"), steps=6)


def test_checkpoint_holds_everything_and_loads_weights_only(checkpoint):
    outer = torch.load(checkpoint, weights_only=True)
    assert outer["format"] == FORMAT
    content = load_checkpoint_content(checkpoint)
    assert content["data_config"]["lesion_labels"] == [2]
    assert content["data_config"]["roi"]["spacing_zyx"] == list(SPACING)
    assert content["data_config"]["intensity"]["kind"] == "window"
    assert len(content["prototypes"]) == 1 and len(content["prototypes"][0]["centers"]) == 2
    assert content["training_histograms"].shape[1] == 16
    assert content["step"] == 6
    run = checkpoint.parent
    rows = [json.loads(x) for x in (run / "training_log.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 6 and (run / "loss.png").stat().st_size > 1000


def test_resume_is_equivalent_to_uninterrupted_training(phantom, tmp_path):
    ds = load_raw_dataset(phantom)
    straight = load_checkpoint_content(_train(ds, tmp_path / "a", steps=6))
    _train(ds, tmp_path / "b", steps=3)
    with pytest.raises(LeFusionInputError, match="--resume"):
        _train(ds, tmp_path / "b", steps=6)
    resumed = load_checkpoint_content(_train(ds, tmp_path / "b", steps=6, resume=True))
    for key in ("model_state", "ema_state"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")


def test_damaged_or_foreign_checkpoints_are_rejected(checkpoint, tmp_path):
    raw = checkpoint.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LeFusionCheckpointError, match="cannot be read"):
        load_checkpoint_content(tmp_path / "trunc.pt")
    outer = torch.load(checkpoint, weights_only=True)
    outer["payload"] = outer["payload"].clone()
    outer["payload"][-10] ^= 1
    torch.save(outer, tmp_path / "flip.pt")
    with pytest.raises(LeFusionCheckpointError, match="hash"):
        load_checkpoint_content(tmp_path / "flip.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(LeFusionCheckpointError, match="not a lefusion-nnunet checkpoint"):
        load_checkpoint_content(tmp_path / "foreign.pt")
    outer = torch.load(checkpoint, weights_only=True)
    outer["format_version"] = 99
    torch.save(outer, tmp_path / "newer.pt")
    with pytest.raises(LeFusionCheckpointError, match="newer"):
        load_checkpoint_content(tmp_path / "newer.pt")
    with pytest.raises(LeFusionCheckpointError, match="'mask' model"):
        load_checkpoint_content(checkpoint, expected_kind="mask")


def _lesion_free_case(phantom: Path):
    ds = load_raw_dataset(phantom)
    manifest = json.loads((phantom / "phantom_manifest.json").read_text())
    free = [c["case_id"] for c in manifest["cases"] if not c["has_lesion"]]
    return ds.case(free[0])


def _ball(shape, center, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - center[0]) ** 2 + ((yy - center[1]) ** 2 + (xx - center[2]) ** 2) / 4 <= radius ** 2


def test_synthesizer_keeps_background_and_is_seeded(checkpoint, phantom):
    from lefusion_nnunet.data.io import read_label

    case = _lesion_free_case(phantom)
    vol = read_image(case.images)
    label, _ = read_label(case.label)
    lung = np.argwhere(label == 1)
    center = lung[len(lung) // 2]
    mask = _ball(vol.shape_zyx, center, 2)[None]
    synth = LesionSynthesizer(checkpoint, device="cpu", sampler=FAST, batch_size=2)
    req = LesionRequest(vol.channel(0), vol.spacing, mask)
    req.texture = synth.texture_condition(TextureSpec("cluster", cluster=0), np.random.default_rng(0))
    a, b = synth.synthesize([req, req], generator=[seeded_generator(1, "x"), seeded_generator(2, "x")])
    again = synth.synthesize([req], generator=[seeded_generator(1, "x")])[0]
    image = vol.channel(0)
    [region] = synth.generation_regions([req])  # the mask and its one-voxel border ring
    assert region[mask[0]].all() and region.sum() > mask.sum()
    for out in (a, b):
        np.testing.assert_array_equal(out[~region], image[~region])
        assert not np.array_equal(out[mask[0]], image[mask[0]])
    # same seed, different batch composition -> same lesion (up to float32 summation order)
    np.testing.assert_allclose(a, again, rtol=1e-4, atol=1e-2)
    assert np.abs(a[mask[0]] - b[mask[0]]).max() > 10.0


@pytest.mark.parametrize("ending,spacing_xyz,direction", [
    (".nii.gz", (1.5, 1.5, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)),        # model spacing: identity resampling
    (".nii.gz", (1.1, 0.9, 3.0), rotation_direction(30)),             # anisotropic, rotated: resampled
    (".nrrd", (1.3, 1.3, 2.0), rotation_direction(-15)),
])
def test_synthesize_command_keeps_background_and_geometry(checkpoint, tmp_path, ending, spacing_xyz, direction):
    rng = np.random.default_rng(0)
    image = (rng.normal(-850, 20, size=(20, 40, 40))).astype(np.int16)
    src = write_sitk(tmp_path / f"pt_0000{ending}", image, spacing_xyz, (5.0, -3.0, 12.5), direction)
    mask = _ball(image.shape, (10, 20, 20), 2).astype(np.uint8)
    mask_file = write_sitk(tmp_path / f"mask{ending}", mask, spacing_xyz, (5.0, -3.0, 12.5), direction)
    label = (rng.random(image.shape) < 0.1).astype(np.uint8)
    label_file = write_sitk(tmp_path / f"pt{ending}", label, spacing_xyz, (5.0, -3.0, 12.5), direction)
    out = tmp_path / "out"
    rc = main(["synthesize", "--checkpoint", str(checkpoint), "-i", str(src), "-l", str(label_file),
               "--mask", str(mask_file), "-o", str(out), "--steps", "3", "--device", "cpu", "--seed", "3"])
    assert rc == 0
    res = sitk.ReadImage(str(out / src.name))
    ref = sitk.ReadImage(str(src))
    got = sitk.GetArrayFromImage(res)
    assert res.GetPixelID() == ref.GetPixelID()
    assert res.GetSpacing() == pytest.approx(ref.GetSpacing()) and res.GetOrigin() == pytest.approx(ref.GetOrigin())
    assert res.GetDirection() == pytest.approx(ref.GetDirection())
    m = mask.astype(bool)
    synth = LesionSynthesizer(checkpoint, device="cpu")
    vol = read_image([src])
    [region] = synth.generation_regions([LesionRequest(vol.channel(0), vol.spacing, m[None])])
    assert region[m].all() and region.sum() > m.sum()
    np.testing.assert_array_equal(got[~region], image[~region])  # bit-identical outside mask + border ring
    assert not np.array_equal(got[m], image[m])
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / label_file.name)))
    assert (lab[m] == 2).all() and np.array_equal(lab[~m], label[~m])
    # the output exists now: a second run without --overwrite is refused with exit code 2
    assert main(["synthesize", "--checkpoint", str(checkpoint), "-i", str(src), "--mask", str(mask_file),
                 "-o", str(out), "--steps", "2", "--device", "cpu"]) == 2


def test_train_command_smoke_and_errors(phantom, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(phantom.parent))
    out = tmp_path / "run"
    args = ["train", "-d", "990", "--lesion-label", "2", "--preset", "tiny", "--steps", "2", "--batch-size", "1",
            "--roi-size", "32", "32", "16", "--spacing", "1.5", "1.5", "2.5", "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert (out / "checkpoint_final.pt").exists()
    capsys.readouterr()
    assert main(args) == 2  # exists without --resume/--overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(args[:4] + ["7"] + args[5:]) == 2   # label 7 not in dataset.json
    assert "not a foreground label" in capsys.readouterr().err
    assert main(["train", "-d", "991", "--lesion-label", "2"]) == 2
    assert "no dataset with id 991" in capsys.readouterr().err
