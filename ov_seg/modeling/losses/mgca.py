"""MGCA's pseudo multi-granular correspondences and its object / region / pixel losses.

Notation (``single_stage.md`` §3, project design): pixel embeddings z_x of image b, (B, N, D);
entities e_bj (text embeddings of a caption's noun chunks), flattened over the batch to (E, D) with
``image_index`` (E,) naming each entity's image; ``same_text`` (E, E) marks entity pairs with the
same string. Grounding masks ``m_bj(x) = σ(w·cos(z_x, e_bj) + β)`` are computed for every pixel of
the batch against every entity, (B, N, E); ``m`` is detached wherever it only selects pseudo labels.

Pseudo correspondences:

- positive units U⁺_bj: meta-points u of image b with ``Σ_x q_xu m_bj(x) / Σ_x q_xu > θ_pos``; when
  none qualifies, the single u with the highest cos(c_u, e_bj);
- positive pixels P_bj: the top-k_pix pixels of image b by m_bj among those with ``m_bj > θ_pos``;
- hard negative pixels N_bj: the top-k_pix pixels of the whole batch by cos(z_x, e_bj) among those
  with ``m_bj(x) < θ_neg``.

Every loss is built from ``hard_negative_info_nce`` (L_hn, top-k_n negatives); a candidate with the
positive's text string is never a negative, nor is an entity the query is itself a positive of. All
functions are pure.
"""

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .hard_negative import hard_negative_info_nce, masked_topk

__all__ = [
    "Correspondences",
    "grounding_masks",
    "own_image_rows",
    "unit_mass",
    "positive_units",
    "positive_pixels",
    "negative_pixels",
    "object_regions",
    "object_level_losses",
    "build_correspondences",
    "region_level_loss",
    "pixel_level_loss",
    "group_mean",
]


@dataclass
class Correspondences:
    """Pseudo correspondences of one batch (all detached).

    Attributes:
        pos_units: (E, U) bool, U⁺ of each entity (units of its own image).
        neg_units: (E, B, U) bool, candidate negative units of each entity over the batch.
        pos_pixels: (E, k) int64 pixel indices (into the entity's image) and ``pos_pixels_valid``
            (E, k).
        neg_pixels: (E, k) int64 indices into the flattened batch (b * N + x) and
            ``neg_pixels_valid``.
    """

    pos_units: torch.Tensor
    neg_units: torch.Tensor
    pos_pixels: torch.Tensor
    pos_pixels_valid: torch.Tensor
    neg_pixels: torch.Tensor
    neg_pixels_valid: torch.Tensor


