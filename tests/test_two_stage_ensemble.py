"""The two-stage fusion math (ov_seg.modeling.fusion) on hand-built tensors."""

import pytest
import torch

from ov_seg.modeling.fusion import (
    clip_class_probs,
    geometric_ensemble,
    panoptic_class_logits,
    proposal_class_probs,
    semantic_scores,
    with_background_name,
)

# 3 proposals, 2 classes (+ no object for the proposal head)
PROPOSAL = torch.tensor([[0.6, 0.2], [0.1, 0.7], [0.3, 0.3]])
CLIP = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
VALID = torch.tensor([True, True, False])


def test_proposal_probs_drop_no_object_without_renormalising():
    logits = torch.log(torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.7, 0.2]]))
    probs = proposal_class_probs(logits)
    assert torch.allclose(probs, torch.tensor([[0.6, 0.2], [0.1, 0.7]]), atol=1e-6)


def test_clip_probs_are_one_for_invalid_masks():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    probs = clip_class_probs(logits, VALID)
    assert torch.allclose(probs[0], torch.softmax(logits[0], 0))
    assert torch.equal(probs[2], torch.ones(2))


def test_lambda_zero_is_the_proposal_head():
    probs, keep = geometric_ensemble(PROPOSAL, CLIP, VALID, 0.0)
    assert torch.equal(probs, PROPOSAL) and keep.all()
    probs, keep = geometric_ensemble(PROPOSAL, None, None, 0.0)  # no CLIP needed
    assert torch.equal(probs, PROPOSAL) and keep.all()


def test_lambda_one_is_clip_and_drops_invalid_masks():
    probs, keep = geometric_ensemble(PROPOSAL, CLIP, VALID, 1.0)
    assert torch.equal(probs, CLIP)
    assert keep.tolist() == [True, True, False]
    probs, keep = geometric_ensemble(None, CLIP, VALID, 1.0)  # no proposal head needed
    assert keep.tolist() == [True, True, False]


def test_geometric_mean_and_invalid_masks_keep_the_proposal_term():
    lam = 0.7
    probs, keep = geometric_ensemble(PROPOSAL, CLIP, VALID, lam)
    assert keep.all()
    # valid proposal: p^(1-λ) c^λ, by hand
    assert probs[0, 0].item() == pytest.approx(0.6**0.3 * 0.9**0.7, rel=1e-6)
    assert probs[1, 1].item() == pytest.approx(0.7**0.3 * 0.5**0.7, rel=1e-6)
    # proposal with an empty mask: p_clip = 1, only p^(1-λ) remains, whatever its CLIP row held
    assert torch.allclose(probs[2], PROPOSAL[2] ** 0.3)
    # λ moves the winner of proposal 1 from the proposal head's class 1 towards CLIP's tie: still
    # class 1
    assert probs[1].argmax() == 1


def test_ensemble_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        geometric_ensemble(PROPOSAL, CLIP, VALID, 1.5)
    with pytest.raises(ValueError, match="class scores"):
        geometric_ensemble(None, CLIP, VALID, 0.5)
    with pytest.raises(ValueError, match="CLIP"):
        geometric_ensemble(PROPOSAL, None, None, 0.5)
    with pytest.raises(ValueError, match="shape"):
        geometric_ensemble(PROPOSAL, CLIP[:, :1], VALID, 0.5)


def test_semantic_scores_sum_over_kept_proposals():
    masks = torch.zeros(3, 2, 2)
    masks[0, 0, 0] = 1.0
    masks[1, 1, 1] = 0.5
    masks[2] = 1.0  # covers everything, but is dropped below
    keep = torch.tensor([True, True, False])
    sem = semantic_scores(CLIP, masks, keep)
    assert sem.shape == (2, 2, 2)
    assert sem[:, 0, 0].tolist() == pytest.approx([0.9, 0.1])
    assert sem[:, 1, 1].tolist() == pytest.approx([0.25, 0.25])
    assert sem[:, 0, 1].tolist() == [0.0, 0.0]
    full = semantic_scores(CLIP, masks)
    assert full[:, 0, 1].tolist() == pytest.approx([0.2, 0.8])
    none = semantic_scores(CLIP, masks, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2, 2, 2))


