"""``chunked_semantic_output`` (scores computed a chunk of classes at a time) against today's path:
``semantic_output(semantic_scores(...))`` with the dense output over the budget."""

import pytest
import torch
import torch.nn.functional as F

from ov_seg.modeling.fusion import semantic_scores
from ov_seg.modeling.meta_arch.two_stage import TwoStageOVSeg
from ov_seg.modeling.postprocess import _score_windows, chunked_semantic_output, semantic_output


def _factors(q, k, h, w, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(q, k, generator=g)
    masks = torch.rand(q, h, w, generator=g)
    if ties:  # duplicated classes and quantised values: exact ties everywhere
        probs = (probs * 4).round() / 4
        probs[:, 1::3] = probs[:, 0:-1:3][:, : probs[:, 1::3].shape[1]]
        masks = (masks * 2).round() / 2
    keep = torch.rand(q, generator=g) > 0.2
    return probs, masks, keep


def _chunked(probs, masks, keep, output_size, budget):
    p, m = probs[keep], masks[keep]

    def scores_of(start, stop):
        return torch.einsum("qc,qhw->chw", p[:, start:stop], m)

    return chunked_semantic_output(scores_of, probs.shape[1], m.shape[-2:], output_size, budget)


@pytest.mark.parametrize(
    "q,k,h,w,out,budget_px,ties",
    [
        (12, 847, 23, 17, (61, 45), 40, False),
        (12, 847, 23, 17, (61, 45), 40, True),
        (9, 150, 19, 31, (50, 77), 3, False),
        (9, 150, 19, 31, (50, 77), 3, True),
        (7, 40, 1, 13, (5, 33), 2, False),
        (7, 40, 11, 1, (29, 3), 2, True),
        (5, 33, 16, 16, (16, 16), 1, False),
        (20, 200, 30, 25, (37, 101), 150, False),
    ],
)
@pytest.mark.parametrize("chunk_classes", [32, 45, 100, 10_000])
def test_same_labels_as_dense_scores(q, k, h, w, out, budget_px, ties, chunk_classes):
    for seed in range(3):
        probs, masks, keep = _factors(q, k, h, w, seed, ties)
        # budget: ``budget_px`` output maps (resize chunk), but not all K; score chunks of
        # ``chunk_classes`` model-resolution maps (at least 32)
        budget = max(budget_px * out[0] * out[1] * 4, chunk_classes * h * w * 16)
        budget = min(budget, k * out[0] * out[1] * 4 - 1)
        ref = semantic_output(semantic_scores(probs, masks, keep), out, budget)
        got = _chunked(probs, masks, keep, out, budget)
        assert ref["sem_seg"].dim() == 2
        assert torch.equal(ref["sem_seg"], got["sem_seg"])
        assert ref["sem_seg_empty"] == got["sem_seg_empty"]


def test_no_kept_proposal_is_empty():
    probs, masks, _ = _factors(6, 64, 9, 8, 0)
    keep = torch.zeros(6, dtype=torch.bool)
    ref = semantic_output(semantic_scores(probs, masks, keep), (30, 31), 4 * 30 * 31)
    got = _chunked(probs, masks, keep, (30, 31), 4 * 30 * 31)
    assert torch.equal(ref["sem_seg"], got["sem_seg"]) and got["sem_seg_empty"]


def test_windows_cover_every_class_once_with_equal_sizes():
    for k in (1, 31, 32, 33, 100, 847):
        for step in (1, 32, 45, 1000):
            windows = _score_windows(k, step)
            new = [c for start, stop, first in windows for c in range(first, stop)]
            assert new == list(range(k))
            assert {stop - start for start, stop, _ in windows} == {min(step, k)}


@pytest.mark.parametrize("budget_px", [0, 2, 10**6])
def test_two_stage_semantic_picks_the_path(budget_px):
    # K = 100 names, Q = 10 masks (about 8 kept): the kept masks are resized first when their
    # (Q', H, W) fits (budget 0 = unbounded, 10**6 maps); at 2 maps neither the masks nor the
    # scores fit and the scores are resized last, a chunk at a time (the label map)
    probs, masks, keep = _factors(10, 100, 21, 18, 1)
    out = (47, 39)
    budget = budget_px * out[0] * out[1] * 4
    resize_first = budget_px != 2
    if resize_first:
        up = F.interpolate(masks[keep][None], size=out, mode="bilinear", align_corners=False)[0]
        ref = semantic_output(semantic_scores(probs[keep], up), out, budget)
    else:
        ref = semantic_output(semantic_scores(probs, masks, keep), out, budget)
    got = TwoStageOVSeg._semantic(probs, masks, keep, out, budget)
    assert ref.keys() == got.keys()
    assert torch.equal(ref["sem_seg"], got["sem_seg"])
    if resize_first:  # the other order: the same scores up to float rounding
        last = semantic_output(semantic_scores(probs, masks, keep), out, budget)["sem_seg"]
        assert got["sem_seg"].shape == (100, *out)
        torch.testing.assert_close(got["sem_seg"], last, rtol=1e-5, atol=1e-5)


def test_two_stage_semantic_resizes_scores_when_names_are_fewer_than_masks():
    # K = 6 names, Q = 10 masks (about 8 kept): resizing the K score maps is cheaper, and the
    # output is exactly the scores' resize
    probs, masks, keep = _factors(10, 6, 21, 18, 2)
    out = (47, 39)
    ref = semantic_output(semantic_scores(probs, masks, keep), out, 0)
    got = TwoStageOVSeg._semantic(probs, masks, keep, out, 0)
    assert torch.equal(ref["sem_seg"], got["sem_seg"])
    none = torch.zeros(10, dtype=torch.bool)  # nothing kept: zero scores at the output size
    empty = TwoStageOVSeg._semantic(probs, masks, none, out, 0)["sem_seg"]
    assert empty.shape == (6, *out) and not empty.any()
