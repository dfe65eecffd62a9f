"""HungarianMatcher: hand-built cost matrices with known optimal assignments, costs, edge cases."""

import itertools

import pytest
import torch

from ov_seg.modeling.matcher import (
    HungarianMatcher,
    assign,
    pairwise_dice_cost,
    pairwise_sigmoid_focal_cost,
)


def _brute_force(cost):
    q, n = cost.shape
    best, best_perm = float("inf"), None
    for rows in itertools.permutations(range(q), n):
        total = sum(cost[r, c].item() for c, r in enumerate(rows))
        if total < best:
            best, best_perm = total, rows
    return best, best_perm


def test_assign_known_optimum():
    # greedy (row 0 takes col 0 at cost 1) is not optimal: the optimum pairs 0-1 and 1-0 (total 2 +
    # 2 = 4 < 1 + 10)
    cost = torch.tensor([[1.0, 2.0], [2.0, 10.0]])
    rows, cols = assign(cost)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_assign_rectangular_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(6, 3, generator=g)
    rows, cols = assign(cost)
    assert len(rows) == 3 and len(set(rows.tolist())) == 3
    best, _ = _brute_force(cost)
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-6)


def test_assign_empty_and_nonfinite():
    rows, cols = assign(torch.zeros(5, 0))
    assert rows.numel() == 0 and cols.numel() == 0
    cost = torch.tensor([[float("inf"), 1.0], [0.5, float("nan")]])
    rows, cols = assign(cost)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]


def test_pairwise_costs_prefer_identical_masks():
    a = torch.zeros(8, 8)
    a[:4] = 1
    b = 1 - a
    targets = torch.stack([a, b]).flatten(1)
    logits = (torch.stack([b, a]) * 20 - 10).flatten(1)  # query 0 predicts b, query 1 predicts a
    for cost in (pairwise_dice_cost(logits, targets), pairwise_sigmoid_focal_cost(logits, targets)):
        assert cost.shape == (2, 2)
        assert cost[0, 1] < cost[0, 0] and cost[1, 0] < cost[1, 1]
    dice = pairwise_dice_cost(logits, targets)
    assert dice[0, 1].item() == pytest.approx(0.0, abs=1e-3)


def test_matcher_finds_the_right_queries():
    h = w = 16
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, :6, :6] = True
    masks[1, 8:, 8:] = True
    masks[2, :, 12:] = True
    labels = torch.tensor([2, 0, 1])
    q = 7
    pred_masks = torch.full((1, q, h // 2, w // 2), -10.0)
    pred_logits = torch.zeros(1, q, 4)
    # query 5 predicts segment 0, query 1 segment 1, query 3 segment 2 (at half resolution)
    for query, seg in ((5, 0), (1, 1), (3, 2)):
        small = torch.nn.functional.interpolate(
            masks[seg][None, None].float(), size=(h // 2, w // 2), mode="area"
        )
        small = small[0, 0]
        pred_masks[0, query] = small * 20 - 10
        pred_logits[0, query, labels[seg]] = 5.0
    for num_points in (0, 64):
        matcher = HungarianMatcher(num_points=num_points)
        ((rows, cols),) = matcher(pred_logits, pred_masks, [{"labels": labels, "masks": masks}])
        assert dict(zip(cols.tolist(), rows.tolist())) == {0: 5, 1: 1, 2: 3}


def test_matcher_empty_targets():
    matcher = HungarianMatcher()
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8)}]
    ((rows, cols),) = matcher(torch.zeros(1, 4, 2), torch.zeros(1, 4, 4, 4), targets)
    assert rows.numel() == 0 and cols.numel() == 0
