"""Prediction units of dense text-supervised segmentation: pixel, fixed group, adaptive unit.

MGCA (``single_stage.md`` §3) argues that fixed groups (GroupViT) under-segment and pixel units
(TCL) are noisy, and predicts with an **adaptive semantic unit** (project design, not confirmed):

1. pixel scores ``S_pix(x, k) = cos(z_x, t_k)``;
2. units from the meta-point clustering (soft k-means, grid initialisation, ``num_units`` centres),
   each pixel assigned to its most probable unit;
3. unit scores ``S_u(k) = cos(c_u, t_k)``;
4. purity ``ρ_u`` = fraction of the unit's pixels whose pixel argmax equals the unit argmax. A pure
   unit (``ρ_u >= purity``) gives ``S_u`` to all its pixels; an impure one is re-clustered into two
   (farthest-point initialisation, soft k-means) and each part is tested again, at most
   ``max_splits`` times; pixels of a leaf that is still impure keep ``S_pix`` (``impure_leaf``
   "pixel", the design) or take the leaf's ``S_u`` ("unit").

``UNIT_PREDICTORS`` maps the config names "pixel", "group" and "adaptive" to the three predictors.
"""

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ov_seg.modeling.losses.meta_points import farthest_point_init, grid_init_centers, soft_kmeans
from ov_seg.modeling.losses.pacl import patch_text_cosine

__all__ = [
    "pixel_unit_scores",
    "group_unit_scores",
    "adaptive_unit_scores",
    "UNIT_PREDICTORS",
    "cluster_units",
]


def _check(features: torch.Tensor, class_emb: torch.Tensor) -> None:
    if features.ndim != 3 or class_emb.ndim != 2 or features.shape[0] != class_emb.shape[1]:
        raise ValueError(
            f"features must be (D, h, w) and class_emb (K, D) with the same D, got "
            f"{tuple(features.shape)} and {tuple(class_emb.shape)}"
        )


def cluster_units(features: torch.Tensor, num_units: int, iters: int = 3, temperature: float = 0.1):
    """Meta-point clustering of one feature map.

    Args:
        features: (D, h, w) pixel embeddings.
        num_units: number of units (grid-initialised centres).
        iters, temperature: soft k-means settings.

    Returns:
        centres (U, D) and the hard assignment (h * w,) int64 of each pixel to a unit.
    """
    init = grid_init_centers(features[None], num_units)
    points = features.flatten(1).t()[None]  # (1, N, D)
    centers, q = soft_kmeans(points, init, iters=iters, temperature=temperature)
    return centers[0], q[0].argmax(dim=-1)


def pixel_unit_scores(features: torch.Tensor, class_emb: torch.Tensor, **kwargs) -> torch.Tensor:
    """Pixel unit (TCL-style): every pixel keeps its own scores.

    Args:
        features: (D, h, w) pixel embeddings z.
        class_emb: (K, D) class embeddings t_k.

    Returns:
        (K, h, w) cosine scores S_pix.
    """
    _check(features, class_emb)
    d, h, w = features.shape
    return patch_text_cosine(features.flatten(1).t()[None], class_emb)[0].reshape(-1, h, w)


def group_unit_scores(
    features: torch.Tensor,
    class_emb: torch.Tensor,
    *,
    num_groups: int = 8,
    iters: int = 3,
    temperature: float = 0.1,
    **kwargs,
) -> torch.Tensor:
    """Fixed group unit (GroupViT-style): every pixel takes the scores of its group's centre.

    Args:
        features: (D, h, w) pixel embeddings.
        class_emb: (K, D) class embeddings.
        num_groups: number of groups.

    Returns:
        (K, h, w) cosine scores.
    """
    _check(features, class_emb)
    d, h, w = features.shape
    centers, assign = cluster_units(features, num_groups, iters, temperature)
    unit_scores = F.normalize(centers, dim=-1) @ F.normalize(class_emb, dim=-1).t()  # (U, K)
    return unit_scores[assign].t().reshape(-1, h, w)


def adaptive_unit_scores(
    features: torch.Tensor,
    class_emb: torch.Tensor,
    *,
    num_units: int = 16,
    purity: float = 0.6,
    max_splits: int = 2,
    impure_leaf: str = "pixel",
    iters: int = 3,
    temperature: float = 0.1,
    **kwargs,
) -> torch.Tensor:
    """Adaptive semantic unit (see the module docstring).

    Args:
        features: (D, h, w) pixel embeddings.
        class_emb: (K, D) class embeddings.
        num_units: initial units (``UNIT_NUM``).
        purity: ρ threshold (``UNIT_PURITY``).
        max_splits: how many times an impure unit may be split in two (``UNIT_MAX_SPLITS``).
        impure_leaf: scores of a leaf that is still impure: "pixel" (its pixels keep S_pix) or
            "unit" (they take the leaf's S_u) (``UNIT_IMPURE_LEAF``).

    Returns:
        (K, h, w) cosine scores.
    """
    if impure_leaf not in ("pixel", "unit"):
        raise ValueError(f"impure_leaf must be 'pixel' or 'unit', got {impure_leaf!r}")
    _check(features, class_emb)
    d, h, w = features.shape
    points = features.flatten(1).t()  # (N, D)
    t_hat = F.normalize(class_emb, dim=-1)
    s_pix = F.normalize(points, dim=-1) @ t_hat.t()  # (N, K)
    pix_label = s_pix.argmax(dim=-1)
    out = s_pix.clone()
    centers, assign = cluster_units(features, num_units, iters, temperature)
    stack = [(torch.nonzero(assign == u).flatten(), centers[u], 0) for u in range(centers.shape[0])]
    while stack:
        idx, center, depth = stack.pop()
        if idx.numel() == 0:
            continue
        s_unit = F.normalize(center, dim=-1) @ t_hat.t()  # (K,)
        rho = (pix_label[idx] == s_unit.argmax()).float().mean()
        if rho >= purity:
            out[idx] = s_unit
            continue
        sub_assign = None
        if depth < max_splits and idx.numel() >= 2:
            sub = points[idx]
            init = farthest_point_init(sub, 2)
            sub_centers, q = soft_kmeans(
                sub[None], init[None], iters=iters, temperature=temperature
            )
            sub_assign = q[0].argmax(dim=-1)
        if sub_assign is None or bool((sub_assign == sub_assign[0]).all()):
            # an impure leaf (split depth reached, or the unit does not split)
            if impure_leaf == "unit":
                out[idx] = s_unit
            continue
        for part in range(2):
            stack.append((idx[sub_assign == part], sub_centers[0, part], depth + 1))
    return out.t().reshape(-1, h, w)


# MODEL.MGCA.TEST.UNIT_MODE -> predictor(features (D, h, w), class_emb (K, D), **settings) -> (K,
# h, w)
UNIT_PREDICTORS: Dict[str, Callable[..., torch.Tensor]] = {
    "pixel": pixel_unit_scores,
    "group": group_unit_scores,
    "adaptive": adaptive_unit_scores,
}
