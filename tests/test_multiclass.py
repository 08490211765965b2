"""Multi-class lesions (multi-channel decomposition, C = 2) on the generated cardiac phantom, tiny presets.

The phantom is realistic in the two ways that matter here: only some infarcts hold an MVO core
(``mvo_fraction`` < 1, so a class can be absent from a lesion), and the synthesis tests use a model whose ROI
spacing differs from the data spacing (the resampled path most real datasets take: model spacing = median)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from lefusion_nnunet.checkpoints.format import load_checkpoint_content
from lefusion_nnunet.checkpoints.loaders import load_lesion_checkpoint
from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.histogram import HIST_BINS, TextureSpec, parse_textures
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.io import read_image, read_label
from lefusion_nnunet.data.lesions import collect_lesion_rois
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import SamplerConfig, masked_epsilon_loss
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.phantoms.cardiac import (CARDIAC_LABELS, CardiacPhantomConfig, generate_cardiac_phantom,
                                              make_cardiac_case)
from lefusion_nnunet.seeding import seeded_generator
from lefusion_nnunet.synthesis.files import synthesize_files
from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer
from lefusion_nnunet.training.lesion import train_lesion_model
from lefusion_nnunet.training.loop import TrainConfig
from lefusion_nnunet.variant_settings import VariantSettings
from lefusion_nnunet.variants import class_frequencies, make_variants

SPACING = (8.0, 1.5, 1.5)
ROI = RoiGeometry((8, 32, 32), SPACING)           # 64 x 48 x 48 mm: holds every infarct; divisible by 4 (tiny)
RESAMPLED_ROI = RoiGeometry((12, 24, 24), (6.0, 2.0, 2.0))   # 72 x 48 x 48 mm on another grid: the resampled path
FAST = SamplerConfig(name="ddim", num_steps=3)
LABELS = [3, 4]
CONFIG = CardiacPhantomConfig(num_cases=6, lesion_free_fraction=0.34, shape_zyx=(10, 48, 48), spacing_zyx=SPACING,
                              mvo_fraction=0.6, seed=3)          # 2 of the 4 infarcts hold an MVO core


@pytest.fixture(scope="module")
def cardiac(tmp_path_factory) -> Path:
    return generate_cardiac_phantom(tmp_path_factory.mktemp("raw"), 991, "TinyCardiac", CONFIG)


@pytest.fixture(scope="module")
def checkpoint(cardiac, tmp_path_factory) -> Path:
    cfg = TrainConfig(preset="tiny", steps=4, batch_size=2, checkpoint_every=4, num_train_timesteps=20,
                      texture_clusters=2, device="cpu")
    return train_lesion_model(load_raw_dataset(cardiac), LABELS, tmp_path_factory.mktemp("run"), cfg, ROI,
                              region_label=2, progress=False)


@pytest.fixture(scope="module")
def resampled_checkpoint(cardiac, tmp_path_factory) -> Path:
    """Same recipe, model ROI spacing (6, 2, 2) mm against data spacing (8, 1.5, 1.5) mm, border ring of 1."""
    cfg = TrainConfig(preset="tiny", steps=4, batch_size=2, checkpoint_every=4, num_train_timesteps=20,
                      texture_clusters=2, device="cpu", border_ring=1)
    return train_lesion_model(load_raw_dataset(cardiac), LABELS, tmp_path_factory.mktemp("run_resampled"), cfg,
                              RESAMPLED_ROI, region_label=2, progress=False)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "phantom_manifest.json").read_text())


def _lesion_case(folder: Path, mvo: bool = True) -> dict:
    return next(c for c in _manifest(folder)["cases"] if c["has_lesion"] and (c["mvo_voxels"] > 0) == mvo)


def _free_case(folder: Path) -> dict:
    return next(c for c in _manifest(folder)["cases"] if not c["has_lesion"])


def _lv_region(label: np.ndarray) -> np.ndarray:
    """The LV (cavity + wall) dilated in-plane: real or ellipsoid masks rarely fit another heart's thin wall."""
    return ndimage.binary_dilation(np.isin(label, [1, 2]), structure=np.ones((1, 3, 3)), iterations=2)


