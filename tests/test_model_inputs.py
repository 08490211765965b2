"""Training and inference see the same model inputs, and the realism defects found by reading the code stay fixed
(issue 13: resampled cases, intensity mapping, absent-class textures, nested classes, connectivity, scan borders,
sub-voxel lesions, prototype jitter, seeding)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lefusion_nnunet.checkpoints.loaders import LoadedCheckpoint
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.histogram import (HIST_BINS, Prototypes, TextureSpec, class_histograms, lesion_histogram,
                                            resolve_texture)
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.io import read_image
from lefusion_nnunet.data.lesions import collect_lesion_rois
from lefusion_nnunet.data.masks import nested_class_masks, roi_mask_to_native
from lefusion_nnunet.data.roi import RoiGeometry, extract_roi, extract_roi_mask, plan_roi_origin
from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, NoiseSchedule, SamplerConfig, ScheduleConfig
from lefusion_nnunet.diffusion.inputs import lesion_model_inputs
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.seeding import seeded_generator
from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer
from lefusion_nnunet.variants import class_frequencies


def _write(path: Path, array: np.ndarray, spacing_zyx) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path))


def _one_lesion_dataset(root: Path, spacing_zyx, modality: str = "CT", shape=(20, 40, 40), seed: int = 0):
    """A raw dataset with one case holding one two-class lesion (outer label 2, core label 3)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image = rng.normal(-600 if modality == "CT" else 300, 80, shape).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    c = np.array(shape) / 2
    r = np.sqrt(((zz - c[0]) * spacing_zyx[0]) ** 2 + ((yy - c[1]) * spacing_zyx[1]) ** 2
                + ((xx - c[2]) * spacing_zyx[2]) ** 2)
    label = np.zeros(shape, np.uint8)
    label[r < 6] = 2
    label[r < 3] = 3
    image[label > 0] += 500
    _write(root / "imagesTr" / "case_000_0000.nii.gz", image, spacing_zyx)
    _write(root / "labelsTr" / "case_000.nii.gz", label, spacing_zyx)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": modality}, "labels": {"background": 0, "outer": 2, "core": 3},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    return image, label


def _synthesizer(data: DataConfig, hists: np.ndarray | None = None) -> LesionSynthesizer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LesionDenoiser(DenoiserConfig.from_preset("tiny", image_channels=data.num_classes)).eval()
    c = data.num_classes
    hists = hists if hists is not None else np.full((2, c * HIST_BINS), 1 / HIST_BINS, np.float32)
    protos = [Prototypes(hists[:1, i * HIST_BINS:(i + 1) * HIST_BINS], np.array([1])) for i in range(c)]
    loaded = LoadedCheckpoint(path=Path("untrained.pt"), file_sha256="ab" * 32, data=data, prototypes=protos,
                              training_histograms=hists, training_summary={}, model=model,
                              schedule=NoiseSchedule(ScheduleConfig(num_train_timesteps=10)))
    return LesionSynthesizer(loaded, device="cpu", sampler=SamplerConfig(num_steps=2), batch_size=2)


@pytest.mark.parametrize("native, model, modality, intensity", [
    ((2.0, 1.0, 1.0), (2.0, 1.0, 1.0), "CT", IntensitySpace("window", window=(-1000.0, 400.0))),  # no resampling
    ((2.5, 0.7, 0.7), (2.0, 1.0, 1.0), "CT", IntensitySpace("window", window=(-1000.0, 400.0))),  # resampled
    ((5.0, 0.8, 0.8), (2.5, 1.2, 1.2), "CTA", IntensitySpace("window", window=(-1000.0, 400.0))),  # thick slices
    ((2.5, 0.7, 0.7), (2.0, 1.0, 1.0), "CT", IntensitySpace("percentile")),  # CT in a percentile space
    ((1.5, 1.5, 1.5), (2.0, 1.0, 1.0), "MR", IntensitySpace("percentile", percentiles=(1.0, 99.0)))])
