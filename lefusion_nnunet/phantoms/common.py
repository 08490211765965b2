"""What every procedural phantom (chest in :mod:`.phantom`, cardiac in :mod:`.phantom_cardiac`) shares:
the configuration base class, smooth random fields and correlated noise, and the atomic writer of an
nnU-Net v2 raw dataset.

Conventions: arrays are ``(Z, Y, X)``; spacings ``(z, y, x)`` in millimetres (SimpleITK stores them
reversed, ``(x, y, z)``). Every random helper takes a :class:`numpy.random.Generator`; none touches a
global RNG.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.data.raw_writer import check_dataset_id_free, dataset_name, raw_dataset_folder

__all__ = ["MANIFEST_NAME", "SUPPORTED_FILE_ENDINGS", "Spacing", "PhantomConfigBase", "as_int", "smooth_field",
           "sphere_perturbation", "sigmoid", "gaussian_noise", "kernel_norm", "write_case_files", "write_raw_dataset"]

#: File name of the per-case ground-truth manifest written next to ``dataset.json``.
MANIFEST_NAME = "phantom_manifest.json"
#: File endings a phantom can be written as (all read by nnU-Net's ``SimpleITKIO``).
SUPPORTED_FILE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nrrd", ".mha")

Spacing = tuple[float, float, float]


# =================================================================================================
# configuration
# =================================================================================================
class PhantomConfigBase(JsonConfig):
    """What the chest and cardiac phantom configurations share: the lesion-free count, JSON round trip and
    the checks of ``file_ending`` and ``seed``. Subclasses are frozen dataclasses with those fields."""

    num_cases: int
    lesion_free_fraction: float
    file_ending: str
    seed: int

    def _check_common(self, fail) -> None:
        if self.file_ending not in SUPPORTED_FILE_ENDINGS:
            fail(f"file_ending is {self.file_ending!r} but must be one of {', '.join(SUPPORTED_FILE_ENDINGS)}")
        if self.seed < 0:
            fail(f"seed is {self.seed} but must be a non-negative integer")

    @property
    def num_lesion_free(self) -> int:
        """Number of lesion-free cases (at least 1 of each kind when ``num_cases >= 2``)."""
        n = int(round(self.lesion_free_fraction * self.num_cases))
        if self.num_cases >= 2:
            n = min(max(n, 1), self.num_cases - 1)
        return min(max(n, 0), self.num_cases)


def as_int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


# =================================================================================================
# random fields and noise
# =================================================================================================
def smooth_field(rng: np.random.Generator, grids: tuple[np.ndarray, ...], wavelength_mm: float,
                  n_waves: int = 6) -> np.ndarray:
    """Low-frequency random field in about [-1, 1]: a sum of random plane waves over mm grids."""
    out = np.zeros(np.broadcast_shapes(*(g.shape for g in grids)), dtype=np.float32)
    for _ in range(n_waves):
        v = rng.normal(size=len(grids))
        v /= np.linalg.norm(v) + 1e-12
        k = 2.0 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4))
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum((k * vi) * g for vi, g in zip(v, grids)) + phase
        out += np.cos(arg).astype(np.float32)
    return out * np.float32(np.sqrt(2.0 / n_waves))


def sphere_perturbation(rng: np.random.Generator, unit: tuple[np.ndarray, ...], n_terms: int = 5) -> np.ndarray:
    """Low-frequency function on the unit sphere in about [-1, 1] (irregular, lobulated boundary)."""
    out = np.zeros(np.broadcast_shapes(*(u.shape for u in unit)), dtype=np.float32)
    for _ in range(n_terms):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v) + 1e-12
        freq = rng.uniform(1.5, 4.0)
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(freq * (v[0] * unit[0] + v[1] * unit[1] + v[2] * unit[2]) + phase).astype(np.float32)
    return out / np.float32(n_terms) * np.float32(1.6)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Correlated unit-variance noise (Gaussian-smoothed white noise, rescaled analytically)."""
    white = rng.standard_normal(size=shape, dtype=np.float32)
    sm = ndimage.gaussian_filter(white, sigma_vox, mode="reflect")
    return sm / np.float32(kernel_norm(sigma_vox))


def kernel_norm(sigma_vox: tuple[float, ...]) -> float:
    """sqrt(sum of squared weights) of scipy's separable Gaussian kernel: std of smoothed unit noise."""
    total = 1.0
    for s in sigma_vox:
        if s <= 0:
            continue
        delta = np.zeros(int(8 * s + 3) * 2 + 1)
        delta[len(delta) // 2] = 1.0
        w = ndimage.gaussian_filter1d(delta, s, mode="constant")
        total *= float(np.sum(w * w))
    return math.sqrt(total)


# =================================================================================================
# writing the nnU-Net raw dataset
# =================================================================================================
def _sitk_image(array: np.ndarray, spacing_zyx: Spacing, origin_xyz: tuple[float, float, float]) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))  # SimpleITK order: (x, y, z)
    img.SetOrigin(origin_xyz)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def write_case_files(folder: Path, case_id: str, image: np.ndarray, label: np.ndarray, spacing_zyx: Spacing,
                     origin_xyz: tuple[float, float, float], ending: str) -> tuple[str, str]:
    """Write ``imagesTr/<case>_0000<ending>`` and ``labelsTr/<case><ending>``; returns both relative paths."""
    image_rel = f"imagesTr/{case_id}_0000{ending}"
    label_rel = f"labelsTr/{case_id}{ending}"
    sitk.WriteImage(_sitk_image(image, spacing_zyx, origin_xyz), str(folder / image_rel), useCompression=True)
    sitk.WriteImage(_sitk_image(label, spacing_zyx, origin_xyz), str(folder / label_rel), useCompression=True)
    return image_rel, label_rel


def write_raw_dataset(raw_root: Path | str, dataset_id: int, name: str, fill, overwrite: bool = False) -> Path:
    """Build ``<raw_root>/Dataset{id:03d}_{name}`` atomically: ``fill(partial_folder)`` writes the content
    (``imagesTr`` and ``labelsTr`` exist already) into a hidden sibling folder that is then moved into place.

    Refuses an existing folder unless ``overwrite``, and always refuses another folder with the same id.
    Write failures become :class:`LeFusionInputError` and leave nothing behind.
    """
    raw_root = Path(raw_root)
    final = raw_root / dataset_name(dataset_id, name)
    check_dataset_id_free(final.name, [raw_root], hint="choose another dataset id (--id)")
    with raw_dataset_folder(final, overwrite=overwrite) as partial:
        fill(partial)
    return final