def _assert_nested(label: np.ndarray, core: bool = False) -> None:
    """Class 4 (MVO) lies inside class 3 (infarct): never without it, each MVO piece touching infarct voxels.
    ``core``: also a depth core, as ellipsoid masks promise (:func:`lefusion_nnunet.data.masks.nested_class_masks`):
    never on the lesion's in-plane border, and deeper inside the lesion than the infarct voxels. (Real MVO is
    subendocardial: it may reach the cavity side of the lesion, so real masks are checked without ``core``.)"""
    lesion = np.isin(label, LABELS)
    mvo = label == 4
    if not mvo.any():
        return
    pieces, n = ndimage.label(lesion, structure=np.ones((3, 3, 3)))
    for i in range(1, n + 1):
        if mvo[pieces == i].any():
            assert (label[pieces == i] == 3).any(), "an MVO without an infarct around it"
    mvo_pieces, m = ndimage.label(mvo, structure=np.ones((3, 3, 3)))
    for i in range(1, m + 1):
        touch = ndimage.binary_dilation(mvo_pieces == i, structure=np.ones((3, 3, 3)))
        assert (label[touch] == 3).any(), "an MVO piece that touches no infarct"
    if not core:
        return
    cross = ndimage.generate_binary_structure(2, 1)[None]                        # in-plane 4-neighbourhood
    on_border = ndimage.binary_dilation(mvo, structure=cross) & ~lesion
    assert not on_border.any(), f"the MVO core reaches the lesion border at {on_border.sum()} voxel(s)"
    depth = ndimage.distance_transform_edt(np.pad(lesion, 1), sampling=SPACING)[1:-1, 1:-1, 1:-1]
    assert depth[mvo].mean() > depth[label == 3].mean(), "the MVO is the lesion's core"


# ------------------------------------------------------------------------------------------------------------
def test_cardiac_phantom_is_an_mr_dataset_with_two_nested_lesion_classes(cardiac):
    dj = json.loads((cardiac / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"} and dj["labels"] == CARDIAC_LABELS
    assert load_raw_dataset(cardiac).modality(0) == "MR"
    cases = _manifest(cardiac)["cases"]
    assert any(not c["has_lesion"] for c in cases) and sum(c["has_lesion"] for c in cases) >= 2
    assert {c["infarct_texture"] for c in cases if c["has_lesion"]} == {"homogeneous", "patchy"}
    assert {c["mvo_voxels"] > 0 for c in cases if c["has_lesion"]} == {True, False}, "some infarcts lack an MVO"
    blood_raw, blood_scaled = [], []
    space = IntensitySpace("percentile")
    for c in cases:
        vol = read_image([cardiac / c["image"]])
        label, props = read_label(cardiac / c["label"])
        assert props["spacing"] == pytest.approx(SPACING)
        image = vol.channel(0)
        np.testing.assert_array_equal(image, make_cardiac_case(CONFIG, int(c["case_id"][-3:])).image)
        lesion = np.isin(label, LABELS)
        assert lesion.any() == c["has_lesion"]
        scaled = space.to_model(image, space.case_range(image, image > image.min()))
        blood_raw.append(image[label == 1].mean())
        blood_scaled.append(scaled[label == 1].mean())
        if not c["has_lesion"]:
            continue
        # lesions live in the myocardial wall: they border healthy myocardium and grow from the endocardium
        assert ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3)))[label == 2].any()
        touches_cavity = ndimage.binary_dilation(label == 1, structure=np.ones((1, 3, 3)))
        for z in np.flatnonzero(lesion.any((1, 2))):
            assert (lesion[z] & touches_cavity[z]).any(), "infarcts start at the endocardium"
        infarct, myo = (scaled[label == v].mean() for v in (3, 2))
        assert infarct > myo + 0.5, "the infarct enhances"
        assert (label == 4).any() == (c["mvo_voxels"] > 0)
        if c["mvo_voxels"] == 0:
            continue
        assert scaled[label == 4].mean() < infarct - 0.5, "the MVO core is dark"
        _assert_nested(label)                              # the MVO is the infarct's core
    # per-case gain: raw intensities differ a lot, percentile-scaled ones less (relative spread). Not "much less":
    # the upper percentile is set by the brightest tissue, the infarct, whose size differs between cases (an
    # infarct without MVO core is larger), so scaled blood still varies with the lesion.
    assert max(blood_raw) / min(blood_raw) > 1.3
    assert np.std(blood_scaled) / np.mean(blood_scaled) < np.std(blood_raw) / np.mean(blood_raw)