def test_training_and_inference_build_identical_model_inputs(tmp_path, native, model, modality, intensity):
    image, label = _one_lesion_dataset(tmp_path / "Dataset900_One", native, modality)
    geometry = RoiGeometry((8, 16, 16), model)
    rois = collect_lesion_rois(load_raw_dataset(tmp_path / "Dataset900_One"), [2, 3], geometry, intensity,
                               progress=False)
    assert len(rois) == 1
    data = DataConfig(dataset_name="Dataset900_One", lesion_labels=(2, 3), label_names=("outer", "core"),
                      region_label=None, channel=0, modality=modality, roi=geometry, intensity=intensity)
    synth = _synthesizer(data)
    vol = read_image([tmp_path / "Dataset900_One" / "imagesTr" / "case_000_0000.nii.gz"])  # as variants reads it
    masks = np.stack([label == 2, label == 3])
    prepared = synth._prepare(LesionRequest(vol.channel(0), vol.spacing, masks), np.random.default_rng(0))
    train = lesion_model_inputs(torch.from_numpy(rois.images[:1])[:, None], torch.from_numpy(rois.class_masks[:1]))
    infer = lesion_model_inputs(torch.from_numpy(prepared["roi"][None, None]), torch.from_numpy(prepared["masks"][None]))
    for field in ("known", "context", "class_masks", "generate"):
        assert torch.equal(getattr(train, field), getattr(infer, field)), field
    assert train.generate.sum() > 0 and torch.equal(train.generate, train.class_masks.amax(1, keepdim=True))


def test_random_texture_of_a_class_never_uses_an_absent_class_placeholder():
    rng = np.random.default_rng(0)
    present = np.concatenate([lesion_histogram(rng.uniform(-1, 0, 50)), lesion_histogram(rng.uniform(0, 1, 50))])
    absent = np.concatenate([lesion_histogram(rng.uniform(-1, 0, 50)), lesion_histogram(np.zeros(0))])
    hists = np.stack([absent, present, absent]).astype(np.float32)
    assert np.array_equal(class_histograms(hists, 1), hists[1:2, HIST_BINS:])
    assert len(class_histograms(hists, 0)) == 3
    protos = Prototypes(hists[:1, HIST_BINS:], np.array([1]))
    for i in range(20):
        got = resolve_texture(TextureSpec("random"), protos, class_histograms(hists, 1), np.random.default_rng(i))
        assert np.abs(got - hists[1, HIST_BINS:]).sum() < 0.5  # a jittered copy of the one real class-1 texture


def test_cluster_texture_is_jittered_around_its_prototype():
    proto = lesion_histogram(np.random.default_rng(0).uniform(-1, 1, 200))
    protos = Prototypes(proto[None], np.array([1]))
    a, b = (resolve_texture(TextureSpec("cluster", cluster=0), protos, proto[None], np.random.default_rng(s))
            for s in (1, 2))
    assert not np.array_equal(a, b) and not np.array_equal(a, proto)
    assert np.abs(a - proto).sum() < 0.25 and a.sum() == pytest.approx(1.0)


