"""Lesion mask diffusion: encodings, post-processing (size / boundary), location control, the mask model
(C = 2 on the cardiac phantom, tiny preset), and the "diffusion" mask source of the variants path."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import block_edit, rotation_direction
from scipy import ndimage

from lefusion_nnunet.checkpoints.format import load_checkpoint_content
from lefusion_nnunet.checkpoints.loaders import load_mask_checkpoint
from lefusion_nnunet.cli import mask_commands
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.io import read_image, read_label, voxel_to_world, world_to_voxel
from lefusion_nnunet.data.mask_shapes import (MASK_FEATURES, center_distance_mm, cumulative_channels, decode_cumulative,
                                              postprocess_masks, sphere_channel)
from lefusion_nnunet.data.masks import mask_volume_mm3, roi_mask_to_native, sphere_volume_mm3, surface_to_volume
from lefusion_nnunet.data.placement import allowed_region
from lefusion_nnunet.data.roi import RoiGeometry, extract_roi_mask, roi_origin_for_center
from lefusion_nnunet.diffusion import SamplerConfig
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.phantoms.cardiac import CardiacPhantomConfig, generate_cardiac_phantom
from lefusion_nnunet.synthesis.masks import MaskGenerator
from lefusion_nnunet.training.loop import TrainConfig
from lefusion_nnunet.training.mask import train_mask_model
from lefusion_nnunet.variant_settings import VariantSettings
from lefusion_nnunet.variants import make_variants

SPACING = (8.0, 1.5, 1.5)
ROI = RoiGeometry((8, 32, 32), SPACING)
LABELS = [3, 4]
FAST = SamplerConfig(name="ddim", num_steps=3)


# ------------------------------------------------------------------------------------------------------------
# pure functions
def test_cumulative_encoding_keeps_classes_nested():
    rng = np.random.default_rng(0)
    classes = np.zeros((2, 4, 6, 6), bool)
    classes[0] = rng.random((4, 6, 6)) < 0.3
    classes[1] = (rng.random((4, 6, 6)) < 0.3) & ~classes[0]
    cum = cumulative_channels(classes)
    np.testing.assert_array_equal(cum[0], classes.any(0))
    np.testing.assert_array_equal(cum[1], classes[1])
    np.testing.assert_array_equal(decode_cumulative(cum), classes)
    broken = cum.copy()
    broken[1, 0, 0, 0], broken[0, 0, 0, 0] = True, False             # inner voxel outside the outer channel
    assert not decode_cumulative(broken)[:, 0, 0, 0].any()


def test_sphere_channel_encodes_centre_and_radius():
    s = sphere_channel((9, 31, 31), (2.0, 1.0, 1.0), (4, 10, 10), 6.0)
    assert s[4, 10, 10] == 1.0 and s[4, 10, 16] == pytest.approx(0.0) and s[4, 10, 0] == pytest.approx(-2 / 3)
    assert s[4, 10, 22] == -1.0 and s[4, 10, 30] == -1.0                     # clipped from 2 r outward
    assert s[1, 10, 10] == pytest.approx(0.0)                                 # 3 slices x 2 mm = 6 mm
    assert s.dtype == np.float32 and s.min() >= -1 and s.max() <= 1


def _blob_soft(shape, center, radius_vox, rng):
    zz, yy, xx = np.indices(shape)
    d = np.sqrt(((zz - center[0]) * 2) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2)
    soft = np.tanh((radius_vox - d) / 2 + 0.8 * rng.standard_normal(shape))
    return np.stack([soft, np.tanh((radius_vox / 2 - d) / 2)])


def test_postprocess_enforces_size_region_and_boundary_order():
    shape, sp, center = (16, 40, 40), (2.0, 1.0, 1.0), (8, 20, 20)
    allowed = np.ones(shape, bool)
    allowed[:, :, 27:] = False                                             # a wall the lesion may not cross
    svr = {0.0: [], 0.5: [], 1.0: []}
    for seed in range(3):
        soft = _blob_soft(shape, center, 7, np.random.default_rng(seed))
        for b in svr:
            for d in (10.0, 16.0):
                target = sphere_volume_mm3(d) / np.prod(sp)
                cum = postprocess_masks(soft, sp, target, b, center, d / 2, np.random.default_rng(100 + seed),
                                        allowed, inner_fractions=[0.2])
                assert abs(cum[0].sum() / target - 1) < 0.03, "the threshold sets the size"
                assert not (cum[0] & ~allowed).any()
                assert ndimage.label(cum[0], structure=np.ones((3, 3, 3)))[1] == 1
                assert not (cum[1] & ~cum[0]).any() and abs(cum[1].sum() / cum[0].sum() - 0.2) < 0.1
                if d == 16.0:
                    svr[b].append(surface_to_volume(cum[0], sp))
    means = [np.mean(svr[b]) for b in (0.0, 0.5, 1.0)]
    assert means[0] < means[1] < means[2], f"surface/volume must grow with --boundary: {means}"
    # a blank network output falls back to the requested sphere
    blank = -np.ones((1, *shape), np.float32)
    cum = postprocess_masks(blank, sp, 500, 0.0, center, 6.0, np.random.default_rng(0))
    idx = np.argwhere(cum[0]).mean(0)
    assert np.abs(idx - center).max() < 1.0 and abs(cum[0].sum() - 500) <= 5
    with pytest.raises(LeFusionInputError, match="--boundary"):
        postprocess_masks(blank, sp, 10, 1.5, center, 3.0, np.random.default_rng(0))


def test_model_grid_masks_map_back_onto_the_native_grid():
    native_sp, roi = (2.5, 0.8, 0.8), RoiGeometry((8, 24, 24), (3.0, 1.2, 1.2))
    zz, yy, xx = np.indices((20, 60, 60))
    ball = ((zz - 9) * 2.5) ** 2 + ((yy - 30) * 0.8) ** 2 + ((xx - 28) * 0.8) ** 2 <= 7.0 ** 2
    origin = roi_origin_for_center((9, 30, 28), native_sp, roi)
    model = extract_roi_mask(ball, native_sp, origin, roi)
    back = roi_mask_to_native(model, origin, native_sp, roi, ball.shape)[0]
    dice = 2 * (back & ball).sum() / (back.sum() + ball.sum())
    assert dice > 0.9 and abs(mask_volume_mm3(back, native_sp) / mask_volume_mm3(ball, native_sp) - 1) < 0.1


def test_world_to_voxel_inverts_voxel_to_world():
    props = {"sitk_stuff": {"spacing": (0.8, 0.9, 2.5), "origin": (-12.5, 30.0, 101.25),
                            "direction": rotation_direction(30.0)}}
    idx = np.array([3.0, 17.0, 9.0])
    np.testing.assert_allclose(world_to_voxel(voxel_to_world(idx, props), props), idx, atol=1e-3)
    with pytest.raises(LeFusionInputError, match="geometry"):
        world_to_voxel((0, 0, 0), {})


# ------------------------------------------------------------------------------------------------------------
# the mask model on the cardiac phantom (C = 2: infarct with MVO core)
@pytest.fixture(scope="module")
def cardiac(tmp_path_factory) -> Path:
    cfg = CardiacPhantomConfig(num_cases=6, lesion_free_fraction=0.34, shape_zyx=(10, 48, 48), spacing_zyx=SPACING,
                               mvo_fraction=0.6, seed=5)          # 2 of the 4 infarcts hold an MVO core
    return generate_cardiac_phantom(tmp_path_factory.mktemp("raw"), 992, "MaskCardiac", cfg)


def _train(cardiac, out: Path, steps: int, resume: bool = False, lr: float = 2e-4) -> Path:
    cfg = TrainConfig(preset="tiny", steps=steps, batch_size=2, checkpoint_every=2, num_train_timesteps=20,
                      device="cpu", lr=lr)
    return train_mask_model(load_raw_dataset(cardiac), LABELS, out, cfg, ROI, region_label=2, resume=resume,
                            progress=False)


@pytest.fixture(scope="module")
def mask_ckpt(cardiac, tmp_path_factory) -> Path:
    # 40 steps at lr 1e-3 (about 2 s): enough for the raw samples to follow the sphere condition (4 steps are not)
    return _train(cardiac, tmp_path_factory.mktemp("maskrun"), steps=40, lr=1e-3)


def _free(cardiac: Path) -> str:
    cases = json.loads((cardiac / "phantom_manifest.json").read_text())["cases"]
    return next(c["case_id"] for c in cases if not c["has_lesion"])


def test_mask_model_checkpoint_and_resume(cardiac, mask_ckpt, tmp_path):
    content = load_checkpoint_content(mask_ckpt, expected_kind="mask")
    assert content["model_config"]["image_channels"] == 2 and content["model_config"]["hist_bins"] == 4
    assert content["data_config"]["roi"] == ROI.to_dict() and content["data_config"]["region_label"] == 2
    assert content["data_config"]["extra"]["mask_model"]["encoding"] == "cumulative"
    ckpt = load_mask_checkpoint(mask_ckpt)
    assert ckpt.features.shape[1] == 8
    # the "present" feature of the MVO channel says which training lesions hold an MVO core, as the phantom made them
    present = ckpt.features.reshape(-1, 2, MASK_FEATURES)[:, 1, 2]
    lesions = [c for c in json.loads((cardiac / "phantom_manifest.json").read_text())["cases"] if c["has_lesion"]]
    assert sorted(present.tolist()) == sorted(float(c["mvo_voxels"] > 0) for c in lesions)
    assert 0 < present.sum() < len(present)
    with pytest.raises(LeFusionCheckpointError, match="'mask' model"):
        from lefusion_nnunet.checkpoints.loaders import load_lesion_checkpoint
        load_lesion_checkpoint(mask_ckpt)
    straight = load_checkpoint_content(_train(cardiac, tmp_path / "a", steps=4))
    _train(cardiac, tmp_path / "b", steps=2)
    resumed = load_checkpoint_content(_train(cardiac, tmp_path / "b", steps=4, resume=True))
    for name, value in straight["ema_state"].items():
        torch.testing.assert_close(resumed["ema_state"][name], value, rtol=0, atol=0)


def test_postprocess_nests_and_sizes_masks_whatever_the_raw_channels():
    """Size and nesting of sampled masks are the post-processing's doing, not the network's: raw channels that are
    not nested (the inner blob half outside the outer one), or pure noise, still come out nested, of the requested
    size, with one inner piece inside the outer one (none when its fraction is 0); the requested inner fraction
    is met only when the raw inner channel is one coherent blob (from noise its largest piece is smaller)."""
    shape, sp, center = (8, 32, 32), SPACING, (3.5, 15.5, 15.5)
    zz, yy, xx = np.indices(shape)
    rng = np.random.default_rng(0)
    outer = np.tanh((9.0 - np.sqrt(((zz - 3.5) * 8) ** 2 + ((yy - 15.5) * 1.5) ** 2 + ((xx - 15.5) * 1.5) ** 2)) / 2)
    inner = np.tanh((5.0 - np.sqrt(((zz - 3.5) * 8) ** 2 + ((yy - 15.5) * 1.5) ** 2 + ((xx - 22.0) * 1.5) ** 2)) / 2)
    not_nested = np.stack([outer, inner]).astype(np.float32)
    assert ((not_nested[1] > 0) & (not_nested[0] <= 0)).any(), "the raw inner channel pokes out of the outer one"
    noise = rng.uniform(-1, 1, (2, *shape)).astype(np.float32)
    for soft in (not_nested, noise):
        for d, frac in ((16.0, 0.3), (20.0, 0.0)):
            target = sphere_volume_mm3(d) / np.prod(sp)
            cum = postprocess_masks(soft, sp, target, 0.3, center, d / 2, np.random.default_rng(1),
                                    inner_fractions=[frac])
            assert abs(cum[0].sum() / target - 1) < 0.03
            assert not (cum[1] & ~cum[0]).any(), "the inner class lies inside the outer one"
            assert ndimage.label(cum[1], structure=np.ones((3, 3, 3)))[1] == (frac > 0), "one inner piece, or none"
            if soft is not_nested and frac > 0:   # from noise the largest inner piece is smaller than asked
                assert abs(cum[1].sum() / cum[0].sum() - frac) < 0.1
            classes = decode_cumulative(cum)
            assert not (classes[0] & classes[1]).any()


def test_sample_post_processes_into_nested_masks_of_the_requested_size(mask_ckpt):
    """`sample` end to end. The size and the nesting checked here come from `postprocess_masks` (the test above
    shows it gives them even from noise); the network's own part is the next test. With ``mvo_fraction`` < 1 an
    MVO core comes out only when the training lesion whose features condition the sample held one."""
    gen = MaskGenerator(mask_ckpt, device="cpu", sampler=FAST)
    n = 4
    masks = gen.sample(18.0, 0.3, n=n, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0))
    replay = np.random.default_rng(0)                                  # `sample` draws the n conditions first
    conds = [gen.condition(18.0, 0.3, replay).reshape(2, MASK_FEATURES) for _ in range(n)]
    assert masks.shape == (n, 2, *ROI.size_zyx) and masks.dtype == bool
    for m, cond in zip(masks, conds):
        assert not (m[0] & m[1]).any(), "classes come back disjoint"
        assert m[1].any() == (cond[1, 3] * m.any(0).sum() >= 0.5), "an MVO core only when the reference had one"
        if m[1].any():
            assert ndimage.binary_dilation(m[1], structure=np.ones((3, 3, 3)))[m[0]].any(), "the MVO is in the infarct"
        assert abs(mask_volume_mm3(m, SPACING) / sphere_volume_mm3(18.0) - 1) < 0.05
    again = gen.sample(18.0, 0.3, n=n, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(masks, again)


def test_raw_mask_samples_follow_the_sphere_condition(mask_ckpt):
    """The network's raw samples (`sample_soft`, before any post-processing): in [-1, 1], reproducible from the
    generator, and conditioned on the sphere *where it is*: moving the requested centre along y or x changes the raw
    samples mostly around the old and new sphere, and the change's centre of mass moves the same way along the same
    axis. Fails if the sphere channel is not fed to the network, or is built with swapped axes, wrong spacing or
    centres in the wrong units."""
    gen = MaskGenerator(mask_ckpt, device="cpu", sampler=FAST)
    roi, d = gen.data.roi, 14.0
    rng = np.random.default_rng(0)
    conds = np.stack([gen.condition(d, 0.3, rng) for _ in range(2)])
    centre = (np.asarray(roi.size_zyx) - 1) / 2.0

    def soft(c):
        return gen.sample_soft(np.stack([c, c]), d, conds, generator=[torch.Generator().manual_seed(i) for i in (0, 1)])

    base = soft(centre)
    assert base.shape == (2, 2, *roi.size_zyx) and base.min() >= -1 and base.max() <= 1
    np.testing.assert_array_equal(base, soft(centre))
    assert (base[0] != base[1]).any(), "different generators, different samples"
    for axis, shift in ((2, 8.0), (1, -8.0), (2, -6.0)):
        moved_centre = centre.copy()
        moved_centre[axis] += shift
        moved = soft(moved_centre)
        near = ((center_distance_mm(roi.size_zyx, roi.spacing_zyx, centre) <= d)
                | (center_distance_mm(roi.size_zyx, roi.spacing_zyx, moved_centre) <= d))
        for a, b in zip(base, moved):
            change = np.abs(b - a).sum(0)
            assert change.sum() > 0, "the raw sample depends on the sphere condition"
            assert change[near].sum() / change.sum() > 2 * near.mean(), "the change sits around the two spheres"
            com = (np.indices(change.shape).reshape(3, -1) * change.reshape(-1)).sum(1) / change.sum()
            assert (com[axis] - centre[axis]) * np.sign(shift) > 0.2 * abs(shift), "it moves with the centre"


def test_generate_in_case_follows_the_wall_size_and_centre(cardiac, mask_ckpt):
    ds = load_raw_dataset(cardiac)
    label, props = read_label(ds.case(_free(cardiac)).label)
    allowed = allowed_region(label, region_label=2, lesion_labels=LABELS)
    gen = MaskGenerator(mask_ckpt, device="cpu", sampler=FAST)
    wall = np.argwhere(allowed)
    target = wall[len(wall) // 3]
    for d in (14.0, 20.0):
        made = gen.generate_in_case(allowed, SPACING, d, 0.5, np.random.default_rng(1),
                                    torch.Generator().manual_seed(1), center_zyx=target)
        union = made.masks.any(0)
        assert not (union & ~allowed).any(), "every lesion voxel lies in the allowed region"
        assert abs(mask_volume_mm3(union, SPACING) / sphere_volume_mm3(d) - 1) <= 0.25
        assert union[tuple(target)] or ndimage.binary_dilation(union, iterations=2)[tuple(target)]
        assert made.info["center_voxel_zyx"] == target.tolist()


class _FakeSynth:
    """LesionSynthesizer's interface; leaves the image unchanged (only the masks matter here)."""

    def __init__(self, data: DataConfig):
        self.checkpoint = SimpleNamespace(data=data, file_sha256="cd" * 32)
        self.batch_size, self.device, self.guidance_scale, self.sampler_config = 2, "cpu", 1.0, None

    def texture_condition(self, specs, rng):
        return np.full(16 * self.checkpoint.data.num_classes, 1 / 16, np.float32)

    def synthesize_edits(self, requests, generator=None, rng=None, progress=False):
        return [block_edit(r) for r in requests]