def test_c2_model_trains_with_one_channel_per_class(checkpoint):
    content = load_checkpoint_content(checkpoint, expected_kind="lesion")
    assert content["model_config"]["image_channels"] == 2
    assert content["data_config"]["lesion_labels"] == LABELS
    assert content["data_config"]["modality"] == "MR" and content["data_config"]["intensity"]["kind"] == "percentile"
    assert content["training_histograms"].shape[1] == 2 * HIST_BINS
    assert len(content["prototypes"]) == 2, "prototypes are clustered per class"
    assert all(n > 0 for n in content["training_summary"]["lesions_per_class"])
    ckpt = load_lesion_checkpoint(checkpoint)
    encoding_width = 2 if ckpt.model.config.cond_encoding == "histogram" else 1   # histogram ++ CDF per class
    assert ckpt.model.cond_mlp[0].in_features == 2 * HIST_BINS * encoding_width


def test_loss_of_channel_c_sees_only_class_c_voxels(cardiac):
    rois = collect_lesion_rois(load_raw_dataset(cardiac), LABELS, ROI, None, progress=False)
    both = [i for i in range(len(rois)) if rois.class_masks[i, 0].any() and rois.class_masks[i, 1].any()]
    assert both, "the phantom must give ROIs holding both classes"
    masks = torch.from_numpy(rois.class_masks[both[:1]]).float()                 # (1, 2, Z, Y, X), disjoint
    assert not (masks[:, 0].bool() & masks[:, 1].bool()).any(), "class channels are disjoint"
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(masks.shape, generator=g)
    pred = torch.randn(masks.shape, generator=g, requires_grad=True)
    loss = masked_epsilon_loss(pred, eps, masks)
    per_class = [((pred[:, c] - eps[:, c]) ** 2)[masks[:, c] > 0].mean() for c in range(2)]
    torch.testing.assert_close(loss, (per_class[0] + per_class[1]) / 2)       # normalised per class
    loss.backward()
    assert (pred.grad[:, 0][masks[:, 1] > 0] == 0).all() and (pred.grad[:, 1][masks[:, 0] > 0] == 0).all()
    with torch.no_grad():
        other = pred.detach().clone()
        other[:, 0][masks[:, 1] > 0] += 100.0        # channel 0 garbage on class-1 (MVO) voxels
        other[:, 1][masks[:, 0] > 0] -= 100.0        # channel 1 garbage on class-0 (infarct) voxels
        torch.testing.assert_close(masked_epsilon_loss(other, eps, masks), loss.detach())
        other[:, 0][masks[:, 0] > 0] += 1.0
        assert masked_epsilon_loss(other, eps, masks) > loss + 0.1


@pytest.mark.parametrize("mvo", [True, False], ids=["with_mvo", "infarct_only"])
def test_c2_sampling_recomposes_labels_with_both_classes(cardiac, resampled_checkpoint, tmp_path, mvo):
    """Resampled path (model spacing != data spacing): each class keeps its value where present, an absent class
    stays absent, and the image changes only inside the generation region (mask + border ring)."""
    from lefusion_nnunet.data.io import write_label

    case = _lesion_case(cardiac, mvo=mvo)
    label, props = read_label(cardiac / case["label"])
    assert (label == 4).any() == mvo
    mask_file = tmp_path / "mask.nii.gz"
    write_label(np.where(np.isin(label, LABELS), label, 0), mask_file, props)
    host = np.where(np.isin(label, LABELS), 2, label)                      # the lesion-free version of the label
    host_file = tmp_path / "host.nii.gz"
    write_label(host, host_file, props)
    synth = LesionSynthesizer(resampled_checkpoint, device="cpu", sampler=FAST)
    assert tuple(synth.data.roi.spacing_zyx) != SPACING and synth.data.border_ring_voxels == 1
    written = synthesize_files(synth, [cardiac / case["image"]], mask_file, tmp_path / "out", host_file,
                               parse_textures(["3=cluster:0", "4=cluster:1"], LABELS), seed=2)
    out_label, _ = read_label(written["label"])
    for v in LABELS:
        np.testing.assert_array_equal(out_label == v, label == v)               # each class keeps its value
    np.testing.assert_array_equal(out_label[~np.isin(label, LABELS)], host[~np.isin(label, LABELS)])
    _assert_nested(out_label)
    src = read_image([cardiac / case["image"]]).channel(0)
    new = read_image([Path(written["image_0000"])]).channel(0)
    union = np.isin(label, LABELS)
    masks = np.stack([label == v for v in LABELS])
    [region] = synth.generation_regions([LesionRequest(src, SPACING, masks)])  # the lesion and its border ring
    assert region[union].all() and (region & ~union).any(), "the ring reaches native voxels outside the mask"
    np.testing.assert_array_equal(new[~region], src[~region])
    assert (new[union] != src[union]).any()
    with pytest.raises(LeFusionInputError, match="none of the lesion labels"):
        write_label((label == 2).astype(np.uint8) * 7, mask_file, props)
        synthesize_files(synth, [cardiac / case["image"]], mask_file, tmp_path / "out2", seed=2)