def grounding_masks(
    pixel_emb: torch.Tensor, entity_emb: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosines and grounding masks of every pixel of the batch against every entity.

    Args:
        pixel_emb: (B, N, D) pixel embeddings z.
        entity_emb: (E, D) entity embeddings e.
        w, b: the grounding scale w and bias β (scalars or 0-dim tensors).

    Returns:
        cos (B, N, E) and m = σ(w·cos + β) (B, N, E).
    """
    cos = torch.einsum(
        "bnd,ed->bne", F.normalize(pixel_emb, dim=-1), F.normalize(entity_emb, dim=-1)
    )
    return cos, torch.sigmoid(w * cos + b)


def own_image_rows(x: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Each entity's column on its own image: (B, N, E) -> (E, N), row e = x[index[e], :, e]."""
    e = torch.arange(image_index.numel(), device=x.device)
    return x[image_index, :, e]


def unit_mass(masks: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Grounding mass of every unit for every entity: Σ_x q_xu m_e(x) / Σ_x q_xu.

    Args:
        masks: (B, N, E) grounding masks m.
        assign: (B, N, U) soft assignments q.

    Returns:
        (E, B, U) mass of each entity over every unit of every image.
    """
    num = torch.einsum("bne,bnu->ebu", masks, assign)
    return num / assign.sum(1).clamp_min(1e-6)[None]


def positive_units(
    mass_own: torch.Tensor, unit_cos_own: torch.Tensor, pos_thresh: float
) -> torch.Tensor:
    """U⁺: units of the entity's image with mass > θ_pos, else the unit most similar to the entity.

    Args:
        mass_own: (E, U) mass of each entity over its own image's units.
        unit_cos_own: (E, U) cos(c_u, e) for its own image's units.
        pos_thresh: θ_pos.

    Returns:
        (E, U) bool with at least one True per row (when U > 0).
    """
    pos = mass_own > pos_thresh
    if pos.shape[1] == 0:
        return pos
    units = torch.arange(pos.shape[1], device=pos.device)
    fallback = unit_cos_own.argmax(dim=1, keepdim=True) == units[None, :]
    return torch.where(pos.any(dim=1, keepdim=True), pos, fallback)


def positive_pixels(masks_own: torch.Tensor, pos_thresh: float, k_pix: int):
    """P: the top-k_pix pixels by m among those with m > θ_pos.

    Args:
        masks_own: (E, N) grounding mask of each entity on its own image.
        pos_thresh: θ_pos.
        k_pix: k_pix (``<= 0``: all qualifying pixels).

    Returns:
        indices (E, k) into the image's pixels and their validity (E, k).
    """
    _, idx, valid = masked_topk(masks_own, masks_own > pos_thresh, k_pix)
    return idx, valid


def negative_pixels(cos: torch.Tensor, masks: torch.Tensor, neg_thresh: float, k_pix: int):
    """N: the top-k_pix pixels of the whole batch by cos(z_x, e) among those with m_e(x) < θ_neg.

    Args:
        cos: (B, N, E) pixel-entity cosines.
        masks: (B, N, E) grounding masks.
        neg_thresh: θ_neg.
        k_pix: k_pix (``<= 0``: all qualifying pixels).

    Returns:
        indices (E, k) into the flattened batch (b * N + x) and their validity (E, k).
    """
    scores = cos.flatten(0, 1).t()  # (E, B * N)
    _, idx, valid = masked_topk(scores, masks.flatten(0, 1).t() < neg_thresh, k_pix)
    return idx, valid


def group_mean(losses: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean over groups of the mean loss inside each group (groups without a member are skipped).

    Args:
        losses: (Q,) per-query losses.
        groups: (Q,) int64 group of each query (e.g. its entity).
        num_groups: number of groups.

    Returns:
        a scalar; 0 (keeping the graph) when Q = 0.
    """
    if losses.numel() == 0:
        return losses.sum()
    total = losses.new_zeros(num_groups).index_add(0, groups, losses)
    count = losses.new_zeros(num_groups).index_add(0, groups, torch.ones_like(losses))
    has = count > 0
    return (total[has] / count[has]).mean()


def object_regions(pixel_emb: torch.Tensor, masks_own: torch.Tensor, image_index: torch.Tensor):
    """Region vectors r_bj = Σ_x m_bj(x) z_x / Σ_x m_bj(x).

    Args:
        pixel_emb: (B, N, D) pixel embeddings.
        masks_own: (E, N) grounding masks on each entity's own image (differentiable).
        image_index: (E,) image of each entity.

    Returns:
        (E, D) region vectors.
    """
    num = torch.einsum("en,end->ed", masks_own, pixel_emb[image_index])
    return num / masks_own.sum(1, keepdim=True).clamp_min(1e-6)


def object_level_losses(
    regions: torch.Tensor,
    entity_emb: torch.Tensor,
    image_index: torch.Tensor,
    same_text: torch.Tensor,
    k_neg: int,
    logit_scale,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two hard-negative terms of L_obj.

    ``L_hn(r_bj, e_bj, other-caption entities)`` and ``L_hn(e_bj, r_bj, regions of other images)``;
    a candidate with the positive's string is dropped. (The image-caption term ``L_nce(cos(ō_b,
    s_c))`` is the shared ``info_nce``.)

    Returns:
        (region -> entity, entity -> region) losses, each a scalar mean over entities.
    """
    other_image = image_index[:, None] != image_index[None, :]
    valid = other_image & ~same_text
    r2e = hard_negative_info_nce(regions, entity_emb, entity_emb, valid, k_neg, logit_scale)
    e2r = hard_negative_info_nce(entity_emb, regions, regions, valid, k_neg, logit_scale)
    return r2e, e2r


def _text_negatives(query_entity: torch.Tensor, co_positive: torch.Tensor, same_text: torch.Tensor):
    """(Q, E) valid text negatives for visual queries positive for ``query_entity``: every entity
    except the positive itself, those with its string, and those the query is also a positive of
    (``co_positive`` (Q, E))."""
    e = same_text.shape[0]
    self_mask = query_entity[:, None] == torch.arange(e, device=query_entity.device)[None, :]
    return ~(self_mask | same_text[query_entity] | co_positive)


def build_correspondences(
    cos: torch.Tensor,
    masks: torch.Tensor,
    assign: torch.Tensor,
    centers: torch.Tensor,
    entity_emb: torch.Tensor,
    image_index: torch.Tensor,
    *,
    pos_thresh: float,
    neg_thresh: float,
    k_pix: int,
    filter_cross_image: bool = True,
) -> Correspondences:
    """Pseudo correspondences of a batch (everything detached).

    With ``filter_cross_image`` a meta-point of another image is not a negative of e_bj when it
    would be a positive unit of e_bj (mass > θ_pos): the cross-image analogue of the U⁺ rule
    (project design).

    Args:
        cos: (B, N, E) pixel-entity cosines.
        masks: (B, N, E) grounding masks m.
        assign: (B, N, U) soft meta-point assignments q.
        centers: (B, U, D) meta-points c_u.
        entity_emb: (E, D) entity embeddings.
        image_index: (E,) image of each entity.
        pos_thresh, neg_thresh: θ_pos, θ_neg.
        k_pix: k_pix.

    Returns:
        the ``Correspondences``.
    """
    with torch.no_grad():
        m = masks.detach()
        num_e = entity_emb.shape[0]
        bsz, num_u = centers.shape[:2]
        e_idx = torch.arange(num_e, device=m.device)
        mass = unit_mass(m, assign.detach())  # (E, B, U)
        unit_cos = torch.einsum(
            "bud,ed->ebu", F.normalize(centers.detach(), dim=-1), F.normalize(entity_emb, dim=-1)
        )
        pos_units = positive_units(
            mass[e_idx, image_index], unit_cos[e_idx, image_index], pos_thresh
        )
        own_image = (image_index[:, None] == torch.arange(bsz, device=m.device))[
            :, :, None
        ]  # (E, B, 1)
        neg_own = own_image & ~pos_units[:, None, :]
        cross = (
            (mass <= pos_thresh) if filter_cross_image else torch.ones_like(mass, dtype=torch.bool)
        )
        neg_units = neg_own | (~own_image & cross)
        pos_idx, pos_valid = positive_pixels(own_image_rows(m, image_index), pos_thresh, k_pix)
        neg_idx, neg_valid = negative_pixels(cos.detach(), m, neg_thresh, k_pix)
    return Correspondences(pos_units, neg_units, pos_idx, pos_valid, neg_idx, neg_valid)


def region_level_loss(
    centers: torch.Tensor,
    corr: Correspondences,
    entity_emb: torch.Tensor,
    image_index: torch.Tensor,
    same_text: torch.Tensor,
    *,
    k_neg: int,
    logit_scale,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """L_reg with meta-points.

    ``L_hn(c_u, e_bj, {other entities of b} ∪ other-caption entities)`` for u ∈ U⁺_bj, and
    ``L_hn(e_bj, c_u, {meta-points of b ∉ U⁺_bj} ∪ meta-points of other images)``.

    Args:
        centers: (B, U, D) meta-points c_u (differentiable).
        corr: the batch's ``Correspondences``.
        entity_emb: (E, D), image_index: (E,), same_text: (E, E).

    Returns:
        (unit -> entity, entity -> unit) losses: means over entities of the means over their
        positive units.
    """
    num_e = entity_emb.shape[0]
    bsz, num_u = centers.shape[:2]
    with torch.no_grad():
        pair_e, pair_u = torch.nonzero(corr.pos_units, as_tuple=True)
        same_image = image_index[pair_e][:, None] == image_index[None, :]  # (Q, E)
        co_pos = same_image & corr.pos_units[:, pair_u].t()  # the unit is also a positive of e'
        text_valid = _text_negatives(pair_e, co_pos, same_text)
    queries = centers[image_index[pair_e], pair_u]  # (Q, D)
    u2e = hard_negative_info_nce(
        queries, entity_emb[pair_e], entity_emb, text_valid, k_neg, logit_scale, reduction="none"
    )
    e2u = hard_negative_info_nce(
        entity_emb[pair_e],
        queries,
        centers.reshape(bsz * num_u, -1),
        corr.neg_units.reshape(num_e, bsz * num_u)[pair_e],
        k_neg,
        logit_scale,
        reduction="none",
    )
    return group_mean(u2e, pair_e, num_e), group_mean(e2u, pair_e, num_e)


def pixel_level_loss(
    pixel_emb: torch.Tensor,
    corr: Correspondences,
    entity_emb: torch.Tensor,
    image_index: torch.Tensor,
    same_text: torch.Tensor,
    *,
    k_neg: int,
    logit_scale,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """L_pix.

    ``mean_{x∈P_bj} L_hn(z_x, e_bj, {other entities of b} ∪ other-caption entities)`` and
    ``mean_{x∈P_bj} L_hn(e_bj, z_x, N_bj)``.

    Args:
        pixel_emb: (B, N, D) pixel embeddings (differentiable).
        corr: the batch's ``Correspondences``.
        entity_emb: (E, D), image_index: (E,), same_text: (E, E).

    Returns:
        (pixel -> entity, entity -> pixel) losses: means over entities of the means over P_bj.
    """
    bsz, n, d = pixel_emb.shape
    num_e = entity_emb.shape[0]
    with torch.no_grad():
        pair_e, slot = torch.nonzero(corr.pos_pixels_valid, as_tuple=True)
        flat_x = image_index[pair_e] * n + corr.pos_pixels[pair_e, slot]  # (Q,) into the batch
        pos_flat = torch.zeros(num_e, bsz * n, dtype=torch.bool, device=pixel_emb.device)
        pos_flat[pair_e, flat_x] = True
        co_pos = pos_flat[:, flat_x].t()  # (Q, E): the pixel is also a positive of e'
        text_valid = _text_negatives(pair_e, co_pos, same_text)
    flat = pixel_emb.reshape(bsz * n, d)
    queries = flat[flat_x]  # (Q, D)
    p2e = hard_negative_info_nce(
        queries, entity_emb[pair_e], entity_emb, text_valid, k_neg, logit_scale, reduction="none"
    )
    if corr.neg_pixels.shape[1] == bsz * n:
        # every pixel of the batch is a candidate (k_pix <= 0): one shared pool, masked per query
        pool, pool_valid = flat, corr.neg_pixels_valid.gather(1, corr.neg_pixels.argsort(1))
    else:  # (Q, k, D): N_bj of the query's entity
        pool, pool_valid = flat[corr.neg_pixels[pair_e]], corr.neg_pixels_valid
    e2p = hard_negative_info_nce(
        entity_emb[pair_e],
        queries,
        pool,
        pool_valid[pair_e],
        k_neg,
        logit_scale,
        reduction="none",
    )
    return group_mean(p2e, pair_e, num_e), group_mean(e2p, pair_e, num_e)
