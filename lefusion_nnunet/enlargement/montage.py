"""Quick-look montage of synthetic lesions: one row per lesion, axial slice through its centre.

Columns: the source case, the synthetic case, and the synthetic case with the lesion mask overlaid. Each
row is cropped around the lesion (at least 64 voxels, or 3x the lesion's in-plane size) and shown with the
physical aspect ratio of the voxels. Rendering uses matplotlib's Agg backend (no display needed) and the
PNG is written atomically.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lefusion_nnunet.utils import atomic_write_bytes

#: Default cap on the number of rows.
MAX_ROWS = 24


@dataclass
class MontageRow:
    """One lesion: ``(Y, X)`` slices of the source and synthetic image, the lesion mask, and display info.

    Attributes:
        title: row label (e.g. the synthetic case id and lesion diameter).
        source, synthetic: native-unit axial slices ``(Y, X)``.
        mask: bool ``(Y, X)``, True = synthetic lesion.
        aspect: ``spacing_y / spacing_x`` (imshow aspect).
        window: display range (native units); None -> 1st-99th percentile of the source slice.
    """

    title: str
    source: np.ndarray
    synthetic: np.ndarray
    mask: np.ndarray
    aspect: float = 1.0
    window: tuple[float, float] | None = None


def crop_box(mask_yx: np.ndarray, min_size: int = 64, factor: float = 3.0) -> tuple[slice, slice]:
    """A square-ish crop around a 2D mask: ``max(min_size, factor * extent)`` voxels, clipped to the image."""
    shape = np.asarray(mask_yx.shape)
    idx = np.argwhere(mask_yx)
    if len(idx) == 0:
        return slice(0, int(shape[0])), slice(0, int(shape[1]))
    center = (idx.min(0) + idx.max(0)) / 2.0
    extent = idx.max(0) - idx.min(0) + 1
    size = np.minimum(np.maximum(min_size, np.ceil(factor * extent.max())), shape).astype(int)
    lo = np.clip(np.round(center - size / 2.0).astype(int), 0, shape - size)
    return slice(int(lo[0]), int(lo[0] + size[0])), slice(int(lo[1]), int(lo[1] + size[1]))


def row_from_volumes(title: str, source_zyx: np.ndarray, synthetic_zyx: np.ndarray, mask_zyx: np.ndarray,
                     spacing_zyx: Sequence[float], window: tuple[float, float] | None = None,
                     center_z: int | None = None) -> MontageRow:
    """A :class:`MontageRow` from 3D volumes: the axial slice through the lesion centre (or ``center_z``)."""
    mask_zyx = np.asarray(mask_zyx, bool)
    if center_z is None:
        zs = np.flatnonzero(mask_zyx.any((1, 2)))
        center_z = int(round((zs.min() + zs.max()) / 2.0)) if len(zs) else source_zyx.shape[0] // 2
    sy, sx = crop_box(mask_zyx[center_z])
    return MontageRow(title, np.asarray(source_zyx[center_z][sy, sx], np.float32),
                      np.asarray(synthetic_zyx[center_z][sy, sx], np.float32), mask_zyx[center_z][sy, sx],
                      aspect=float(spacing_zyx[1]) / float(spacing_zyx[2]), window=window)


def render_montage(rows: Sequence[MontageRow], out_file: Path | str, max_rows: int = MAX_ROWS,
                   title: str | None = None, dpi: int = 80) -> Path:
    """Write a PNG montage (rows beyond ``max_rows`` are left out and counted in the title)."""
    from matplotlib.figure import Figure  # object API with the Agg canvas: no pyplot, no global backend

    shown = list(rows)[:max_rows]
    n = max(1, len(shown))
    height = 2.5 * n + 0.6
    fig = Figure(figsize=(7.5, height), dpi=dpi)
    axes = fig.subplots(n, 3, squeeze=False)
    for r, row in enumerate(shown):
        lo, hi = row.window or tuple(np.percentile(row.source, [1, 99]))
        if not hi > lo:
            hi = lo + 1.0
        for c, (img, name) in enumerate(((row.source, "source"), (row.synthetic, "synthetic"),
                                         (row.synthetic, "lesion mask"))):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=row.aspect, interpolation="nearest")
            if c == 2 and row.mask.any():
                overlay = np.zeros((*row.mask.shape, 4), np.float32)
                overlay[row.mask] = (1.0, 0.15, 0.1, 0.45)
                ax.imshow(overlay, aspect=row.aspect, interpolation="nearest")
                ax.contour(row.mask.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(row.title, fontsize=7)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no synthetic lesions", ha="center", va="center")
        for ax in axes[0]:
            ax.set_axis_off()
    head = title or "LeFusion synthetic lesions"
    if len(rows) > len(shown):
        head += f" (first {len(shown)} of {len(rows)})"
    fig.suptitle(head, fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.5 / height))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    out_file = Path(out_file)
    atomic_write_bytes(out_file, buf.getvalue())
    return out_file
