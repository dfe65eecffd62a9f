"""MGCA's pure pieces: hard-negative InfoNCE, pseudo correspondences, losses, meta-points, units."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ov_seg.modeling.heads.semantic_units import (
    UNIT_PREDICTORS,
    adaptive_unit_scores,
    group_unit_scores,
    pixel_unit_scores,
)
from ov_seg.modeling.losses.hard_negative import (
    hard_negative_info_nce,
    masked_topk,
    same_text_matrix,
)
from ov_seg.modeling.losses.meta_points import grid_init_centers, grid_shape, soft_kmeans
from ov_seg.modeling.losses.mgca import (
    build_correspondences,
    grounding_masks,
    group_mean,
    object_level_losses,
    object_regions,
    own_image_rows,
    pixel_level_loss,
    positive_units,
    region_level_loss,
)


def _unit(*vals):
    return F.normalize(torch.tensor(vals, dtype=torch.float32), dim=-1)


# ---------------------------------------------------------------- hard-negative InfoNCE
def test_hard_negative_nce_matches_formula_and_keeps_hardest():
    q = _unit(1.0, 0.0, 0.0)[None]
    pos = _unit(0.8, 0.6, 0.0)[None]
    negs = torch.stack(
        [_unit(0.9, 0.1, 0.0), _unit(0.0, 1.0, 0.0), _unit(0.5, 0.0, 0.5), _unit(-1, 0, 0)]
    )
    scale = 10.0
    cos_neg = (negs @ q[0]).tolist()
    loss = hard_negative_info_nce(q, pos, negs, k_neg=2, logit_scale=scale)
    top2 = sorted(cos_neg, reverse=True)[:2]  # the two negatives most similar to q
    expected = -math.log(
        math.exp(0.8 * scale) / (math.exp(0.8 * scale) + sum(math.exp(c * scale) for c in top2))
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # k_neg <= 0 keeps every negative
    all_loss = hard_negative_info_nce(q, pos, negs, k_neg=0, logit_scale=scale)
    expected_all = -math.log(
        math.exp(0.8 * scale) / (math.exp(0.8 * scale) + sum(math.exp(c * scale) for c in cos_neg))
    )
    assert all_loss.item() == pytest.approx(expected_all, rel=1e-5)
    # masking out the hardest negative makes the next ones the top-2
    valid = torch.tensor([[False, True, True, True]])
    masked = hard_negative_info_nce(q, pos, negs, valid, k_neg=2, logit_scale=scale)
    top2 = sorted(cos_neg[1:], reverse=True)[:2]
    expected = -math.log(
        math.exp(0.8 * scale) / (math.exp(0.8 * scale) + sum(math.exp(c * scale) for c in top2))
    )
    assert masked.item() == pytest.approx(expected, rel=1e-5)


def test_hard_negative_nce_per_query_pools_and_degenerate_inputs():
    torch.manual_seed(0)
    scale = torch.tensor(14.0, requires_grad=True)
    q = torch.randn(3, 8, requires_grad=True)
    pos = torch.randn(3, 8)
    pools = torch.randn(3, 5, 8, requires_grad=True)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1] = False  # query 1: no negative at all -> loss 0
    losses = hard_negative_info_nce(
        q, pos, pools, valid, k_neg=3, logit_scale=scale, reduction="none"
    )
    assert losses.shape == (3,)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-6)
    losses.mean().backward()
    for t in (q, pools, scale):
        assert torch.isfinite(t.grad).all()
    # no query at all: a zero that still backpropagates
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = hard_negative_info_nce(
        empty, torch.zeros(0, 8), torch.randn(4, 8), k_neg=2, logit_scale=scale
    )
    assert loss.item() == 0.0
    loss.backward()
    # zero vectors (degenerate features) stay finite
    z = torch.zeros(2, 8, requires_grad=True)
    loss = hard_negative_info_nce(
        z, torch.zeros(2, 8), torch.zeros(4, 8), k_neg=2, logit_scale=scale
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError):
        hard_negative_info_nce(q, pos, pools[:2], k_neg=3)


def test_masked_topk_and_same_text():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    valid = torch.tensor([[True, False, True, True]])
    values, idx, ok = masked_topk(scores, valid, 2)
    assert idx.tolist() == [[3, 2]] and ok.all()
    values, idx, ok = masked_topk(scores, torch.tensor([[False, False, True, False]]), 2)
    assert idx[0, 0].item() == 2 and ok.tolist() == [[True, False]]
    same = same_text_matrix(["a red star", "A red star ", "sky"])
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


# ---------------------------------------------------------------- correspondences
def _hand_built_batch():
    """Two images of 6 pixels, 3 entities (e0, e1 in image 0, e2 in image 1), hand-set cosines.

    The grounding is m = sigmoid(10 cos - 2.5): cos 0.5 -> 0.92, 0.3 -> 0.62, 0.2 -> 0.38, 0.1 ->
    0.18, 0.08 -> 0.15, 0.05 -> 0.12, 0.0 -> 0.08.
    """
    cos = torch.zeros(2, 6, 3)
    # entity 0 ("red star", image 0): pixels 0, 1, 2 grounded (0.5, 0.3, 0.5), pixel 3 ambiguous
    cos[0, :, 0] = torch.tensor([0.5, 0.3, 0.5, 0.2, 0.0, 0.05])
    # image 1 pixel 2 looks like a red star too
    cos[1, :, 0] = torch.tensor([0.0, 0.08, 0.5, 0.0, 0.0, 0.1])
    # entity 1 ("sky", image 0): pixels 4, 5
    cos[0, :, 1] = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.5, 0.5])
    cos[1, :, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    # entity 2 ("sky", image 1): nothing above θ_pos in its own image
    cos[1, :, 2] = torch.tensor([0.2, 0.1, 0.0, 0.0, 0.0, 0.0])
    cos[0, :, 2] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0])
    masks = torch.sigmoid(10 * cos - 2.5)
    # 2 units per image: unit 0 = pixels 0-2, unit 1 = pixels 3-5 (hard assignment)
    assign = torch.zeros(2, 6, 2)
    assign[:, :3, 0] = 1
    assign[:, 3:, 1] = 1
    centers = torch.randn(2, 2, 4)
    entity_emb = torch.randn(3, 4)
    image_index = torch.tensor([0, 0, 1])
    return cos, masks, assign, centers, entity_emb, image_index


def test_correspondences_pick_specified_positives_and_hard_negatives():
    cos, masks, assign, centers, entity_emb, image_index = _hand_built_batch()
    corr = build_correspondences(
        cos,
        masks,
        assign,
        centers,
        entity_emb,
        image_index,
        pos_thresh=0.5,
        neg_thresh=0.2,
        k_pix=2,
    )
    # P: top-2 by m among m > θ_pos in the entity's own image
    pos = [sorted(corr.pos_pixels[e][corr.pos_pixels_valid[e]].tolist()) for e in range(3)]
    assert pos[0] == [0, 2]  # pixels 0 and 2 (m = 0.92) beat pixel 1 (0.62); pixel 3 (0.38) is out
    assert pos[1] == [4, 5]
    assert pos[2] == []  # image 1 has no pixel with m_2 > 0.5
    # N: top-2 by cos over the whole batch among m < θ_neg; flattened index b * 6 + x
    neg0 = corr.neg_pixels[0][corr.neg_pixels_valid[0]].tolist()
    # candidates with m_0 < 0.2: image 0 pixels 4 (cos 0.0), 5 (0.05); image 1 pixels 0, 3, 4 (0.0),
    # 1 (0.08), 5 (0.1). Image 1 pixel 2 (cos 0.5) is grounded to entity 0 there and image 0 pixel 3
    # (m 0.38) is ambiguous: neither may be a negative.
    assert neg0 == [11, 7]  # image 1 pixel 5 (cos 0.1), then image 1 pixel 1 (cos 0.08)
    # U+: mass of entity 0 over unit 0 (pixels 0-2) = mean(0.92, 0.62, 0.92) > 0.5, unit 1 < 0.5
    assert corr.pos_units[0].tolist() == [True, False]
    assert corr.pos_units[1].tolist() == [False, True]
    # entity 2 has no unit above θ_pos: fallback = the unit with the highest cos(c_u, e_2)
    unit_cos = F.normalize(centers[1], dim=-1) @ F.normalize(entity_emb[2], dim=-1)
    assert corr.pos_units[2].tolist() == [
        bool(unit_cos.argmax() == 0),
        bool(unit_cos.argmax() == 1),
    ]
    # negative units of entity 0: its own image's other unit, plus image 1's units unless they would
    # be positive for it (image 1 unit 0 holds pixel 2 with m = 0.92: mass 0.39 < 0.5, kept)
    assert corr.neg_units[0].tolist() == [[False, True], [True, True]]
    # entity 1 ("sky" in image 0): image 1's unit 0 (pixels 0, 1 at cos 0.5) would be positive:
    # dropped
    assert corr.neg_units[1].tolist() == [[True, False], [False, True]]
    unfiltered = build_correspondences(
        cos,
        masks,
        assign,
        centers,
        entity_emb,
        image_index,
        pos_thresh=0.5,
        neg_thresh=0.2,
        k_pix=2,
        filter_cross_image=False,
    )
    assert unfiltered.neg_units[1].tolist() == [[True, False], [True, True]]


def test_positive_units_fallback_only_when_empty():
    mass = torch.tensor([[0.6, 0.7, 0.1], [0.1, 0.2, 0.3]])
    cos = torch.tensor([[0.0, 0.0, 0.9], [0.5, 0.1, 0.2]])
    pos = positive_units(mass, cos, 0.5)
    assert pos.tolist() == [[True, True, False], [True, False, False]]


# ---------------------------------------------------------------- level losses
def _random_batch(b=3, n=16, d=8, texts=("red star", "sky", "red star", "water", "blue ring")):
    torch.manual_seed(1)
    z = torch.randn(b, n, d, requires_grad=True)
    e = len(texts)
    entity_emb = F.normalize(torch.randn(e, d), dim=-1)
    image_index = torch.arange(e) % b
    return z, entity_emb, image_index, same_text_matrix(list(texts))


def _all_losses(z, entity_emb, image_index, same_text, w, b, scale, k_pix=4, num_units=4):
    bsz, n, d = z.shape
    side = int(math.isqrt(n))
    cos, masks = grounding_masks(z, entity_emb, w, b)
    regions = object_regions(z, own_image_rows(masks, image_index), image_index)
    r2e, e2r = object_level_losses(regions, entity_emb, image_index, same_text, 16, scale)
    init = grid_init_centers(z.transpose(1, 2).reshape(bsz, d, side, side), num_units)
    centers, assign = soft_kmeans(z, init)
    corr = build_correspondences(
        cos,
        masks,
        assign,
        centers,
        entity_emb,
        image_index,
        pos_thresh=0.5,
        neg_thresh=0.2,
        k_pix=k_pix,
    )
    u2e, e2u = region_level_loss(
        centers, corr, entity_emb, image_index, same_text, k_neg=16, logit_scale=scale
    )
    p2e, e2p = pixel_level_loss(
        z, corr, entity_emb, image_index, same_text, k_neg=16, logit_scale=scale
    )
    return {"r2e": r2e, "e2r": e2r, "u2e": u2e, "e2u": e2u, "p2e": p2e, "e2p": e2p}


@pytest.mark.parametrize(
    "case",
    [
        "normal",
        "no_entities",
        "one_image",
        "same_text",
        "nothing_grounded",
        "all_grounded",
        "zeros",
    ],
)
def test_level_losses_finite_and_differentiable(case):
    z, entity_emb, image_index, same_text = _random_batch()
    w = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-2.5, requires_grad=True)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    if case == "no_entities":
        entity_emb, image_index, same_text = entity_emb[:0], image_index[:0], same_text_matrix([])
    elif case == "one_image":
        z = z[:1].detach().requires_grad_(True)
        entity_emb, image_index = entity_emb[:2], torch.zeros(2, dtype=torch.long)
        same_text = same_text_matrix(["red star", "sky"])
    elif case == "same_text":
        same_text = same_text_matrix(["sky"] * 5)  # every text negative is dropped
    elif case == "nothing_grounded":
        b = torch.tensor(
            -50.0, requires_grad=True
        )  # m ~ 0 everywhere: no positive pixel / unit by mass
    elif case == "all_grounded":
        b = torch.tensor(50.0, requires_grad=True)  # m ~ 1 everywhere: no negative pixel
    elif case == "zeros":
        z = torch.zeros_like(z, requires_grad=True)
    losses = _all_losses(z, entity_emb, image_index, same_text, w, b, scale)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    for t in (z, w, b, scale):
        assert t.grad is None or torch.isfinite(t.grad).all()
    if case == "normal":
        assert all(v.item() > 0 for v in losses.values()), losses
        assert z.grad.abs().sum() > 0 and w.grad.abs() > 0 and scale.grad.abs() > 0
    if case == "no_entities":
        assert all(v.item() == 0 for v in losses.values())


def test_pixel_loss_pulls_positive_pixels_to_their_entity():
    """Gradient steps on L_pix lower it and raise the cosine of grounded pixels to their entity."""
    torch.manual_seed(0)
    entity_emb = torch.eye(4)[:2]  # two orthogonal entities, one per image
    image_index = torch.tensor([0, 1])
    same_text = same_text_matrix(["red star", "sky"])
    z = (0.3 * torch.randn(2, 16, 4)).requires_grad_(True)
    with torch.no_grad():
        z[0, :4, 0] += 0.5  # image 0: 4 pixels lean towards entity 0 (grounded: m > θ_pos)
        z[1, :4, 1] += 0.5
    opt = torch.optim.SGD([z], lr=0.5)

    def pos_cos():
        return (F.normalize(z[0, :4], dim=-1) @ entity_emb[0]).mean().item()

    before, losses = pos_cos(), []
    for _ in range(20):
        cos, masks = grounding_masks(z, entity_emb, 10.0, -2.5)
        init = grid_init_centers(z.transpose(1, 2).reshape(2, 4, 4, 4), 2)
        centers, assign = soft_kmeans(z, init)
        corr = build_correspondences(
            cos,
            masks,
            assign,
            centers,
            entity_emb,
            image_index,
            pos_thresh=0.5,
            neg_thresh=0.2,
            k_pix=4,
        )
        loss = sum(
            pixel_level_loss(z, corr, entity_emb, image_index, same_text, k_neg=4, logit_scale=10.0)
        )
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.2 * losses[0], losses
    assert pos_cos() > before + 0.02


# ---------------------------------------------------------------- meta-points
def test_grid_init_and_soft_kmeans():
    assert grid_shape(8, 16, 16) == (2, 4) or grid_shape(8, 16, 16) == (4, 2)
    assert grid_shape(16, 16, 16) == (4, 4)
    assert grid_shape(6, 8, 32) == (1, 6) or grid_shape(6, 8, 32) == (2, 3)
    feats = torch.randn(2, 5, 8, 8, requires_grad=True)
    init = grid_init_centers(feats, 4)
    assert init.shape == (2, 4, 5)
    assert torch.allclose(init[0, 0], feats[0, :, :4, :4].mean(dim=(1, 2)), atol=1e-6)
    points = feats.flatten(2).transpose(1, 2)
    centers, q = soft_kmeans(points, init, iters=3, temperature=0.1)
    assert q.shape == (2, 64, 4) and torch.allclose(q.sum(-1), torch.ones(2, 64), atol=1e-5)
    expected = torch.einsum("bnu,bnd->bud", q, points) / q.sum(1)[..., None]
    assert torch.allclose(centers, expected, atol=1e-5)
    centers.sum().backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


# ---------------------------------------------------------------- prediction units
def _two_region_map(noise=0.0, flip_fraction=0.0, seed=0):
    """(D, 8, 8) features: left half near class 0's embedding, right half near class 1's; a
    fraction of the pixels gets a strong class-2 component (their pixel argmax flips to class 2)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.eye(6)[:3]  # 3 classes in 6-d
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:, 4:] = 1
    feats = classes[labels] + noise * torch.randn(8, 8, 6, generator=g)
    if flip_fraction:
        flip = torch.rand(8, 8, generator=g) < flip_fraction
        feats[flip] += 1.2 * classes[2]
    return feats.permute(2, 0, 1).contiguous(), classes, labels


