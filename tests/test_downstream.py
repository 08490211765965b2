"""The downstream benchmark's pieces: metrics against hand-computed values, held-out splits without leakage,
the copy-paste baseline (background bit-identical, lesion voxels changed, only inside the mask, deterministic),
and a smoke run of ``benchmarks/downstream.py --quick`` (slow)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.evaluation.downstream import (aggregate, check_no_leakage, evaluate_case, held_out_split,
                                                   lesion_detection, lesion_dice, mean_std, summarize_seeds)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------
# metrics
def test_dice_hand_computed():
    gt = np.zeros((4, 4, 4), bool)
    gt[0, 0, :4] = True                     # 4 voxels
    pred = np.zeros_like(gt)
    pred[0, 0, 2:4] = True                  # 2 overlap
    pred[3, 3, 3] = True                    # 1 extra
    # 2 * 2 / (3 + 4)
    assert lesion_dice(pred, gt) == pytest.approx(4 / 7)
    assert lesion_dice(gt, gt) == 1.0
    assert lesion_dice(np.zeros_like(gt), gt) == 0.0
    assert math.isnan(lesion_dice(np.zeros_like(gt), np.zeros_like(gt)))
    with pytest.raises(LeFusionInputError):
        lesion_dice(pred[:2], gt)


def _two_lesions_and_a_blob():
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[1:3, 1:3, 1:3] = 2                   # lesion A, 8 voxels
    gt[6:9, 6:9, 6:9] = 2                   # lesion B, 27 voxels
    gt[5, 0, 0] = 1                         # another label (e.g. lung) is not lesion
    pred = np.zeros_like(gt)
    pred[2, 2, 2] = 2                       # touches A by one voxel: A detected
    pred[0, 8, 8] = 2                       # a blob far from any lesion: false positive
    pred[0, 8, 9] = 2                       # (same component)
    pred[9, 0, 0] = 2                       # a second false positive
    return pred, gt


def test_detection_hand_computed():
    pred, gt = _two_lesions_and_a_blob()
    counts = lesion_detection(pred == 2, gt == 2)
    tp, fn, fp = counts
    assert (tp, fn, fp) == (1, 1, 2)
    # diagonal neighbours belong to one component (26-connectivity)
    diag = np.zeros((3, 3, 3), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert tuple(lesion_detection(diag, np.zeros_like(diag))) == (0, 0, 1)
    # a predicted component overlapping two lesions detects both and is no false positive
    bridge = (gt == 2).copy()
    bridge[3:6, 3:6, 3:6] = True
    assert tuple(lesion_detection(bridge, gt == 2)) == (2, 0, 0)
    # tiny predicted components can be ignored by volume (1 voxel = 8 mm^3 at 2 mm spacing)
    assert tuple(lesion_detection(pred == 2, gt == 2, spacing=(2.0, 2.0, 2.0), min_volume_mm3=10)) == (0, 2, 1)


def test_case_metrics_and_aggregate_hand_computed():
    pred, gt = _two_lesions_and_a_blob()
    m = evaluate_case("c1", pred, gt, [2])
    assert (m.true_positives, m.false_negatives, m.false_positives) == (1, 1, 2)
    assert (m.gt_voxels, m.pred_voxels, m.overlap_voxels) == (35, 4, 1)
    assert m.dice == pytest.approx(2 / 39)
    empty = np.zeros_like(gt)
    free_fp = empty.copy()
    free_fp[5, 5, 5] = 2
    cases = [m, evaluate_case("c2", gt, gt, [2]), evaluate_case("free", free_fp, empty, [2]),
             evaluate_case("free2", empty, empty, [2])]
    s = aggregate(cases)
    assert s["dice"] == pytest.approx((2 / 39 + 1.0) / 2)          # lesion cases only
    assert s["dice_pooled"] == pytest.approx(2 * (1 + 35) / (35 + 4 + 70 + 1))
    assert s["sensitivity"] == pytest.approx(3 / 4)
    assert s["fp_per_case"] == pytest.approx(3 / 4)                # 2 + 0 + 1 + 0 over 4 cases
    assert (s["n_cases"], s["n_lesion_cases"], s["n_lesions"]) == (4, 2, 4)
    json.dumps(cases[3].to_dict())  # NaN dice becomes null


def test_mean_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))   # sample std
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([0.5, float("nan")]) == (0.5, 0.0)
    out = summarize_seeds([{"dice": 0.4, "sensitivity": 1.0}, {"dice": 0.6, "sensitivity": 0.5}],
                          ["dice", "sensitivity"])
    assert out["dice"]["mean"] == pytest.approx(0.5)
    assert out["dice"]["std"] == pytest.approx(math.sqrt(0.02))
    assert out["sensitivity"]["values"] == [1.0, 0.5]


# --------------------------------------------------------------------------------------------------------
# splits
def test_held_out_split_has_no_leakage_and_is_deterministic():
    lesion = [f"L{i:02d}" for i in range(12)]
    free = [f"F{i:02d}" for i in range(20)]
    split = held_out_split(lesion, free, n_test=5, seed=3, n_test_free=2, n_train_lesion=4, n_train_free=10)
    assert len(split.test_lesion) == 5 and len(split.test_free) == 2
    assert len(split.train_lesion) == 4 and len(split.train_free) == 10
    groups = [set(split.train), set(split.test), set(split.unused)]
    assert sum(len(g) for g in groups) == 32 and set().union(*groups) == set(lesion) | set(free)
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert set(split.test_lesion) <= set(lesion) and set(split.train_free) <= set(free)
    assert held_out_split(reversed(lesion), free, 5, 3, 2, 4, 10) == split   # order of the input does not matter
    assert held_out_split(lesion, free, 5, 4, 2, 4, 10).test != split.test  # the seed does
    # held-out lesion cases are the same whatever the training subset size
    assert held_out_split(lesion, free, 5, 3, 2).test_lesion == split.test_lesion
    with pytest.raises(LeFusionInputError):
        held_out_split(lesion, free, n_test=12, seed=0)
    with pytest.raises(LeFusionInputError):
        held_out_split(lesion, lesion[:1], n_test=2, seed=0)


def test_check_no_leakage():
    check_no_leakage(["a", "b", "b_lefusion000"], ["c"], {"b_lefusion000": "b"})
    with pytest.raises(LeFusionInputError, match="also a training case"):
        check_no_leakage(["a", "c"], ["c"])
    with pytest.raises(LeFusionInputError, match="made from test case"):
        check_no_leakage(["a", "c_lefusion000"], ["c"], {"c_lefusion000": "c"})


# --------------------------------------------------------------------------------------------------------
# copy-paste
@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom

    raw = tmp_path_factory.mktemp("raw")
    folder = generate_chest_phantom(raw, 731, "CopyPaste", PhantomConfig(num_cases=4, lesion_free_fraction=0.5,
                                                                         shape_zyx=(24, 64, 64), seed=2))
    return load_raw_dataset(folder)


def _request(dataset, case_id, center, radius_vox=3):
    from lefusion_nnunet.data.io import read_image
    from lefusion_nnunet.synthesis.lesion import LesionRequest

    vol = read_image(dataset.case(case_id).images)
    image = vol.channel(0)
    zz, yy, xx = np.ogrid[:image.shape[0], :image.shape[1], :image.shape[2]]
    cz, cy, cx = center
    mask = ((zz - cz) * 2.5) ** 2 + ((yy - cy) * 0.9) ** 2 + ((xx - cx) * 0.9) ** 2 <= (radius_vox * 0.9 * 2) ** 2
    return LesionRequest(image=np.array(image), spacing=vol.spacing, class_masks=mask[None])


def test_copy_paste_changes_only_the_mask(small_phantom):
    import torch

    from lefusion_nnunet.data.histogram import TextureSpec
    from lefusion_nnunet.data.io import read_label
    from lefusion_nnunet.synthesis.copy_paste import CopyPasteSynthesizer

    synth = CopyPasteSynthesizer.from_dataset(small_phantom, [2], region_label=1)
    assert len(synth.lesions) >= 2 and synth.checkpoint.data.lesion_labels == (2,)
    free = [c.case_id for c in small_phantom.cases if not (read_label(c.label)[0] == 2).any()][0]
    req = _request(small_phantom, free, (12, 32, 20))
    rng = np.random.default_rng(0)
    req.texture = synth.texture_condition(TextureSpec("random"), rng)
    [out] = synth.synthesize([req], generator=[torch.Generator().manual_seed(1)], rng=rng)
    mask = req.class_masks[0]
    assert out.dtype == np.float32 and out.shape == req.image.shape
    assert np.array_equal(out[~mask].view(np.uint32), req.image[~mask].astype(np.float32).view(np.uint32))
    assert (out[mask] != req.image[mask]).mean() > 0.9           # lesion voxels changed
    # values come from a real lesion: inside the range of the library's lesion voxels (blending keeps them
    # between lesion and original values)
    lesion_vals = np.concatenate([les.values[les.union] for les in synth.lesions])
    lo, hi = min(lesion_vals.min(), req.image[mask].min()), max(lesion_vals.max(), req.image[mask].max())
    spread = float(np.ptp(lesion_vals))
    assert out[mask].min() >= lo - spread and out[mask].max() <= hi + spread
    # deterministic: same generator seed and texture -> identical output, independent of the batch
    other = _request(small_phantom, free, (12, 20, 44))
    other.texture = synth.texture_condition(TextureSpec("random"), rng)
    again = synth.synthesize([other, req], generator=[torch.Generator().manual_seed(5),
                                                      torch.Generator().manual_seed(1)])
    assert np.array_equal(again[1], out)
    # hard paste (no blending): every mask voxel comes from the lesion's own statistics
    hard = CopyPasteSynthesizer(synth.lesions, synth.data, blend_mm=0.0)
    idx = hard.choose_lesion(req.texture)
    filled = hard.fill(req, idx).apply(np.asarray(req.image, np.float32))  # the edit on the whole image
    les = hard.lesions[idx]
    assert np.array_equal(filled[~mask], req.image[~mask].astype(np.float32))
    assert filled[mask].mean() == pytest.approx(float(les.values[les.union].mean()), abs=1.0)
    assert filled[mask].std() == pytest.approx(float(les.values[les.union].std()), rel=0.05)


def test_copy_paste_texture_picks_nearest_lesion(small_phantom):
    from lefusion_nnunet.data.histogram import TextureSpec
    from lefusion_nnunet.synthesis.copy_paste import CopyPasteSynthesizer

    synth = CopyPasteSynthesizer.from_dataset(small_phantom, [2])
    for i, les in enumerate(synth.lesions):
        assert synth.choose_lesion(les.histogram) == int(np.argmin(
            [np.abs(o.histogram - les.histogram).sum() for o in synth.lesions]))
    # cluster:0 (darkest prototype) picks a darker lesion than the brightest prototype
    n = len(synth.checkpoint.prototypes[0].centers)
    rng = np.random.default_rng(0)
    dark = synth.lesions[synth.choose_lesion(synth.texture_condition(TextureSpec("cluster", cluster=0), rng))]
    bright = synth.lesions[synth.choose_lesion(synth.texture_condition(TextureSpec("cluster", cluster=n - 1), rng))]
    assert dark.values[dark.union].mean() <= bright.values[bright.union].mean()


def test_copy_paste_through_enlarge_cli(small_phantom, nnunet_env, capsys):
    """`lefusion enlarge --method copy-paste` goes through make_variants / enlarge unchanged: background
    bit-identical on disk, lesions only inside the host region, the method recorded in the provenance."""
    from lefusion_nnunet.cli.main import main
    from lefusion_nnunet.data.io import read_image, read_label
    from lefusion_nnunet.enlargement.run import PROVENANCE_NAME
    from lefusion_nnunet.synthesis.copy_paste import CopyPasteSynthesizer

    common = ["enlarge", "-d", str(small_phantom.folder), "--mask-source", "real", "--region-label", "1",
              "--per-case", "1", "--size-mm", "8", "12"]
    # copy-paste options with the LeFusion method, and copy-paste without labels or a checkpoint: one sentence, exit 2
    for bad in (["--destination", "733", "--lesion-label", "2"], ["--destination", "733", "--method", "copy-paste"]):
        assert main(common + bad) != 0
        err = capsys.readouterr().err
        assert "--lesion-label" in err and "Traceback" not in err
    assert not list(nnunet_env["nnUNet_raw"].glob("Dataset733_*"))

    assert main(common + ["--destination", "732", "--method", "copy-paste", "--lesion-label", "2"]) == 0
    (dest,) = nnunet_env["nnUNet_raw"].glob("Dataset732_*")
    record = json.loads((dest / PROVENANCE_NAME).read_text())
    assert record["method"] == "copy-paste"
    prov = record["synthetic_cases"]
    assert prov
    fingerprint = CopyPasteSynthesizer.from_dataset(small_phantom, [2], region_label=1).checkpoint.file_sha256
    for case_id, p in prov.items():
        src = small_phantom.case(p["source_case"])
        before = read_image(src.images).array[0]
        after = read_image([dest / "imagesTr" / f"{case_id}_0000{small_phantom.file_ending}"]).array[0]
        label, _ = read_label(dest / "labelsTr" / f"{case_id}{small_phantom.file_ending}")
        old_label, _ = read_label(src.label)
        lesion = label == 2
        assert lesion.any() and not (old_label == 2).any()
        assert np.array_equal(before[~lesion], after[~lesion])
        assert (before[lesion] != after[lesion]).mean() > 0.9
        assert (old_label[lesion] == 1).all()                      # inside the lung
        assert p["checkpoint_sha256"] == fingerprint


# --------------------------------------------------------------------------------------------------------
# the segmenter's pieces
def _benchmark_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import downstream  # noqa: E402

    return downstream


def test_network_plan_follows_anisotropy():
    ds = _benchmark_module()
    kernels, strides = ds.plan_network((2.5, 0.9, 0.9), (16, 64, 64), 4)
    assert kernels[0] == (1, 3, 3) and strides[0] == (1, 1, 1)
    assert strides[1] == (1, 2, 2) and kernels[1] == (3, 3, 3)
    assert strides[2] == (2, 2, 2) and strides[3] == (2, 2, 2)


def test_patch_sampling_and_sliding_window():
    import torch

    ds = _benchmark_module()
    cfg = ds.SegmenterConfig(features=(4, 8), patch_zyx=(8, 16, 16), batch_size=3, iterations=2)
    image = np.random.default_rng(0).normal(size=(1, 10, 20, 30)).astype(np.float32)
    label = np.zeros((10, 20, 30), np.int16)
    label[5, 10, 25] = 2
    case = ds.prepare_cases([("c", image, label, (1.0, 1.0, 1.0))],
                            ds.Normalization((False,), ((0.0, 0.0, 0.0, 1.0),)), cfg.patch_zyx)[0]
    x, y = ds.sample_batch([case], cfg, np.random.default_rng(1))
    assert x.shape == (3, 1, 8, 16, 16) and y.shape == (3, 1, 8, 16, 16)
    assert (y[-1] == 2).any()                                       # the oversampled item holds the foreground

    class Echo(torch.nn.Module):                                    # "predicts" class 1 where the input is > 0
        def forward(self, t):
            return torch.cat([torch.zeros_like(t), (t > 0).float() * 5, torch.zeros_like(t)], 1)

    pred = ds.predict_case(Echo(), image, cfg, 3)
    assert pred.shape == label.shape
    assert np.array_equal(pred == 1, image[0] > 0)


@pytest.mark.slow
def test_downstream_quick_smoke(tmp_path):
    """The whole benchmark at toy size (about 1.5 min on 2 busy cores)."""
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "downstream.py"), "phantom", "--quick",
                           "--arms", "real", "copy-paste", "--work", str(tmp_path / "work"), "--out", str(out),
                           "--out-md", str(md)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for arm in ("real", "copy-paste"):
        s = result["arms"][arm]["summary"]
        assert set(s) >= {"dice", "dice_pooled", "sensitivity", "fp_per_case"}
    assert result["arms"]["copy-paste"]["composition"]["n_synthetic"] > 0
    assert "(b) real + copy-paste" in md.read_text()


def _toy_data(labels, kind="percentile"):
    from lefusion_nnunet.data.config import DataConfig
    from lefusion_nnunet.data.intensity import IntensitySpace
    from lefusion_nnunet.data.roi import RoiGeometry

    return DataConfig("Dataset999_Toy", tuple(labels), tuple(f"l{v}" for v in labels), None, 0,
                      "MR" if kind == "percentile" else "CT", RoiGeometry((8, 16, 16), (1.0, 1.0, 1.0)),
                      IntensitySpace(kind), ".nii.gz")


def _toy_lesion(case, values_per_class, value_range=(0.0, 100.0)):
    from lefusion_nnunet.data.histogram import lesion_histogram
    from lefusion_nnunet.synthesis.copy_paste_sources import SourceLesion

    c = len(values_per_class)
    masks = np.zeros((c, 4, 4, 4), bool)
    vals = np.zeros((4, 4, 4), np.float32)
    for i, v in enumerate(values_per_class):
        if v is None:
            continue
        masks[i, :, :, 2 * i:2 * i + 2] = True
        vals[masks[i]] = np.float32(v) + np.arange(masks[i].sum(), dtype=np.float32) % 3
    model = (vals - value_range[0]) / (value_range[1] - value_range[0]) * 2 - 1
    hist = np.concatenate([lesion_histogram(model[m]) for m in masks])
    return SourceLesion(case, 1, (1.0, 1.0, 1.0), vals, masks, value_range, hist)


def test_copy_paste_multiclass_and_mr_transfer():
    from lefusion_nnunet.synthesis.copy_paste import CopyPasteSynthesizer
    from lefusion_nnunet.synthesis.lesion import LesionRequest

    one_class = _toy_lesion("a", [60.0, None])
    two_class = _toy_lesion("b", [80.0, 20.0])
    synth = CopyPasteSynthesizer([one_class, two_class], _toy_data([3, 4]), blend_mm=0.0)
    # a target with both classes is filled from the lesion that has both, even if the other histogram is nearer
    assert synth.choose_lesion(one_class.histogram, [True, True]) == 1
    assert synth.choose_lesion(one_class.histogram, [True, False]) == 0
    image = np.zeros((10, 10, 10), np.float32)
    image[0, 0, 0] = 200.0                                          # target case range differs from the source's
    masks = np.zeros((2, 10, 10, 10), bool)
    masks[0, 3:7, 3:7, 3:5] = True
    masks[1, 3:7, 3:7, 5:7] = True
    req = LesionRequest(image=image, spacing=(1.0, 1.0, 1.0), class_masks=masks, value_range=(0.0, 200.0))
    out = synth.fill(req, 1).apply(np.asarray(req.image, np.float32))
    assert np.array_equal(out[~masks.any(0)], image[~masks.any(0)])
    # MR: source (0..100) mapped to the target's (0..200): class means double, classes keep their own values
    assert out[masks[0]].mean() == pytest.approx(2 * two_class.values[two_class.masks[0]].mean(), rel=1e-4)
    assert out[masks[1]].mean() == pytest.approx(2 * two_class.values[two_class.masks[1]].mean(), rel=1e-4)
