"""Full-resolution outputs within a memory budget.

The models score classes at their own resolution (the resized input, or a grid below it); the
output is wanted at the original image size, which can be a 12 MP photo. Resizing all K class maps
to H x W first (detectron2's ``sem_seg_postprocess``) needs K x H x W floats: 40 GB for 847 names
at 12 MP. The functions here give the same outputs from the model-resolution scores while holding
at most ``budget`` bytes of resized maps at a time, besides a few (H, W) maps:

- ``resized_label_map``: argmax_k of the bilinearly resized scores. Exact by construction: the
  classes are resized by ``F.interpolate`` itself, a chunk of classes at a time (the same
  arithmetic per channel as one call on all of them), with a running maximum that keeps the first
  maximum on ties (what ``argmax`` gives). Classes that cannot be the maximum anywhere are skipped:
  a bilinear value lies between the smallest and the largest of its 2 x 2 source values, so class
  k can only win inside a source cell if its largest corner reaches the best smallest corner of any
  class there (with a margin for rounding).
- ``resized_panoptic``: the MaskFormer panoptic rules on bilinearly resized masks, a chunk of masks
  at a time.
- ``semantic_output``: the ``sem_seg`` entry of a model's output: (K, H, W) scores when they fit in
  the budget (the dense output, as before), else the (H, W) labels of ``resized_label_map``.

Limits: the model-resolution scores (K, h, w) are taken as given (their size is set by the test
resize, not by the photo); a few (H, W) maps (labels, running maximum, owner flags) are always
needed, about 16 bytes a pixel.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ov_seg.utils.semseg import label_map

__all__ = [
    "budget_bytes",
    "candidate_classes",
    "dense_fits",
    "panoptic_segments",
    "resized_label_map",
    "resized_panoptic",
    "semantic_output",
    "semantic_postprocess",
]

# bytes of one float32 value
_FLOAT = 4
# rounding margin of the candidate test, relative to the largest |score| (a bilinear value is
# computed with a few roundings, each at most 2^-24 relative)
_SLACK = 1e-5


def budget_bytes(budget_mb: float) -> int:
    """``TEST.MEMORY_BUDGET_MB`` in bytes (0 = unbounded)."""
    return int(budget_mb * 2**20) if budget_mb > 0 else 0


def dense_fits(channels: int, output_size: Tuple[int, int], budget: int) -> bool:
    """Whether ``channels`` float maps of ``output_size`` fit in ``budget`` bytes (0 = always)."""
    return budget <= 0 or channels * output_size[0] * output_size[1] * _FLOAT <= budget


def _chunk(output_size: Tuple[int, int], budget: int, copies: int = 2) -> int:
    """Channels per resized chunk: ``copies`` (K_chunk, H, W) float maps within ``budget``."""
    per_channel = copies * output_size[0] * output_size[1] * _FLOAT
    return max(1, budget // per_channel) if budget > 0 else 1 << 30


def _resize(x: torch.Tensor, output_size: Tuple[int, int]) -> torch.Tensor:
    """(C, h, w) → (C, H, W) bilinear (``align_corners=False``), as ``sem_seg_postprocess``."""
    if tuple(x.shape[-2:]) == tuple(output_size):
        return x
    return F.interpolate(x[None], size=output_size, mode="bilinear", align_corners=False)[0]


def _cell_bounds(s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(largest, smallest) of each 2 x 2 cell of adjacent source pixels of (C, h, w) maps →
    (C, max(h - 1, 1), max(w - 1, 1)) each. Every bilinear output value lies in the bounds of one
    such cell (a single row / column counts as a cell of its own)."""
    hi = lo = s
    if s.shape[-2] > 1:
        hi, lo = torch.maximum(hi[:, :-1], hi[:, 1:]), torch.minimum(lo[:, :-1], lo[:, 1:])
    if s.shape[-1] > 1:
        hi = torch.maximum(hi[..., :-1], hi[..., 1:])
        lo = torch.minimum(lo[..., :-1], lo[..., 1:])
    return hi, lo


