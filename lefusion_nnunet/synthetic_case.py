"""A synthetic training case, stored as its source case plus what the variant changes (:class:`SyntheticCase`).

Made by :mod:`lefusion_nnunet.variants`; written whole by the enlarger, read box by box by the trainer's patch
maker. Arrays are native ``(Z, Y, X)``; boxes are ``(3, 2)`` int ``[start, stop)`` voxels per axis (z, y, x).
"""
from __future__ import annotations

import numpy as np

from lefusion_nnunet.data.io import ImageVolume

__all__ = ["SyntheticCase"]


class SyntheticCase:
    """One synthetic training case: its source case plus what the variant changes.

    Stored sparsely: the source's channels and label (shared, never written) and, inside :attr:`box`, the changed
    channel(s) and the label. Every voxel that differs from the source lies inside the box, so consumers that
    need only the change (the trainer's patch bank) never copy a whole case; :attr:`channels` and :attr:`label`
    build whole arrays on each access (the enlarger's writer).

    Args (whole arrays, as the synthesizer used to return them; :meth:`from_edit` is the sparse form):
        case_id: ``f"{source_case}_lefusion{k:03d}"``.
        source_case: the real case it was made from.
        channels: native ``(Z, Y, X)`` arrays, one per image channel; only the model channel differs from the
            source, and only inside the lesion.
        label: ``(Z, Y, X)`` int16: source label with the lesion class values written inside the lesion.
        provenance: JSON-safe record (source, mask source, centre, volume, texture, seeds, sampler, checkpoint).
        reference: the source :class:`ImageVolume` (geometry and stored pixel types for writing).
        label_properties: the source label's reader properties (geometry and stored pixel type).
    """

    def __init__(self, case_id: str, source_case: str, channels: list[np.ndarray], label: np.ndarray,
                 provenance: dict, reference: ImageVolume | None = None, label_properties: dict | None = None):
        self.case_id, self.source_case, self.provenance = case_id, source_case, provenance
        self.reference, self.label_properties = reference, label_properties
        self._base_channels, self._base_label = list(channels), label
        self.box = self._full_box  # every voxel may differ (whole arrays); from_edit narrows it
        self._edited: dict[int, np.ndarray] = {}
        self._label_box: np.ndarray | None = None

    @classmethod
    def from_edit(cls, case_id: str, source_case: str, source: ImageVolume, source_label: np.ndarray,
                  box: np.ndarray, edited_channels: dict[int, np.ndarray], label_box: np.ndarray, provenance: dict,
                  label_properties: dict | None = None) -> "SyntheticCase":
        """The sparse form: ``source`` and ``source_label`` unchanged outside ``box`` (``(3, 2)`` ``[start, stop)``
        native voxels, z y x); ``edited_channels`` (channel index -> array of the box's shape) and ``label_box``
        are the variant inside it."""
        case = cls(case_id, source_case, [source.channel(i) for i in range(source.array.shape[0])], source_label,
                   provenance, reference=source, label_properties=label_properties)
        case.box = np.asarray(box, np.int64).reshape(3, 2)
        case._edited, case._label_box = dict(edited_channels), label_box
        return case

    @property
    def num_channels(self) -> int:
        return len(self._base_channels)

    def _slices(self, box) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in np.asarray(box).reshape(3, 2))  # type: ignore[return-value]

    def _paste(self, base: np.ndarray, part: np.ndarray | None, box) -> np.ndarray:
        """``base`` inside ``box`` with this case's ``part`` (on :attr:`box`) pasted where the two overlap."""
        box = np.asarray(box, np.int64).reshape(3, 2)
        out = np.array(base[self._slices(box)], copy=True)
        if part is not None:
            lo, hi = np.maximum(box[:, 0], self.box[:, 0]), np.minimum(box[:, 1], self.box[:, 1])
            if (hi > lo).all():
                out[self._slices(np.stack([lo - box[:, 0], hi - box[:, 0]], 1))] = \
                    part[self._slices(np.stack([lo - self.box[:, 0], hi - self.box[:, 0]], 1))].astype(out.dtype)
        return out

    def channel_in(self, index: int, box) -> np.ndarray:
        """Channel ``index`` of the variant inside ``box`` (``(3, 2)`` native voxels), a new array."""
        return self._paste(self._base_channels[index], self._edited.get(index), box)

    def label_in(self, box) -> np.ndarray:
        """The variant's label inside ``box`` (``(3, 2)`` native voxels), a new array."""
        return self._paste(self._base_label, self._label_box, box)

    def channel(self, index: int) -> np.ndarray:
        """Channel ``index`` as a whole ``(Z, Y, X)`` array (the source's own array when it is unchanged)."""
        if index not in self._edited:
            return self._base_channels[index]
        return self.channel_in(index, self._full_box)

    @property
    def _full_box(self) -> np.ndarray:
        return np.stack([np.zeros(3, np.int64), np.asarray(np.shape(self._base_label), np.int64)], axis=1)

    @property
    def channels(self) -> list[np.ndarray]:
        """Every channel as a whole ``(Z, Y, X)`` array (changed ones built on each access)."""
        return [self.channel(i) for i in range(self.num_channels)]

    @property
    def label(self) -> np.ndarray:
        """The whole ``(Z, Y, X)`` label (built on each access for a sparse case)."""
        return self._base_label if self._label_box is None else self.label_in(self._full_box)
