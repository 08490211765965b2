"""The lesion model's inputs, built by one function for training and for inference.

Training (:mod:`lefusion_nnunet.training.lesion`) and sampling (:mod:`lefusion_nnunet.synthesis.lesion`) both call
:func:`lesion_model_inputs` on an ROI in model space and its class masks, so the network never sees at inference an
input it was not trained on: the generation region is the union of the class masks plus an optional border ring of
``border_ring`` model voxels around it (where real lesions end in partial-volume blur that their labels cut
through; the ring belongs to the outermost class and is supervised in training), the context is the ROI with that
region zeroed, and the known image is the ROI repeated once per lesion class (multi-channel decomposition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


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


def border_ring_region(union: Tensor, border_ring: int) -> Tensor:
    """``union`` ``(B, 1, Z, Y, X)`` {0, 1} grown by ``border_ring`` voxels (26-neighbourhood per voxel step)."""
    grown = union
    for _ in range(int(border_ring)):
        grown = F.max_pool3d(grown, kernel_size=3, stride=1, padding=1)
    return grown


def lesion_model_inputs(roi: Tensor, class_masks: Tensor, border_ring: int = 0) -> LesionModelInputs:
    """Build the model's inputs from an ROI ``(B, 1, Z, Y, X)`` and its class masks ``(B, C, Z, Y, X)`` (bool or
    {0, 1}), with a border ring of ``border_ring`` model voxels; outputs are on the ROI's device and dtype."""
    masks = class_masks.to(roi.dtype)
    generate = border_ring_region(masks.amax(1, keepdim=True), border_ring)
    if border_ring:
        masks = masks.clone()
        masks[:, :1] = masks[:, :1] + generate - masks.amax(1, keepdim=True)  # the ring joins the outer class
    return LesionModelInputs(known=roi.expand(-1, masks.shape[1], -1, -1, -1).contiguous(),
                             context=roi * (1.0 - generate), class_masks=masks, generate=generate)