def test_ellipsoid_masks_of_nested_classes_come_out_nested():
    zz, yy, xx = np.indices((21, 21, 21))
    ball = (zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 64
    masks, depths = nested_class_masks(ball, (1.0, 1.0, 1.0), [1.0, 1.0], np.random.default_rng(0))
    outer, core = masks
    assert core.any() and outer.any() and not (outer & core).any() and np.array_equal(outer | core, ball)
    assert depths[0] is not None and ball[10, 10, 10] and core[10, 10, 10]  # the core is the lesion's centre
    from scipy import ndimage
    assert ndimage.binary_dilation(core).sum() <= (core | outer).sum()  # the rim surrounds the core
    absent = [nested_class_masks(ball, (1.0, 1.0, 1.0), [1.0, 0.3], np.random.default_rng(s))[0][1].any()
              for s in range(40)]
    assert 4 <= sum(absent) <= 22  # the core appears about as often as in the training lesions (30 %)
    assert class_frequencies({"num_lesions": 10, "lesions_per_class": [10, 3]}, 2) == [1.0, 0.3]
    assert class_frequencies({}, 2) == [1.0, 1.0]


def test_training_counts_a_diagonally_touching_lesion_once(tmp_path):
    root = tmp_path / "Dataset901_Diag"
    _one_lesion_dataset(root, (1.0, 1.0, 1.0))
    label = np.zeros((20, 40, 40), np.uint8)
    label[8:10, 18:20, 18:20] = 2
    label[10:12, 20:22, 20:22] = 2  # touches the first block at one corner only
    _write(root / "labelsTr" / "case_000.nii.gz", label, (1.0, 1.0, 1.0))
    rois = collect_lesion_rois(load_raw_dataset(root), [2], RoiGeometry((8, 16, 16), (1.0, 1.0, 1.0)),
                               IntensitySpace(), progress=False)
    assert len(rois) == 1


def test_a_mask_at_the_scan_border_does_not_continue_into_the_padding():
    mask = np.zeros((10, 20, 20), bool)
    mask[0:3, 8:12, 8:12] = True  # touches the first slice
    geometry = RoiGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    origin = plan_roi_origin(mask, (1.0, 1.0, 1.0), geometry)
    assert origin[0] < 0  # the ROI reaches past the image
    roi = extract_roi_mask(mask, (1.0, 1.0, 1.0), origin, geometry)
    padding = np.arange(8) + origin[0] < 0
    assert roi.sum() == mask.sum() and not roi[padding].any()


def test_a_lesion_smaller_than_a_model_voxel_is_still_generated():
    image = np.random.default_rng(0).normal(-700, 30, (20, 40, 40)).astype(np.float32)
    mask = np.zeros((1, 20, 40, 40), bool)
    mask[0, 10, 20, 20] = True  # 1 mm^3 lesion, model voxels of 8 mm^3
    geometry = RoiGeometry((8, 8, 8), (2.0, 2.0, 2.0))
    assert extract_roi_mask(mask[0], (1.0, 1.0, 1.0), plan_roi_origin(mask[0], (1.0, 1.0, 1.0), geometry),
                            geometry).sum() == 1
    data = DataConfig(dataset_name="D", lesion_labels=(2,), label_names=("n",), region_label=None, channel=0,
                      modality="CT", roi=geometry, intensity=IntensitySpace())
    [out] = _synthesizer(data).synthesize([LesionRequest(image, (1.0, 1.0, 1.0), mask)],
                                          generator=[seeded_generator(0, "x")])
    assert out[10, 20, 20] != image[10, 20, 20] and np.array_equal(out[~mask[0]], image[~mask[0]])


def test_seeding_is_explicit_and_device_independent():
    data = DataConfig(dataset_name="D", lesion_labels=(2,), label_names=("n",), region_label=None, channel=0,
                      modality="CT", roi=RoiGeometry((8, 8, 8), (1.0, 1.0, 1.0)), intensity=IntensitySpace())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    synth = _synthesizer(data)
    assert torch.equal(torch.get_rng_state(), before)  # building and loading models leaves the global RNG alone
    image = np.random.default_rng(0).normal(-700, 30, (16, 16, 16)).astype(np.float32)
    mask = np.zeros((1, 16, 16, 16), bool)
    mask[0, 6:10, 6:10, 6:10] = True
    request = LesionRequest(image, (1.0, 1.0, 1.0), mask)
    a, b = synth.synthesize([request])[0], synth.synthesize([request])[0]  # no generator: seeded, not global
    assert np.array_equal(a, b) and torch.equal(torch.get_rng_state(), before)
    assert seeded_generator(0, "x").device.type == "cpu"  # noise is drawn on the CPU, then moved


def test_classifier_free_guidance_reaches_the_network_through_the_synthesizer():
    data = DataConfig(dataset_name="D", lesion_labels=(2,), label_names=("n",), region_label=None, channel=0,
                      modality="CT", roi=RoiGeometry((8, 8, 8), (1.0, 1.0, 1.0)), intensity=IntensitySpace())
    synth = _synthesizer(data)
    synth.guidance_scale = 3.0
    torch.manual_seed(0)
    x_t, context = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    masks, cond, t = torch.ones(2, 1, 8, 8, 8), torch.rand(2, HIST_BINS), torch.tensor([3, 7])
    model = synth.checkpoint.model
    with torch.no_grad():
        for p in model.parameters():  # an untrained network's zero output layer would hide the condition
            p.add_(0.1 * torch.randn_like(p))
        eps_c = model(x_t, t, context, masks, cond)
        eps_u = model(x_t, t, context, masks, cond, drop_cond=torch.ones(2, dtype=torch.bool))
        got = synth._eps_fn(context, masks, cond)(x_t, t)
    assert not torch.allclose(eps_c, eps_u)  # the null condition is a different input
    torch.testing.assert_close(got, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_sampling_uses_the_ema_weights(tmp_path):
    from lefusion_nnunet.checkpoints.format import load_checkpoint_content
    from lefusion_nnunet.checkpoints.loaders import load_lesion_checkpoint
    from lefusion_nnunet.phantoms import generate_phantom
    from lefusion_nnunet.training.lesion import train_lesion_model
    from lefusion_nnunet.training.loop import TrainConfig

    folder = generate_phantom("chest", tmp_path / "raw", num_cases=3, shape_zyx=(24, 48, 48), seed=1)
    final = train_lesion_model(load_raw_dataset(folder), [2], tmp_path / "run",
                               TrainConfig(preset="tiny", steps=3, batch_size=1, ema_decay=0.5, device="cpu"),
                               RoiGeometry((8, 16, 16), (2.0, 1.5, 1.5)), region_label=1, progress=False)
    content = load_checkpoint_content(final)
    loaded = load_lesion_checkpoint(final).model.state_dict()
    name = next(k for k in content["ema_state"] if not torch.equal(content["ema_state"][k], content["model_state"][k]))
    assert torch.equal(loaded[name], content["ema_state"][name])
    assert not torch.equal(loaded[name], content["model_state"][name])


def test_default_roi_is_planned_in_mm_from_the_training_lesions(tmp_path):
    from lefusion_nnunet.data.lesions import lesion_extents_mm
    from lefusion_nnunet.data.roi import choose_roi_geometry, mask_fits_roi

    _one_lesion_dataset(tmp_path / "Dataset902_Thick", (5.0, 0.7, 0.7), shape=(16, 64, 64))
    extents = lesion_extents_mm(load_raw_dataset(tmp_path / "Dataset902_Thick"), [2, 3])
    assert extents.shape == (1, 3) and extents[0, 0] == pytest.approx(15.0, abs=0.01)  # 3 slices of 5 mm
    roi = choose_roi_geometry(extents, (5.0, 0.7, 0.7))
    assert roi.spacing_zyx[0] >= 5.0  # never thinner slices than the scan
    assert all(e >= 1.5 * x - 1e-6 for e, x in zip(roi.extent_mm, extents[0]))  # every lesion fits with margin
    assert all(s % 8 == 0 for s in roi.size_zyx) and roi.size_zyx[1] == roi.size_zyx[2]
    big = choose_roi_geometry(np.array([[60.0, 120.0, 100.0]]), (5.0, 0.7, 0.7))  # a large tumour: coarser grid
    assert big.size_zyx[1] <= 64 and big.extent_mm[1] >= 180.0 - 1e-6
    _, label = _one_lesion_dataset(tmp_path / "Dataset903_Fit", (2.5, 0.9, 0.9), shape=(20, 40, 40))
    geometry = choose_roi_geometry(lesion_extents_mm(load_raw_dataset(tmp_path / "Dataset903_Fit"), [2, 3]),
                                   (2.5, 0.9, 0.9))
    lesion = label > 0
    assert mask_fits_roi(lesion, (2.5, 0.9, 0.9), plan_roi_origin(lesion, (2.5, 0.9, 0.9), geometry), geometry)


def test_auto_lung_region_places_every_lesion_in_the_lungs(tmp_path):
    from lefusion_nnunet.phantoms import generate_phantom
    from lefusion_nnunet.variant_settings import VariantSettings
    from lefusion_nnunet.variants import make_variants

    folder = generate_phantom("chest", tmp_path / "raw", num_cases=3, shape_zyx=(24, 64, 64), seed=2,
                              lesion_free_fraction=0.67)
    dataset = load_raw_dataset(folder)
    data = DataConfig(dataset_name=dataset.name, lesion_labels=(2,), label_names=("nodule",), region_label=None,
                      channel=0, modality="CT", roi=RoiGeometry((8, 16, 16), (2.5, 0.9, 0.9)),
                      intensity=IntensitySpace())
    settings = VariantSettings(per_case=2, size_mm=(4.0, 6.0), auto_region="lung", seed=3)
    made = [c for cases, _ in make_variants(_synthesizer(data), dataset, [c.case_id for c in dataset.cases], settings)
            for c in cases]
    assert made
    for case in made:
        source_label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.case(case.source_case).label)))
        new = (case.label == 2) & (source_label != 2)
        assert new.any() and (source_label[new] == 1).all(), "a synthetic lesion voxel lies outside the lung"
    with pytest.raises(Exception, match="only one"):
        VariantSettings(auto_region="lung", region_label=1)


