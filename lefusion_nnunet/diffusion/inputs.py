"""The lesion model's inputs, built by one function for training and for inference.

Training (:mod:`lefusion_nnunet.training.lesion`) and sampling (:mod:`lefusion_nnunet.synthesis.lesion`) both call
:func:`lesion_model_inputs` on an ROI in model space and its class masks, so the network never sees at inference an
input it was not trained on: the generation region is exactly the union of the class masks, the context is the ROI
with that region zeroed, and the known image is the ROI repeated once per lesion class (multi-channel decomposition).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class LesionModelInputs:
    """What the denoiser and the sampler get for a batch of lesion ROIs (model units [-1, 1]).

    Attributes:
        known: ``(B, C, Z, Y, X)`` the real ROI, one copy per lesion class (what the background is kept as).
        context: ``(B, 1, Z, Y, X)`` the ROI with the generation region zeroed (the denoiser's context channel).
        class_masks: ``(B, C, Z, Y, X)`` float {0, 1}, one mask per lesion class.
        generate: ``(B, 1, Z, Y, X)`` float {0, 1}: the union of the class masks, the region the model fills.
    """

    known: Tensor
    context: Tensor
    class_masks: Tensor
    generate: Tensor


def lesion_model_inputs(roi: Tensor, class_masks: Tensor) -> LesionModelInputs:
    """Build the model's inputs from an ROI ``(B, 1, Z, Y, X)`` and its class masks ``(B, C, Z, Y, X)`` (bool or
    {0, 1}); all outputs are on the ROI's device and dtype."""
    masks = class_masks.to(roi.dtype)
    generate = masks.amax(1, keepdim=True)
    return LesionModelInputs(known=roi.expand(-1, masks.shape[1], -1, -1, -1).contiguous(),
                             context=roi * (1.0 - generate), class_masks=masks, generate=generate)
