"""Hungarian (bipartite) matching of predicted masks to ground-truth segments, as in MaskFormer."""

from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.projects.point_rend.point_features import point_sample
from torch import nn
from torch.nn import functional as F

__all__ = [
    "HungarianMatcher",
    "pairwise_sigmoid_focal_cost",
    "pairwise_dice_cost",
    "assign",
]


def pairwise_sigmoid_focal_cost(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss of every prediction against every target, averaged over pixels.

    Args:
        logits: (Q, P) mask logits at P pixels / points.
        targets: (N, P) target masks in [0, 1].
        alpha: weight of positive pixels (negatives get 1 - alpha); < 0 disables the weighting.
        gamma: focusing exponent.

    Returns:
        (Q, N) costs.
    """
    prob = logits.sigmoid()
    # per-pixel loss when the target is 1 (pos) or 0 (neg); linear in the target, so a matmul does
    # all pairs
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    pos = pos * (1 - prob) ** gamma
    neg = neg * prob**gamma
    if alpha >= 0:
        pos, neg = pos * alpha, neg * (1 - alpha)
    return (pos @ targets.T + neg @ (1 - targets).T) / max(logits.shape[1], 1)


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice cost 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) of every prediction against every
    target.

    Args:
        logits: (Q, P) mask logits. targets: (N, P) target masks in [0, 1].

    Returns:
        (Q, N) costs.
    """
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def assign(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment (scipy's ``linear_sum_assignment``).

    Args:
        cost: (Q, N) cost matrix; non-finite entries are treated as very large costs.

    Returns:
        (pred_idx, tgt_idx), int64 tensors of length min(Q, N), sorted by pred_idx.
    """
    c = cost.detach().float().cpu().numpy()
    if c.size == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    finite = np.isfinite(c)
    if not finite.all():
        big = np.abs(c[finite]).max(initial=0.0) * 2 + 1e6
        c = np.where(finite, c, big)
    # imported here: scipy.optimize costs ~0.6 s at import, and only training needs it
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one matching of the Q predictions of each image to its N ground-truth segments.

    cost = cost_class · (−p(class of the target)) + cost_focal · focal + cost_dice · dice, where the
    mask costs compare the predicted logits with the targets resized to the prediction size (area
    interpolation, i.e. soft targets), or at ``num_points`` random points when ``num_points`` > 0.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_focal: float = 20.0,
        cost_dice: float = 1.0,
        num_points: int = 0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            cost_class, cost_focal, cost_dice: cost weights (OVSeg: 1, 20, 1).
            num_points: points sampled uniformly per image for the mask costs (0 = all pixels).
            focal_alpha, focal_gamma: focal loss parameters.
        """
        super().__init__()
        if cost_class == 0 and cost_focal == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_focal = cost_focal
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _mask_inputs(self, pred: torch.Tensor, tgt: torch.Tensor):
        """Predictions (Q, h, w) and targets (N, H, W) → (Q, P), (N, P) at common pixels /
        points."""
        tgt = tgt.to(pred.dtype)
        if self.num_points > 0:
            coords = torch.rand(1, self.num_points, 2, device=pred.device)
            pred = point_sample(
                pred[:, None], coords.expand(pred.shape[0], -1, -1), align_corners=False
            )
            tgt = point_sample(
                tgt[:, None], coords.expand(tgt.shape[0], -1, -1), align_corners=False
            )
            return pred[:, 0], tgt[:, 0]
        if tgt.shape[-2:] != pred.shape[-2:]:
            tgt = F.interpolate(tgt[:, None], size=pred.shape[-2:], mode="area")[:, 0]
        return pred.flatten(1), tgt.flatten(1)

    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            pred_logits: (Q, K + 1) class logits. pred_masks: (Q, h, w) mask logits.
            labels: (N,) target classes in [0, K). masks: (N, H, W) target masks.

        Returns:
            (Q, N) matching costs.
        """
        cost = -pred_logits.float().softmax(-1)[:, labels] * self.cost_class
        if self.cost_focal or self.cost_dice:
            pred, tgt = self._mask_inputs(pred_masks.float(), masks)
            if self.cost_focal:
                focal = pairwise_sigmoid_focal_cost(pred, tgt, self.focal_alpha, self.focal_gamma)
                cost = cost + self.cost_focal * focal
            if self.cost_dice:
                cost = cost + self.cost_dice * pairwise_dice_cost(pred, tgt)
        return cost

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            pred_logits: (B, Q, K + 1) class logits.
            pred_masks: (B, Q, h, w) mask logits.
            targets: per image, ``labels`` (N,) int64 and ``masks`` (N, H, W) (N may be 0).

        Returns:
            per image (pred_idx, tgt_idx): int64 tensors of length min(Q, N) on the CPU.
        """
        indices = []
        for logits, masks, t in zip(pred_logits, pred_masks, targets):
            if len(t["labels"]) == 0:
                indices.append(assign(logits.new_zeros(logits.shape[0], 0)))
            else:
                indices.append(assign(self.cost_matrix(logits, masks, t["labels"], t["masks"])))
        return indices
