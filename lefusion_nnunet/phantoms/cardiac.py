"""Procedural MR-like cardiac phantom (EMIDEC-like short-axis LGE stack) as an nnU-Net v2 raw dataset.

Two lesion classes for the multi-channel decomposition and the multi-class mask model: each lesion case
holds one enhancing myocardial infarct in the left-ventricular (LV) myocardium, most of them with a dark
microvascular-obstruction (MVO, "no-reflow") core inside, as late-gadolinium-enhancement images show them.
Labels follow EMIDEC:

====  ===========  ===================================================================
0     background   everything else (body, right ventricle, fat, air)
1     cavity       LV blood pool (bright)
2     myocardium   healthy LV myocardium (dark, nulled): the host region of lesions
3     infarct      hyper-enhanced scar, from the endocardium outward (brightest tissue)
4     mvo          dark core inside the infarct, subendocardial (label 4 voxels are not label 3)
====  ===========  ===================================================================

Geometry: a short-axis stack, ``shape_zyx = (12, 64, 64)`` voxels of ``(8.0, 1.5, 1.5)`` mm (z, y, x) by
default (thick slices, fine in-plane pixels, like EMIDEC's 8-13 mm slices of about 1.5 mm pixels). The LV
narrows from base (z = 0) to apex. With these spacings a model ROI of 32 x 32 x 8 voxels (x, y, z; 48 x 48 x
64 mm) holds every infarct; it is divisible by 8 (the ``small`` denoiser preset) and by 4 (``tiny``).

Intensities are MR-like arbitrary units (not HU; the channel is named ``"MRI"`` so models use per-case
percentile scaling): air ~5, body ~160, fat ~480, LV blood ~420, myocardium ~60, infarct ~640-760 (two
textures, alternating over lesion cases: ``"homogeneous"`` and ``"patchy"``), MVO ~45. Each case is then
multiplied by a random receiver gain (``gain_range``) and a smooth bias field, so absolute values differ
between cases and only percentile scaling makes them comparable. Noise is Rician.

Conventions and determinism as in :mod:`lefusion_nnunet.phantoms.chest` (arrays ``(Z, Y, X)``, spacings
``(z, y, x)`` mm, one :class:`numpy.random.Generator` per case derived from the seed).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lefusion_nnunet.data.raw_writer import dataset_name
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.phantoms.common import (MANIFEST_NAME, PhantomConfigBase, as_int, smooth_field, write_case_files,
                                             write_raw_dataset)

__all__ = ["CARDIAC_LABELS", "CARDIAC_LESION_LABELS", "CARDIAC_HOST_LABEL", "INFARCT_TEXTURES", "CardiacPhantomConfig",
           "CardiacCase", "make_cardiac_case", "generate_cardiac_phantom"]

CARDIAC_LABELS: dict[str, int] = {"background": 0, "cavity": 1, "myocardium": 2, "infarct": 3, "mvo": 4}
#: Lesion classes in channel order (outer class first: the MVO lies inside the infarct).
CARDIAC_LESION_LABELS: tuple[int, int] = (3, 4)
#: Host region of the lesions (``--region-label``).
CARDIAC_HOST_LABEL = 2
INFARCT_TEXTURES: tuple[str, ...] = ("homogeneous", "patchy")

# tissue signal (arbitrary units, before gain)
_AIR, _BODY, _FAT, _BLOOD, _RV_BLOOD, _MYO = 5.0, 160.0, 480.0, 420.0, 380.0, 60.0
_INFARCT = {"homogeneous": (760.0, 35.0), "patchy": (640.0, 110.0)}    # mean, texture sd
_MVO_MEAN, _MVO_SD = 45.0, 15.0
_BLUR_PX = 0.5                 # in-plane partial-volume blur (pixels)


@dataclass(frozen=True)
class CardiacPhantomConfig(PhantomConfigBase):
    """How to build a cardiac phantom dataset.

    Attributes:
        num_cases: total number of cases (lesion cases plus lesion-free cases).
        lesion_free_fraction: fraction of cases without infarct (at least one of each kind for >= 2 cases).
        shape_zyx: volume size in voxels ``(Z, Y, X)``; Z >= 6, Y and X >= 48.
        spacing_zyx: voxel spacing ``(z, y, x)`` in mm.
        infarct_extent_deg: inclusive ``(min, max)`` angular extent of an infarct around the LV, degrees.
        mvo_fraction: fraction of lesion cases whose infarct has an MVO core (at least one when there are
            two or more lesion cases).
        noise: Rician noise standard deviation (arbitrary units, before gain).
        gain_range: ``(min, max)`` per-case receiver gain.
        file_ending: ``".nii.gz"``, ``".nrrd"`` or ``".mha"``.
        seed: base seed.
    """

    num_cases: int = 12
    lesion_free_fraction: float = 0.34
    shape_zyx: tuple[int, int, int] = (12, 64, 64)
    spacing_zyx: tuple[float, float, float] = (8.0, 1.5, 1.5)
    infarct_extent_deg: tuple[float, float] = (40.0, 90.0)
    mvo_fraction: float = 0.7
    noise: float = 18.0
    gain_range: tuple[float, float] = (0.6, 1.8)
    file_ending: str = ".nii.gz"
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(what: str) -> None:
            raise LeFusionInputError(f"invalid cardiac phantom configuration: {what}.")

        try:
            object.__setattr__(self, "num_cases", as_int(self.num_cases))
            object.__setattr__(self, "shape_zyx", tuple(as_int(v) for v in self.shape_zyx))
            object.__setattr__(self, "seed", as_int(self.seed))
            for name in ("lesion_free_fraction", "mvo_fraction", "noise"):
                object.__setattr__(self, name, float(getattr(self, name)))
            for name in ("spacing_zyx", "infarct_extent_deg", "gain_range"):
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        except (TypeError, ValueError) as exc:
            fail(f"a field has the wrong type ({exc}); use integers for counts, shape and seed")
        if self.num_cases < 1:
            fail(f"num_cases is {self.num_cases} but must be at least 1")
        for name in ("lesion_free_fraction", "mvo_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"{name} is {getattr(self, name)} but must lie in [0, 1]")
        if len(self.shape_zyx) != 3 or self.shape_zyx[0] < 6 or min(self.shape_zyx[1:]) < 48:
            fail(f"shape_zyx is {self.shape_zyx} but must be (z, y, x) with z >= 6 and y, x >= 48")
        if len(self.spacing_zyx) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_zyx):
            fail(f"spacing_zyx is {self.spacing_zyx} but must be three positive spacings (z, y, x) in mm")
        e = self.infarct_extent_deg
        if len(e) != 2 or not 10.0 <= e[0] <= e[1] <= 180.0:
            fail(f"infarct_extent_deg is {e} but must be (min, max) with 10 <= min <= max <= 180")
        g = self.gain_range
        if len(g) != 2 or not 0 < g[0] <= g[1]:
            fail(f"gain_range is {g} but must be (min, max) with 0 < min <= max")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            fail(f"noise is {self.noise} but must be a non-negative number")
        self._check_common(fail)


@dataclass
class CardiacCase:
    """One case: ``image`` int16 ``(Z, Y, X)`` (arbitrary units), ``label`` uint8 ``(Z, Y, X)``, ground truth."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing_zyx: tuple[float, float, float]
    infarct_texture: str | None = None
    gain: float = 1.0
    info: dict = field(default_factory=dict)

    @property
    def has_lesion(self) -> bool:
        return self.infarct_texture is not None