def test_ellipsoid_variants_come_out_nested_at_the_training_class_frequency(cardiac, resampled_checkpoint, tmp_path):
    """The default mask source (ellipsoids) on the resampled path: every lesion is an infarct, an MVO core only as
    often as the training lesions held one, always nested inside the infarct; only the generation region changes."""
    from lefusion_nnunet.data.io import write_label

    ds = load_raw_dataset(cardiac)
    synth = LesionSynthesizer(resampled_checkpoint, device="cpu", sampler=FAST)
    lesions = [c for c in _manifest(cardiac)["cases"] if c["has_lesion"]]
    freq = class_frequencies(synth.checkpoint.training_summary, 2)
    assert 0 < freq[1] < 1
    assert freq[1] == pytest.approx(sum(c["mvo_voxels"] > 0 for c in lesions) / len(lesions))
    free = [c["case_id"] for c in _manifest(cardiac)["cases"] if not c["has_lesion"]]
    (tmp_path / "regions").mkdir()
    for case_id in free:
        src_label, props = read_label(ds.case(case_id).label)
        write_label(_lv_region(src_label).astype(np.uint8), tmp_path / "regions" / f"{case_id}.nii.gz", props)
    settings = VariantSettings(per_case=4, mask_source="ellipsoid", size_mm=(14.0, 20.0),
                               region_masks_dir=str(tmp_path / "regions"), textures=("3=random", "4=random"),
                               seed=4)
    cases = [c for cs, _ in make_variants(synth, ds, free, settings) for c in cs]
    assert len(cases) >= 6, "most variants fit"
    with_mvo = []
    for case in cases:
        src = read_image(ds.case(case.source_case).images).channel(0)
        src_label, _ = read_label(ds.case(case.source_case).label)
        lab, new = case.label, case.channels[0]
        lesion = np.isin(lab, LABELS)
        assert (lab == 3).any(), "every lesion has its outer class"
        _assert_nested(lab, core=True)
        with_mvo.append(bool((lab == 4).any()))
        assert (4 in case.provenance["mask"]["classes"]) == with_mvo[-1]
        assert case.provenance["class_voxels"] == {"3": int((lab == 3).sum()), "4": int((lab == 4).sum())}
        np.testing.assert_array_equal(lab[~lesion], src_label[~lesion])
        masks = np.stack([lab == v for v in LABELS])
        [region] = synth.generation_regions([LesionRequest(src, SPACING, masks)])
        assert region[lesion].all() and (region & ~lesion).any()
        np.testing.assert_array_equal(new[~region], src[~region])           # bit-identical outside the region
        assert (new[lesion] != src[lesion]).any()
    assert any(with_mvo) and not all(with_mvo), f"MVO cores should follow the training frequency {freq[1]}"


class _ChannelSeparable(torch.nn.Module):
    """A stand-in denoiser that cannot mix channels: its x0 estimate for channel c is the mean of the class-c
    histogram condition (bin centres in [-1, 1]), whatever the other classes ask for."""

    def __init__(self, channels: int, alphas_cumprod: torch.Tensor):
        super().__init__()
        edges = torch.linspace(-1.0, 1.0, HIST_BINS + 1)
        self.register_buffer("centres", (edges[1:] + edges[:-1]) / 2)
        self.register_buffer("ab", alphas_cumprod.float())
        self.channels = channels

    def forward(self, x_t, t, context, class_masks, cond=None, drop_cond=None):
        x0 = torch.stack([cond[:, c * HIST_BINS:(c + 1) * HIST_BINS] @ self.centres for c in range(self.channels)], 1)
        ab = self.ab[t].reshape(-1, 1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0[..., None, None, None]) / (1 - ab).sqrt()


