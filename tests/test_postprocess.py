"""Bounded full-resolution outputs (``ov_seg.modeling.postprocess``): the same labels / panoptic
segments as resizing every map first, and resized maps that do not grow with the names."""

import pytest
import torch
import torch.nn.functional as F

from ov_seg.modeling import postprocess
from ov_seg.modeling.meta_arch.proposal_maskformer import ProposalMaskFormer
from ov_seg.modeling.postprocess import (
    candidate_classes,
    resized_label_map,
    resized_panoptic,
    semantic_output,
)
from ov_seg.utils.semseg import label_map


def _dense_labels(scores, size):
    return label_map(
        F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    )


def _peaky_scores(k, h, w, seed):
    """Softmax scores with a few classes present, as a trained model gives."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, h, w, generator=g)
    present = torch.randperm(k, generator=g)[: max(1, k // 10)]
    logits[present] += 4 * torch.rand(len(present), h, w, generator=g)
    return logits.softmax(0)


@pytest.mark.parametrize("k", [1, 2, 7, 69, 300])
@pytest.mark.parametrize(
    "size_in,size_out",
    [((12, 17), (37, 53)), ((9, 11), (9, 11)), ((20, 16), (7, 5)), ((1, 5), (3, 13))],
)
def test_labels_equal_dense(k, size_in, size_out):
    scores = _peaky_scores(k, *size_in, seed=k)
    ref = _dense_labels(scores, size_out)
    for budget in (
        1,
        4 * size_out[0] * size_out[1] * 3,
        10**9,
    ):  # one class a chunk, 3 a chunk, all
        assert torch.equal(resized_label_map(scores, size_out, budget), ref)


def test_random_scores_and_crop_view():
    """Flat random scores (many candidates) and a cropped view, as ``sem_seg_postprocess`` crops."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 30, 26, generator=g)[:, :25, :21]
    ref = _dense_labels(scores, (101, 77))
    assert torch.equal(resized_label_map(scores, (101, 77), 4 * 101 * 77 * 5), ref)


def test_ties_keep_the_first_class():
    """Exact ties (duplicate channels, all-zero scores) resolve to the first class, as argmax."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(5, 8, 9, generator=g)
    scores = torch.cat([base, base[[3, 1]], torch.zeros(2, 8, 9)])  # classes 5, 6 copy 3, 1
    for s in (scores, torch.zeros(6, 8, 9)):
        assert torch.equal(resized_label_map(s, (29, 31), 4 * 29 * 31), _dense_labels(s, (29, 31)))
    # a later chunk's equal value does not take the pixel
    tie = torch.ones(4, 3, 3)
    assert int(resized_label_map(tie, (10, 10), 4 * 100).max()) == 0


def test_candidates_drop_classes_that_never_win():
    scores = torch.zeros(3, 4, 4)
    scores[0] = 1.0
    scores[1, 0, 0] = 0.5  # below class 0 everywhere
    scores[2, 3, 3] = 2.0  # wins near (3, 3)
    assert candidate_classes(scores).tolist() == [True, False, True]


def test_semantic_output_dense_when_it_fits():
    scores = _peaky_scores(6, 10, 12, seed=3)
    dense = semantic_output(scores, (20, 24), 0)["sem_seg"]
    assert dense.shape == (6, 20, 24)
    small = semantic_output(scores, (20, 24), 4 * 20 * 24 * 5)
    assert small["sem_seg"].dtype == torch.int64 and small["sem_seg_empty"] is False
    assert torch.equal(small["sem_seg"], label_map(dense))
    assert semantic_output(torch.zeros(6, 3, 3), (9, 9), 4)["sem_seg_empty"] is True


class _Rules:
    def __init__(self, thing_ids):
        self.thing_ids = set(thing_ids)
        self.object_mask_threshold = 0.3
        self.overlap_threshold = 0.5


def _loop_panoptic(rules, mask_cls, masks):
    """The MaskFormer rules written as a plain loop over queries (independent of the code)."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > rules.object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    seg = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    info, stuff = [], {}
    if not len(masks):
        return seg, info
    owner = (scores[:, None, None] * masks).argmax(0)
    for k in range(len(masks)):
        c, thing = int(labels[k]), int(labels[k]) in rules.thing_ids
        own = masks[k] >= 0.5
        segment = (owner == k) & own
        if own.sum() == 0 or segment.sum() == 0 or segment.sum() / own.sum() < 0.5:
            continue
        if not thing and c in stuff:
            seg[segment] = stuff[c]
            continue
        seg[segment] = len(info) + 1
        if not thing:
            stuff[c] = len(info) + 1
        info.append({"id": len(info) + 1, "isthing": thing, "category_id": c})
    return seg, info


@pytest.mark.parametrize("q", [0, 1, 5, 23])
def test_panoptic_equal_dense(q):
    g = torch.Generator().manual_seed(q)
    k = 6
    logits = torch.randn(q, k + 1, generator=g) * 3
    masks = torch.rand(q, 14, 11, generator=g) ** 2
    size = (41, 30)
    up = masks.new_zeros((0, *size))
    if q:
        up = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]
    rules = _Rules([0, 2, 4])
    ref_seg, ref_info = _loop_panoptic(rules, logits, up)
    model_seg, model_info = ProposalMaskFormer.panoptic_inference(rules, logits, up)
    assert torch.equal(model_seg, ref_seg) and model_info == ref_info
    for budget in (1, 4 * 41 * 30 * 3 * 4, 0):
        seg, info = resized_panoptic(logits, masks, size, [0, 2, 4], 0.3, 0.5, budget)
        assert torch.equal(seg, ref_seg) and info == ref_info


def test_resized_maps_do_not_grow_with_names(monkeypatch):
    """The largest resized map held at once is set by the budget, not by the number of names."""
    largest = []
    resize = postprocess._resize

    def spy(x, size):
        out = resize(x, size)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(postprocess, "_resize", spy)
    size, budget = (64, 48), 4 * 64 * 48 * 2 * 3  # three channels a chunk
    peaks = []
    for k in (10, 100, 847):
        largest.clear()
        scores = torch.rand(k, 8, 6)  # flat: nearly every class is a candidate
        resized_label_map(scores, size, budget)
        peaks.append(max(largest))
    assert peaks[0] == peaks[1] == peaks[2] == 3 * 64 * 48


def test_random_cases():
    """Random sizes (up and down, one row / column), names and score shapes, a small budget."""
    g = torch.Generator().manual_seed(7)
    for _ in range(40):
        k = int(torch.randint(1, 60, (1,), generator=g))
        h, w, out_h, out_w = (int(v) for v in torch.randint(1, 40, (4,), generator=g))
        scores = torch.randn(k, h, w, generator=g) * float(torch.rand(1, generator=g) * 10)
        if torch.rand(1, generator=g) < 0.5:
            scores = scores.softmax(0)
        budget = 4 * out_h * out_w * int(torch.randint(1, 5, (1,), generator=g))
        ref = _dense_labels(scores, (out_h, out_w))
        assert torch.equal(resized_label_map(scores, (out_h, out_w), budget), ref)
