"""Procedural CT-like chest phantom written as an nnU-Net v2 raw dataset.

This is the project's embedded default data: no downloads are possible, so the demo, the tests and the
benchmarks all start from :func:`generate_chest_phantom`. Each case is a small thorax: air outside the
body (-1000 HU), an elliptic body of soft tissue (~40 HU) under a thin fat layer (~-100 HU), ribs,
sternum and a vertebra (+300 to +700 HU), a heart/mediastinum, a trachea, two jittered lung lobes of
parenchyma (~-860 HU) with a branching vessel tree (~+40 HU, thinner toward the periphery), CT-like
correlated noise, and in lesion cases 1-2 pulmonary nodules of three textures:

* ``"ground_glass"``: about -600 HU (sd ~60), soft edge;
* ``"solid"``: about +30 HU (sd ~40), sharp edge;
* ``"part_solid"``: a solid core (about +20 HU, radius ~45 % of the nodule) in a ground-glass rim.

Textures are assigned round-robin over all nodules of the dataset, so every dataset with at least three
lesion cases holds all three. Labels: 0 background, 1 lung (parenchyma and its vessels), 2 nodule
(whole nodule, core plus rim; overrides lung).

Conventions: arrays are ``(Z, Y, X)``; spacings are ``(z, y, x)`` in millimetres (SimpleITK files store
them reversed, ``(x, y, z)``); voxel index ``z`` grows toward the head, ``y`` toward the back and ``x``
toward the patient's left (LPS, identity direction). All randomness comes from
:class:`numpy.random.Generator` objects derived from ``PhantomConfig.seed``; no global RNG is touched,
and the same config writes byte-identical files.
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
from lefusion_nnunet.phantoms.common import (MANIFEST_NAME, SUPPORTED_FILE_ENDINGS, PhantomConfigBase, Spacing, as_int,
                                             kernel_norm, smooth_field, write_case_files, write_raw_dataset)
from lefusion_nnunet.phantoms.nodules import paint_nodule, place_nodule
from lefusion_nnunet.phantoms.vessels import _largest_per_side, _rasterize_vessels, _vessel_tree

__all__ = [
    "TEXTURES",
    "MANIFEST_NAME",
    "SUPPORTED_FILE_ENDINGS",
    "PhantomConfig",
    "PhantomNodule",
    "PhantomCase",
    "make_phantom_case",
    "generate_chest_phantom",
    "write_raw_dataset",
    "write_case_files",
]

#: Nodule texture names, in round-robin order.
TEXTURES: tuple[str, ...] = ("ground_glass", "solid", "part_solid")
#: Label values written to ``labelsTr``.
LABELS: dict[str, int] = {"background": 0, "lung": 1, "nodule": 2}

# --- tissue values (HU) -------------------------------------------------------------------------
#: Generator id written into the phantom's manifest (the module's first name; kept so phantoms stay byte-identical).
PHANTOM_GENERATOR_ID = "lefusion_nnunet.data.phantom"
_AIR = -1000.0
_FAT = -100.0
_SOFT = 40.0
_HEART = 38.0
_LUNG = -860.0
_VESSEL = 40.0
_BONE_CANCELLOUS = 320.0
_BONE_CORTEX = 700.0
_RIB = 450.0
_DISC = 80.0
_CSF = 15.0
_HU_MIN, _HU_MAX = -1024.0, 3071.0

_SMOOTH_SIGMA_MM = 0.55        # partial-volume / reconstruction blur applied to anatomy and noise


# =================================================================================================
# configuration
# =================================================================================================
@dataclass(frozen=True)
class PhantomConfig(PhantomConfigBase):
    """How to build a phantom dataset.

    Attributes:
        num_cases: total number of cases (lesion cases plus lesion-free cases).
        lesion_free_fraction: fraction of cases without any nodule; with ``num_cases >= 2`` there is
            always at least one case of each kind.
        shape_zyx: volume size in voxels, ``(Z, Y, X)``; each at least 16.
        spacing_zyx: voxel spacing in mm, ``(z, y, x)``.
        nodules_per_case: inclusive ``(min, max)`` number of nodules in a lesion case.
        nodule_diameter_mm: inclusive ``(min, max)`` nodule diameter in mm. A nodule that does not fit
            inside the lung is shrunk until it does; the manifest holds the diameter actually used.
        noise_hu: standard deviation of the CT noise in HU (after the slight smoothing).
        file_ending: ``".nii.gz"``, ``".nrrd"`` or ``".mha"``.
        seed: base seed; every case draws from its own generator derived from it.
    """

    num_cases: int = 16
    lesion_free_fraction: float = 0.375
    shape_zyx: tuple[int, int, int] = (48, 96, 96)
    spacing_zyx: tuple[float, float, float] = (2.5, 0.9, 0.9)
    nodules_per_case: tuple[int, int] = (1, 2)
    nodule_diameter_mm: tuple[float, float] = (8.0, 20.0)
    noise_hu: float = 15.0
    file_ending: str = ".nii.gz"
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(what: str) -> None:
            raise LeFusionInputError(f"invalid phantom configuration: {what}.")

        # normalise JSON lists to tuples of plain Python numbers
        try:
            object.__setattr__(self, "num_cases", as_int(self.num_cases))
            object.__setattr__(self, "lesion_free_fraction", float(self.lesion_free_fraction))
            object.__setattr__(self, "shape_zyx", tuple(as_int(v) for v in self.shape_zyx))
            object.__setattr__(self, "spacing_zyx", tuple(float(v) for v in self.spacing_zyx))
            object.__setattr__(self, "nodules_per_case", tuple(as_int(v) for v in self.nodules_per_case))
            object.__setattr__(self, "nodule_diameter_mm", tuple(float(v) for v in self.nodule_diameter_mm))
            object.__setattr__(self, "noise_hu", float(self.noise_hu))
            object.__setattr__(self, "seed", as_int(self.seed))
        except (TypeError, ValueError) as exc:
            fail(f"a field has the wrong type ({exc}); use integers for counts, shape and seed and numbers "
                 f"for spacing, diameters and noise")
        if self.num_cases < 1:
            fail(f"num_cases is {self.num_cases} but must be at least 1")
        if not 0.0 <= self.lesion_free_fraction <= 1.0:
            fail(f"lesion_free_fraction is {self.lesion_free_fraction} but must lie in [0, 1]")
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 16:
            fail(f"shape_zyx is {self.shape_zyx} but must be three sizes (z, y, x) of at least 16 voxels")
        if len(self.spacing_zyx) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_zyx):
            fail(f"spacing_zyx is {self.spacing_zyx} but must be three positive spacings (z, y, x) in mm")
        npc = self.nodules_per_case
        if len(npc) != 2 or not 1 <= npc[0] <= npc[1]:
            fail(f"nodules_per_case is {self.nodules_per_case} but must be (min, max) with 1 <= min <= max")
        d = self.nodule_diameter_mm
        if len(d) != 2 or not (math.isfinite(d[0]) and math.isfinite(d[1]) and 0 < d[0] <= d[1]):
            fail(f"nodule_diameter_mm is {d} but must be (min, max) in mm with 0 < min <= max")
        if not (math.isfinite(self.noise_hu) and self.noise_hu >= 0):
            fail(f"noise_hu is {self.noise_hu} but must be a non-negative number of HU")
        self._check_common(fail)


# =================================================================================================
# in-memory cases
# =================================================================================================
@dataclass(frozen=True)
class PhantomNodule:
    """Ground truth of one nodule.

    ``center_zyx`` is the voxel index (z, y, x); ``diameter_mm`` the nominal diameter (the boundary
    is perturbed by up to +-15 %); ``mean_hu`` the mean of the final image over the nodule's label voxels.
    """

    center_zyx: tuple[int, int, int]
    diameter_mm: float
    texture: str
    mean_hu: float
    num_voxels: int

    def to_dict(self) -> dict[str, Any]:
        return {"center_zyx": [int(c) for c in self.center_zyx], "diameter_mm": round(float(self.diameter_mm), 4),
                "texture": self.texture, "mean_hu": round(float(self.mean_hu), 3),
                "num_voxels": int(self.num_voxels)}


@dataclass
class PhantomCase:
    """One generated case: ``image`` int16 HU ``(Z, Y, X)``, ``label`` uint8 ``(Z, Y, X)``."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing_zyx: Spacing
    nodules: list[PhantomNodule] = field(default_factory=list)

    @property
    def has_lesion(self) -> bool:
        return bool(self.nodules)