def test_per_class_texture_changes_only_that_class(cardiac, checkpoint):
    ckpt = load_lesion_checkpoint(checkpoint)
    specs = parse_textures(["3=cluster:0", "4=cluster:1"], LABELS)
    assert specs == [TextureSpec("cluster", 0), TextureSpec("cluster", 1)]
    synth = LesionSynthesizer(ckpt, device="cpu", sampler=FAST)
    a = synth.texture_condition(specs, np.random.default_rng(0))
    b = synth.texture_condition(parse_textures(["3=cluster:1", "4=cluster:1"], LABELS), np.random.default_rng(0))
    # each class's condition is its chosen prototype, jittered (±10 % per bin) like LeFusion's
    assert np.abs(a[:HIST_BINS] - ckpt.prototypes[0].centers[0]).sum() < 0.25
    assert np.abs(a[HIST_BINS:] - ckpt.prototypes[1].centers[1]).sum() < 0.25
    assert (a[:HIST_BINS] != b[:HIST_BINS]).any() and (a[HIST_BINS:] == b[HIST_BINS:]).all()
    with pytest.raises(LeFusionInputError, match="LABEL=SPEC"):
        parse_textures(["5=cluster:0"], LABELS)

    case = _lesion_case(cardiac)
    label, _ = read_label(cardiac / case["label"])
    image = read_image([cardiac / case["image"]]).channel(0)
    masks = np.stack([label == v for v in LABELS])
    ckpt.model = _ChannelSeparable(2, ckpt.schedule.alphas_cumprod)   # the real data path, unmixable model
    synth = LesionSynthesizer(ckpt, device="cpu", sampler=FAST)
    outs = [synth.synthesize([LesionRequest(image, SPACING, masks, texture=t)],
                             generator=[seeded_generator(0, "x")])[0] for t in (a, b)]
    assert np.abs(outs[0][masks[0]] - outs[1][masks[0]]).mean() > 1.0, "class 3 follows its texture"
    np.testing.assert_array_equal(outs[0][masks[1]], outs[1][masks[1]])    # class 4 untouched
    [region] = synth.generation_regions([LesionRequest(image, SPACING, masks)])
    outer = region & ~masks[1]  # class 3 and the border ring that belongs to it
    np.testing.assert_array_equal(outs[0][~outer], outs[1][~outer])  # and everything else


def test_enlarge_path_with_real_masks_keeps_both_classes(cardiac, resampled_checkpoint, tmp_path):
    """Real (translated) infarct masks rarely fit another heart's thin wall, so the allowed region here is the
    LV (cavity + wall, dilated); `--mask-source diffusion` makes masks that follow the wall (test_mask_diffusion)."""
    from lefusion_nnunet.data.io import write_label

    ds = load_raw_dataset(cardiac)
    synth = LesionSynthesizer(resampled_checkpoint, device="cpu", sampler=FAST)
    free = _free_case(cardiac)["case_id"]
    src_label, props = read_label(ds.case(free).label)
    lv = _lv_region(src_label)
    (tmp_path / "regions").mkdir()
    write_label(lv.astype(np.uint8), tmp_path / "regions" / f"{free}.nii.gz", props)
    settings = VariantSettings(per_case=1, mask_source="real", size_mm=(14.0, 18.0),
                               region_masks_dir=str(tmp_path / "regions"), textures=("3=cluster:0", "4=random"),
                               seed=1)
    cases = [c for cs, _ in make_variants(synth, ds, [free], settings) for c in cs]
    assert len(cases) == 1
    lab = cases[0].label
    lesion = np.isin(lab, LABELS)
    source = next(c for c in _manifest(cardiac)["cases"] if c["case_id"] == cases[0].provenance["mask"]["case"])
    assert (lab == 3).any(), "the label output carries the outer class's value"
    assert (lab == 4).any() == (source["mvo_voxels"] > 0), "the real lesion's MVO core comes along, or none"
    _assert_nested(lab)
    assert lv[lesion].all()
    np.testing.assert_array_equal(lab[~lesion], src_label[~lesion])
    assert cases[0].provenance["class_voxels"] == {"3": int((lab == 3).sum()), "4": int((lab == 4).sum())}
    src = read_image(ds.case(free).images).channel(0)
    [region] = synth.generation_regions([LesionRequest(src, SPACING, np.stack([lab == v for v in LABELS]))])
    np.testing.assert_array_equal(cases[0].channels[0][~region], src[~region])
