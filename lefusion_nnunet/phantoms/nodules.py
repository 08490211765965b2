"""Pulmonary nodules of the chest phantom: where one fits and how each texture is painted.

Textures: ``"ground_glass"`` (about -600 HU, soft edge), ``"solid"`` (about +30 HU, sharp edge) and
``"part_solid"`` (a solid, eccentric core in a ground-glass rim). Arrays are ``(Z, Y, X)``, spacings
``(z, y, x)`` in mm, centres voxel indices ``(z, y, x)``; randomness comes only from the generator passed in.
"""
from __future__ import annotations

import numpy as np

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.phantoms.common import Spacing, gaussian_noise, sigmoid, sphere_perturbation

__all__ = ["RADIUS_JITTER", "place_nodule", "paint_nodule"]

# nodule texture parameters: mean HU, texture sd HU, edge width mm (logistic scale)
_GGO_MEAN, _GGO_SD, _GGO_EDGE = -600.0, 60.0, 0.6
_SOLID_MEAN, _SOLID_SD, _SOLID_EDGE = 30.0, 40.0, 0.12
_CORE_MEAN, _CORE_SD, _CORE_FRACTION = 20.0, 40.0, 0.5
RADIUS_JITTER = 0.15          # max relative perturbation of the nodule radius (low-frequency)
_NODULE_MARGIN_MM = 1.5        # nodules keep this far from the lung border (beyond their max radius)
_NODULE_GAP_MM = 2.5           # and this far from each other


def place_nodule(rng: np.random.Generator, edt: np.ndarray, spacing: Spacing, diameter: float,
                  placed: list, case_id: str) -> tuple[np.ndarray, float]:
    """Pick a centre voxel where the whole (perturbed) nodule fits inside the lung, away from others.

    The diameter is shrunk by 10 % steps until a position exists.
    """
    sp = np.asarray(spacing)
    min_d = 2.0 * max(spacing)
    while True:
        r_max = 0.5 * diameter * (1.0 + RADIUS_JITTER)
        cand = np.flatnonzero(edt.reshape(-1) >= r_max + _NODULE_MARGIN_MM)
        if cand.size and placed:
            coords = np.stack(np.unravel_index(cand, edt.shape), axis=1) * sp
            ok = np.ones(cand.size, dtype=bool)
            for c, d, _, _ in placed:
                need = r_max + 0.5 * d * (1.0 + RADIUS_JITTER) + _NODULE_GAP_MM
                ok &= np.sum((coords - c * sp) ** 2, axis=1) >= need ** 2
            cand = cand[ok]
        if cand.size:
            flat = int(cand[rng.integers(cand.size)])
            return np.array(np.unravel_index(flat, edt.shape)), diameter
        if diameter <= min_d:
            raise LeFusionInputError(
                f"no room for a {diameter:.1f} mm nodule inside the lungs of phantom case {case_id}; use a "
                f"larger shape_zyx / spacing_zyx, smaller nodule_diameter_mm or fewer nodules_per_case.")
        diameter = max(diameter * 0.9, min_d)


def paint_nodule(rng: np.random.Generator, img: np.ndarray, center: np.ndarray, diameter: float, texture: str,
                  spacing: Spacing) -> tuple[tuple[slice, ...], np.ndarray]:
    """Blend one nodule into ``img`` (in place) in a local box; return (box slices, label mask in box)."""
    sp = np.asarray(spacing, dtype=np.float32)
    r = 0.5 * diameter
    reach = r * (1.0 + RADIUS_JITTER) + 4.0 * _GGO_EDGE + 1.0
    lo = np.maximum(center - np.ceil(reach / sp).astype(int), 0)
    hi = np.minimum(center + np.ceil(reach / sp).astype(int) + 1, img.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = [((np.arange(a, b, dtype=np.float32) - c) * s) for a, b, c, s in zip(lo, hi, center, sp)]
    dz, dy, dx = grids[0][:, None, None], grids[1][None, :, None], grids[2][None, None, :]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    safe = np.maximum(dist, 1e-6)
    unit = (dz / safe, dy / safe, dx / safe)
    amp = RADIUS_JITTER * (0.8 if texture == "solid" else 0.6)
    radius = r * (1.0 + amp * np.clip(sphere_perturbation(rng, unit), -1.0, 1.0))
    signed = dist - radius                                              # < 0 inside, mm
    mask = signed <= 0.0
    box_shape = mask.shape
    tex_sigma = tuple(0.8 / s for s in spacing)

    if texture == "solid":
        tex = _SOLID_MEAN + _SOLID_SD * gaussian_noise(rng, box_shape, tex_sigma)
        w = sigmoid(-signed / _SOLID_EDGE)
    elif texture == "ground_glass":
        tex = _GGO_MEAN + _GGO_SD * gaussian_noise(rng, box_shape, tex_sigma)
        w = sigmoid(-signed / _GGO_EDGE)
    elif texture == "part_solid":
        ggo = _GGO_MEAN + _GGO_SD * gaussian_noise(rng, box_shape, tex_sigma)
        core_tex = _CORE_MEAN + _CORE_SD * gaussian_noise(rng, box_shape, tex_sigma)
        # eccentric, irregular core; never thinner than ~0.8 of the coarsest voxel so it is visible
        rc = min(max(_CORE_FRACTION * r, 0.8 * float(max(spacing))), 0.7 * r)
        off = rng.normal(size=3)
        off = off / (np.linalg.norm(off) + 1e-12) * rng.uniform(0.0, 0.15) * r
        cdz, cdy, cdx = dz - off[0], dy - off[1], dx - off[2]
        cdist = np.sqrt(cdz * cdz + cdy * cdy + cdx * cdx)
        csafe = np.maximum(cdist, 1e-6)
        cunit = (cdz / csafe, cdy / csafe, cdx / csafe)
        crad = rc * (1.0 + 0.15 * np.clip(sphere_perturbation(rng, cunit), -1.0, 1.0))
        wc = sigmoid(-(cdist - crad) / _SOLID_EDGE)
        tex = ggo * (1.0 - wc) + core_tex * wc
        w = sigmoid(-signed / _GGO_EDGE)
    else:  # pragma: no cover - plans only use TEXTURES
        raise ValueError(texture)
    box = img[sl]
    img[sl] = box * (1.0 - w) + tex.astype(np.float32) * w
    return sl, mask