def test_border_ring_is_generated_and_nothing_beyond_it_changes():
    import dataclasses as dc

    from lefusion_nnunet.synthesis.lesion import generation_region

    image = np.random.default_rng(0).normal(-700, 30, (16, 32, 32)).astype(np.float32)
    mask = np.zeros((1, 16, 32, 32), bool)
    mask[0, 6:10, 12:18, 12:18] = True
    base = DataConfig(dataset_name="D", lesion_labels=(2,), label_names=("n",), region_label=None, channel=0,
                      modality="CT", roi=RoiGeometry((8, 16, 16), (1.0, 1.0, 1.0)), intensity=IntensitySpace())
    synth = _synthesizer(dc.replace(base, border_ring_voxels=1))
    with torch.no_grad():
        for p in synth.checkpoint.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    [out] = synth.synthesize([LesionRequest(image, (1.0, 1.0, 1.0), mask)], generator=[seeded_generator(0, "r")])
    changed = out != image
    from scipy import ndimage
    ring = ndimage.binary_dilation(mask[0], structure=np.ones((3, 3, 3))) & ~mask[0]
    assert changed[ring].mean() > 0.9 and not changed[~(mask[0] | ring)].any()  # exactly mask + one-voxel ring
    prepared = synth._prepare(LesionRequest(image, (1.0, 1.0, 1.0), mask), np.random.default_rng(0))
    inputs = lesion_model_inputs(torch.from_numpy(prepared["roi"][None, None]),
                                 torch.from_numpy(prepared["masks"][None]), border_ring=1)
    region = generation_region(mask[0], inputs.generate[0, 0].numpy().astype(bool), prepared["origin"],
                               (1.0, 1.0, 1.0), synth.data)
    assert np.array_equal(region, mask[0] | ring)
    assert np.array_equal(generation_region(mask[0], inputs.generate[0, 0].numpy().astype(bool),
                                            prepared["origin"], (1.0, 1.0, 1.0), base), mask[0])  # no ring: mask


