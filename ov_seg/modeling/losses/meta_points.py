"""Meta-points: differentiable soft k-means over pixel embeddings (pure functions).

MGCA's region level groups each image's pixel embeddings {z_x} into U meta-points c_u
(``single_stage.md`` §3, project design)::

    q_xu = softmax_u(cos(z_x, c_u) / T)        c_u = Σ_x q_xu z_x / Σ_x q_xu

iterated a few times from a grid initialisation (the average of z over a regular grid of cells).
The same clustering forms the units of the adaptive semantic unit at inference
(``ov_seg.modeling.heads.semantic_units``).
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["grid_shape", "grid_init_centers", "soft_kmeans", "farthest_point_init"]


def grid_shape(num_points: int, height: int, width: int) -> Tuple[int, int]:
    """A (rows, cols) grid with rows * cols = ``num_points`` whose aspect follows the feature map.

    Among the factorisations of ``num_points`` the one whose rows / cols ratio is closest to height
    / width
    is chosen (8 points on a square map: 2 x 4).
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    target = math.log(max(height, 1) / max(width, 1))
    best = None
    for rows in range(1, num_points + 1):
        if num_points % rows:
            continue
        cols = num_points // rows
        score = abs(math.log(rows / cols) - target)
        if best is None or score < best[0] - 1e-9:
            best = (score, rows, cols)
    return best[1], best[2]


def grid_init_centers(features: torch.Tensor, num_points: int) -> torch.Tensor:
    """Grid initialisation: average the features over ``num_points`` regular cells.

    Args:
        features: (B, D, h, w) feature maps.
        num_points: U, the number of centres.

    Returns:
        (B, U, D) initial centres, cells in row-major order.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, D, h, w), got {tuple(features.shape)}")
    rows, cols = grid_shape(num_points, features.shape[2], features.shape[3])
    pooled = F.adaptive_avg_pool2d(features, (rows, cols))  # (B, D, rows, cols)
    return pooled.flatten(2).transpose(1, 2)


def farthest_point_init(points: torch.Tensor, num_points: int) -> torch.Tensor:
    """Deterministic farthest-point initialisation on one point set (cosine distance).

    The first centre is the point least similar to the set's mean; each next one is the point least
    similar to its closest chosen centre.

    Args:
        points: (N, D) points, N >= 1.
        num_points: U centres (repeats points when N < U).

    Returns:
        (U, D) centres (copies of points).
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (N, D) tensor, got {tuple(points.shape)}")
    p = F.normalize(points, dim=-1)
    closest = p @ F.normalize(points.mean(0), dim=-1)  # (N,) similarity to the nearest "centre"
    chosen = []
    for _ in range(num_points):
        idx = int(closest.argmin())
        chosen.append(idx)
        closest = torch.maximum(closest, p @ p[idx])
    return points[chosen]


def soft_kmeans(
    points: torch.Tensor,
    centers: torch.Tensor,
    iters: int = 3,
    temperature: float = 0.1,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft k-means with cosine assignments; differentiable in ``points`` and ``centers``.

    Each iteration computes ``q = softmax_u(cos(z, c) / temperature)`` and then ``c = Σ q z / Σ q``.

    Args:
        points: (B, N, D) points z.
        centers: (B, U, D) initial centres.
        iters: iterations (>= 1).
        temperature: the softmax temperature T (0.1 in the design).
        weights: optional (B, N) non-negative point weights (0 removes a point, e.g. padding).

    Returns:
        centres (B, U, D) and the assignment (B, N, U) that produced them, so that
        ``c_u = Σ_x q_xu z_x / Σ_x q_xu`` holds for the returned pair. A centre that receives no
        mass keeps its previous value.
    """
    if points.ndim != 3 or centers.ndim != 3 or points.shape[0] != centers.shape[0]:
        raise ValueError(
            f"points {tuple(points.shape)} must be (B, N, D) and centers {tuple(centers.shape)} "
            "(B, U, D)"
        )
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    zn = F.normalize(points, dim=-1)
    q = None
    for _ in range(iters):
        logits = torch.einsum("bnd,bud->bnu", zn, F.normalize(centers, dim=-1)) / temperature
        q = logits.softmax(dim=-1)
        if weights is not None:
            q = q * weights.unsqueeze(-1)
        mass = q.sum(1)  # (B, U)
        new = torch.einsum("bnu,bnd->bud", q, points) / mass.clamp_min(1e-6).unsqueeze(-1)
        centers = torch.where((mass > 1e-6).unsqueeze(-1), new, centers)
    return centers, q