@dataclass(frozen=True)
class _CasePlan:
    index: int
    case_id: str
    textures: tuple[str, ...]       # empty for lesion-free cases


def _plan(config: PhantomConfig) -> list[_CasePlan]:
    """Dataset-level draws: which cases are lesion-free, how many nodules, which textures."""
    rng = np.random.default_rng([config.seed, 0x5EED])
    n = config.num_cases
    free = set(rng.permutation(n)[:config.num_lesion_free].tolist())
    lo, hi = config.nodules_per_case
    counts = rng.integers(lo, hi + 1, size=n)
    plans, k = [], 0
    for i in range(n):
        textures: tuple[str, ...] = ()
        if i not in free:
            textures = tuple(TEXTURES[(k + j) % len(TEXTURES)] for j in range(int(counts[i])))
            k += int(counts[i])
        plans.append(_CasePlan(i, f"phantom_{i:03d}", textures))
    return plans


def make_phantom_case(config: PhantomConfig, case_index: int) -> PhantomCase:
    """Build case ``case_index`` of the dataset described by ``config`` in memory.

    Returns exactly the arrays :func:`generate_chest_phantom` writes for that case.
    """
    if not 0 <= case_index < config.num_cases:
        raise LeFusionInputError(f"case index {case_index} is outside 0..{config.num_cases - 1}; the phantom "
                                 f"has num_cases={config.num_cases}.")
    plan = _plan(config)[case_index]
    return _render_case(config, plan)


