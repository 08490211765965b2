"""Histogram texture control: lesion histograms, prototypes, and the user's texture choice.

The condition of the lesion model is the normalised 16-bin histogram of the lesion voxels in model space
[-1, 1] (for a CT window of [-1000, 400] HU one bin is 87.5 HU). With C lesion classes the condition is the
C class histograms concatenated, shape ``(C * bins,)``. Training histograms are clustered with k-means
into a few prototypes per class (e.g. ground-glass, part-solid, solid) that the user picks at sampling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lefusion_nnunet.errors import LeFusionInputError

HIST_BINS = 16
TEXTURE_KINDS = ("cluster", "random", "file")


def lesion_histogram(model_values: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Normalised histogram (sums to 1) of values in [-1, 1]; an empty input gives a uniform histogram."""
    values = np.ravel(model_values)
    if values.size == 0:
        return np.full(bins, 1.0 / bins, dtype=np.float32)
    counts, _ = np.histogram(np.clip(values, -1, 1), bins=bins, range=(-1.0, 1.0))
    return (counts / counts.sum()).astype(np.float32)


def is_empty_class_histogram(hist: np.ndarray) -> bool:
    """Whether ``hist`` is the placeholder :func:`lesion_histogram` gives a class with no voxels in an ROI."""
    hist = np.asarray(hist, np.float64)
    return bool(np.allclose(hist, 1.0 / hist.size, rtol=0, atol=1e-7))


def class_histograms(histograms: np.ndarray, c: int, bins: int = HIST_BINS) -> np.ndarray:
    """Class ``c``'s histograms ``(M, bins)`` out of ``(N, C * bins)`` condition rows, only from the ROIs where the
    class has voxels (the placeholder of an absent class is no texture of it); all rows when none has."""
    rows = np.asarray(histograms)[:, c * bins:(c + 1) * bins]
    present = np.array([not is_empty_class_histogram(h) for h in rows], bool)
    return rows[present] if present.any() else rows


def jitter_histogram(hist: np.ndarray, rng: np.random.Generator, amount: float = 0.1) -> np.ndarray:
    """``hist`` with each bin scaled by a uniform factor in ``[1 - amount, 1 + amount]``, renormalised (float32):
    lesions made from one prototype or training histogram differ in texture (LeFusion's ±10 % jitter)."""
    jittered = np.asarray(hist, np.float64) * rng.uniform(1.0 - amount, 1.0 + amount, size=np.shape(hist))
    return (jittered / jittered.sum()).astype(np.float32)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L1 distance between two normalised histograms (0 = identical, 2 = disjoint)."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum())


