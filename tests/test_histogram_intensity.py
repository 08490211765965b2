"""Histograms, prototypes, texture specs and intensity spaces."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lefusion_nnunet.data.histogram import (Prototypes, TextureSpec, cluster_prototypes, histogram_distance,
                                            histogram_emd, lesion_histogram, parse_texture, parse_textures,
                                            resolve_texture)
from lefusion_nnunet.data.intensity import IntensitySpace, derive_ct_window
from lefusion_nnunet.errors import LeFusionInputError


def test_histogram_normalised_and_binned():
    h = lesion_histogram(np.array([-1.0, -0.99, 0.01, 0.99, 1.0]))
    assert h.shape == (16,) and h.sum() == pytest.approx(1.0)
    assert h[0] == pytest.approx(0.4) and h[8] == pytest.approx(0.2) and h[15] == pytest.approx(0.4)


def test_prototypes_recover_three_textures_in_intensity_order():
    rng = np.random.default_rng(0)
    means = {"solid": 0.1, "ground_glass": -0.6, "part_solid": None}
    hists, truth = [], []
    for i in range(30):
        kind = list(means)[i % 3]
        if kind == "part_solid":
            v = np.concatenate([rng.normal(-0.6, 0.05, 300), rng.normal(0.1, 0.05, 300)])
        else:
            v = rng.normal(means[kind], 0.05, 600)
        hists.append(lesion_histogram(v))
        truth.append(kind)
    protos = cluster_prototypes(np.stack(hists), k=3, seed=0)
    assert protos.centers.shape == (3, 16) and protos.counts.sum() == 30 and (protos.counts == 10).all()
    assert np.allclose(protos.centers.sum(1), 1.0)
    # ordered darkest first: ground glass, part solid, solid
    assigned = [protos.nearest(h) for h in hists]
    assert [assigned[i] for i in (1, 2, 0)] == [0, 1, 2]
    assert Prototypes.from_dict(json.loads(json.dumps(protos.to_dict()))).centers == pytest.approx(protos.centers)


def test_texture_specs(tmp_path):
    assert parse_texture("cluster:2") == TextureSpec("cluster", cluster=2)
    assert parse_texture("random").kind == "random"
    assert parse_texture("file:/x.json").path == "/x.json"
    with pytest.raises(LeFusionInputError):
        parse_texture("cluster:two")
    specs = parse_textures(["3=cluster:0", "4=cluster:1"], [3, 4])
    assert [s.cluster for s in specs] == [0, 1]
    with pytest.raises(LeFusionInputError):
        parse_textures(["5=cluster:0"], [3, 4])
    protos = Prototypes(np.eye(3, 16, dtype=np.float32), np.array([1, 1, 1]))
    rng = np.random.default_rng(0)
    train = np.full((4, 16), 1 / 16, np.float32)
    assert resolve_texture(TextureSpec("cluster", cluster=1), protos, train, rng)[1] == 1.0
    with pytest.raises(LeFusionInputError, match="does not exist"):
        resolve_texture(TextureSpec("cluster", cluster=3), protos, train, rng)
    r = resolve_texture(TextureSpec("random"), protos, train, rng)
    assert r.sum() == pytest.approx(1.0) and np.all(np.abs(r * 16 - 1) < 0.25) and not np.allclose(r, 1 / 16)
    f = tmp_path / "t.json"
    f.write_text(json.dumps([1] * 8 + [0] * 8))
    assert resolve_texture(TextureSpec("file", path=str(f)), protos, train, rng)[:8] == pytest.approx([1 / 8] * 8)
    f.write_text("[1, 2]")
    with pytest.raises(LeFusionInputError, match="16 non-negative numbers"):
        resolve_texture(TextureSpec("file", path=str(f)), protos, train, rng)
    assert histogram_distance(np.eye(16)[0], np.eye(16)[1]) == 2.0
    # EMD counts how many bins the mass moves; L1 cannot tell a 1-bin from a 10-bin shift
    assert histogram_emd(np.eye(16)[0], np.eye(16)[1]) == pytest.approx(1.0)
    assert histogram_emd(np.eye(16)[0], np.eye(16)[10]) == pytest.approx(10.0)
    assert histogram_distance(np.eye(16)[0], np.eye(16)[10]) == 2.0
    half = (np.eye(16)[3] + np.eye(16)[5]) / 2
    assert histogram_emd(half, np.eye(16)[4]) == pytest.approx(1.0)
    assert histogram_emd(half, half) == 0.0


def test_intensity_spaces():
    ct = IntensitySpace("window", window=(-1000, 400))
    v = np.array([-1000, -300, 400, 1000], np.float32)
    m = ct.to_model(v, ct.case_range(v))
    assert m.tolist() == pytest.approx([-1, 0, 1, 1])
    assert ct.to_native(m[:3], ct.case_range(v)) == pytest.approx([-1000, -300, 400])
    mr = IntensitySpace("percentile", percentiles=(1, 99))
    img = np.random.default_rng(0).normal(100, 10, 10000)
    lo, hi = mr.case_range(img)
    assert 70 < lo < 80 and 120 < hi < 130
    assert IntensitySpace.from_dict(ct.to_dict()) == ct
    with pytest.raises(ValueError):
        IntensitySpace("zscore")
    lo, hi = derive_ct_window(np.array([-600.0, 30.0]), np.array([-900.0, -850.0, 50.0]))
    assert lo <= -900 and hi >= 50 and lo % 50 == 0 and hi % 50 == 0
