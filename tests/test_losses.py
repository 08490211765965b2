"""masked_epsilon_loss: inside-lesion only, normalised per (sample, class) pair."""
import pytest
import torch

from lefusion_nnunet.diffusion.losses import masked_epsilon_loss

S = (8, 8, 8)


def _ball(radius, center=(4, 4, 4)):
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in S], indexing="ij")
    return ((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2) <= radius ** 2


def test_zero_gradient_outside_masks():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 2, *S, generator=g)
    eps_pred = torch.randn(2, 2, *S, generator=g)
    eps_pred[~torch.broadcast_to(_ball(2), eps_pred.shape)] = float("nan")  # outside values must not matter
    eps_pred.requires_grad_(True)
    masks = torch.stack([torch.stack([_ball(2), _ball(1)]), torch.stack([_ball(3), torch.zeros(S, dtype=torch.bool)])])
    masks = masks & _ball(2)
    loss = masked_epsilon_loss(eps_pred, eps, masks.float())
    assert torch.isfinite(loss)
    loss.backward()
    assert bool((eps_pred.grad[~masks] == 0).all())
    assert bool((eps_pred.grad[masks] != 0).all())


def test_small_and_big_lesion_weigh_the_same():
    eps = torch.zeros(1, 1, *S)
    small, big = _ball(1)[None, None], _ball(3)[None, None]
    assert int(small.sum()) * 10 < int(big.sum())
    pred = eps + 0.5
    assert float(masked_epsilon_loss(pred, eps, small)) == pytest.approx(0.25)
    assert float(masked_epsilon_loss(pred, eps, big)) == pytest.approx(0.25)
    # In one batch each sample counts equally, whatever its lesion size: (0.5^2 + 1^2) / 2.
    eps2 = torch.zeros(2, 1, *S)
    pred2 = torch.stack([torch.full((1, *S), 0.5), torch.full((1, *S), 1.0)])
    masks2 = torch.cat([small, big])
    assert float(masked_epsilon_loss(pred2, eps2, masks2)) == pytest.approx(0.625)


def test_class_loss_unaffected_by_other_class_voxels():
    m0, m1 = _ball(1, (2, 2, 2)), _ball(1, (5, 5, 5))
    masks = torch.stack([m0, m1])[None].float()
    eps = torch.zeros(1, 2, *S)
    pred = torch.zeros(1, 2, *S)
    pred[0, 0][m0] = 1.0
    pred[0, 1][m1] = 2.0
    base = float(masked_epsilon_loss(pred, eps, masks))
    assert base == pytest.approx((1.0 + 4.0) / 2)
    changed = pred.clone()
    changed[0, 0][m1] = 100.0   # channel 0 inside class 1's lesion
    changed[0, 1][m0] = -50.0   # channel 1 inside class 0's lesion
    assert float(masked_epsilon_loss(changed, eps, masks)) == base


def test_empty_masks_give_zero_and_backward_works():
    pred = torch.randn(2, 2, *S, requires_grad=True)
    loss = masked_epsilon_loss(pred, torch.zeros(2, 2, *S), torch.zeros(2, 2, *S))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().max()) == 0.0


def test_single_channel_mask_broadcasts_and_empty_pairs_are_skipped():
    pred, eps = torch.ones(2, 2, *S), torch.zeros(2, 2, *S)
    mask = torch.stack([_ball(2), torch.zeros(S, dtype=torch.bool)])[:, None]  # sample 1 has no lesion
    assert float(masked_epsilon_loss(pred, eps, mask)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        masked_epsilon_loss(pred, eps[:1], mask)