# ---- border ring shapes (issue 13: edges too soft with the 26-neighbourhood ring on thick slices) ----------------

THICK = (2.5, 0.9, 0.9)  # the chest phantom's grid: z three times coarser than y, x


def _structure(shape: str, spacing) -> np.ndarray:
    """The 3x3x3 scipy structuring element one ring step of ``shape`` should be (written out independently)."""
    from scipy import ndimage

    fine = [s <= 1.5 * min(spacing) for s in spacing] if shape.startswith("in-plane") else [True] * 3
    if shape.endswith("faces"):
        st = ndimage.generate_binary_structure(3, 1)
    else:
        st = np.ones((3, 3, 3), bool)
    for axis, keep in enumerate(fine):
        if not keep:  # no growth along this axis: only the middle plane of the element stays
            idx = [slice(None)] * 3
            for off in (0, 2):
                idx[axis] = off
                st[tuple(idx)] = False
    return st


@pytest.mark.parametrize("shape", ["cube", "faces", "in-plane", "in-plane-faces"])
@pytest.mark.parametrize("spacing", [THICK, (1.0, 1.0, 1.0), (0.8, 0.8, 3.0)])
def test_each_ring_shape_grows_the_mask_by_its_neighbourhood(shape, spacing):
    from scipy import ndimage

    from lefusion_nnunet.diffusion.inputs import border_ring_region

    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((10, 14, 14)) < 0.35) | (rng.random((10, 14, 14)) < 0.03)
    for steps in (1, 2):
        got = border_ring_region(torch.from_numpy(mask[None, None]).float(), steps, shape, spacing)[0, 0]
        want = ndimage.binary_dilation(mask, structure=_structure(shape, spacing), iterations=steps)
        assert np.array_equal(got.numpy().astype(bool), want), (shape, spacing, steps)


