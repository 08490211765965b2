"""ROI extraction / paste-back and file I/O: exactness, geometry, bit-identical background."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import rotation_direction, write_sitk

from lefusion_nnunet.data.io import read_image, read_label, write_image_channel, write_label
from lefusion_nnunet.data.roi import (RoiGeometry, extract_roi, extract_roi_mask, mask_fits_roi, paste_roi,
                                      roi_center_for_mask, roi_origin_for_center)
from lefusion_nnunet.errors import LeFusionInputError


def _ball(shape, center, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius ** 2


def test_roi_identity_when_spacings_match():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 30, 40)).astype(np.float32)
    geo = RoiGeometry((8, 12, 16), (2.0, 1.0, 1.0))
    origin = roi_origin_for_center((10, 15, 20), (2.0, 1.0, 1.0), geo)
    roi = extract_roi(image, (2.0, 1.0, 1.0), origin, geo)
    o = origin.astype(int)
    np.testing.assert_array_equal(roi, image[o[0]:o[0] + 8, o[1]:o[1] + 12, o[2]:o[2] + 16])


def test_roi_round_trip_resampled_is_close_and_background_exact():
    rng = np.random.default_rng(1)
    z, y, x = np.indices((24, 40, 40)).astype(np.float32)
    image = (np.sin(x / 5) + np.cos(y / 7) + z / 10).astype(np.float32)  # smooth: linear resampling is accurate
    spacing = (2.5, 0.8, 0.8)
    geo = RoiGeometry((32, 32, 32), (1.0, 1.0, 1.0))
    mask = _ball(image.shape, (12, 20, 20), 5)
    origin = roi_origin_for_center(roi_center_for_mask(mask), spacing, geo)
    assert mask_fits_roi(mask, spacing, origin, geo)
    roi = extract_roi(image, spacing, origin, geo)
    pasted = paste_roi(image, spacing, origin, geo, roi, mask)
    # background bit-identical, lesion close to the original (resample there and back)
    np.testing.assert_array_equal(pasted[~mask], image[~mask])
    assert np.abs(pasted[mask] - image[mask]).max() < 0.15
    # a changed ROI changes only mask voxels
    pasted2 = paste_roi(image, spacing, origin, geo, roi + 100.0, mask)
    assert (pasted2[mask] > image[mask] + 50).all()
    np.testing.assert_array_equal(pasted2[~mask], image[~mask])
    _ = rng


def test_roi_mask_extraction_and_padding_at_border():
    image = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    geo = RoiGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    origin = roi_origin_for_center((0, 0, 0), (1.0, 1.0, 1.0), geo)  # mostly outside: edge replicated
    roi = extract_roi(image, (1.0, 1.0, 1.0), origin, geo)
    assert roi.shape == (8, 8, 8)
    assert roi[0, 0, 0] == image[0, 0, 0]
    m = np.zeros((10, 10, 10), bool)
    m[2:4, 2:4, 2:4] = True
    rm = extract_roi_mask(m, (1.0, 1.0, 1.0), (0, 0, 0), geo)
    assert rm.sum() == 8 and rm[2:4, 2:4, 2:4].all()


def test_paste_rejects_mask_outside_roi():
    image = np.zeros((30, 30, 30), np.float32)
    geo = RoiGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    mask = _ball(image.shape, (15, 15, 15), 6)  # 13 voxels across > 8
    origin = roi_origin_for_center((15, 15, 15), (1.0, 1.0, 1.0), geo)
    assert not mask_fits_roi(mask, (1.0, 1.0, 1.0), origin, geo)
    with pytest.raises(LeFusionInputError, match="beyond the model ROI"):
        paste_roi(image, (1.0, 1.0, 1.0), origin, geo, np.zeros((8, 8, 8), np.float32), mask)


@pytest.mark.parametrize("ending,dtype,spacing,direction", [
    (".nii.gz", np.int16, (0.7, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    (".nii.gz", np.float32, (1.0, 1.2, 3.0), rotation_direction(25)),
    (".nrrd", np.int16, (0.9, 0.9, 1.5), rotation_direction(-40)),
    (".mha", np.uint8, (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
])
def test_write_keeps_dtype_geometry_and_untouched_voxels(tmp_path, ending, dtype, spacing, direction):
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 200, size=(12, 20, 24)).astype(dtype)
    src = write_sitk(tmp_path / f"case_0000{ending}", arr, spacing, origin=(-10.5, 3.25, 7.0), direction=direction)
    vol = read_image([src])
    assert vol.array.shape == (1, 12, 20, 24)
    assert vol.spacing == pytest.approx(tuple(spacing[::-1]))
    assert vol.source_dtypes == [np.dtype(dtype).name]
    changed = vol.array[0].copy()
    changed[5:7, 5:9, 5:9] += 3.4
    out = tmp_path / "out" / f"case_0000{ending}"
    write_image_channel(changed, out, vol, 0)
    back = read_image([out])
    keep = np.ones(changed.shape, bool)
    keep[5:7, 5:9, 5:9] = False
    np.testing.assert_array_equal(back.array[0][keep], vol.array[0][keep])
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert a.GetPixelID() == b.GetPixelID()
    assert a.GetSpacing() == pytest.approx(b.GetSpacing())
    assert a.GetOrigin() == pytest.approx(b.GetOrigin())
    assert a.GetDirection() == pytest.approx(b.GetDirection())
    lab, props = read_label(src)
    write_label((lab > 100).astype(np.int16), tmp_path / "lab" / f"l{ending}", props)
    lab2, _ = read_label(tmp_path / "lab" / f"l{ending}")
    np.testing.assert_array_equal(lab2, (lab > 100))


def test_read_image_errors(tmp_path):
    with pytest.raises(LeFusionInputError, match="does not exist"):
        read_image([tmp_path / "missing.nii.gz"])
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(LeFusionInputError, match="not a readable image"):
        read_image([bad])
    nan = np.zeros((4, 5, 6), np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(LeFusionInputError, match="NaN"):
        read_image([write_sitk(tmp_path / "nan_0000.mha", nan)])
    with pytest.raises(LeFusionInputError, match="2D image"):
        read_image([write_sitk(tmp_path / "flat_0000.nii.gz", np.zeros((5, 6), np.int16), (1.0, 1.0), (0.0, 0.0),
                               (1, 0, 0, 1))])