def test_panoptic_logits_give_back_the_class_distribution():
    probs = torch.tensor([[0.3, 0.1], [0.2, 0.2]])
    objectness = torch.tensor([0.8, 0.5])
    logits = panoptic_class_logits(probs, objectness, torch.tensor([True, False]))
    p = logits.softmax(-1)
    assert p[0].tolist() == pytest.approx(
        [0.6, 0.2, 0.2], abs=1e-6
    )  # (0.75, 0.25) × 0.8, no object 0.2
    assert p[1].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)  # not kept: no object


def test_single_class_gets_a_background_name():
    assert with_background_name(["cat"], "others") == ["cat", "others"]
    assert with_background_name(["cat", "dog"], "others") == ["cat", "dog"]
    with pytest.raises(ValueError, match="empty vocabulary"):
        with_background_name([], "others")
    with pytest.raises(ValueError, match="background name"):
        with_background_name(["others"], "others")


def test_seen_names_get_their_own_weight():
    """λ_s for the names the proposal head was trained on, λ for the others (OVSeg's code on a
    seen / unseen split: λ_s = 1 − λ)."""
    seen = torch.tensor([True, False])
    probs, keep = geometric_ensemble(PROPOSAL, CLIP, VALID, 0.7, seen=seen, seen_weight=0.3)
    assert keep.all()
    assert probs[0, 0].item() == pytest.approx(0.6**0.7 * 0.9**0.3, rel=1e-6)  # seen: λ_s
    assert probs[0, 1].item() == pytest.approx(0.2**0.3 * 0.1**0.7, rel=1e-6)  # unseen: λ
    # an empty mask keeps the proposal term of each class's own exponent
    assert torch.allclose(probs[2], torch.tensor([0.3**0.7, 0.3**0.3]))
    # λ_s = λ, no seen name or no λ_s: the uniform ensemble, bit for bit
    uniform, _ = geometric_ensemble(PROPOSAL, CLIP, VALID, 0.7)
    for kwargs in (
        dict(seen=seen, seen_weight=0.7),
        dict(seen=torch.tensor([False, False]), seen_weight=0.3),
        dict(seen=seen, seen_weight=None),
    ):
        assert torch.equal(geometric_ensemble(PROPOSAL, CLIP, VALID, 0.7, **kwargs)[0], uniform)
    # λ = 0 for the unseen names still needs CLIP for the seen ones, and vice versa
    probs, keep = geometric_ensemble(PROPOSAL, CLIP, VALID, 0.0, seen=seen, seen_weight=1.0)
    assert torch.allclose(probs[:2, 0], CLIP[:2, 0]) and torch.allclose(probs[:, 1], PROPOSAL[:, 1])
    # a class with λ_c = 1 gets no score from a proposal without a crop (no information)
    assert probs[2, 0] == 0 and keep.all()


def test_seen_weight_errors():
    seen = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"λ_s must be in \[0, 1\]"):
        geometric_ensemble(PROPOSAL, CLIP, VALID, 0.7, seen=seen, seen_weight=-0.1)
    with pytest.raises(ValueError, match="both"):
        geometric_ensemble(PROPOSAL, None, None, 0.0, seen=seen, seen_weight=0.5)
    with pytest.raises(ValueError, match="shapes"):
        geometric_ensemble(PROPOSAL, CLIP[:2], VALID, 0.7, seen=seen, seen_weight=0.3)


def test_seen_weight_one_everywhere_drops_proposals_without_a_crop():
    """Every name seen and λ_s = 1: CLIP only for every class, so, as for λ = 1, a proposal without
    a crop carries no class information and leaves the outputs; a seen mask of another size fails.
    """
    probs, keep = geometric_ensemble(
        PROPOSAL, CLIP, VALID, 0.5, seen=torch.tensor([True, True]), seen_weight=1.0
    )
    assert keep.tolist() == [True, True, False]
    assert torch.allclose(probs[:2], CLIP[:2]) and torch.all(probs[2] == 0)
    with pytest.raises(ValueError, match=r"seen must be \(2,\)"):
        geometric_ensemble(PROPOSAL, CLIP, VALID, 0.5, seen=torch.tensor([True]), seen_weight=0.5)
