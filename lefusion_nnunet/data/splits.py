"""Cross-validation splits: nnU-Net's default folds, and grouped folds for synthetic variants.

nnU-Net (``nnUNetTrainer.do_split``) splits a dataset without ``splits_final.json`` with
``generate_crossval_split(sorted ids, seed=12345, n_splits=5)``: a ``KFold(shuffle=True,
random_state=12345)`` over the sorted case ids. A synthetic variant placed by that rule would land in a
random fold and leak its source case's anatomy from train into validation. :func:`grouped_splits` keeps the
real cases exactly where nnU-Net would put them and adds each synthetic case to the *training* list of
exactly those folds that train on its source case; synthetic cases are never validated on.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from lefusion_nnunet.errors import LeFusionInputError

NNUNET_SPLIT_SEED = 12345
NNUNET_N_FOLDS = 5


def default_nnunet_folds(case_ids: Iterable[str], n_folds: int = NNUNET_N_FOLDS,
                         seed: int = NNUNET_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """The folds nnU-Net itself creates for these case ids (same order, same assignment).

    Returns:
        ``[{"train": [...], "val": [...]}, ...]``, one dict per fold, ids as plain ``str``.
    """
    from sklearn.model_selection import KFold

    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        raise LeFusionInputError("case ids for the cross-validation split are not unique; check dataset.json.")
    if n_folds < 2 or len(ids) < n_folds:
        raise LeFusionInputError(f"{len(ids)} case(s) cannot be split into {n_folds} folds; a {n_folds}-fold "
                                 f"cross-validation needs at least {max(n_folds, 2)} cases.")
    kfold = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [{"train": [ids[i] for i in tr], "val": [ids[i] for i in va]} for tr, va in kfold.split(ids)]


def grouped_splits(real_case_ids: Iterable[str], synthetic_to_source: Mapping[str, str],
                   n_folds: int = NNUNET_N_FOLDS, seed: int = NNUNET_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's default folds of the real cases, with synthetic cases added to training lists only.

    Args:
        real_case_ids: the original cases (their folds are :func:`default_nnunet_folds`).
        synthetic_to_source: synthetic case id -> the real case it was made from.

    Returns:
        One ``{"train", "val"}`` dict per fold: ``val`` is nnU-Net's default validation list; ``train`` is the
        default training list followed by the (sorted) synthetic cases whose source case is in it.
    """
    folds = default_nnunet_folds(real_case_ids, n_folds, seed)
    real = {c for f in folds for c in f["val"]}
    clash = sorted(set(synthetic_to_source) & real)
    if clash:
        raise LeFusionInputError(f"synthetic case id(s) {clash[:3]} equal real case ids; rename the synthetic cases.")
    unknown = sorted({s for s in synthetic_to_source.values() if s not in real})
    if unknown:
        raise LeFusionInputError(f"synthetic cases name source case(s) {unknown[:3]} that are not real cases of "
                                 f"the dataset; check the provenance.")
    out = []
    for f in folds:
        train = set(f["train"])
        extra = sorted(s for s, src in synthetic_to_source.items() if src in train)
        out.append({"train": list(f["train"]) + extra, "val": list(f["val"])})
    return out
