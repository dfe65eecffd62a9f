"""Noun-to-proposal assignment on hand-built scores."""

import math

import pytest
import torch

from ov_seg.mining.assign import assign_nouns, cosine_scores


def test_argmax_proposal_per_noun():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.6, 0.7, 0.1], [0.8, 0.85, 0.2, 0.0]])
    a = assign_nouns(scores)
    assert a.proposal.tolist() == [
        1,
        2,
        1,
    ]  # nouns 0 and 2 share proposal 1 (OVSeg's independent argmax)
    assert torch.allclose(a.score, torch.tensor([0.9, 0.7, 0.85]))
    assert a.keep.all()


def test_invalid_proposals_and_min_score():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.2, 0.95, 0.25]])
    valid = torch.tensor([True, False, True])
    a = assign_nouns(scores, valid, min_score=0.28)
    assert a.proposal.tolist() == [2, 2]
    assert a.keep.tolist() == [True, False]  # 0.25 < 0.28: kept proposal, not kept pair
    none = assign_nouns(scores, torch.zeros(3, dtype=torch.bool))
    assert none.proposal.tolist() == [-1, -1] and not none.keep.any() and math.isinf(none.score[0])


def test_ties_take_the_first_proposal():
    assert assign_nouns(torch.tensor([[0.5, 0.7, 0.7]])).proposal.tolist() == [1]


def test_one_to_one_maximises_total_score():
    scores = torch.tensor([[0.9, 0.8], [0.85, 0.1], [0.3, 0.2]])
    a = assign_nouns(scores, one_to_one=True)
    assert a.proposal.tolist() == [1, 0, -1]  # 0.8 + 0.85 > 0.9 + 0.1; the third noun finds none
    assert a.keep.tolist() == [True, True, False]
    b = assign_nouns(scores, torch.tensor([True, False]), one_to_one=True)
    assert b.proposal.tolist() == [0, -1, -1]


def test_empty_inputs_and_shapes():
    assert assign_nouns(torch.zeros(0, 3)).proposal.shape == (0,)
    assert assign_nouns(torch.zeros(2, 0)).proposal.tolist() == [-1, -1]
    with pytest.raises(ValueError):
        assign_nouns(torch.zeros(3))
    with pytest.raises(ValueError):
        assign_nouns(torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))


def test_cosine_scores_fill_invalid_columns():
    nouns = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    crops = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    valid = torch.tensor([True, False, True])
    s = cosine_scores(nouns, crops, valid)
    assert s.shape == (2, 3) and torch.isinf(s[:, 1]).all()
    assert torch.allclose(s[:, [0, 2]], torch.tensor([[1.0, 2**-0.5], [0.0, 2**-0.5]]))
    assert assign_nouns(s, valid).proposal.tolist() == [0, 2]
    with pytest.raises(ValueError):
        cosine_scores(nouns, crops, torch.tensor([True, True, True]))


class _FakeCropClassifier:
    """Stands in for MaskedCropClassifier: fixed crop embeddings, one per valid mask."""

    mask_thr = 0.5

    def __init__(self, crop_embeddings):
        self.crop_embeddings = crop_embeddings

    def embed(self, images, masks):
        valid = [m.flatten(1).any(dim=1) for m in masks]
        return self.crop_embeddings[: int(valid[0].sum())], valid


def test_mine_image_pairs_cosine_objectness_and_min_score():
    import numpy as np

    from ov_seg.mining.pairs_job import MiningProposals, mine_image_pairs

    masks = torch.zeros(3, 8, 8)
    masks[0, :4] = 0.9  # proposal 0: top half
    masks[1, 4:] = 0.9  # proposal 1: bottom half; proposal 2 is empty (invalid)
    crops = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # "dog" is closest to proposal 0
    nouns = {"dog": torch.tensor([1.0, 0.0]), "cat": torch.tensor([0.0, 1.0])}
    record = {"image_id": 1, "file_name": "x.png", "nouns": [["dog", "cat"]]}
    image = np.zeros((8, 8, 3), np.uint8)

    def run(**kw):
        props = [MiningProposals(masks, torch.tensor([0.1, 0.9, 0.5]))]
        res = mine_image_pairs(
            [record],
            [image],
            props,
            _FakeCropClassifier(crops),
            lambda ns: torch.stack([nouns[n] for n in ns]),
            **kw,
        )[0]
        return {p["category"]: (p["proposal"], p["score"]) for p in res["pairs"]}

    out = run()
    assert out["dog"] == (0, 1.0) and out["cat"][0] == 1 and out["cat"][1] == pytest.approx(0.6)
    assert run(objectness_weight=1.0)["dog"] == (1, pytest.approx(0.8))  # log(.9) - log(.1) > 0.2
    assert set(run(min_score=0.7)) == {"dog"}