def _render_case(config: PhantomConfig, plan: _CasePlan) -> PhantomCase:
    rng = np.random.default_rng([config.seed, 1 + plan.index])
    Z, Y, X = config.shape_zyx
    sz, sy, sx = config.spacing_zyx
    spacing = config.spacing_zyx
    # mm coordinates relative to the volume centre, as broadcastable open grids
    z = ((np.arange(Z, dtype=np.float32) - (Z - 1) / 2) * sz)[:, None, None]
    y = ((np.arange(Y, dtype=np.float32) - (Y - 1) / 2) * sy)[None, :, None]
    x = ((np.arange(X, dtype=np.float32) - (X - 1) / 2) * sx)[None, None, :]
    fov_y, fov_x, ext_z = Y * sy, X * sx, Z * sz

    # ---- body: elliptic cylinder with slight per-case jitter -----------------------------------
    ax = 0.475 * fov_x * rng.uniform(0.95, 1.0)
    ay = 0.40 * fov_y * rng.uniform(0.93, 1.0)
    by = rng.uniform(-0.02, 0.02) * fov_y
    rb = np.sqrt((x / ax) ** 2 + ((y - by) / ay) ** 2)                   # (1, Y, X) normalised radius
    body2d = rb < 1.0
    img = np.full((Z, Y, X), _AIR, dtype=np.float32)
    img[:] = np.where(body2d, np.where(rb > 0.935, _FAT, _SOFT), _AIR)
    body = np.broadcast_to(body2d, (Z, Y, X))
    ang = np.arctan2(y - by, x)                                            # (1, Y, X)

    # ---- ribs (oblique bands in a ring), sternum, vertebra ----------------------------------
    period = max(0.16 * ext_z, 3.0 * sz)
    rib_ring = (rb > 0.86) & (rb < 0.915)
    rib_phase = rng.uniform(0, 2 * np.pi)
    rib_wave = np.sin(2 * np.pi * (z + 0.22 * ext_z * np.abs(ang) / np.pi) / period + rib_phase)
    front = (np.abs(x) < 0.12 * ax) & (y - by < 0)
    ribs = rib_ring & (rib_wave > 0.45) & ~front
    img[ribs] = _RIB
    sternum = (((x / (0.10 * ax)) ** 2 + ((y - by + 0.86 * ay) / (0.06 * ay)) ** 2) < 1.0)
    img[np.broadcast_to(sternum, img.shape)] = _RIB
    vy = by + 0.60 * ay
    rv = np.sqrt((x / (0.15 * ax)) ** 2 + ((y - vy) / (0.17 * ay)) ** 2)     # vertebral body
    disc_period = max(0.2 * ext_z, 4.0 * sz)
    disc = (np.mod(z + rng.uniform(0, disc_period), disc_period) < max(0.18 * disc_period, 0.6 * sz))
    vert = np.broadcast_to(rv < 1.0, img.shape)
    img[vert] = np.where(np.broadcast_to(rv > 0.78, img.shape), _BONE_CORTEX, _BONE_CANCELLOUS)[vert]
    img[vert & np.broadcast_to(disc, img.shape)] = _DISC
    canal = ((x / (0.055 * ax)) ** 2 + ((y - vy - 0.25 * ay) / (0.07 * ay)) ** 2) < 1.0
    arch = (((x / (0.11 * ax)) ** 2 + ((y - vy - 0.25 * ay) / (0.12 * ay)) ** 2) < 1.0) & ~canal
    spinous = (np.abs(x) < 0.025 * ax + 0.5 * sx) & (y > vy + 0.3 * ay) & (rb < 0.92)
    img[np.broadcast_to(arch | spinous, img.shape) & body] = _BONE_CORTEX - 150.0
    img[np.broadcast_to(canal, img.shape)] = _CSF

    # ---- heart / mediastinum and trachea -------------------------------------------------------
    hx, hy, hz = 0.12 * ax, by - 0.15 * ay, -0.22 * ext_z
    heart = (((x - hx) / (0.33 * ax)) ** 2 + ((y - hy) / (0.43 * ay)) ** 2 + ((z - hz) / (0.38 * ext_z)) ** 2) < 1.0
    mediastinum = ((x / (0.16 * ax)) ** 2 + ((y - by + 0.1 * ay) / (0.75 * ay)) ** 2) < 1.0
    spine_zone = ((x / (0.22 * ax)) ** 2 + ((y - vy) / (0.42 * ay)) ** 2) < 1.0
    trachea = (((x / (0.09 * ax)) ** 2 + ((y - by + 0.2 * ay) / (0.11 * ay)) ** 2) < 1.0) & (z > 0.05 * ext_z)

    # ---- lungs: jittered ellipsoids with low-frequency shape noise, cut by the rib cage ----------
    lung = np.zeros((Z, Y, X), dtype=bool)
    hila: list[np.ndarray] = []
    for side in (-1.0, 1.0):
        cx = side * 0.50 * ax * rng.uniform(0.95, 1.05)
        cy = by - 0.06 * ay + rng.uniform(-0.04, 0.04) * ay
        cz = 0.06 * ext_z + rng.uniform(-0.03, 0.03) * ext_z
        lx = 0.46 * ax * rng.uniform(0.92, 1.06)
        ly = 0.78 * ay * rng.uniform(0.92, 1.06)
        lz = 0.50 * ext_z * rng.uniform(0.9, 1.0)
        f = ((x - cx) / lx) ** 2 + ((y - cy) / ly) ** 2 + ((z - cz) / lz) ** 2
        f = f + 0.10 * smooth_field(rng, (z, y, x), wavelength_mm=0.9 * min(lx, ly) * 2.0, n_waves=5)
        one = (f < 1.0) & (rb < 0.845) & ~mediastinum & ~heart & ~spine_zone
        lung |= one
        hila.append(np.array([(cz - 0.1 * ext_z) / sz + (Z - 1) / 2, (cy + 0.05 * ay) / sy + (Y - 1) / 2,
                              (side * 0.2 * ax) / sx + (X - 1) / 2]))
    # keep only the largest piece of each side so the lungs are two clean components
    lung = _largest_per_side(lung, X)

    img[np.broadcast_to(heart, img.shape) & body] = _HEART
    img[np.broadcast_to(trachea, img.shape)] = _AIR
    gradient = 25.0 * np.clip((y - by) / ay, -1, 1)                   # gravity: posterior lung is denser
    img = np.where(lung, np.float32(_LUNG) + gradient.astype(np.float32), img)

    # ---- vessels --------------------------------------------------------------------------------
    mid = X // 2
    vessels = np.zeros_like(img)
    for k, side_slice in enumerate((np.s_[:, :, :mid], np.s_[:, :, mid:])):
        side_lung = np.zeros_like(lung)
        side_lung[side_slice] = lung[side_slice]
        if not side_lung.any():
            continue
        pts, rads = _vessel_tree(rng, side_lung, spacing, hila[k])
        vessels = np.maximum(vessels, _rasterize_vessels(pts, rads, side_lung, spacing))
    img = img + vessels * (np.float32(_VESSEL) - img) * lung

    label = lung.astype(np.uint8)

    # ---- nodules --------------------------------------------------------------------------------
    nodule_masks: list[tuple[tuple[slice, ...], np.ndarray]] = []
    placed: list[tuple[np.ndarray, float, str, float]] = []
    if plan.textures:
        edt = ndimage.distance_transform_edt(lung, sampling=spacing).astype(np.float32)
        for texture in plan.textures:
            d = float(rng.uniform(*config.nodule_diameter_mm))
            center, d = place_nodule(rng, edt, spacing, d, placed, plan.case_id)
            placed.append((center, d, texture, 0.0))
            sl, mask = paint_nodule(rng, img, center, d, texture, spacing)
            label[sl][mask] = LABELS["nodule"]
            nodule_masks.append((sl, mask))

    # ---- partial-volume blur + correlated CT noise in one Gaussian pass ---------------------------
    sigma_vox = tuple(_SMOOTH_SIGMA_MM / s for s in spacing)
    if config.noise_hu > 0:
        white = rng.standard_normal(size=img.shape, dtype=np.float32)
        img += white * np.float32(config.noise_hu / kernel_norm(sigma_vox))
    img = ndimage.gaussian_filter(img, sigma_vox, mode="nearest")
    image = np.clip(np.rint(img), _HU_MIN, _HU_MAX).astype(np.int16)

    nodules = []
    for (center, d, texture, _), (sl, mask) in zip(placed, nodule_masks):
        vals = image[sl][mask]
        nodules.append(PhantomNodule(tuple(int(c) for c in center), float(d), texture,
                                     float(vals.mean()) if vals.size else float("nan"), int(vals.size)))
    return PhantomCase(plan.case_id, image, label, spacing, nodules)