def test_in_plane_rings_leave_thick_slices_alone_and_the_cube_ring_is_the_old_one():
    from lefusion_nnunet.diffusion.inputs import border_ring_region, ring_axes

    voxel = torch.zeros(1, 1, 5, 5, 5)
    voxel[0, 0, 2, 2, 2] = 1
    counts = {s: int(border_ring_region(voxel, 1, s, THICK).sum()) for s in ("cube", "faces", "in-plane",
                                                                               "in-plane-faces")}
    assert counts == {"cube": 27, "faces": 7, "in-plane": 9, "in-plane-faces": 5}
    assert ring_axes("in-plane", THICK) == (1, 2) and ring_axes("in-plane", (1.0, 1.2, 1.0)) == (0, 1, 2)
    old = torch.nn.functional.max_pool3d(voxel, 3, 1, 1)  # the ring of the previous release, written out
    assert torch.equal(border_ring_region(voxel, 1), old)  # default shape = "cube" = old checkpoints' ring
    with pytest.raises(ValueError, match="spacings"):
        border_ring_region(voxel, 1, "in-plane")
    with pytest.raises(ValueError, match="not one of"):
        border_ring_region(voxel, 1, "sphere", THICK)


@pytest.mark.parametrize("shape", ["in-plane-faces", "in-plane", "faces", "cube"])
def test_training_and_inference_build_the_same_ring(tmp_path, shape):
    import dataclasses as dc

    _, label = _one_lesion_dataset(tmp_path / "Dataset904_Ring", THICK, shape=(16, 48, 48))
    geometry = RoiGeometry((8, 24, 24), THICK)
    intensity = IntensitySpace("window", window=(-1000.0, 400.0))
    rois = collect_lesion_rois(load_raw_dataset(tmp_path / "Dataset904_Ring"), [2, 3], geometry, intensity,
                               progress=False)
    data = DataConfig(dataset_name="Dataset904_Ring", lesion_labels=(2, 3), label_names=("outer", "core"),
                      region_label=None, channel=0, modality="CT", roi=geometry, intensity=intensity,
                      border_ring_voxels=1, border_ring_shape=shape)
    synth = _synthesizer(data)
    vol = read_image([tmp_path / "Dataset904_Ring" / "imagesTr" / "case_000_0000.nii.gz"])
    prepared = synth._prepare(LesionRequest(vol.channel(0), vol.spacing, np.stack([label == 2, label == 3])),
                              np.random.default_rng(0))
    ring = dict(border_ring=data.border_ring_voxels, ring_shape=data.border_ring_shape,
                spacing_zyx=data.roi.spacing_zyx)   # what training (training/lesion.py) passes
    train = lesion_model_inputs(torch.from_numpy(rois.images[:1])[:, None], torch.from_numpy(rois.class_masks[:1]),
                                **ring)
    infer = lesion_model_inputs(torch.from_numpy(prepared["roi"][None, None]),
                                torch.from_numpy(prepared["masks"][None]), **ring)
    for name in ("known", "context", "class_masks", "generate"):
        assert torch.equal(getattr(train, name), getattr(infer, name)), name
    union = torch.from_numpy(rois.class_masks[:1]).amax(1, keepdim=True).float()
    assert train.generate.sum() > union.sum()  # a ring was added
    [region] = synth.generation_regions([LesionRequest(vol.channel(0), vol.spacing,
                                                       np.stack([label == 2, label == 3]))])
    assert region.sum() == train.generate.sum()  # native grid = model grid here: the same voxels
    cube = _synthesizer(dc.replace(data, border_ring_shape="cube")).generation_regions(
        [LesionRequest(vol.channel(0), vol.spacing, np.stack([label == 2, label == 3]))])[0]
    assert (region <= cube).all() and (shape == "cube") == np.array_equal(region, cube)


