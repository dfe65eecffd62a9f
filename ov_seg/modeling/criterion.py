"""MaskFormer set criterion: classification, sigmoid focal and dice losses on matched masks."""

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import nn
from torch.nn import functional as F

from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "sigmoid_focal_loss", "dice_loss"]


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss averaged over the pixels of each mask, summed over masks, / ``num_masks``.

    Args:
        logits: (M, P) mask logits. targets: (M, P) targets in [0, 1].
        num_masks: normaliser (number of ground-truth masks in the batch, averaged across workers).
        alpha: weight of positive pixels (negatives get 1 - alpha); < 0 disables it.
        gamma: focusing exponent.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per mask, summed, / ``num_masks``.

    Args:
        logits: (M, P) mask logits. targets: (M, P) targets in [0, 1]. num_masks: normaliser.
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def _resize_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """(N, H, W) masks → (N, *size) float by area interpolation (soft values at boundaries)."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[:, None], size=tuple(size), mode="area")[:, 0]


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of (M, 1, P) mask logits: −|logit| (highest at the decision boundary)."""
    return -torch.abs(logits)


class SetCriterion(nn.Module):
    """Losses of a mask-classification model (MaskFormer): match each decoder layer's predictions to
    the targets (``HungarianMatcher``), then

    - ``loss_ce``: cross-entropy over K classes + no object (unmatched queries → no object, whose
      class weight is ``no_object_weight``), weighted mean over queries;
    - ``loss_mask``: sigmoid focal loss of the matched masks; ``loss_dice``: dice loss;

    mask losses normalised by the number of target masks in the batch (averaged across workers,
    at least 1). Deep supervision: the same losses on every auxiliary (non-final) layer, named with
    a ``_{layer}`` suffix. Mask losses are dense (predictions upsampled to the target size, or
    targets resized to the prediction size) or, with ``num_points`` > 0, computed at ``num_points``
    points per mask chosen by uncertainty (PointRend), which bounds memory.
    Returned losses are already multiplied by their weights.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        class_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        loss_at_target_size: bool = True,
    ):
        """
        Args:
            matcher: the Hungarian matcher.
            class_weight, mask_weight, dice_weight: weights of loss_ce, loss_mask (focal),
                loss_dice.
            no_object_weight: class weight of "no object" in the cross-entropy.
            focal_alpha, focal_gamma: focal loss parameters.
            num_points: points per mask for the mask losses (0 = dense).
            oversample_ratio, importance_sample_ratio: PointRend importance sampling of the points.
            loss_at_target_size: dense losses with the predictions upsampled to the target size
                (MaskFormer); False: targets resized to the prediction size (area interpolation,
                soft targets; 16x cheaper at stride 4).
        """
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.loss_at_target_size = loss_at_target_size

    @staticmethod
    def num_masks(targets: List[Dict[str, torch.Tensor]], device) -> float:
        """Target masks in the batch, averaged across workers, at least 1."""
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / comm.get_world_size()
        return max(float(n.item()), 1.0)

    def loss_labels(self, logits: torch.Tensor, targets, indices) -> torch.Tensor:
        """Weighted cross-entropy. logits: (B, Q, K + 1)."""
        num_classes = logits.shape[-1] - 1
        target_classes = torch.full(
            logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (t, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices)):
            target_classes[b, pred_idx.to(logits.device)] = t["labels"][tgt_idx.to(logits.device)]
        weight = torch.ones(num_classes + 1, device=logits.device, dtype=logits.dtype)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(logits.transpose(1, 2), target_classes, weight)

    def _matched_masks(self, pred_masks, targets, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """Matched predictions (M, h, w) and targets (M, H, W) as float."""
        preds, tgts = [], []
        for b, (t, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices)):
            preds.append(pred_masks[b, pred_idx.to(pred_masks.device)])
            tgts.append(t["masks"][tgt_idx.to(t["masks"].device)])
        return torch.cat(preds), torch.cat(tgts).to(pred_masks.dtype)

    def loss_masks(self, pred_masks: torch.Tensor, targets, indices, num_masks: float):
        """Focal and dice losses of the matched masks. pred_masks: (B, Q, h, w) logits."""
        src, tgt = self._matched_masks(pred_masks, targets, indices)
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0  # keeps every mask parameter in the graph
            return zero, zero
        if self.num_points > 0:
            with torch.no_grad():
                coords = get_uncertain_point_coords_with_randomness(
                    src[:, None],
                    _uncertainty,
                    self.num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                )
                tgt = point_sample(tgt[:, None], coords, align_corners=False)[:, 0]
            src = point_sample(src[:, None], coords, align_corners=False)[:, 0]
        else:
            if src.shape[-2:] != tgt.shape[-2:]:
                src = F.interpolate(
                    src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False
                )[:, 0]
            src, tgt = src.flatten(1), tgt.flatten(1)
        focal = sigmoid_focal_loss(src, tgt, num_masks, self.focal_alpha, self.focal_gamma)
        return focal, dice_loss(src, tgt, num_masks)

    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        """
        Args:
            outputs: ``pred_logits`` (L, B, Q, K + 1) and ``pred_masks`` (L, B, Q, h, w) for L
                decoder layers, the last being the final output.
            targets: per image, ``labels`` (N,) int64 in [0, K) and ``masks`` (N, H, W) (bool or
                float), all padded to the same (H, W).

        Returns:
            weighted losses: ``loss_ce``, ``loss_mask``, ``loss_dice`` for the final layer, and the
            same with suffix ``_{l}`` for each auxiliary layer l = 0 .. L - 2.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if pred_logits.dim() != 4 or pred_masks.dim() != 5:
            raise ValueError(
                "SetCriterion expects pred_logits (L, B, Q, K+1) and pred_masks (L, B, Q, h, w), "
                "got "
                f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
            )
        num_masks = self.num_masks(targets, pred_logits.device)
        num_layers = pred_logits.shape[0]
        # dense: targets resized to the prediction size once for all layers (for matching, and for
        # the losses unless they are computed at the target size); points: sampled per layer
        match_targets = loss_targets = targets
        if self.num_points == 0:
            size = pred_masks.shape[-2:]
            match_targets = [{**t, "masks": _resize_masks(t["masks"], size)} for t in targets]
            if not self.loss_at_target_size:
                loss_targets = match_targets
        losses = {}
        for layer in range(num_layers):
            indices = self.matcher(pred_logits[layer], pred_masks[layer], match_targets)
            focal, dice = self.loss_masks(pred_masks[layer], loss_targets, indices, num_masks)
            layer_losses = {
                "loss_ce": self.loss_labels(pred_logits[layer], targets, indices),
                "loss_mask": focal,
                "loss_dice": dice,
            }
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            for name, value in layer_losses.items():
                losses[name + suffix] = value * self.weights[name]
        return losses
