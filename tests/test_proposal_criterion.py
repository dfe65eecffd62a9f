"""SetCriterion: empty ground truth, one / many segments, deep supervision, point sampling."""

import math

import pytest
import torch

from ov_seg.modeling.criterion import SetCriterion, dice_loss, sigmoid_focal_loss
from ov_seg.modeling.matcher import HungarianMatcher

L, B, Q, K, H, W = 3, 2, 6, 4, 16, 16


def _criterion(num_points=0):
    return SetCriterion(matcher=HungarianMatcher(num_points=num_points), num_points=num_points)


def _outputs(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(L, B, Q, K + 1, generator=g).requires_grad_(requires_grad)
    masks = torch.randn(L, B, Q, H // 4, W // 4, generator=g).requires_grad_(requires_grad)
    return {"pred_logits": logits, "pred_masks": masks}


def _target(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, H, W, dtype=torch.bool)
    for i in range(n):  # 4-aligned squares: exact at the predictions' 1/4 resolution
        y, x = (torch.randint(0, 3, (2,), generator=g) * 4).tolist()
        masks[i, y : y + 8, x : x + 4] = True
    return {"labels": torch.randint(0, K, (n,), generator=g), "masks": masks}


def _check(losses, num_layers=L):
    names = {"loss_ce", "loss_mask", "loss_dice"}
    expected = names | {f"{n}_{i}" for n in names for i in range(num_layers - 1)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


@pytest.mark.parametrize("num_points", [0, 32])
@pytest.mark.parametrize("counts", [(0, 0), (1, 0), (5, 3)], ids=["empty", "one", "many"])
def test_losses_finite_with_gradients(counts, num_points):
    outputs = _outputs()
    targets = [_target(n, seed=i + 1) for i, n in enumerate(counts)]
    losses = _criterion(num_points)(outputs, targets)
    _check(losses)
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert torch.isfinite(outputs["pred_masks"].grad).all()
    if sum(counts) == 0:
        # no segment: mask losses are exactly zero, all queries are pushed to "no object"
        assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
        assert losses["loss_ce"].item() > 0


def test_empty_ground_truth_ce_is_no_object_ce():
    outputs = _outputs(requires_grad=False)
    targets = [_target(0), _target(0)]
    losses = _criterion()(outputs, targets)
    expected = torch.nn.functional.cross_entropy(
        outputs["pred_logits"][-1].reshape(-1, K + 1), torch.full((B * Q,), K)
    )
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_perfect_prediction_has_lower_loss():
    targets = [_target(3, seed=5), _target(1, seed=6)]
    outputs = _outputs(requires_grad=False)
    perfect = {k: v.clone() for k, v in outputs.items()}
    for b, t in enumerate(targets):
        for i, (label, mask) in enumerate(zip(t["labels"], t["masks"])):
            small = torch.nn.functional.interpolate(
                mask[None, None].float(), size=(H // 4, W // 4), mode="area"
            )
            perfect["pred_masks"][:, b, i] = (small[0, 0] - 0.5) * 40
            perfect["pred_logits"][:, b, i] = -10
            perfect["pred_logits"][:, b, i, label] = 10
        perfect["pred_logits"][:, b, len(t["labels"]) :] = -10
        perfect["pred_logits"][:, b, len(t["labels"]) :, K] = 10
    crit = _criterion()
    bad, good = crit(outputs, targets), crit(perfect, targets)
    for name in ("loss_ce", "loss_mask", "loss_dice"):
        assert good[name] < bad[name], name
    assert good["loss_ce"].item() < 1e-3


def test_weights_and_normalisation():
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert dice_loss(logits, targets, 2).item() == pytest.approx(0.0, abs=1e-3)
    # focal loss of a p = 0.5 prediction on a positive pixel: alpha * 0.5^gamma * log 2
    zero = torch.zeros(1, 1)
    assert sigmoid_focal_loss(zero, torch.ones(1, 1), 1).item() == pytest.approx(
        0.25 * 0.25 * math.log(2)
    )
    crit = SetCriterion(
        matcher=HungarianMatcher(), class_weight=2.0, mask_weight=0.0, dice_weight=3.0
    )
    outputs = _outputs(requires_grad=False)
    targets = [_target(2), _target(2, seed=3)]
    unit = SetCriterion(
        matcher=HungarianMatcher(), class_weight=1.0, mask_weight=1.0, dice_weight=1.0
    )
    weighted, plain = crit(outputs, targets), unit(outputs, targets)
    assert weighted["loss_ce"].item() == pytest.approx(2 * plain["loss_ce"].item(), rel=1e-5)
    assert weighted["loss_dice"].item() == pytest.approx(3 * plain["loss_dice"].item(), rel=1e-5)
    assert weighted["loss_mask"].item() == 0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="pred_logits"):
        _criterion()(
            {"pred_logits": torch.zeros(B, Q, K + 1), "pred_masks": torch.zeros(B, Q, 4, 4)}, []
        )