def test_in_plane_faces_ring_is_generated_and_nothing_beyond_it_changes():
    from scipy import ndimage

    image = np.random.default_rng(1).normal(-700, 30, (12, 32, 32)).astype(np.float32)
    mask = np.zeros((1, 12, 32, 32), bool)
    mask[0, 4:8, 12:19, 13:18] = True
    mask[0, 5:7, 11, 15] = True
    data = DataConfig(dataset_name="D", lesion_labels=(2,), label_names=("n",), region_label=None, channel=0,
                      modality="CT", roi=RoiGeometry((8, 16, 16), THICK), intensity=IntensitySpace(),
                      border_ring_voxels=1, border_ring_shape="in-plane-faces")
    synth = _synthesizer(data)
    with torch.no_grad():
        for p in synth.checkpoint.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    request = LesionRequest(image, THICK, mask)
    [out] = synth.synthesize([request], generator=[seeded_generator(0, "r")])
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)  # in-plane face neighbours only
    region = ndimage.binary_dilation(mask[0], structure=cross)
    ring = region & ~mask[0]
    changed = out != image
    assert changed[ring].mean() > 0.9 and not changed[~region].any()
    assert not (changed & ~region).any() and np.array_equal(synth.generation_regions([request])[0], region)
    above = np.roll(mask[0], 1, axis=0) & ~region  # across the thick slices: a cube ring would change these
    assert above.any() and not changed[above].any()


def test_ring_shape_defaults_old_checkpoints_and_validation():
    from lefusion_nnunet.cli.main import build_parser
    from lefusion_nnunet.cli.train import RING_SHAPE_CHOICES
    from lefusion_nnunet.data.config import BORDER_RING_SHAPES
    from lefusion_nnunet.diffusion.inputs import RING_SHAPES
    from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
    from lefusion_nnunet.training.loop import TrainConfig

    assert set(RING_SHAPES) == set(BORDER_RING_SHAPES) == set(RING_SHAPE_CHOICES)
    new = DataConfig(dataset_name="D", lesion_labels=(2,), label_names=("n",), region_label=None, channel=0,
                     modality="CT", roi=RoiGeometry((8, 8, 8), THICK), intensity=IntensitySpace(),
                     border_ring_voxels=1, border_ring_shape="in-plane-faces")
    old = new.to_dict()
    del old["border_ring_shape"]  # a checkpoint written before the field: its ring was the 26-neighbourhood one
    assert DataConfig.from_dict(old).border_ring_shape == "cube"
    assert DataConfig.from_dict(new.to_dict()) == new
    with pytest.raises(LeFusionCheckpointError, match="border_ring_shape"):
        DataConfig.from_dict({**new.to_dict(), "border_ring_shape": "sphere"})
    assert TrainConfig().border_ring_shape == "in-plane-faces" != DataConfig.from_dict(old).border_ring_shape
    with pytest.raises(LeFusionInputError, match="--border-ring-shape"):
        TrainConfig(border_ring_shape="round")
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    args = train.parse_args(["-d", "501", "--lesion-label", "2"])
    assert args.border_ring_shape == TrainConfig().border_ring_shape
    chosen = train.parse_args(["-d", "1", "--lesion-label", "2", "--border-ring-shape", "cube"])
    assert chosen.border_ring_shape == "cube"
    assert "--border-ring-shape" in train.format_help()


def test_training_records_the_ring_and_an_old_run_resumes_with_its_own(tmp_path):
    from lefusion_nnunet.checkpoints.format import load_checkpoint_content, save_checkpoint
    from lefusion_nnunet.phantoms import generate_phantom
    from lefusion_nnunet.training.lesion import train_lesion_model
    from lefusion_nnunet.training.loop import LATEST, TrainConfig

    folder = generate_phantom("chest", tmp_path / "raw", num_cases=3, shape_zyx=(24, 48, 48), seed=1)
    dataset = load_raw_dataset(folder)
    geometry = RoiGeometry((8, 16, 16), THICK)
    config = TrainConfig(preset="tiny", steps=2, batch_size=1, checkpoint_every=1, device="cpu")
    final = train_lesion_model(dataset, [2], tmp_path / "run", config, geometry, region_label=1, progress=False)
    content = load_checkpoint_content(final)
    recorded = (content["data_config"]["border_ring_shape"], content["train_config"]["border_ring_shape"])
    assert recorded == ("in-plane-faces", "in-plane-faces")
    latest = load_checkpoint_content(tmp_path / "run" / LATEST)
    for key in ("data_config", "train_config"):  # as the previous version wrote it: no shape, the cube ring
        del latest[key]["border_ring_shape"]
    save_checkpoint(tmp_path / "run" / LATEST, latest)
    resumed = train_lesion_model(dataset, [2], tmp_path / "run", TrainConfig(preset="tiny", steps=3, batch_size=1,
                                                                            device="cpu"),
                                 geometry, region_label=1, resume=True, progress=False)
    content = load_checkpoint_content(resumed)
    assert content["step"] == 3
    assert content["data_config"]["border_ring_shape"] == "cube" == content["train_config"]["border_ring_shape"]


