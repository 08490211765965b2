"""Cross-validation splits: nnU-Net's default folds and grouped folds for synthetic variants."""
from __future__ import annotations

import numpy as np
import pytest

from lefusion_nnunet.data.splits import default_nnunet_folds, grouped_splits
from lefusion_nnunet.errors import LeFusionInputError


def _nnunet_default(case_ids):
    """Exactly what nnUNetTrainer.do_split does without a splits_final.json."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    all_keys_sorted = list(np.sort(list(case_ids)))
    return generate_crossval_split(all_keys_sorted, seed=12345, n_splits=5)


ID_LISTS = [
    [f"case_{i}" for i in range(5)],
    [f"case_{i}" for i in range(12)],                       # case_10 sorts before case_2
    [f"LUNG_{i:03d}" for i in range(23)][::-1],             # given in reverse order
    ["b", "a", "Z", "c_1", "c_10", "c_2", "aa", "A0", "x-1", "x_1", "y"],
]


@pytest.mark.parametrize("ids", ID_LISTS)
def test_default_folds_equal_nnunet(ids):
    ours = default_nnunet_folds(ids)
    theirs = _nnunet_default(ids)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert a["train"] == [str(x) for x in b["train"]]
        assert a["val"] == [str(x) for x in b["val"]]
        assert all(type(x) is str for x in a["train"] + a["val"])   # JSON-safe, not numpy strings


def test_default_folds_partition_the_cases():
    ids = [f"c{i:02d}" for i in range(17)]
    folds = default_nnunet_folds(ids)
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == ids
    for f in folds:
        assert sorted(f["train"] + f["val"]) == ids


def test_default_folds_errors():
    with pytest.raises(LeFusionInputError, match="at least 5"):
        default_nnunet_folds(["a", "b", "c"])
    with pytest.raises(LeFusionInputError, match="unique"):
        default_nnunet_folds(["a", "a", "b", "c", "d", "e"])
    assert len(default_nnunet_folds(["a", "b", "c"], n_folds=3)) == 3


def test_grouped_splits_keep_synthetic_cases_with_their_source():
    real = [f"case_{i}" for i in range(9)]
    synthetic = {f"{c}_lefusion{k:03d}": c for c in real[::2] for k in range(3)}
    splits = grouped_splits(real, synthetic)
    default = default_nnunet_folds(real)
    assert len(splits) == 5
    for f, d in zip(splits, default):
        assert f["val"] == d["val"]                                     # real cases keep nnU-Net's folds
        assert f["train"][:len(d["train"])] == d["train"]
        assert not set(synthetic) & set(f["val"])                       # never validated on
        assert len(f["train"]) == len(set(f["train"]))
    for s, src in synthetic.items():
        with_syn = {i for i, f in enumerate(splits) if s in f["train"]}
        with_src = {i for i, f in enumerate(splits) if src in f["train"]}
        assert with_syn == with_src and len(with_src) == 4
    # every synthetic case is used somewhere, exactly once per fold it appears in
    assert all(sum(f["train"].count(s) for f in splits) == 4 for s in synthetic)


def test_grouped_splits_rejects_bad_mappings():
    real = [f"case_{i}" for i in range(6)]
    with pytest.raises(LeFusionInputError, match="not real cases"):
        grouped_splits(real, {"x_lefusion000": "missing"})
    with pytest.raises(LeFusionInputError, match="equal real case"):
        grouped_splits(real, {"case_1": "case_2"})