def test_units_recover_two_regions():
    feats, classes, labels = _two_region_map(noise=0.05)
    for name, fn in UNIT_PREDICTORS.items():
        scores = fn(feats, classes, num_units=4, num_groups=2, purity=0.6, max_splits=2)
        assert scores.shape == (3, 8, 8)
        assert torch.equal(scores.argmax(0), labels), name


def test_adaptive_unit_removes_pixel_noise():
    feats, classes, labels = _two_region_map(noise=0.05, flip_fraction=0.15, seed=3)
    pixel = pixel_unit_scores(feats, classes).argmax(0)
    adaptive = adaptive_unit_scores(feats, classes, num_units=2, purity=0.6, max_splits=2).argmax(0)
    assert (pixel != labels).sum() > 0  # the pixel unit is noisy
    assert (adaptive == labels).float().mean() > (pixel == labels).float().mean()
    assert torch.equal(adaptive, labels)


def test_adaptive_unit_splits_an_under_segmented_unit():
    """One initial unit covers both regions: it is impure, the split recovers the two regions,
    whereas a single fixed group cannot."""
    feats, classes, labels = _two_region_map(noise=0.05)
    adaptive = adaptive_unit_scores(feats, classes, num_units=1, purity=0.6, max_splits=1).argmax(0)
    assert torch.equal(adaptive, labels)
    group = group_unit_scores(feats, classes, num_groups=1).argmax(0)
    assert group.unique().numel() == 1
    # with no split allowed the impure unit keeps the pixel scores (still correct here, no noise)
    kept = adaptive_unit_scores(feats, classes, num_units=1, purity=0.6, max_splits=0)
    assert torch.allclose(kept, pixel_unit_scores(feats, classes))
    # UNIT_IMPURE_LEAF "unit": the impure leaf takes its unit scores (here: the single group's)
    leaf = adaptive_unit_scores(feats, classes, num_units=1, max_splits=0, impure_leaf="unit")
    assert torch.allclose(leaf, group_unit_scores(feats, classes, num_groups=1), atol=1e-6)