# ---- the ROI's native window (issue 14: synthesis touches only the lesion's neighbourhood) -----------------------

@pytest.mark.parametrize("spacing, where", [
    ((0.4, 2.5, 2.5), "corner"),     # 2.5 native voxels per model voxel along z: the ring reaches past floor - 1
    ((2.5, 0.7, 0.7), "middle"),
    ((1.0, 1.0, 1.0), "edge")])      # no resampling: exact copies
def test_window_path_equals_the_whole_image_path(spacing, where):
    """The model inputs, the generation region and the pasted result are computed on the ROI's native window only;
    they equal the whole-image functions, also where the ROI leaves the image, and a mask block at an offset gives
    the same edit as the whole-volume mask."""
    rng = np.random.default_rng(3)
    shape = (40, 64, 64)
    image = rng.normal(-600, 80, shape).astype(np.float32)
    masks = np.zeros((2, *shape), bool)
    z, y, x = {"corner": (1, 1, 2), "middle": (18, 30, 29), "edge": (36, 1, 30)}[where]
    masks[0, z:z + 3, y:y + 4, x:x + 4] = True
    masks[1, z + 1, y + 1:y + 3, x + 1:x + 3] = True
    masks[0] &= ~masks[1]
    data = DataConfig(dataset_name="D", lesion_labels=(2, 3), label_names=("a", "b"), region_label=None, channel=0,
                      modality="CT", roi=RoiGeometry((16, 16, 16), (1.0, 2.0, 2.0)), intensity=IntensitySpace(),
                      border_ring_voxels=1, border_ring_shape="cube")
    synth = _synthesizer(data)
    with torch.no_grad():
        for p in synth.checkpoint.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    whole = LesionRequest(image, spacing, masks, texture=np.full(32, 1 / 16, np.float32))
    p = synth._prepare(whole, np.random.default_rng(0))
    window = p["window"]
    assert np.prod(window.shape) < np.prod(shape) / 4   # only the neighbourhood is read
    origin = p["origin"]
    assert np.array_equal(p["roi"], data.intensity.to_model(extract_roi(image, spacing, origin, data.roi),
                                                            data.intensity.value_range_for(image)))
    assert np.array_equal(p["masks"], np.stack([extract_roi_mask(m, spacing, origin, data.roi) for m in masks]))
    inputs = lesion_model_inputs(torch.from_numpy(p["roi"][None, None]), torch.from_numpy(p["masks"][None]),
                                 border_ring=1, ring_shape="cube", spacing_zyx=data.roi.spacing_zyx)
    ring = roi_mask_to_native(inputs.generate[0, 0].bool().numpy(), origin, spacing, data.roi, shape)[0]
    [region] = synth.generation_regions([whole])
    assert np.array_equal(region, masks.any(0) | ring) and ring.sum() > masks.any(0).sum()
    lo = np.argwhere(masks.any(0)).min(0)
    hi = np.argwhere(masks.any(0)).max(0) + 1
    block = LesionRequest(image, spacing, masks[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], texture=whole.texture,
                          mask_offset_zyx=tuple(int(v) for v in lo))
    [a] = synth.synthesize([whole], generator=[seeded_generator(0, "w")])
    [edit] = synth.synthesize_edits([block], generator=[seeded_generator(0, "w")])
    assert np.array_equal(edit.apply(image), a) and not np.array_equal(a, image)
    assert not (a != image)[~region].any()
    with pytest.raises(LeFusionInputError, match="do not match"):
        synth.synthesize_edits([dataclasses.replace(block, mask_offset_zyx=(38, 0, 0))])
