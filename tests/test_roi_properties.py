"""Property-based tests (hypothesis) of ROI extraction and paste-back over random geometries.

Random image shapes and dtypes, native and model spacings (equal or not), ROI sizes, mask shapes (balls,
boxes, scattered voxels, single voxels, masks touching the border, generated ellipsoids), allowed regions,
and, through real files, random directions (rotations and reflections), origins and file formats:

- the background (every voxel outside the paste mask) is bit-identical, also after a write/read round trip;
- a placed lesion, and every voxel paste-back changes, lies inside the allowed region;
- coordinates round-trip: native -> model grid -> native reproduces a linear ramp, identity spacings copy
  exactly, an ROI centred on a small enough mask contains it, and voxel -> world positions agree with ITK.

Examples are derandomized (fixed seed), so a failure reproduces on every run.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lefusion_nnunet.data.io import read_image, write_image_channel
from lefusion_nnunet.data.masks import ellipsoid_mask
from lefusion_nnunet.data.placement import paste_mask, place_mask
from lefusion_nnunet.data.roi import (RoiGeometry, extract_roi, extract_roi_mask, mask_fits_roi, paste_roi,
                                      roi_center_for_mask, roi_origin_for_center)
from lefusion_nnunet.errors import LeFusionInputError

PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FILE_PROPS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

spacings = st.tuples(*[st.floats(0.4, 3.0, allow_nan=False)] * 3)
shapes = st.tuples(st.integers(6, 18), st.integers(6, 22), st.integers(6, 22))
roi_sizes = st.tuples(*[st.integers(4, 14)] * 3)
MASK_KINDS = ("ball", "box", "scatter", "voxel", "border")


@st.composite
def geometries(draw):
    """(native spacing, RoiGeometry): the model spacing equals the native one in about a third of cases."""
    native = draw(spacings)
    model = native if draw(st.integers(0, 2)) == 0 else draw(spacings)
    return native, RoiGeometry(draw(roi_sizes), model)


def make_mask(kind: str, shape, rng: np.random.Generator) -> np.ndarray:
    """A non-empty bool mask of one of several shapes (some touch the volume border)."""
    shape = tuple(shape)
    mask = np.zeros(shape, bool)
    c = [int(rng.integers(0, s)) for s in shape]
    if kind == "ball":
        r = rng.uniform(0.5, 3.0, 3)
        zz, yy, xx = np.indices(shape)
        mask = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
    elif kind == "box":
        lo = c
        hi = [min(s, a + int(rng.integers(1, 4))) for a, s in zip(lo, shape)]
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    elif kind == "scatter":  # several disconnected voxels in a small neighbourhood
        for _ in range(int(rng.integers(2, 7))):
            p = [min(s - 1, max(0, a + int(rng.integers(-3, 4)))) for a, s in zip(c, shape)]
            mask[tuple(p)] = True
    elif kind == "voxel":
        mask[tuple(c)] = True
    else:  # "border": a slab along one face
        axis = int(rng.integers(3))
        sl = [slice(max(0, a - 1), a + 2) for a in c]
        sl[axis] = slice(0, 1) if rng.random() < 0.5 else slice(shape[axis] - 1, shape[axis])
        mask[tuple(sl)] = True
    mask[tuple(c)] = mask[tuple(c)] or kind != "border"
    assert mask.any()
    return mask


def random_image(shape, rng: np.random.Generator, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return rng.integers(-1024, 2000, size=shape).astype(np.int16)
    return rng.normal(0, 300, size=shape).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------- background

@PROPS
@given(shape=shapes, geo=geometries(), kind=st.sampled_from(MASK_KINDS), dtype=st.sampled_from(["int16", "float32"]),
       seed=st.integers(0, 2**32 - 1))
def test_paste_changes_only_mask_voxels_and_keeps_background_bits(shape, geo, kind, dtype, seed):
    native, roi = geo
    rng = np.random.default_rng(seed)
    image = random_image(shape, rng, dtype)
    original = image.copy()
    mask = make_mask(kind, shape, rng)
    origin = roi_origin_for_center(roi_center_for_mask(mask), native, roi)
    generated = rng.normal(0, 500, size=roi.size_zyx).astype(np.float32)
    try:
        out = paste_roi(image, native, origin, roi, generated, mask)
    except LeFusionInputError:
        assert not mask_fits_roi(mask, native, origin, roi, margin=0.0)  # only a mask outside the ROI is refused
        assert same_bits(image, original)
        return
    assert same_bits(image, original), "paste_roi modified its input"
    assert out.dtype == image.dtype and out.shape == image.shape
    assert same_bits(out[~mask], original[~mask]), "a background voxel changed"
    assert not ((out != original) & ~mask).any()


@PROPS
@given(shape=shapes, geo=geometries(), kind=st.sampled_from(MASK_KINDS), seed=st.integers(0, 2**32 - 1))
def test_roi_is_padded_by_edge_replication_and_extraction_never_fails(shape, geo, kind, seed):
    """Any ROI position, also far outside the image, yields a full ROI whose values come from the image."""
    native, roi = geo
    rng = np.random.default_rng(seed)
    image = random_image(shape, rng, "float32")
    mask = make_mask(kind, shape, rng)
    origin = roi_origin_for_center(roi_center_for_mask(mask), native, roi) + rng.integers(-20, 21, 3)
    out = extract_roi(image, native, origin, roi)
    assert out.shape == roi.size_zyx and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= image.min() - 1e-3 and out.max() <= image.max() + 1e-3  # interpolation, no invention
    m = extract_roi_mask(mask, native, origin, roi)
    assert m.shape == roi.size_zyx and m.dtype == bool


# ---------------------------------------------------------------------------------------------- allowed region

@PROPS
@given(shape=shapes, spacing=spacings, diameter=st.floats(2.0, 9.0), boundary=st.floats(0.0, 1.0),
       region=st.sampled_from(["ball", "box", "slab", "two_blobs"]), seed=st.integers(0, 2**32 - 1))
def test_placed_lesions_and_pasted_voxels_stay_in_the_allowed_region(shape, spacing, diameter, boundary, region,
                                                                     seed):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    c = np.asarray(shape) / 2
    if region == "ball":
        allowed = ((zz - c[0]) / (shape[0] / 2.2)) ** 2 + ((yy - c[1]) / (shape[1] / 2.2)) ** 2 \
            + ((xx - c[2]) / (shape[2] / 2.2)) ** 2 <= 1
    elif region == "box":
        allowed = np.zeros(shape, bool)
        allowed[1:-1, 2:-2, 2:-2] = True
    elif region == "slab":
        allowed = (yy >= shape[1] // 3) & (yy < 2 * shape[1] // 3)
    else:
        allowed = ((zz - c[0]) ** 2 + (yy - shape[1] / 4) ** 2 + (xx - c[2]) ** 2 <= 9) | \
                  ((zz - c[0]) ** 2 + (yy - 3 * shape[1] / 4) ** 2 + (xx - c[2]) ** 2 <= 9)
    lesion = ellipsoid_mask(diameter, spacing, boundary, rng)
    offset = place_mask(lesion, allowed, rng)
    assume(offset is not None)  # no room: nothing is placed (the variant is skipped with a warning)
    placed = paste_mask(lesion, offset, shape)[0]
    assert placed.any() and not (placed & ~allowed).any(), "a lesion voxel lies outside the allowed region"
    geometry = RoiGeometry(tuple(int(v) for v in np.minimum(np.asarray(shape) + 4, 14)), spacing)
    origin = roi_origin_for_center(roi_center_for_mask(placed), spacing, geometry)
    assume(mask_fits_roi(placed, spacing, origin, geometry, margin=0.0))
    image = random_image(shape, rng, "int16")
    out = paste_roi(image, spacing, origin, geometry, rng.normal(0, 900, geometry.size_zyx), placed)
    changed = out != image
    assert not (changed & ~allowed).any(), "paste-back changed a voxel outside the allowed region"


# ---------------------------------------------------------------------------------------------- coordinates

@PROPS
@given(shape=shapes, native=spacings, size=roi_sizes, seed=st.integers(0, 2**32 - 1))
def test_identity_spacing_round_trip_is_an_exact_copy(shape, native, size, seed):
    rng = np.random.default_rng(seed)
    roi = RoiGeometry(size, native)
    image = random_image(shape, rng, "float32")
    center = [rng.uniform(0, s - 1) for s in shape]
    origin = roi_origin_for_center(center, native, roi)
    assert np.array_equal(origin, np.round(origin))  # whole native voxels: no interpolation
    extracted = extract_roi(image, native, origin, roi)
    o = origin.astype(int)
    inside = np.zeros(shape, bool)
    lo = np.maximum(o, 0)
    hi = np.minimum(o + np.asarray(size), shape)
    assume((hi > lo).all())
    inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    np.testing.assert_array_equal(extracted[tuple(slice(a - b, c - b) for a, b, c in zip(lo, o, hi))],
                                  image[inside].reshape(hi - lo))
    back = paste_roi(image, native, origin, roi, extracted, inside)
    assert same_bits(back, image), "extract then paste with equal spacings must give the input back"


@PROPS
@given(shape=shapes, geo=geometries(), coeff=st.tuples(*[st.floats(-5, 5)] * 3), seed=st.integers(0, 2**32 - 1))
def test_native_to_model_to_native_reproduces_a_linear_ramp(shape, geo, coeff, seed):
    """Linear interpolation reproduces linear functions exactly, so paste(extract(ramp)) == ramp wherever the
    ROI samples lie inside the image: the forward (model -> native) and inverse (native -> model) coordinate
    maps are consistent for every spacing combination."""
    native, roi = geo
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape).astype(np.float64)
    ramp = (coeff[0] * zz + coeff[1] * yy + coeff[2] * xx + 7.0).astype(np.float32)
    center = [rng.uniform(0, s - 1) for s in shape]
    origin = roi_origin_for_center(center, native, roi)
    extracted = extract_roi(ramp, native, origin, roi)
    scale = np.asarray(roi.spacing_zyx) / np.asarray(native)
    idx = np.argwhere(np.ones(shape, bool))
    model = (idx - origin) / scale
    lo, hi = np.floor(model), np.ceil(model)
    # voxels whose neighbouring model samples exist in the ROI and lie inside the image (no edge padding)
    ok = (lo >= 0).all(1) & (hi <= np.asarray(roi.size_zyx) - 1).all(1)
    ok &= ((origin + lo * scale) >= -1e-9).all(1) & ((origin + hi * scale) <= np.asarray(shape) - 1 + 1e-9).all(1)
    assume(ok.any())
    mask = np.zeros(shape, bool)
    mask[tuple(idx[ok].T)] = True
    back = paste_roi(ramp, native, origin, roi, extracted, mask)
    tol = 1e-3 * (1 + np.abs(ramp).max())
    np.testing.assert_allclose(back[mask], ramp[mask], atol=tol, rtol=0)


@PROPS
@given(shape=shapes, geo=geometries(), kind=st.sampled_from(MASK_KINDS), seed=st.integers(0, 2**32 - 1))
def test_an_roi_centred_on_a_small_enough_mask_contains_it(shape, geo, kind, seed):
    native, roi = geo
    rng = np.random.default_rng(seed)
    mask = make_mask(kind, shape, rng)
    idx = np.argwhere(mask)
    extent = idx.max(0) - idx.min(0)
    scale = np.asarray(roi.spacing_zyx) / np.asarray(native)
    origin = roi_origin_for_center(roi_center_for_mask(mask), native, roi)
    if ((extent + 1) / scale <= np.asarray(roi.size_zyx) - 1).all():  # fits even with origin rounding
        assert mask_fits_roi(mask, native, origin, roi, margin=0.0)
        coords = (idx - origin) / scale
        assert (coords >= 0).all() and (coords <= np.asarray(roi.size_zyx) - 1).all()
        paste_roi(np.zeros(shape, np.float32), native, origin, roi, np.ones(roi.size_zyx, np.float32), mask)


# ---------------------------------------------------------------------------------------------- through files

def random_direction(rng: np.random.Generator) -> np.ndarray:
    """A random orthonormal 3x3 matrix (rotation, possibly with a reflection)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


