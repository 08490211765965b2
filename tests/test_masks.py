"""Lesion masks: ellipsoid sizes and roughness, real-mask resampling, allowed regions and placement."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from lefusion_nnunet.data.mask_library import MaskLibrary, RealMask
from lefusion_nnunet.data.masks import (ellipsoid_mask, equivalent_diameter_mm, lesion_components,
                                        mask_equivalent_diameter, sphere_volume_mm3)
from lefusion_nnunet.data.placement import allowed_region, body_mask, paste_mask, place_mask, valid_offsets
from lefusion_nnunet.errors import LeFusionInputError


def surface_to_volume(mask: np.ndarray, spacing) -> float:
    """Exposed voxel-face area (mm^2) divided by volume (mm^3)."""
    m = np.pad(mask, 1).astype(np.int8)
    sz, sy, sx = spacing
    faces = {0: sy * sx, 1: sz * sx, 2: sz * sy}
    area = sum(np.abs(np.diff(m, axis=a)).sum() * f for a, f in faces.items())
    return float(area / (m.sum() * sz * sy * sx))


def test_equivalent_diameter_formula():
    assert equivalent_diameter_mm(sphere_volume_mm3(12.5)) == pytest.approx(12.5)
    assert equivalent_diameter_mm(1000.0) == pytest.approx((6000 / np.pi) ** (1 / 3))


@pytest.mark.parametrize("diameter,spacing", [(6.0, (1.0, 1.0, 1.0)), (12.0, (2.5, 0.8, 0.9)),
                                              (20.0, (1.25, 0.7, 0.7)), (9.0, (3.0, 0.6, 0.6))])
@pytest.mark.parametrize("boundary", [0.0, 1.0])
def test_ellipsoid_volume_matches_request(diameter, spacing, boundary):
    rng = np.random.default_rng(1)
    for _ in range(3):
        m = ellipsoid_mask(diameter, spacing, boundary, rng)
        assert m.dtype == bool and m.any()
        assert abs(mask_equivalent_diameter(m, spacing) - diameter) <= 0.1 * diameter
        # tight grid: every face of the bounding box touches the lesion
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
        assert m[:, :, 0].any() and m[:, :, -1].any()
        # one connected piece without holes
        assert ndimage.label(m, structure=np.ones((3, 3, 3)))[1] == 1
        assert (ndimage.binary_fill_holes(m) == m).all()


def test_ellipsoid_is_random_and_reproducible():
    a = ellipsoid_mask(14, (1.0, 0.8, 0.8), 0.5, np.random.default_rng(3))
    b = ellipsoid_mask(14, (1.0, 0.8, 0.8), 0.5, np.random.default_rng(3))
    c = ellipsoid_mask(14, (1.0, 0.8, 0.8), 0.5, np.random.default_rng(4))
    assert a.shape == b.shape and (a == b).all()
    assert a.shape != c.shape or (a != c).any()


def test_boundary_roughens_the_surface():
    spacing = (1.5, 0.8, 0.9)
    rng = np.random.default_rng(7)
    smooth = np.mean([surface_to_volume(ellipsoid_mask(16, spacing, 0.0, rng), spacing) for _ in range(6)])
    rough = np.mean([surface_to_volume(ellipsoid_mask(16, spacing, 1.0, rng), spacing) for _ in range(6)])
    assert rough > smooth * 1.05


def test_ellipsoid_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(LeFusionInputError, match="boundary"):
        ellipsoid_mask(10, (1, 1, 1), 1.5, rng)
    with pytest.raises(LeFusionInputError, match="diameter"):
        ellipsoid_mask(0, (1, 1, 1), 0.3, rng)
    with pytest.raises(LeFusionInputError, match="spacing"):
        ellipsoid_mask(10, (1, 0, 1), 0.3, rng)


def _library() -> MaskLibrary:
    rng = np.random.default_rng(0)
    shape = ellipsoid_mask(10, (2.0, 0.5, 0.5), 0.3, rng)
    two = np.stack([shape, np.zeros_like(shape)])
    core = ndimage.binary_erosion(shape, iterations=2)
    two[1] = core
    two[0] &= ~core
    return MaskLibrary([RealMask(two, (2.0, 0.5, 0.5), "caseA", 1)], lesion_labels=(2, 3))


def test_real_mask_sample_rescales_to_target_spacing_and_diameter():
    lib = _library()
    own = lib.entries[0].equivalent_diameter
    rng = np.random.default_rng(5)
    for target in (own, own * 1.2, own * 0.8):
        masks, info = lib.sample_with_info(rng, target, (1.0, 0.8, 0.8))
        assert masks.shape[0] == 2 and masks.dtype == bool
        assert not (masks[0] & masks[1]).any()          # classes stay disjoint
        assert masks[1].any() and masks[0].any()          # both classes kept together
        assert abs(mask_equivalent_diameter(masks, (1.0, 0.8, 0.8)) - target) <= 0.12 * target
        assert info["case"] == "caseA"
    # requests beyond the limits are clipped to 1.4x / 0.7x of the lesion's own size
    big, info = lib.sample_with_info(rng, own * 3, (1.0, 0.8, 0.8))
    assert info["scale"] == pytest.approx(1.4)
    assert mask_equivalent_diameter(big, (1.0, 0.8, 0.8)) == pytest.approx(own * 1.4, rel=0.12)
    # the plain sample() is the same draw, without the description
    again = lib.sample(np.random.default_rng(9), own, (2.0, 0.5, 0.5))
    assert np.array_equal(again, lib.sample_with_info(np.random.default_rng(9), own, (2.0, 0.5, 0.5))[0])


def test_mask_library_needs_entries():
    with pytest.raises(LeFusionInputError, match="ellipsoid"):
        MaskLibrary([], lesion_labels=(2,))


def _brute_force_valid(mask, allowed):
    ks = np.array(mask.shape)
    out = np.zeros(tuple(np.array(allowed.shape) - ks + 1), bool)
    pts = np.argwhere(mask)
    for o in itertools.product(*[range(n) for n in out.shape]):
        out[o] = allowed[tuple((pts + np.array(o)).T)].all()
    return out


def test_valid_offsets_equals_brute_force():
    rng = np.random.default_rng(11)
    allowed = ndimage.gaussian_filter(rng.standard_normal((14, 16, 15)), 1.5) > -0.1
    mask = ellipsoid_mask(5, (1, 1, 1), 0.0, rng)
    valid, base = valid_offsets(mask, allowed)
    expected = _brute_force_valid(mask, allowed)
    got = np.zeros_like(expected)
    sl = tuple(slice(b, b + n) for b, n in zip(base, valid.shape))
    got[sl] = valid
    assert expected.any() and (got == expected).all()


def test_place_mask_keeps_every_voxel_inside_and_off_lesions():
    rng = np.random.default_rng(2)
    shape = (20, 40, 44)
    label = np.zeros(shape, np.int16)
    zz, yy, xx = np.indices(shape)
    label[((zz - 10) / 8.0) ** 2 + ((yy - 20) / 16.0) ** 2 + ((xx - 14) / 10.0) ** 2 <= 1] = 1   # organ
    label[((zz - 10) / 8.0) ** 2 + ((yy - 20) / 16.0) ** 2 + ((xx - 32) / 10.0) ** 2 <= 1] = 1
    label[8:12, 16:22, 12:17] = 2                                                              # existing lesion
    allowed = allowed_region(label, region_label=1, lesion_labels=[2])
    lesion_margin = ndimage.binary_dilation(label == 2, structure=np.ones((3, 3, 3)))
    assert not (allowed & lesion_margin).any() and (allowed <= (label == 1)).all()
    for i in range(25):
        mask = ellipsoid_mask(rng.uniform(4, 9), (1.0, 1.0, 1.0), 0.5, rng)[None]
        offset = place_mask(mask, allowed, rng)
        assert offset is not None
        full = paste_mask(mask, offset, shape)[0]
        assert full.sum() == mask.sum()
        assert (label[full] == 1).all()
        assert not (full & lesion_margin).any()


def test_place_mask_returns_none_when_impossible():
    rng = np.random.default_rng(0)
    allowed = np.zeros((12, 12, 12), bool)
    allowed[2:8, 2:8, 2:8] = True
    assert place_mask(np.ones((1, 7, 3, 3), bool), allowed, rng) is None    # larger than the region
    ring = allowed.copy()
    ring[4, 4, 4] = False                                                    # a hole in every position
    assert place_mask(np.ones((1, 6, 6, 6), bool), ring, rng) is None
    assert place_mask(np.ones((1, 2, 2, 2), bool), np.zeros((5, 5, 5), bool), rng) is None
    assert place_mask(np.ones((1, 6, 6, 6), bool), allowed, rng).tolist() == [2, 2, 2]


def test_place_mask_near_requested_center():
    rng = np.random.default_rng(0)
    allowed = np.zeros((20, 20, 20), bool)
    allowed[2:18, 2:18, 2:18] = True
    offset = place_mask(np.ones((1, 3, 3, 3), bool), allowed, rng, center_zyx=(10, 5, 16))
    assert offset.tolist() == [9, 4, 15]
    offset = place_mask(np.ones((1, 3, 3, 3), bool), allowed, rng, center_zyx=(0, 0, 0))
    assert offset.tolist() == [2, 2, 2]


def test_body_mask_fills_enclosed_air_and_allowed_priorities():
    image = np.full((10, 30, 30), -1000.0, np.float32)
    zz, yy, xx = np.indices(image.shape)
    body = ((yy - 15) / 12.0) ** 2 + ((xx - 15) / 12.0) ** 2 <= 1
    image[body] = 40.0
    lung = ((yy - 15) / 6.0) ** 2 + ((xx - 15) / 5.0) ** 2 <= 1
    image[lung] = -850.0
    image[:, 2, 2] = 500.0                     # a small bright object outside the body
    fg = body_mask(image)
    assert (fg == body).all()
    label = np.zeros(image.shape, np.int16)
    label[lung] = 1
    label[4:6, 14:16, 14:16] = 2
    a = allowed_region(label, image=image, lesion_labels=[2])
    assert (a <= body).all() and not a[3:7, 13:17, 13:17].any() and a[0, 15, 15]
    region = np.zeros(image.shape, np.uint8)
    region[:, :5, :5] = 1
    b = allowed_region(label, region_label=1, region_mask=region, image=image, lesion_labels=[2])
    assert (b == (region > 0)).all()
    with pytest.raises(LeFusionInputError, match="shape"):
        allowed_region(label, region_mask=region[:5])


def test_lesion_components_keep_the_classes_of_one_lesion_together():
    """Two separate lesions (one of two touching classes, one of a single class) and a diagonal neighbour that
    26-connectivity joins: one class stack per lesion, cropped to its box, classes in the requested order."""
    label = np.zeros((6, 8, 8), np.uint8)
    label[1:3, 1:3, 1:3] = 3                      # lesion A: class 3 ...
    label[1:3, 1:3, 3] = 4                        # ... touching class 4
    label[3, 3, 4] = 4                            # diagonal neighbour of A's class-4 part (26-connected)
    label[4:6, 6:8, 6:8] = 4                      # lesion B: class 4 only
    label[0, 7, 0] = 1                            # another label: ignored
    found = list(lesion_components(label, [3, 4]))
    assert [c for c, _, _ in found] == [1, 2]
    (_, sl_a, a), (_, sl_b, b) = found
    assert a.shape == (2, 3, 3, 4) and sl_a == (slice(1, 4), slice(1, 4), slice(1, 5))
    assert a[0].sum() == 8 and a[1].sum() == 5 and not (a[0] & a[1]).any()
    assert b.shape == (2, 2, 2, 2) and b[0].sum() == 0 and b[1].all()
    assert list(lesion_components(label, [7])) == []


def test_place_mask_draws_uniformly_from_the_valid_offsets():
    """Rejection sampling keeps placement uniform over every valid offset (what the FFT route draws from)."""
    allowed = np.zeros((10, 30, 30), bool)
    allowed[2:8, 3:9, 3:9] = True          # a 6^3 block: a 4^3 mask has 27 valid offsets
    allowed[2:8, 20:26, 20:26] = True      # a second block far away: 27 more; none in between
    mask = np.ones((1, 4, 4, 4), bool)
    valid, base = valid_offsets(mask[0], allowed)
    expected = {tuple(int(v) for v in o + base) for o in np.argwhere(valid)}
    assert len(expected) == 54
    rng = np.random.default_rng(0)
    counts: dict = {}
    for _ in range(54 * 60):
        offset = tuple(int(v) for v in place_mask(mask, allowed, rng))
        counts[offset] = counts.get(offset, 0) + 1
    assert set(counts) == expected                                  # only valid offsets, and every one of them
    freq = np.array(list(counts.values()))
    assert freq.min() > 25 and freq.max() < 100                     # ~60 each (binomial sd ~7.7)


def test_place_mask_falls_back_to_every_valid_offset_in_thin_regions(monkeypatch):
    from lefusion_nnunet.data import placement

    allowed = np.zeros((30, 30, 30), bool)
    allowed[:, 5, 5] = True
    allowed[:, 25, 25] = True              # bounding box 30 x 21 x 21: a random offset almost never fits
    allowed[10:14, 20:23, 20:23] = True    # the one place a 4 x 3 x 3 block fits
    monkeypatch.setattr(placement, "PLACEMENT_TRIES", 3)
    rng = np.random.default_rng(1)
    assert place_mask(np.ones((1, 4, 3, 3), bool), allowed, rng).tolist() == [10, 20, 20]