def candidate_classes(scores: torch.Tensor, budget: int = 0) -> torch.Tensor:
    """Classes that can be the per-pixel maximum of a bilinear resize of ``scores``.

    Class k is dropped when, in every 2 x 2 source cell, its largest value is below the largest
    smallest value of any class there (minus a rounding margin): a bilinear value is a convex
    combination of its cell's values, so k loses to that class at every output pixel.

    Args:
        scores: (K, h, w) finite scores.
        budget: bytes for the (K_chunk, h, w) temporaries (0 = all classes at once).

    Returns:
        (K,) bool.
    """
    k = scores.shape[0]
    per_class = max(1, scores.shape[-2] * scores.shape[-1] * _FLOAT * 4)
    step = max(1, budget // per_class) if budget > 0 else k
    floor = None  # (h', w') best smallest corner
    for i in range(0, k, step):
        lo = _cell_bounds(scores[i : i + step])[1].amax(0)
        floor = lo if floor is None else torch.maximum(floor, lo)
    slack = _SLACK * float(scores.abs().max()) if scores.numel() else 0.0
    keep = torch.zeros(k, dtype=torch.bool, device=scores.device)
    for i in range(0, k, step):
        hi = _cell_bounds(scores[i : i + step])[0]
        keep[i : i + step] = (hi >= floor - slack).flatten(1).any(1)
    return keep


def resized_label_map(
    scores: torch.Tensor, output_size: Tuple[int, int], budget: int = 0
) -> torch.Tensor:
    """argmax over K of the bilinear resize of ``scores`` to ``output_size``, without holding the
    (K, H, W) map: equal to ``label_map(F.interpolate(scores[None], output_size, mode="bilinear",
    align_corners=False)[0])`` (the first maximum on ties).

    Args:
        scores: (K, h, w) finite scores (e.g. already cropped to the image: the
            ``sem_seg_postprocess`` crop is a view).
        output_size: (H, W).
        budget: bytes of resized (K_chunk, H, W) maps at a time (0 = all at once).

    Returns:
        (H, W) int64.
    """
    output_size = (int(output_size[0]), int(output_size[1]))
    if scores.dim() != 3 or scores.shape[0] == 0:
        raise ValueError(f"scores must be (K, h, w) with K > 0, got {tuple(scores.shape)}")
    if budget <= 0:
        return label_map(_resize(scores, output_size))
    ids = candidate_classes(scores, budget).nonzero()[:, 0]  # ascending: ties keep the first
    step = _chunk(output_size, budget)
    best = labels = None
    for i in range(0, ids.numel(), step):
        chunk = ids[i : i + step]
        value, index = _resize(scores[chunk], output_size).max(dim=0)
        index = chunk[index]
        if best is None:
            best, labels = value, index
            continue
        better = value > best  # strict: an earlier class keeps a tie
        best = torch.where(better, value, best)
        labels = torch.where(better, index, labels)
    return labels


def semantic_output(
    scores: torch.Tensor, output_size: Tuple[int, int], budget: int = 0
) -> Dict[str, object]:
    """The ``sem_seg`` output of one image from model-resolution scores.

    Args:
        scores: (K, h, w) class scores, cropped to the image.
        output_size: (H, W) of the output.
        budget: bytes (``budget_bytes(TEST.MEMORY_BUDGET_MB)``; 0 = unbounded).

    Returns:
        ``{"sem_seg": (K, H, W) scores}`` when K x H x W floats fit in ``budget`` (bilinear resize,
        as ``sem_seg_postprocess``), else ``{"sem_seg": (H, W) int64 labels (their argmax),
        "sem_seg_empty": bool}``, the flag telling whether every score is <= 0 (at the model's
        resolution), as a consumer of the dense scores would check.
    """
    output_size = (int(output_size[0]), int(output_size[1]))
    if dense_fits(scores.shape[0], output_size, budget):
        return {"sem_seg": _resize(scores, output_size)}
    empty = not (scores.numel() and float(scores.max()) > 0)
    return {"sem_seg": resized_label_map(scores, output_size, budget), "sem_seg_empty": empty}


def semantic_postprocess(
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    budget: int = 0,
) -> Dict[str, object]:
    """detectron2's ``sem_seg_postprocess`` (crop the padding, resize to the output size) within
    a memory budget: ``semantic_output`` of the cropped scores.

    Args:
        scores: (K, h_pad, w_pad) class scores of the padded input. image_size: (h, w) of the image
            in it. output_size: (H, W). budget: bytes (0 = unbounded).
    """
    cropped = scores[:, : int(image_size[0]), : int(image_size[1])]
    output_size = (int(output_size[0]), int(output_size[1]))
    if dense_fits(scores.shape[0], output_size, budget):  # resized even at the same size, as there
        up = F.interpolate(cropped[None], size=output_size, mode="bilinear", align_corners=False)
        return {"sem_seg": up[0]}
    return semantic_output(cropped, output_size, budget)


def panoptic_segments(
    labels: torch.Tensor,
    original_areas: torch.Tensor,
    areas: torch.Tensor,
    thing_ids: Sequence[int],
    overlap_threshold: float,
) -> Tuple[torch.Tensor, List[dict]]:
    """The MaskFormer panoptic merge of Q kept queries, from their pixel counts: a query whose
    owned area / own area (σ(m_q) >= 0.5) is below ``overlap_threshold`` (or either is 0) is
    dropped; stuff queries of one class share a segment.

    Args:
        labels: (Q,) class per query. original_areas: (Q,) pixels with σ(m_q) >= 0.5. areas: (Q,)
            of those pixels that the query owns (largest score · σ(m)).
        thing_ids: thing classes. overlap_threshold: the MaskFormer threshold.

    Returns:
        (segment id per query (Q,) int32, 0 = dropped; segments_info).
    """
    things = set(thing_ids)
    original, area = original_areas.tolist(), areas.tolist()
    segment_of = [0] * len(original)
    segments_info: List[dict] = []
    stuff_segment_ids: Dict[int, int] = {}
    for k, category in enumerate(labels.tolist()):
        isthing = category in things
        if original[k] == 0 or area[k] == 0 or area[k] / original[k] < overlap_threshold:
            continue
        if not isthing and category in stuff_segment_ids:
            segment_of[k] = stuff_segment_ids[category]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment_ids[category] = segment_id
        segment_of[k] = segment_id
        segments_info.append({"id": segment_id, "isthing": isthing, "category_id": category})
    return torch.tensor(segment_of, dtype=torch.int32, device=labels.device), segments_info


def resized_panoptic(
    class_logits: torch.Tensor,
    masks: torch.Tensor,
    output_size: Tuple[int, int],
    thing_ids: Sequence[int],
    object_mask_threshold: float,
    overlap_threshold: float,
    budget: int = 0,
) -> Tuple[torch.Tensor, List[dict]]:
    """``ProposalMaskFormer.panoptic_inference`` on masks resized to ``output_size``, a chunk of
    masks at a time: same segments, ids and ``segments_info`` as resizing all Q masks first.

    Each pixel goes to the first query of largest score_q · m_q (a running maximum over chunks of
    queries, in order); the pass also records whether the owner's own mask is >= 0.5 there and each
    query's mask area (m_q >= 0.5), which is all the overlap test and the merge need.

    Args:
        class_logits: (Q, K + 1) log-probabilities. masks: (Q, h, w) probabilities.
        output_size: (H, W). thing_ids: thing classes.
        object_mask_threshold, overlap_threshold: the MaskFormer thresholds.
        budget: bytes of resized (Q_chunk, H, W) masks at a time (0 = all at once).

    Returns:
        (panoptic_seg (H, W) int32 with 0 = void, segments_info).
    """
    output_size = (int(output_size[0]), int(output_size[1]))
    scores, labels = class_logits.softmax(-1).max(-1)
    num_classes = class_logits.shape[-1] - 1
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    panoptic_seg = torch.zeros(output_size, dtype=torch.int32, device=masks.device)
    segments_info: List[dict] = []
    if masks.shape[0] == 0:
        return panoptic_seg, segments_info
    step = _chunk(output_size, budget, copies=3)
    best: Optional[torch.Tensor] = None
    owner = own = None
    areas = []
    for i in range(0, masks.shape[0], step):
        m = _resize(masks[i : i + step], output_size)
        mine = m >= 0.5
        areas.append(mine.flatten(1).sum(1))
        value, index = (scores[i : i + step, None, None] * m).max(dim=0)
        own_here = mine.gather(0, index[None])[0]
        index = index + i
        if best is None:
            best, owner, own = value, index, own_here
            continue
        better = value > best
        best = torch.where(better, value, best)
        owner = torch.where(better, index, owner)
        own = torch.where(better, own_here, own)
        del m, mine
    segment_of, segments_info = panoptic_segments(
        labels, torch.cat(areas), torch.bincount(owner[own], minlength=masks.shape[0]),
        thing_ids, overlap_threshold,
    )  # fmt: skip
    panoptic_seg = torch.where(own, segment_of[owner], panoptic_seg)
    return panoptic_seg, segments_info
