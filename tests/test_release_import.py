"""The published LeFusion models: our ReleaseUnet against fixtures made by the release's own code.

The fixtures (tests/fixtures/release/, written by benchmarks/release_fixtures/make_release_fixtures.py from a
checkout of M3DV/LeFusion) hold small seeded release-format checkpoints, the release model's eps for seeded inputs,
and the key / shape lists of the full-width published models. No real weights are involved.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lefusion_nnunet.checkpoints.format import load_checkpoint_content
from lefusion_nnunet.checkpoints.loaders import checkpoint_data_config
from lefusion_nnunet.checkpoints.release import (RELEASE_KINDS, RELEASE_PROTOTYPES, import_release_checkpoint,
                                                 infer_release_config, read_release_file)
from lefusion_nnunet.diffusion.release_unet import (ReleaseLesionDenoiser, ReleaseMaskDenoiser, ReleaseUnet,
                                                    ReleaseUnetConfig)
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError

FIXTURES = Path(__file__).parent / "fixtures" / "release"
PREFIX = "denoise_fn.module."


def _release_net(kind: str, weights: str = "model") -> ReleaseUnet:
    state, _, _ = read_release_file(FIXTURES / f"{kind}_small.pt", weights)
    net = ReleaseUnet(infer_release_config(state))
    net.load_state_dict(state, strict=True)
    return net.eval()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", RELEASE_KINDS)
def test_fixture_checkpoint_loads_key_for_key(kind):
    raw = torch.load(FIXTURES / f"{kind}_small.pt", weights_only=True)
    assert set(raw) == {"step", "model", "ema", "scaler"}
    expected = [k[len(PREFIX):] for k in raw["model"] if k.startswith(PREFIX)]
    assert len(raw["model"]) - len(expected) == 12                     # the schedule buffers
    net = _release_net(kind)
    assert list(net.state_dict()) == expected                           # same names, same order
    for key, value in net.state_dict().items():
        assert torch.equal(value, raw["model"][PREFIX + key])


@pytest.mark.parametrize("kind", RELEASE_KINDS)
def test_epsilon_equals_the_release_model(kind):
    ref = torch.load(FIXTURES / f"{kind}_eps.pt", weights_only=True)
    net = _release_net(kind)
    with torch.no_grad():
        if kind == "diffmask":
            eps = net(torch.cat([ref["x"], ref["sphere"]], dim=1), ref["t"])
            adapted = ReleaseMaskDenoiser(net.config)
            adapted.load_state_dict(net.state_dict())
            eps_adapter = adapted.eval()(ref["x"], ref["t"], ref["sphere"], None, None)
        else:
            eps = net(ref["x"], ref["t"], ref["cond"])
            adapted = ReleaseLesionDenoiser(net.config)
            adapted.load_state_dict(net.state_dict())
            eps_adapter = adapted.eval()(ref["x"], ref["t"], torch.zeros_like(ref["x"][:, :1]),
                                         torch.ones_like(ref["x"]), ref["cond"])
        single = None if kind == "diffmask" else net(ref["x"][:1], ref["t"][:1], ref["cond"][:1])
        cl = net.to(memory_format=torch.channels_last_3d)
        x_cl = (torch.cat([ref["x"], ref["sphere"]], 1) if kind == "diffmask" else ref["x"])
        eps_cl = cl(x_cl.contiguous(memory_format=torch.channels_last_3d), ref["t"],
                    None if kind == "diffmask" else ref["cond"])
    assert eps.shape == ref["eps"].shape
    assert (eps - ref["eps"]).abs().max().item() <= 1e-5
    assert (eps_adapter - ref["eps"]).abs().max().item() <= 1e-5
    assert (eps_cl - ref["eps"]).abs().max().item() <= 1e-5
    if single is not None:                                              # batch 1 takes the folded-FiLM path
        assert (single - ref["eps"][:1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", RELEASE_KINDS)
def test_full_width_key_and_shape_lists_match_our_class(kind):
    shapes = json.loads((FIXTURES / f"{kind}_full_keys.json").read_text())
    expected = {k[len(PREFIX):]: v for k, v in shapes.items() if k.startswith(PREFIX)}
    assert len(shapes) - len(expected) == 12
    with torch.device("meta"):
        net = ReleaseUnet(ReleaseUnetConfig.from_preset(kind))
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours) == list(expected)
    assert ours == expected
    # and the architecture inferred from those shapes is the preset
    assert infer_release_config({k: torch.empty(v, device="meta") for k, v in expected.items()}) == net.config


def test_null_condition_and_config_round_trip():
    net = _release_net("lidc")
    x, t = torch.randn(2, 1, 8, 16, 16), torch.tensor([10, 200])
    cond = torch.full((2, 16), 1 / 16)
    with torch.no_grad():
        dropped = net(x, t, cond, drop_cond=torch.tensor([True, False]))
        assert torch.allclose(dropped[:1], net(x[:1], t[:1], None), atol=1e-5)
        assert torch.allclose(dropped[1:], net(x[1:], t[1:], cond[1:]), atol=1e-5)
    assert ReleaseUnetConfig.from_dict(net.config.to_dict()) == net.config
    with pytest.raises(LeFusionInputError):
        ReleaseUnetConfig.from_dict({**net.config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 8, 12, 12), t[:1])                       # 12 not divisible by 8


def test_import_records_everything_and_leaves_the_source_alone(tmp_path):
    src = FIXTURES / "lidc_small.pt"
    before, mtime = _sha(src), src.stat().st_mtime_ns
    out = import_release_checkpoint(src, "lidc", out=tmp_path / "lidc.pt", spacing=(0.8, 0.8, 1.5))
    assert _sha(src) == before and src.stat().st_mtime_ns == mtime
    content = load_checkpoint_content(out.path, expected_kind="lesion")
    prov = content["training_summary"]["imported_from"]
    assert prov["source_sha256"] == before == out.source_sha256 and prov["weights"] == "model"
    assert content["model_config"]["architecture"] == "lefusion-release-unet3d"
    assert content["schedule_config"] == {"num_train_timesteps": 300, "beta_schedule": "cosine"}
    data = content["data_config"]
    assert data["roi"] == {"size_zyx": [32, 64, 64], "spacing_zyx": [1.5, 0.8, 0.8]}
    assert data["intensity"]["kind"] == "window" and data["intensity"]["window"] == [-1000.0, 400.0]
    assert data["lesion_labels"] == [1] and data["modality"] == "CT"
    assert np.allclose(content["prototypes"][0]["centers"], RELEASE_PROTOTYPES["lidc"])
    assert content["step"] == 1234
    raw = torch.load(src, weights_only=True)
    for key, value in content["ema_state"].items():
        assert torch.equal(value, raw["model"][PREFIX + key])
    ema = load_checkpoint_content(import_release_checkpoint(src, "lidc", weights="ema",
                                                            out=tmp_path / "ema.pt").path)
    assert all(torch.equal(v, raw["ema"][PREFIX + k]) for k, v in ema["ema_state"].items())

    emidec = load_checkpoint_content(import_release_checkpoint(FIXTURES / "emidec_small.pt", "emidec",
                                                               out=tmp_path / "e.pt").path)
    assert emidec["data_config"]["lesion_labels"] == [3, 4] and emidec["data_config"]["modality"] == "MR"
    assert [p["centers"] for p in emidec["prototypes"]] == [[c] for c in RELEASE_PROTOTYPES["emidec"]]
    assert tuple(emidec["training_histograms"].shape) == (1, 32)
    mask = load_checkpoint_content(import_release_checkpoint(FIXTURES / "diffmask_small.pt", "diffmask",
                                                             out=tmp_path / "m.pt").path, expected_kind="mask")
    assert mask["model_config"]["architecture"] == "lefusion-release-diffmask"
    assert mask["data_config"]["extra"]["mask_model"]["region_hint"] is False


class _NotATensor:
    pass


def test_bad_files_get_one_clear_sentence(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    pickled = tmp_path / "pickled.pt"
    with pickled.open("wb") as f:
        pickle.dump({"model": _NotATensor()}, f)
    no_model = tmp_path / "no_model.pt"
    torch.save({"step": 1, "weights": {}}, no_model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"step": 1, "model": {"conv.weight": torch.zeros(1)}, "ema": {}, "scaler": {}}, foreign)
    for path in (tmp_path / "missing.pt", junk, pickled, no_model, foreign):
        with pytest.raises(LeFusionCheckpointError) as info:
            import_release_checkpoint(path, "lidc", out=tmp_path / "out.pt")
        assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")
    src = FIXTURES / "lidc_small.pt"
    with pytest.raises(LeFusionCheckpointError, match="--kind"):
        import_release_checkpoint(src, "emidec", out=tmp_path / "out.pt")
    with pytest.raises(LeFusionInputError, match="lesion-label"):
        import_release_checkpoint(src, "lidc", lesion_labels=[1, 2], out=tmp_path / "out.pt")
    with pytest.raises(LeFusionInputError, match="spacing"):
        import_release_checkpoint(src, "lidc", spacing=(1, 0, 1), out=tmp_path / "out.pt")
    with pytest.raises(LeFusionInputError, match="weights"):
        import_release_checkpoint(src, "lidc", weights="best", out=tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_import_checkpoint_command(tmp_path, capsys):
    import argparse

    from lefusion_nnunet.cli.import_checkpoint import add_import_checkpoint_parser

    parser = argparse.ArgumentParser(prog="lefusion")
    add_import_checkpoint_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "lidc_imported.pt"
    argv = ["import-checkpoint", str(FIXTURES / "lidc_small.pt"), "--kind", "lidc", "--spacing", "0.7", "0.7", "1.25",
            "-o", str(out)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "lesion model" in printed and "0.7 0.7 1.25 mm" in printed and out.is_file()
    with pytest.raises(LeFusionInputError, match="overwrite"):
        args.func(parser.parse_args(argv))
    assert checkpoint_data_config(out).roi.size_zyx == (32, 64, 64)       # the release's default grid

    sized = tmp_path / "lidc_sized.pt"                                     # --roi-size is x y z
    args = parser.parse_args([*argv[:-2], "--roi-size", "32", "16", "8", "-o", str(sized)])
    assert args.func(args) == 0
    assert checkpoint_data_config(sized).roi.size_zyx == (8, 16, 32)
    with pytest.raises(LeFusionInputError, match="multiples"):
        args = parser.parse_args([*argv[:-2], "--roi-size", "30", "16", "8", "-o", str(tmp_path / "bad.pt")])
        args.func(args)
    assert not (tmp_path / "bad.pt").exists()


def _ball(shape, center, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius ** 2


def test_imported_model_synthesizes_with_a_bit_identical_background(tmp_path):
    from lefusion_nnunet.data.histogram import TextureSpec
    from lefusion_nnunet.diffusion import SamplerConfig
    from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer

    out = import_release_checkpoint(FIXTURES / "lidc_small.pt", "lidc", spacing=(1.0, 1.0, 1.0),
                                    roi_size_zyx=(8, 16, 16), out=tmp_path / "lidc.pt").path
    synth = LesionSynthesizer(out, device="cpu", sampler=SamplerConfig(name="ddim", num_steps=3))
    assert isinstance(synth.checkpoint.model, ReleaseLesionDenoiser)
    rng = np.random.default_rng(0)
    image = rng.normal(-700, 120, size=(12, 24, 24)).astype(np.float32)
    mask = _ball(image.shape, (6, 12, 12), 3)[None]
    req = LesionRequest(image, (1.0, 1.0, 1.0), mask)
    req.texture = synth.texture_condition(TextureSpec("cluster", cluster=2), rng)
    distances = np.abs(np.asarray(RELEASE_PROTOTYPES["lidc"]) - req.texture).sum(1)
    assert distances.argmin() == 2                                     # the release's prototype 2 (jittered)
    result = synth.synthesize([req], generator=torch.Generator().manual_seed(0))[0]
    np.testing.assert_array_equal(result[~mask[0]], image[~mask[0]])
    assert not np.array_equal(result[mask[0]], image[mask[0]])
    assert result[mask[0]].min() >= -1000 and result[mask[0]].max() <= 400      # the CT window


def test_imported_diffmask_samples_masks(tmp_path):
    from lefusion_nnunet.synthesis.masks import MaskGenerator

    out = import_release_checkpoint(FIXTURES / "diffmask_small.pt", "diffmask", spacing=(1.0, 1.0, 1.0),
                                    roi_size_zyx=(8, 16, 16), out=tmp_path / "diffmask.pt").path
    generator = MaskGenerator(out, device="cpu")
    assert isinstance(generator.checkpoint.model, ReleaseMaskDenoiser)
    masks = generator.sample(diameter_mm=6.0, n=1, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (1, 1, 8, 16, 16) and masks.dtype == bool


def _write_case(path: Path, array_zyx: np.ndarray) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def test_enlarge_with_imported_lesion_and_mask_models(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from lefusion_nnunet.enlargement.run import enlarge
    from lefusion_nnunet.variant_settings import VariantSettings

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    src = tmp_path / "nnUNet_raw" / "Dataset611_Chest"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    zz, yy, xx = np.indices((12, 32, 32))
    for i in range(2):
        lung = ((zz - 6) / 5.0) ** 2 + ((yy - 16) / 12.0) ** 2 + ((xx - 16) / 12.0) ** 2 <= 1
        ct = np.where(lung, -850.0, 40.0) + rng.normal(0, 20, lung.shape)
        label = lung.astype(np.uint8)
        if i == 1:
            label[5:8, 14:18, 14:18] = 2
        _write_case(src / "imagesTr" / f"chest_{i:03d}_0000.nii.gz", ct.astype(np.int16))
        _write_case(src / "labelsTr" / f"chest_{i:03d}.nii.gz", label)
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1, "nodule": 2}, "numTraining": 2,
        "file_ending": ".nii.gz", "name": "Chest"}))
    kw = dict(spacing=(1.0, 1.0, 1.0), roi_size_zyx=(8, 16, 16), lesion_labels=[2])
    lesion = import_release_checkpoint(FIXTURES / "lidc_small.pt", "lidc", out=tmp_path / "lidc.pt", **kw).path
    masks = import_release_checkpoint(FIXTURES / "diffmask_small.pt", "diffmask", out=tmp_path / "m.pt", **kw).path
    settings = VariantSettings(per_case=1, mask_source="diffusion", mask_checkpoint=str(masks), size_mm=(4.0, 6.0),
                               region_label=1, sampler={"num_steps": 2}, seed=0)
    summary = enlarge(611, 612, checkpoint=lesion, settings=settings, device="cpu", progress=False)
    prov = json.loads((summary.destination / "lefusion_provenance.json").read_text())
    assert summary.cases_written >= 1
    for name, record in prov["synthetic_cases"].items():
        source = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "imagesTr" / f"{record['source_case']}_0000.nii.gz")))
        new = sitk.GetArrayFromImage(sitk.ReadImage(str(summary.destination / "imagesTr" / f"{name}_0000.nii.gz")))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(summary.destination / "labelsTr" / f"{name}.nii.gz")))
        added = lab == 2
        assert added.any() and np.array_equal(new[~added], source[~added])


@pytest.mark.slow
def test_lefusion_trainer_one_epoch_with_an_imported_model(tmp_path):
    """phantom -> nnU-Net preprocessing -> import-checkpoint -> trainer-config -> nnUNetv2_train 1 epoch (CPU)."""
    import os
    import shutil
    import subprocess
    import sys

    from lefusion_nnunet.integration.install import shim_installed, uninstall_trainer_shim
    from lefusion_nnunet.integration.swap_dataset import read_draws

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEFUSION_") and k != "nnUNet_extTrainer"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p),
               LEFUSION_ITERATIONS_PER_EPOCH="4", LEFUSION_VAL_ITERATIONS_PER_EPOCH="2", LEFUSION_PROBABILITY="1",
               LEFUSION_BATCH_SIZE="8", LEFUSION_BANK_BUILD="before-training")  # 4 iterations: the whole bank first
    exe = shutil.which("lefusion")
    lefusion = [exe] if exe else [sys.executable, "-m", "lefusion_nnunet.cli.main"]

    def run(*cmd, timeout=1500):
        out = subprocess.run(list(cmd), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    did = 963
    run(*lefusion, "phantom", "-o", str(tmp_path / "nnUNet_raw"), "--id", str(did), "--cases", "8",
        "--lesion-free-fraction", "0.5", "--shape", "48", "48", "32")
    name = next((tmp_path / "nnUNet_raw").glob(f"Dataset{did}_*")).name
    run("nnUNetv2_plan_and_preprocess", "-d", str(did), "-c", "3d_fullres", "-np", "1")
    ckpt = tmp_path / "imported_lidc.pt"
    run(*lefusion, "import-checkpoint", str(FIXTURES / "lidc_small.pt"), "--kind", "lidc", "--lesion-label", "2",
        "-o", str(ckpt))
    run(*lefusion, "trainer-config", "-d", str(did), "--checkpoint", str(ckpt), "--per-case", "1", "--steps", "2")
    was_installed = shim_installed()
    try:
        run(*lefusion, "install-trainer")
        run("nnUNetv2_train", str(did), "3d_fullres", "0", "-tr", "LeFusionTrainer_1epoch", "-device", "cpu")
    finally:
        if not was_installed:
            uninstall_trainer_shim()
    fold = tmp_path / "nnUNet_results" / name / "LeFusionTrainer_1epoch__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert read_draws(fold / "lefusion_draws.log").synthetic > 0
