"""Full-resolution outputs within a memory budget.

The models score classes at their own resolution (the resized input, or a grid below it); the
output is wanted at the original image size, which can be a 12 MP photo. Resizing all K class maps
to H x W first (detectron2's ``sem_seg_postprocess``) needs K x H x W floats: 40 GB for 847 names
at 12 MP. The functions here give the same outputs (up to last-bit ties, below) from the
model-resolution scores while holding at most ``budget`` bytes of resized maps at a time, besides a
few (H, W) maps:

- ``resized_label_map``: argmax_k of the bilinearly resized scores: the classes are resized by
  ``F.interpolate`` itself, a chunk of classes at a time, with a running maximum that keeps the
  first maximum on ties (what ``argmax`` gives). A channel resized in another batch can differ
  in the last bit (measured on CPU), so labels equal the dense path's except at such 1-ulp ties
  (none in the tests' cases); ``chunked_semantic_output`` resizes in the same groups as this
  function, so the two bounded paths give identical labels. Classes that cannot be the maximum
  anywhere are skipped: a bilinear value lies between the smallest and the largest of its 2 x 2
  source values, so class k can only win inside a source cell if its largest corner reaches the
  best smallest corner of any class there (with a margin for rounding).
- ``resized_panoptic``: the MaskFormer panoptic rules on bilinearly resized masks, a chunk of masks
  at a time.
- ``semantic_output``: the ``sem_seg`` entry of a model's output: (K, H, W) scores when they fit in
  the budget (the dense output, as before), else the (H, W) labels of ``resized_label_map``.
- ``chunked_semantic_output``: the same labels from scores computed a chunk of classes at a time
  (two passes), for when the model-resolution (K, h, w) scores do not fit in the budget either.

Limits: ``semantic_output`` takes the model-resolution scores (K, h, w) as given; a few (H, W) maps
(labels, running maximum, owner flags) are always needed, about 16 bytes a pixel.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ov_seg.utils.semseg import label_map

__all__ = [
    "budget_bytes",
    "candidate_classes",
    "chunked_semantic_output",
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


def _cell_floor(scores: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """A lower bound of the largest output value in each 2 x 2 cell of adjacent source pixels:
    the largest smallest corner among the classes that win a corner.

    Args:
        scores: (K, h, w). best: (h, w) class of largest score per pixel.

    Returns:
        (max(h - 1, 1), max(w - 1, 1)).
    """
    h, w = scores.shape[-2:]
    ch, cw = max(h - 1, 1), max(w - 1, 1)
    offsets = [(dy, dx) for dy in {0, min(1, h - 1)} for dx in {0, min(1, w - 1)}]
    floor = None
    for ay, ax in offsets:  # the class winning this corner
        k = best[ay : ay + ch, ax : ax + cw]
        low = None
        for dy, dx in offsets:  # its smallest value over the cell's corners
            rows = torch.arange(dy, dy + ch, device=scores.device)[:, None]
            cols = torch.arange(dx, dx + cw, device=scores.device)[None, :]
            value = scores[k, rows, cols]
            low = value if low is None else torch.minimum(low, value)
        floor = low if floor is None else torch.maximum(floor, low)
    return floor


def _pixel_need(floor: torch.Tensor, h: int, w: int, absmax: float) -> torch.Tensor:
    """(h, w) threshold of the candidate test: per pixel the smallest floor of its cells (a
    min-pool of the +inf-padded floors), less the rounding margin (``absmax``: the largest |score|).
    """
    pad = (int(w > 1), int(w > 1), int(h > 1), int(h > 1))
    padded = F.pad(-floor[None], pad, value=float("-inf"))
    need = -F.max_pool2d(padded, (1 + int(h > 1), 1 + int(w > 1)), stride=1)[0]
    return need - _SLACK * absmax


def candidate_classes(scores: torch.Tensor, budget: int = 0) -> torch.Tensor:
    """Classes that can be the per-pixel maximum of a bilinear resize of ``scores``.

    A bilinear output value is a convex combination of one 2 x 2 cell of adjacent source values (a
    single row / column at the borders lies in a cell too). In a cell, the winner's value is at
    least the floor F(c) = the largest smallest corner of the classes winning a corner, so class k
    can only win there if one of its corners reaches F(c). Class k is kept when some source pixel
    p has S_k(p) >= min over the cells c holding p of F(c), minus a rounding margin.

    Args:
        scores: (K, h, w) finite scores.
        budget: bytes for the (K_chunk, h, w) temporaries (0 = all classes at once).

    Returns:
        (K,) bool.
    """
    k, (h, w) = scores.shape[0], scores.shape[-2:]
    floor = _cell_floor(scores, label_map(scores))
    need = _pixel_need(floor, h, w, max(float(scores.max()), -float(scores.min())))
    step = max(1, budget // max(1, h * w * 2)) if budget > 0 else k
    keep = torch.zeros(k, dtype=torch.bool, device=scores.device)
    for i in range(0, k, step):
        keep[i : i + step] = (scores[i : i + step] >= need).flatten(1).any(1)
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
    if ids.numel() == 1:  # one class wins everywhere
        return torch.full(output_size, int(ids[0]), dtype=torch.int64, device=scores.device)
    step = _chunk(output_size, budget)
    best = labels = None
    for i in range(0, ids.numel(), step):
        chunk = ids[i : i + step].tolist()
        resized = _resize(scores[chunk], output_size)
        for j, k in enumerate(chunk):  # a running maximum, class by class in ascending order
            value = resized[j]
            if best is None:
                best = value.clone()
                labels = torch.full(output_size, k, dtype=torch.int64, device=scores.device)
                continue
            better = value > best  # strict: an earlier class keeps a tie
            torch.maximum(best, value, out=best)
            labels.masked_fill_(better, k)
        del resized
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


# fewest classes per computed score chunk: BLAS may round a matrix product of a few rows
# differently from the same rows of a larger one; every chunk has this many rows or more
_MIN_SCORE_CHUNK = 32


def _score_windows(num_classes: int, step: int) -> List[Tuple[int, int, int]]:
    """(start, stop, first new class) windows of ``step`` classes covering ``range(num_classes)``;
    the last window ends at ``num_classes`` (overlapping the one before) so that every window has
    ``min(step, num_classes)`` classes."""
    step = min(step, num_classes)
    windows, done = [], 0
    while done < num_classes:
        start = min(done, num_classes - step)
        windows.append((start, start + step, done))
        done = start + step
    return windows


def chunked_semantic_output(
    scores_of: Callable[[int, int], torch.Tensor],
    num_classes: int,
    size: Tuple[int, int],
    output_size: Tuple[int, int],
    budget: int,
) -> Dict[str, object]:
    """``semantic_output`` of (K, h, w) scores that are never held whole: ``scores_of(start,
    stop)`` computes the (stop - start, h, w) scores of classes ``start:stop`` (e.g. an einsum of
    a slice of the class probabilities with the masks; each row must not depend on the slice).

    Same labels as ``semantic_output(scores, output_size, budget)`` when the dense output does not
    fit (same argmax, the first maximum on ties) and same ``sem_seg_empty``; the scores are
    computed twice, a chunk of at most ``budget / 4`` bytes (at least 32 classes) at a time. First
    pass: the per-pixel argmax and, for the ``candidate_classes`` test, the values of each pixel's
    winning class at the corners of its cells. Second pass: the candidate test of each chunk's
    classes, then the resize and running maximum of ``resized_label_map``.

    Args:
        scores_of: (start, stop) → (stop - start, h, w) finite scores. num_classes: K > 0.
        size: (h, w) of the scores. output_size: (H, W). budget: bytes (> 0).

    Returns:
        ``{"sem_seg": (H, W) int64 labels, "sem_seg_empty": bool}``.
    """
    output_size = (int(output_size[0]), int(output_size[1]))
    if num_classes <= 0 or budget <= 0:
        raise ValueError(f"need num_classes > 0 and budget > 0, got {num_classes}, {budget}")
    h, w = int(size[0]), int(size[1])
    step = max(_MIN_SCORE_CHUNK, budget // (4 * h * w * _FLOAT))
    windows = _score_windows(num_classes, step)
    ch, cw = max(h - 1, 1), max(w - 1, 1)
    offsets = [(dy, dx) for dy in {0, min(1, h - 1)} for dx in {0, min(1, w - 1)}]
    # pass 1: running argmax over the classes (strict: an earlier class keeps a tie) and, for
    # each (winning corner a, corner b) of a cell, the winner of a's value at b
    best = best_at = None
    top, bottom = float("-inf"), float("inf")
    for start, stop, new in windows:
        scores = scores_of(start, stop)[new - start :]
        top, bottom = max(top, float(scores.max())), min(bottom, float(scores.min()))
        arg = scores.argmax(0)
        value = scores.gather(0, arg[None])[0]
        arg += new
        if best is None:
            best, labels, better = value, arg, None
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, arg, labels)
        at = {}
        for ay, ax in offsets:
            k = arg[ay : ay + ch, ax : ax + cw] - new
            for dy, dx in offsets:
                at[ay, ax, dy, dx] = scores[:, dy : dy + ch, dx : dx + cw].gather(0, k[None])[0]
        if best_at is None:
            best_at = at
        else:
            for (ay, ax, dy, dx), v in at.items():
                won = better[ay : ay + ch, ax : ax + cw]
                best_at[ay, ax, dy, dx] = torch.where(won, v, best_at[ay, ax, dy, dx])
        del scores, at
    floor = None
    for ay, ax in offsets:  # as ``_cell_floor``
        low = None
        for dy, dx in offsets:
            v = best_at[ay, ax, dy, dx]
            low = v if low is None else torch.minimum(low, v)
        floor = low if floor is None else torch.maximum(floor, low)
    need = _pixel_need(floor, h, w, max(top, -bottom))
    del best, labels, best_at, floor
    # pass 2: candidates of each chunk, resized into a running maximum in the same groups of
    # ``resize_step`` candidates as ``resized_label_map`` (``F.interpolate`` may round a channel
    # differently in another batch)
    resize_step = _chunk(output_size, budget)
    state: Dict[str, torch.Tensor] = {}
    pending: List[Tuple[int, torch.Tensor]] = []

    def fold(group: List[Tuple[int, torch.Tensor]]) -> None:
        resized = _resize(torch.stack([m for _, m in group]), output_size)
        for j, (k, _) in enumerate(group):  # class by class in ascending order
            value = resized[j]
            if not state:
                state["best"] = value.clone()
                state["out"] = torch.full(output_size, k, dtype=torch.int64, device=value.device)
                continue
            better = value > state["best"]  # strict: an earlier class keeps a tie
            torch.maximum(state["best"], value, out=state["best"])
            state["out"].masked_fill_(better, k)

    for start, stop, new in windows:
        scores = scores_of(start, stop)[new - start :]
        for k in (scores >= need).flatten(1).any(1).nonzero()[:, 0].tolist():
            pending.append((new + k, scores[k].clone()))  # the chunk itself is freed
            if len(pending) == resize_step:
                fold(pending)
                pending = []
        del scores
    if pending:
        fold(pending)
    out = state["out"]
    return {"sem_seg": out, "sem_seg_empty": not top > 0}


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
    # a query that owns no pixel is dropped whatever its mask area: resize the possible owners
    # only (score · σ(m) is bilinear in σ(m) up to rounding, so ``candidate_classes`` applies)
    ids = candidate_classes(scores[:, None, None] * masks, budget).nonzero()[:, 0]
    step = _chunk(output_size, budget, copies=3)
    num = masks.shape[0]
    original_areas = torch.zeros(num, dtype=torch.int64, device=masks.device)
    best: Optional[torch.Tensor] = None
    owner = own = None  # (H, W) owning query, whether its own mask covers the pixel
    for i in range(0, ids.numel(), step):
        chunk = ids[i : i + step].tolist()
        resized = _resize(masks[chunk], output_size)
        for j, k in enumerate(chunk):  # a running maximum, query by query in ascending order
            mine = resized[j] >= 0.5
            original_areas[k] = torch.count_nonzero(mine)
            value = resized[j].mul_(scores[k])  # in place: score_q · m_q, as the dense rule
            if best is None:
                best, own = value, mine
                owner = torch.full(output_size, k, dtype=torch.int32, device=masks.device)
                continue
            better = value > best  # strict: an earlier query keeps a tie
            torch.maximum(best, value, out=best)
            owner.masked_fill_(better, k)
            own = torch.where(better, mine, own)
        del resized
    del best
    owner.masked_fill_(~own, num)  # num: not covered by its owner's mask (void)
    areas = torch.bincount(owner.flatten(), minlength=num + 1)[:num]
    segment_of, segments_info = panoptic_segments(
        labels, original_areas, areas, thing_ids, overlap_threshold
    )
    if ids.numel() <= 16:  # a few owners: fill their pixels (faster than a gather)
        for k in ids.tolist():
            if int(segment_of[k]):
                panoptic_seg.masked_fill_(owner == k, int(segment_of[k]))
    else:
        panoptic_seg = torch.cat([segment_of, segment_of.new_zeros(1)])[owner.long()]
    return panoptic_seg, segments_info