# =================================================================================================
# writing the nnU-Net raw dataset
# =================================================================================================
def _origin_xyz(config: PhantomConfig) -> tuple[float, float, float]:
    """Non-zero origin (mm, SimpleITK x, y, z order): the volume centre sits near (0, 0, -150) mm."""
    Z, Y, X = config.shape_zyx
    sz, sy, sx = config.spacing_zyx
    return (round(-0.5 * (X - 1) * sx, 4), round(-0.5 * (Y - 1) * sy, 4), round(-150.0 - 0.5 * (Z - 1) * sz, 4))


def _write_dataset_json(folder: Path, config: PhantomConfig, name: str) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(folder), channel_names={0: "CT"}, labels=dict(LABELS), num_training_cases=config.num_cases,
        file_ending=config.file_ending, dataset_name=name,
        description=("Procedural CT-like chest phantom (LeFusion nnU-Net plugin): lungs with vessels, ribs, "
                     "spine, heart; nodules of textures ground_glass, solid and part_solid. Synthetic data, "
                     "not for clinical use."),
        license="Apache-2.0 (synthetic data generated by lefusion_nnunet)",
        converted_by="lefusion_nnunet.data.phantom.generate_chest_phantom",
        lefusion_phantom=config.to_dict())


def generate_chest_phantom(raw_root: Path | str, dataset_id: int = 501, name: str = "LeFusionChestPhantom",
                           config: PhantomConfig = PhantomConfig(), overwrite: bool = False) -> Path:
    """Write the phantom as an nnU-Net v2 raw dataset and return its folder.

    Writes ``<raw_root>/Dataset{id:03d}_{name}/`` with ``dataset.json``, ``imagesTr/phantom_XXX_0000<ending>``
    (int16 HU, ``(Z, Y, X)`` arrays stored with spacing ``config.spacing_zyx`` in mm), ``labelsTr/phantom_XXX<ending>``
    (uint8: 0 background, 1 lung, 2 nodule) and ``phantom_manifest.json`` (per case: nodule centres as
    voxel ``(z, y, x)``, diameters in mm, textures, mean HU).

    The dataset is built in a sibling ``.Dataset..partial-<pid>`` folder and moved into place with
    ``os.replace``, so an interrupted run leaves no half-written dataset. An existing dataset folder is
    only replaced with ``overwrite=True``; otherwise :class:`LeFusionInputError` is raised. Another
    folder with the same dataset id but a different name is always refused (nnU-Net could not tell
    them apart).
    """
    if not isinstance(config, PhantomConfig):
        raise LeFusionInputError(f"config must be a PhantomConfig, got {type(config).__name__}.")
    ds_name = dataset_name(dataset_id, name)

    def fill(partial: Path) -> None:
        origin = _origin_xyz(config)
        ending = config.file_ending
        cases = []
        for plan in _plan(config):
            case = _render_case(config, plan)
            image_rel, label_rel = write_case_files(partial, case.case_id, case.image, case.label,
                                                    config.spacing_zyx, origin, ending)
            cases.append({"case_id": case.case_id, "has_lesion": case.has_lesion, "image": image_rel,
                          "label": label_rel, "nodules": [n.to_dict() for n in case.nodules]})
        _write_dataset_json(partial, config, ds_name)
        manifest = {"format_version": 1, "generator": PHANTOM_GENERATOR_ID, "dataset": ds_name,
                    "config": config.to_dict(), "labels": dict(LABELS), "textures": list(TEXTURES),
                    "axis_order": "center_zyx is a voxel index (z, y, x); diameter_mm in mm; mean_hu in HU",
                    "cases": cases}
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_raw_dataset(raw_root, dataset_id, name, fill, overwrite)
