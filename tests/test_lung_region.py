"""lung_region: the automatic lung mask for CT without a lung label, checked on the chest phantom."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lefusion_nnunet.data.lung_region import lung_region
from lefusion_nnunet.errors import LeFusionInputError

try:
    from lefusion_nnunet.phantoms.chest import PhantomConfig, make_phantom_case
except ImportError:     # before the phantoms moved into their own package
    from lefusion_nnunet.phantoms.chest import PhantomConfig, make_phantom_case

LUNG, NODULE = 1, 2
# bone HU of the phantom's ribs / vertebra, soft tissue of its body wall and mediastinum
_BONE_HU, _SOFT_HU = 200, -200


def _case(shape_zyx=(32, 64, 64), spacing_zyx=(3.75, 1.35, 1.35), index=0, seed=0):
    # index 0 of seed 0 holds a nodule; the phantom's physical size does not depend on the grid
    return make_phantom_case(PhantomConfig(num_cases=4, shape_zyx=shape_zyx, spacing_zyx=spacing_zyx, seed=seed),
                             index)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom_case():
    return _case()


@pytest.fixture(scope="module")
def phantom_region(phantom_case):
    return lung_region(phantom_case.image, phantom_case.spacing_zyx)


def test_region_matches_the_phantom_lung_label(phantom_case, phantom_region):
    lung = phantom_case.label > 0           # label 1 (parenchyma + vessels) and 2 (nodules inside it)
    assert phantom_region.dtype == bool and phantom_region.shape == phantom_case.image.shape
    assert _dice(phantom_region, lung) > 0.97
    # two lungs, as in the label
    assert ndimage.label(phantom_region, structure=np.ones((3, 3, 3)))[1] == 2


def test_vessels_and_nodules_inside_the_lung_are_included(phantom_case, phantom_region):
    lung = phantom_case.label > 0
    # vessels: voxels of the lung label that are not air-like (the vessel tree is at about +40 HU);
    # keep those at least 2 voxels in-plane from the lung surface, i.e. really inside the lung
    deep = ndimage.binary_erosion(lung, structure=ndimage.generate_binary_structure(3, 1)[1:2], iterations=2)
    vessels = deep & (phantom_case.image > -300) & (phantom_case.label == LUNG)
    assert vessels.sum() > 50, "the phantom should hold vessels"
    assert phantom_region[vessels].mean() > 0.98
    nodule = phantom_case.label == NODULE
    assert nodule.any()
    assert phantom_region[nodule].mean() > 0.95


def test_body_wall_bone_mediastinum_and_outside_air_are_excluded(phantom_case, phantom_region):
    outside_lung = ndimage.binary_dilation(phantom_case.label > 0, iterations=2)
    bone = (phantom_case.image > _BONE_HU) & ~outside_lung
    soft = (phantom_case.image > _SOFT_HU) & ~outside_lung        # body wall, mediastinum, heart, spine
    assert bone.sum() > 100 and soft.sum() > 1000
    assert not phantom_region[bone].any()
    assert not phantom_region[soft].any()
    # outside air (and the trachea, air inside the mediastinum) are not lung
    air = (phantom_case.image < -900) & ~outside_lung
    assert air.sum() > 1000
    assert not phantom_region[air].any()


@pytest.mark.parametrize("shape_zyx, spacing_zyx", [((16, 64, 64), (7.5, 1.35, 1.35)),     # thick slices
                                                    ((64, 48, 48), (1.875, 1.8, 1.8)),      # near-isotropic
                                                    ((24, 96, 96), (5.0, 0.9, 0.9))])
def test_anisotropic_spacing_gives_the_same_region(shape_zyx, spacing_zyx):
    case = _case(shape_zyx, spacing_zyx, index=1)
    region = lung_region(case.image, case.spacing_zyx)
    assert _dice(region, case.label > 0) > 0.95
    volume_ml = region.sum() * np.prod(spacing_zyx) / 1000.0
    label_ml = (case.label > 0).sum() * np.prod(spacing_zyx) / 1000.0
    assert volume_ml == pytest.approx(label_ml, rel=0.05)


def test_closing_is_in_millimetres():
    """A notch of 4 mm in a lung slab is closed by a 3 mm ball on every grid, and a 10 mm notch is not."""
    def slab(spacing):
        sz, sy, sx = spacing
        z = np.arange(int(60 / sz)) * sz
        y = np.arange(int(120 / sy)) * sy
        x = np.arange(int(120 / sx)) * sx
        zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
        img = np.full(zz.shape, 40.0)                    # soft-tissue body filling the slice ...
        img[:, :2, :] = img[:, -2:, :] = img[:, :, :2] = img[:, :, -2:] = -1000.0   # ... in outside air
        lung = (np.abs(yy - 60) < 35) & (np.abs(xx - 60) < 40)
        narrow = (np.abs(xx - 40) < 2.0) & (yy < 40)     # 4 mm wide notch from the lung's top edge
        wide = (np.abs(xx - 80) < 5.0) & (yy < 40)       # 10 mm wide notch
        img[lung & ~narrow & ~wide] = -850.0
        return img, narrow & lung, wide & lung, lung & (yy > 45)

    for spacing in [(5.0, 0.7, 0.7), (1.0, 1.0, 1.0), (2.5, 1.5, 0.8)]:
        img, narrow, wide, core = slab(spacing)
        region = lung_region(img, spacing, closing_radius_mm=3.0, min_lung_ml=1.0)
        assert region[core].all()
        assert region[narrow].mean() > 0.8, spacing      # all but the mouth of the notch
        assert region[wide].mean() < 0.3, spacing


def test_no_lung_raises_one_clear_sentence():
    mr_like = np.full((12, 32, 32), 300.0)
    with pytest.raises(LeFusionInputError, match="no lung found"):
        lung_region(mr_like, (2.0, 1.0, 1.0))
    # air only outside the body does not count as lung
    body = np.full((12, 32, 32), -1000.0)
    body[:, 4:28, 4:28] = 40.0
    with pytest.raises(LeFusionInputError, match="no lung found"):
        lung_region(body, (2.0, 1.0, 1.0))


@pytest.mark.parametrize("image, spacing", [(np.zeros((8, 8)), (1.0, 1.0, 1.0)),
                                            (np.zeros((8, 8, 8)), (1.0, 0.0, 1.0)),
                                            (np.zeros((8, 8, 8)), (1.0, 1.0))])
def test_bad_input_raises(image, spacing):
    with pytest.raises(LeFusionInputError):
        lung_region(image, spacing)