@FILE_PROPS
@given(shape=st.tuples(st.integers(6, 12), st.integers(8, 16), st.integers(8, 16)), native=spacings,
       model_spacing=spacings, kind=st.sampled_from(MASK_KINDS), dtype=st.sampled_from(["int16", "float32"]),
       ending=st.sampled_from([".nii.gz", ".nrrd", ".mha"]), seed=st.integers(0, 2**32 - 1))
def test_file_round_trip_with_random_direction_keeps_geometry_background_and_world_positions(
        tmp_path, shape, native, model_spacing, kind, dtype, ending, seed):
    from lefusion_nnunet.data.io import voxel_to_world

    rng = np.random.default_rng(seed)
    direction = random_direction(rng)
    origin = rng.uniform(-200, 200, 3)
    src = tmp_path / f"case_{seed}_0000{ending}"
    img = sitk.GetImageFromArray(random_image(shape, rng, dtype))
    img.SetSpacing(tuple(float(s) for s in native[::-1]))
    img.SetDirection(tuple(direction.ravel()))
    img.SetOrigin(tuple(origin))
    sitk.WriteImage(img, str(src), True)

    vol = read_image([src])
    assert np.allclose(vol.spacing, native, rtol=1e-5)
    channel = vol.channel(0)
    mask = make_mask(kind, shape, rng)
    roi = RoiGeometry((14, 16, 16), model_spacing)
    roi_origin = roi_origin_for_center(roi_center_for_mask(mask), vol.spacing, roi)
    if not mask_fits_roi(mask, vol.spacing, roi_origin, roi, margin=0.0):
        with pytest.raises(LeFusionInputError):  # a mask reaching past the ROI is refused, never half-pasted
            paste_roi(channel, vol.spacing, roi_origin, roi, np.zeros(roi.size_zyx, np.float32), mask)
        idx = np.argwhere(mask)  # keep the part of the mask the ROI covers, and paste that
        coords = (idx - roi_origin) / (np.asarray(roi.spacing_zyx) / np.asarray(vol.spacing))
        inside = ((coords >= 0) & (coords <= np.asarray(roi.size_zyx) - 1)).all(1)
        mask = np.zeros_like(mask)
        mask[tuple(idx[inside].T)] = True
    values = rng.normal(0, 300, roi.size_zyx)
    pasted = paste_roi(channel, vol.spacing, roi_origin, roi, values, mask)
    if mask.any():
        assert not np.array_equal(pasted[mask], channel[mask]), "the paste changed no lesion voxel"
    out = tmp_path / f"out_{seed}_0000{ending}"
    write_image_channel(pasted, out, vol, 0)

    written = sitk.ReadImage(str(out))
    source = sitk.ReadImage(str(src))
    assert written.GetPixelID() == source.GetPixelID()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(written, get)(), getattr(source, get)(), atol=1e-5, err_msg=get)
    a, b = sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source)
    assert same_bits(a[~mask], b[~mask]), "a background voxel changed through the file round trip"

    # voxel (z, y, x) -> world (x, y, z) mm agrees with ITK on the written file, for the lesion's centre
    center = roi_center_for_mask(mask)
    world = voxel_to_world(center, vol.properties)
    expected = written.TransformContinuousIndexToPhysicalPoint([float(v) for v in center[::-1]])
    np.testing.assert_allclose(world, expected, atol=1e-3)
    # and back: world -> continuous index -> the same voxel
    index = written.TransformPhysicalPointToContinuousIndex([float(v) for v in world])
    np.testing.assert_allclose(index[::-1], center, atol=1e-3)


def test_hypothesis_is_installed_for_these_properties():
    assert importlib.util.find_spec("hypothesis") is not None, "install the test extras: pip install -e .[test]"