@dataclass(frozen=True)
class _Plan:
    index: int
    case_id: str
    texture: str | None           # None: lesion-free
    mvo: bool


def _plan(config: CardiacPhantomConfig) -> list[_Plan]:
    rng = np.random.default_rng([config.seed, 0xCA4D])
    n = config.num_cases
    free = set(rng.permutation(n)[:config.num_lesion_free].tolist())
    lesion_idx = [i for i in range(n) if i not in free]
    n_mvo = int(round(config.mvo_fraction * len(lesion_idx)))
    if len(lesion_idx) >= 2 and config.mvo_fraction > 0:
        n_mvo = max(n_mvo, 1)
    with_mvo = set(rng.permutation(lesion_idx)[:n_mvo].tolist()) if lesion_idx else set()
    plans = []
    for i in range(n):
        texture = None
        if i not in free:
            texture = INFARCT_TEXTURES[lesion_idx.index(i) % len(INFARCT_TEXTURES)]
        plans.append(_Plan(i, f"cardiac_{i:03d}", texture, i in with_mvo))
    return plans


def make_cardiac_case(config: CardiacPhantomConfig, case_index: int) -> CardiacCase:
    """Build case ``case_index`` in memory (exactly what :func:`generate_cardiac_phantom` writes)."""
    if not 0 <= case_index < config.num_cases:
        raise LeFusionInputError(f"case index {case_index} is outside 0..{config.num_cases - 1}.")
    return _render(config, _plan(config)[case_index])


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _render(config: CardiacPhantomConfig, plan: _Plan) -> CardiacCase:
    rng = np.random.default_rng([config.seed, 1 + plan.index])
    Z, Y, X = config.shape_zyx
    sz, sy, sx = config.spacing_zyx
    y = ((np.arange(Y) - (Y - 1) / 2) * sy).astype(np.float32)[None, :, None]
    x = ((np.arange(X) - (X - 1) / 2) * sx).astype(np.float32)[None, None, :]
    zi = np.arange(Z)[:, None, None]
    z_mm = (zi * sz).astype(np.float32)

    # ---- body, right ventricle, LV ------------------------------------------------------------
    img = np.full((Z, Y, X), _AIR, np.float32)
    by, bx = rng.uniform(-3, 3, 2)
    ay, ax = 0.47 * Y * sy * rng.uniform(0.93, 1.0), 0.49 * X * sx * rng.uniform(0.93, 1.0)
    body = np.broadcast_to(((y - by) / ay) ** 2 + ((x - bx) / ax) ** 2 <= 1.0, img.shape)
    img[body] = _BODY
    img += np.where(body, 25.0 * smooth_field(rng, (z_mm, y, x), 40.0, 4), 0.0).astype(np.float32)

    n_lv = Z - int(rng.integers(1, 3))                 # slices holding LV; the last one is the apical cap
    u = np.clip(zi / max(n_lv - 1, 1), 0.0, 1.0)
    r0, w0 = rng.uniform(16.0, 20.0), rng.uniform(7.0, 9.0)
    cy = rng.uniform(-4, 4) + rng.uniform(-1, 1) * zi
    cx = rng.uniform(-4, 4) + rng.uniform(-1, 1) * zi
    dy, dx = y - cy, x - cx
    r = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    wobble = 1.0 + 0.04 * (np.cos(2 * theta + rng.uniform(0, 6.3)) + np.cos(3 * theta + rng.uniform(0, 6.3))) / 2
    r_endo = r0 * np.sqrt(np.clip(1.0 - u ** 2.5, 0.0, 1.0)) * wobble
    wall = w0 * (1.0 + 0.12 * np.cos(theta - rng.uniform(0, 6.3)))
    r_epi = r_endo + wall
    in_lv = zi < n_lv
    cavity = in_lv & (r < r_endo)
    myo = in_lv & (r >= r_endo) & (r < r_epi)
    rv_off = r0 + w0 + rng.uniform(6.0, 9.0)
    rv = in_lv & (zi < n_lv - 1) & (((dy + 0.3 * rv_off) / (1.3 * r0)) ** 2 + ((dx + rv_off) / (0.8 * r0)) ** 2 <= 1) \
        & (r > r_epi + 2.0)
    fat_shell = in_lv & (r >= r_epi) & (r < r_epi + rng.uniform(1.5, 3.0)) & ~rv
    fat = fat_shell & (smooth_field(rng, (z_mm, y, x), 25.0, 4) > 0.0)
    img[np.broadcast_to(fat, img.shape) & body] = _FAT
    img[np.broadcast_to(rv, img.shape)] = _RV_BLOOD
    img[np.broadcast_to(cavity, img.shape)] = _BLOOD
    img[np.broadcast_to(myo, img.shape)] = _MYO + 10.0 * rng.standard_normal(int(np.broadcast_to(myo, img.shape).sum()))
    label = np.zeros((Z, Y, X), np.uint8)
    label[np.broadcast_to(cavity, label.shape)] = CARDIAC_LABELS["cavity"]
    label[np.broadcast_to(myo, label.shape)] = CARDIAC_LABELS["myocardium"]

    # ---- infarct and MVO ------------------------------------------------------------------------
    info: dict[str, Any] = {}
    if plan.texture is not None:
        myo_full = np.broadcast_to(myo, label.shape)
        depth = np.clip((r - r_endo) / np.maximum(r_epi - r_endo, 1e-3), 0.0, 1.0)   # 0 endo .. 1 epi
        theta_c = rng.uniform(-np.pi, np.pi)
        half = np.deg2rad(rng.uniform(*config.infarct_extent_deg)) / 2
        length = int(rng.integers(2, 5))
        z0 = int(rng.integers(0, max(1, n_lv - 1 - length) + 1))
        zs = np.arange(z0, min(z0 + length, n_lv - 1))
        taper = np.zeros((Z, 1, 1), np.float32)          # per-slice angular half-width factor
        mid = (zs[0] + zs[-1]) / 2.0
        for zz in zs:
            taper[zz] = 1.0 - 0.35 * abs(zz - mid) / max(len(zs) / 2.0, 1.0)
        t0 = rng.uniform(0.5, 1.0)
        a = np.abs(_wrap(theta - theta_c))
        edge = half * taper * (1.0 + 0.08 * smooth_field(rng, (z_mm, y, x), 12.0, 4))
        s = np.clip(1.0 - (a / np.maximum(edge, 1e-3)) ** 2, 0.0, 1.0)
        infarct = myo_full & (a < edge) & (depth <= t0 * (0.35 + 0.65 * np.sqrt(s)))
        mvo = np.zeros_like(infarct)
        if plan.mvo:
            central = np.zeros((Z, 1, 1), bool)
            central[zs[len(zs) // 2]] = True
            if len(zs) >= 3:
                central[zs[len(zs) // 2 - 1]] = True
            mvo = infarct & central & (a < 0.5 * edge) & (depth <= 0.5 * t0 * np.sqrt(s) + 0.05)
        mean, sd = _INFARCT[plan.texture]
        sigma = (0.0, 2.0, 2.0) if plan.texture == "patchy" else (0.0, 0.7, 0.7)
        tex = rng.standard_normal(label.shape).astype(np.float32)
        tex = ndimage.gaussian_filter(tex, sigma)
        tex /= max(float(tex.std()), 1e-6)
        img[infarct] = mean + sd * tex[infarct]
        img[mvo] = _MVO_MEAN + _MVO_SD * rng.standard_normal(int(mvo.sum()))
        label[infarct] = CARDIAC_LABELS["infarct"]
        label[mvo] = CARDIAC_LABELS["mvo"]
        info = {"infarct_voxels": int((label == 3).sum()), "mvo_voxels": int(mvo.sum()),
                "center_angle_deg": round(float(np.rad2deg(theta_c)), 3),
                "extent_deg": round(float(np.rad2deg(2 * half)), 3), "slices": [int(v) for v in zs],
                "transmurality": round(float(t0), 4)}

    # ---- partial volume, Rician noise, gain and bias --------------------------------------------
    img = ndimage.gaussian_filter(img, (0.0, _BLUR_PX, _BLUR_PX), mode="nearest")
    if config.noise > 0:
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(config.noise)
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(config.noise)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    gain = float(rng.uniform(*config.gain_range))
    bias = 1.0 + 0.12 * smooth_field(rng, (z_mm, y, x), 150.0, 3)
    img = img * np.float32(gain) * bias
    image = np.clip(np.rint(img), 0, 32767).astype(np.int16)
    return CardiacCase(plan.case_id, image, label, (sz, sy, sx), plan.texture, round(gain, 6),
                       {**info, "mvo": bool(plan.mvo and plan.texture is not None)})


def _origin_xyz(config: CardiacPhantomConfig) -> tuple[float, float, float]:
    Z, Y, X = config.shape_zyx
    sz, sy, sx = config.spacing_zyx
    return (round(-0.5 * (X - 1) * sx, 4), round(-0.5 * (Y - 1) * sy, 4), round(-40.0 - 0.5 * (Z - 1) * sz, 4))


def generate_cardiac_phantom(raw_root: Path | str, dataset_id: int = 511, name: str = "LeFusionCardiacPhantom",
                             config: CardiacPhantomConfig = CardiacPhantomConfig(), overwrite: bool = False) -> Path:
    """Write the cardiac phantom as an nnU-Net v2 raw dataset and return its folder.

    ``imagesTr/cardiac_XXX_0000<ending>`` (int16, arbitrary MR units, channel name ``"MRI"``),
    ``labelsTr/cardiac_XXX<ending>`` (uint8, :data:`CARDIAC_LABELS`), ``dataset.json`` and
    ``phantom_manifest.json`` (per case: lesion or not, infarct texture, MVO, gain, infarct geometry).
    Same atomic-write and overwrite rules as :func:`lefusion_nnunet.data.phantom.generate_chest_phantom`.
    """
    if not isinstance(config, CardiacPhantomConfig):
        raise LeFusionInputError(f"config must be a CardiacPhantomConfig, got {type(config).__name__}.")
    ds_name = dataset_name(dataset_id, name)

    def fill(partial: Path) -> None:
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

        origin = _origin_xyz(config)
        cases = []
        for plan in _plan(config):
            case = _render(config, plan)
            image_rel, label_rel = write_case_files(partial, case.case_id, case.image, case.label,
                                                    config.spacing_zyx, origin, config.file_ending)
            cases.append({"case_id": case.case_id, "has_lesion": case.has_lesion, "image": image_rel,
                          "label": label_rel, "infarct_texture": case.infarct_texture, "gain": case.gain,
                          **case.info})
        generate_dataset_json(
            str(partial), channel_names={0: "MRI"}, labels=dict(CARDIAC_LABELS), num_training_cases=config.num_cases,
            file_ending=config.file_ending, dataset_name=ds_name,
            description=("Procedural MR-like cardiac phantom (LeFusion nnU-Net plugin): short-axis LGE-like stack, "
                         "LV cavity (1), myocardium (2, host), infarct (3) with dark MVO core (4). Synthetic data, "
                         "not for clinical use."),
            license="Apache-2.0 (synthetic data generated by lefusion_nnunet)",
            converted_by="lefusion_nnunet.data.phantom_cardiac.generate_cardiac_phantom",
            lefusion_phantom={"kind": "cardiac", **config.to_dict()})
        manifest = {"format_version": 1, "generator": "lefusion_nnunet.data.phantom_cardiac", "kind": "cardiac",
                    "dataset": ds_name, "config": config.to_dict(), "labels": dict(CARDIAC_LABELS),
                    "lesion_labels": list(CARDIAC_LESION_LABELS), "host_label": CARDIAC_HOST_LABEL,
                    "infarct_textures": list(INFARCT_TEXTURES), "cases": cases}
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_raw_dataset(raw_root, dataset_id, name, fill, overwrite)