def test_pixel_loss_with_all_pixels_matches_per_query_pools():
    """k_pix <= 0 (every qualifying pixel) uses one shared masked pool: the same loss as explicit
    per-query pools, whatever the order of the candidate indices."""
    z, entity_emb, image_index, same_text = _random_batch()
    cos, masks = grounding_masks(z, entity_emb, 10.0, 0.0)
    init = grid_init_centers(z.transpose(1, 2).reshape(3, 8, 4, 4), 4)
    centers, assign = soft_kmeans(z, init)
    corr = build_correspondences(
        cos,
        masks,
        assign,
        centers,
        entity_emb,
        image_index,
        pos_thresh=0.5,
        neg_thresh=0.4,
        k_pix=0,
    )
    assert corr.neg_pixels.shape == (5, 48)
    _, e2p = pixel_level_loss(
        z, corr, entity_emb, image_index, same_text, k_neg=0, logit_scale=10.0
    )
    perm = torch.randperm(48)
    shuffled = dataclasses.replace(
        corr, neg_pixels=corr.neg_pixels[:, perm], neg_pixels_valid=corr.neg_pixels_valid[:, perm]
    )
    _, e2p_shuffled = pixel_level_loss(
        z, shuffled, entity_emb, image_index, same_text, k_neg=0, logit_scale=10.0
    )
    # explicit per-query pools
    pair_e, slot = torch.nonzero(corr.pos_pixels_valid, as_tuple=True)
    flat = z.reshape(48, -1)
    queries = flat[image_index[pair_e] * 16 + corr.pos_pixels[pair_e, slot]]
    losses = hard_negative_info_nce(
        entity_emb[pair_e],
        queries,
        flat[corr.neg_pixels[pair_e]],
        corr.neg_pixels_valid[pair_e],
        k_neg=0,
        logit_scale=10.0,
        reduction="none",
    )
    assert len(pair_e) > 0
    assert torch.allclose(e2p, group_mean(losses, pair_e, 5), atol=1e-5)
    assert torch.allclose(e2p, e2p_shuffled, atol=1e-5)
