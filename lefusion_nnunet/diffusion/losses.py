"""Lesion-focused training loss: noise-prediction error inside the lesion masks only.

Each (sample, class) pair contributes the mean squared eps error over its own lesion voxels, so a
5-voxel nodule weighs as much as a 5,000-voxel one (the reference release averaged over all voxels,
which starved small lesions of gradient). Masks use 1 = lesion = region the model must generate.
"""
from __future__ import annotations

import torch
from torch import Tensor


def masked_epsilon_loss(eps_pred: Tensor, eps: Tensor, class_masks: Tensor) -> Tensor:
    """Mean over (sample, class) pairs with at least one lesion voxel of that pair's masked MSE.

    Args:
        eps_pred: (B, C, Z, Y, X) predicted noise (any float dtype; the loss is computed in float32).
        eps: (B, C, Z, Y, X) true noise.
        class_masks: (B, C, Z, Y, X) {0, 1} (bool or float); channel c supervises image channel c.
            A (B, 1, Z, Y, X) mask is broadcast over channels.
    Returns:
        A scalar float32 tensor. Pairs without voxels are skipped; if no pair has voxels the result
        is exactly 0 and still attached to the graph (backward gives zero gradients). The gradient w.r.t. ``eps_pred``
        is exactly zero outside the masks, even where predictions are not finite.
    """
    if eps_pred.shape != eps.shape:
        raise ValueError(f"eps_pred {tuple(eps_pred.shape)} and eps {tuple(eps.shape)} must have the same shape")
    if eps_pred.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial) tensors, got shape {tuple(eps_pred.shape)}")
    inside = torch.broadcast_to(class_masks.to(device=eps_pred.device) > 0.5, eps_pred.shape)
    diff = torch.where(inside, eps_pred.float() - eps.float(), torch.zeros((), device=eps_pred.device))
    spatial = tuple(range(2, eps_pred.ndim))
    sq_sum = (diff * diff).sum(dim=spatial)                       # (B, C)
    count = inside.sum(dim=spatial)                               # (B, C)
    has_voxels = (count > 0).to(sq_sum.dtype)
    per_pair = sq_sum / count.clamp(min=1).to(sq_sum.dtype)     # 0 for pairs without voxels
    # Branch-free mean over pairs with voxels (no host sync); exactly 0, still differentiable, if none.
    return (per_pair * has_voxels).sum() / has_voxels.sum().clamp(min=1.0)