def test_variants_with_diffusion_masks_and_center(cardiac, mask_ckpt):
    ds = load_raw_dataset(cardiac)
    free = _free(cardiac)
    data = DataConfig(dataset_name=ds.name, lesion_labels=tuple(LABELS), label_names=("infarct", "mvo"),
                      region_label=2, channel=0, modality="MR", roi=ROI, intensity=IntensitySpace("percentile"))
    label, props = read_label(ds.case(free).label)
    vol = read_image(ds.case(free).images)
    wall = np.argwhere(allowed_region(label, region_label=2, lesion_labels=LABELS))
    center_mm = tuple(voxel_to_world(wall[len(wall) // 2], vol.properties))
    settings = VariantSettings(per_case=2, mask_source="diffusion", mask_checkpoint=str(mask_ckpt),
                               size_mm=(14.0, 18.0), boundary=0.4, center_mm=center_mm, sampler={"num_steps": 3},
                               seed=2)
    assert VariantSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    cases = [c for cs, _ in make_variants(_FakeSynth(data), ds, [free], settings) for c in cs]
    assert len(cases) == 2
    for case in cases:
        lesion = np.isin(case.label, LABELS)
        assert (label[lesion] == 2).all(), "diffusion masks stay inside the myocardium"
        assert (case.label == 3).any()
        prov = case.provenance
        assert prov["mask_source"] == "diffusion" and prov["requested_center_world_xyz_mm"] == list(center_mm)
        assert abs(prov["diameter_mm"] / prov["requested_diameter_mm"] - 1) < 0.1
        centroid = np.argwhere(lesion).mean(0)
        assert np.abs((centroid - wall[len(wall) // 2]) * SPACING).max() < 20.0, "the lesion sits at --center"
    bad = VariantSettings(per_case=1, mask_source="diffusion", mask_checkpoint=str(mask_ckpt), size_mm=(14.0, 18.0),
                          center_mm=(1e4, 0.0, 0.0))
    out = list(make_variants(_FakeSynth(data), ds, [free], bad))
    assert out[0][0] == [] and "outside the image" in out[0][1][0]
    other = DataConfig.from_dict({**data.to_dict(), "lesion_labels": [3], "label_names": ["infarct"]})
    with pytest.raises(LeFusionInputError, match="train-mask with the same --lesion-label"):
        list(make_variants(_FakeSynth(other), ds, [free], settings))


def test_sample_mask_command_writes_a_mask_in_the_wall(cardiac, mask_ckpt, tmp_path):
    parser = argparse.ArgumentParser()
    mask_commands.register(parser.add_subparsers())
    ds = load_raw_dataset(cardiac)
    case = ds.case(_free(cardiac))
    out = tmp_path / "mask.nii.gz"
    args = parser.parse_args(["sample-mask", "--mask-checkpoint", str(mask_ckpt), "-i", str(case.images[0]),
                              "-l", str(case.label), "--size-mm", "16", "16", "--boundary", "0.2", "-o", str(out),
                              "--device", "cpu"])
    assert args.func(args) == 0
    mask, _ = read_label(out)
    label, _ = read_label(case.label)
    assert set(np.unique(mask)) <= {0, 3, 4} and (mask == 3).any()
    assert (label[mask > 0] == 2).all()
    assert abs(mask_volume_mm3(mask > 0, SPACING) / sphere_volume_mm3(16.0) - 1) <= 0.25