def histogram_emd(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's (1-D Wasserstein-1) distance between two normalised histograms over the same ordered bins,
    in bins: how far intensity mass must move to turn one into the other.

    Unlike L1 it respects the order of the bins: a ground-glass lesion whose peak sits half a bin lower is
    near its prototype, while one that grows a solid core (mass several bins up) is far from it.
    """
    return float(np.abs(np.cumsum(np.asarray(a, np.float64) - np.asarray(b, np.float64))).sum())


@dataclass(frozen=True)
class Prototypes:
    """k-means prototypes of one lesion class: ``centers`` (K, bins), ``counts`` (K,) member counts."""

    centers: np.ndarray
    counts: np.ndarray

    def to_dict(self) -> dict:
        return {"centers": self.centers.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Prototypes":
        return cls(np.asarray(d["centers"], np.float32), np.asarray(d["counts"], np.int64))

    def nearest(self, hist: np.ndarray) -> int:
        """Index of the prototype nearest (L1) to ``hist``."""
        return int(np.argmin([histogram_distance(hist, c) for c in self.centers]))


def cluster_prototypes(histograms: np.ndarray, k: int = 3, seed: int = 0) -> Prototypes:
    """k-means (scikit-learn) over ``histograms`` (N, bins); K is reduced to N when there are fewer lesions.

    Prototypes are ordered by their mean intensity (darkest first), so ``cluster:0`` is the most
    ground-glass-like texture of a CT dataset; centres are renormalised to sum to 1.
    """
    from sklearn.cluster import KMeans

    h = np.asarray(histograms, np.float64)
    if h.ndim != 2 or len(h) == 0:
        raise LeFusionInputError("no lesion histograms to cluster; the dataset has no lesion voxels of that label.")
    k = max(1, min(k, len(np.unique(h, axis=0))))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(h)
    centers = np.clip(km.cluster_centers_, 0, None)
    centers /= centers.sum(1, keepdims=True)
    counts = np.bincount(km.labels_, minlength=k)
    bin_mid = np.linspace(-1, 1, h.shape[1] + 1)
    bin_mid = (bin_mid[1:] + bin_mid[:-1]) / 2
    order = np.argsort(centers @ bin_mid)
    return Prototypes(centers[order].astype(np.float32), counts[order].astype(np.int64))


@dataclass(frozen=True)
class TextureSpec:
    """A texture choice: ``cluster:K`` (prototype K), ``random`` (a training lesion's histogram jittered
    +-10 % per bin) or ``file:PATH`` (JSON list of ``bins`` numbers)."""

    kind: str = "random"
    cluster: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TEXTURE_KINDS:
            raise ValueError(f"texture kind {self.kind!r} is not one of {TEXTURE_KINDS}")

    def __str__(self) -> str:
        return {"cluster": f"cluster:{self.cluster}", "random": "random", "file": f"file:{self.path}"}[self.kind]


def parse_texture(text: str) -> TextureSpec:
    """Parse ``cluster:K`` / ``random`` / ``file:PATH``."""
    text = text.strip()
    if text == "random":
        return TextureSpec("random")
    if text.startswith("cluster:") and text[8:].isdigit():
        return TextureSpec("cluster", cluster=int(text[8:]))
    if text.startswith("file:") and len(text) > 5:
        return TextureSpec("file", path=text[5:])
    raise LeFusionInputError(f"texture {text!r} is not understood; use cluster:K, random or file:PATH.")


def parse_textures(items: list[str] | None, lesion_labels: list[int]) -> list[TextureSpec]:
    """Per-class texture specs from ``--texture`` items: one spec for all classes, or ``LABEL=SPEC`` each."""
    if not items:
        return [TextureSpec("random")] * len(lesion_labels)
    if len(items) == 1 and "=" not in items[0]:
        return [parse_texture(items[0])] * len(lesion_labels)
    specs: dict[int, TextureSpec] = {}
    for item in items:
        label, sep, spec = item.partition("=")
        if not sep or not label.strip().isdigit() or int(label) not in lesion_labels:
            raise LeFusionInputError(f"texture {item!r} must be LABEL=SPEC with LABEL one of {lesion_labels}.")
        specs[int(label)] = parse_texture(spec)
    return [specs.get(lab, TextureSpec("random")) for lab in lesion_labels]


def resolve_texture(spec: TextureSpec, prototypes: Prototypes, training_histograms: np.ndarray,
                    rng: np.random.Generator, bins: int = HIST_BINS) -> np.ndarray:
    """Turn a spec into one class's condition histogram ``(bins,)``."""
    if spec.kind == "cluster":
        if not 0 <= (spec.cluster or 0) < len(prototypes.centers):
            raise LeFusionInputError(f"texture cluster:{spec.cluster} does not exist; the checkpoint has "
                                     f"{len(prototypes.centers)} prototypes (cluster:0 .. "
                                     f"cluster:{len(prototypes.centers) - 1}).")
        return jitter_histogram(prototypes.centers[spec.cluster], rng)
    if spec.kind == "random":
        return jitter_histogram(training_histograms[rng.integers(len(training_histograms))], rng)
    path = Path(spec.path or "")
    try:
        values = np.asarray(json.loads(path.read_text()), np.float64).ravel()
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise LeFusionInputError(f"texture file {path} could not be read as a JSON list of {bins} numbers.") from exc
    if values.size != bins or (values < 0).any() or values.sum() <= 0:
        raise LeFusionInputError(f"texture file {path} must hold {bins} non-negative numbers, not {values.size}.")
    return (values / values.sum()).astype(np.float32)
