"""The lesion model's inputs, built by one function for training and for inference.

Training (:mod:`lefusion_nnunet.training.lesion`) and sampling (:mod:`lefusion_nnunet.synthesis.lesion`) both call
:func:`lesion_model_inputs` on an ROI in model space and its class masks, so the network never sees at inference an
input it was not trained on: the generation region is the union of the class masks plus an optional border ring of
``border_ring`` model voxels around it (where real lesions end in partial-volume blur that their labels cut
through; the ring belongs to the outermost class and is supervised in training), the context is the ROI with that
region zeroed, and the known image is the ROI repeated once per lesion class (multi-channel decomposition).

Ring shapes (:data:`RING_SHAPES`; each step grows the region by one voxel):

* ``"cube"``: the 26-neighbourhood along every axis (the ring of checkpoints written before the shape was
  recorded);
* ``"faces"``: the 6-neighbourhood (face neighbours) along every axis;
* ``"in-plane"``: the full (8-) neighbourhood along the *fine* axes only, those whose spacing is at most
  :data:`FINE_AXIS_RATIO` times the finest (thick slices get no ring across them; an isotropic grid: ``"cube"``);
* ``"in-plane-faces"``: face neighbours along the fine axes only (an isotropic grid: ``"faces"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

#: The border ring shapes (see the module docstring); "cube" is what older checkpoints used.
RING_SHAPES: tuple[str, ...] = ("cube", "faces", "in-plane", "in-plane-faces")
#: An axis is "fine" (the in-plane shapes grow along it) when its spacing is <= this times the finest spacing.
FINE_AXIS_RATIO = 1.5


@dataclass
class LesionModelInputs:
    """What the denoiser and the sampler get for a batch of lesion ROIs (model units [-1, 1]).

    Attributes:
        known: ``(B, C, Z, Y, X)`` the real ROI, one copy per lesion class (what the background is kept as).
        context: ``(B, 1, Z, Y, X)`` the ROI with the generation region zeroed (the denoiser's context channel).
        class_masks: ``(B, C, Z, Y, X)`` float {0, 1}, one mask per lesion class; class 0 (the outermost) also
            holds the border ring.
        generate: ``(B, 1, Z, Y, X)`` float {0, 1}: the region the model fills (class masks and ring).
    """

    known: Tensor
    context: Tensor
    class_masks: Tensor
    generate: Tensor


def ring_axes(ring_shape: str, spacing_zyx: Sequence[float] | None) -> tuple[int, ...]:
    """The axes (0 = z, 1 = y, 2 = x) a ring of ``ring_shape`` grows along on a grid of ``spacing_zyx`` mm.

    ``"cube"`` and ``"faces"`` grow along all three (no spacing needed); the in-plane shapes along the axes whose
    spacing is at most :data:`FINE_AXIS_RATIO` times the finest (``spacing_zyx`` required)."""
    if ring_shape not in RING_SHAPES:
        raise ValueError(f"border ring shape {ring_shape!r} is not one of {', '.join(RING_SHAPES)}")
    if not ring_shape.startswith("in-plane"):
        return (0, 1, 2)
    if spacing_zyx is None or len(spacing_zyx) != 3 or not all(float(s) > 0 for s in spacing_zyx):
        raise ValueError(f"the {ring_shape!r} border ring needs the grid's three positive (z, y, x) spacings in mm, "
                         f"got {spacing_zyx!r}")
    finest = min(float(s) for s in spacing_zyx)
    return tuple(a for a, s in enumerate(spacing_zyx) if float(s) <= FINE_AXIS_RATIO * finest + 1e-9)


def border_ring_region(union: Tensor, border_ring: int, ring_shape: str = "cube",
                       spacing_zyx: Sequence[float] | None = None) -> Tensor:
    """``union`` ``(B, 1, Z, Y, X)`` {0, 1} grown by ``border_ring`` voxel steps of ``ring_shape`` (see the module
    docstring) on a grid of ``spacing_zyx`` mm (needed by the in-plane shapes only)."""
    axes = ring_axes(ring_shape, spacing_zyx)
    faces = ring_shape.endswith("faces")
    grown = union
    for _ in range(int(border_ring)):
        if faces:  # union of one-axis dilations = the face neighbours along those axes
            step = grown
            for a in axes:
                kernel = tuple(3 if i == a else 1 for i in range(3))
                padding = tuple(1 if i == a else 0 for i in range(3))
                step = step.maximum(F.max_pool3d(grown, kernel_size=kernel, stride=1, padding=padding))
            grown = step
        else:
            kernel = tuple(3 if i in axes else 1 for i in range(3))
            padding = tuple(1 if i in axes else 0 for i in range(3))
            grown = F.max_pool3d(grown, kernel_size=kernel, stride=1, padding=padding)
    return grown


def lesion_model_inputs(roi: Tensor, class_masks: Tensor, border_ring: int = 0, ring_shape: str = "cube",
                        spacing_zyx: Sequence[float] | None = None) -> LesionModelInputs:
    """Build the model's inputs from an ROI ``(B, 1, Z, Y, X)`` and its class masks ``(B, C, Z, Y, X)`` (bool or
    {0, 1}), with a border ring of ``border_ring`` voxel steps of ``ring_shape`` on the model grid of
    ``spacing_zyx`` mm (:func:`border_ring_region`); outputs are on the ROI's device and dtype."""
    masks = class_masks.to(roi.dtype)
    generate = border_ring_region(masks.amax(1, keepdim=True), border_ring, ring_shape, spacing_zyx)
    if border_ring:
        masks = masks.clone()
        masks[:, :1] = masks[:, :1] + generate - masks.amax(1, keepdim=True)  # the ring joins the outer class
    return LesionModelInputs(known=roi.expand(-1, masks.shape[1], -1, -1, -1).contiguous(),
                             context=roi * (1.0 - generate), class_masks=masks, generate=generate)
