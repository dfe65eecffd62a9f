"""Contrastive losses (pure functions): CLIP's symmetric InfoNCE and contrastive classification.

For B matched pairs (a_i, b_i), L2-normalised, and a logit scale s = 1/τ::

    L = ½ [ CE(s · A Bᵀ, i) + CE(s · B Aᵀ, i) ]

Extra negatives for the a → b direction (e.g. hard-negative captions) are appended as columns of the
a → b logits only. Pairs marked ``same`` (two captions that say the same thing) are no negatives of
each other: their logits leave both softmaxes.
"""

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["info_nce", "contrastive_classification", "clamped_logit_scale", "all_gather_with_grad"]


def clamped_logit_scale(log_scale: torch.Tensor, max_scale: float = 100.0) -> torch.Tensor:
    """s = exp(log_scale) clamped to ``max_scale`` (CLIP: 100); gradient stops once clamped."""
    return log_scale.exp().clamp(max=max_scale)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) over all workers, differentiably (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: Union[float, torch.Tensor],
    *,
    b_negatives: Optional[torch.Tensor] = None,
    symmetric: bool = True,
    normalize: bool = True,
    targets: Optional[torch.Tensor] = None,
    same: Optional[torch.Tensor] = None,
    same_negatives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between two batches of paired embeddings.

    Args:
        a: (B, D) embeddings of one modality (e.g. images).
        b: (B, D) embeddings of the other (e.g. captions); b[i] is a[i]'s positive.
        logit_scale: s = 1/τ (float or 0-dim tensor, already exponentiated and clamped).
        b_negatives: optional (M, D) extra negatives of the a → b direction (hard-negative texts).
        symmetric: average the a → b and b → a losses (CLIP); ``False`` = a → b only.
        normalize: L2-normalise ``a``, ``b`` and ``b_negatives`` here.
        targets: optional (B,) int64 column of each a's positive among ``b`` (default: the
            diagonal); only with ``symmetric=False`` (the b → a direction needs one positive per
            row).
        same: optional (B, B) bool, True where a_i and b_j (and so a_j and b_i) belong together
            although i ≠ j (e.g. captions that say the same thing): those off-diagonal pairs are
            left out of both directions' negatives. The diagonal is ignored; only with the
            default targets.
        same_negatives: optional (B, M) bool, True where ``b_negatives[m]`` belongs with a_i (a
            hard negative of another pair that says what a_i's own caption says): left out of
            a_i's negatives.

    Returns:
        the scalar loss (mean over the batch).

    Raises:
        ValueError: mismatched shapes.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be (B, D)")
    if targets is not None and symmetric:
        raise ValueError("explicit targets need symmetric=False")
    if same is not None:
        if targets is not None:
            raise ValueError("same needs the default (diagonal) targets")
        if same.shape != (a.shape[0], a.shape[0]) or same.dtype != torch.bool:
            raise ValueError(
                f"same must be a ({a.shape[0]}, {a.shape[0]}) bool tensor, got "
                f"{tuple(same.shape)} {same.dtype}"
            )
    num_neg = 0 if b_negatives is None else b_negatives.shape[0]
    if same_negatives is not None and (
        same_negatives.shape != (a.shape[0], num_neg) or same_negatives.dtype != torch.bool
    ):
        raise ValueError(
            f"same_negatives must be a ({a.shape[0]}, {num_neg}) bool tensor (rows of a, "
            f"b_negatives), got {tuple(same_negatives.shape)} {same_negatives.dtype}"
        )
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if targets is None:
        targets = torch.arange(a.shape[0], device=a.device)
    logits_ab = logit_scale * a @ b.t()  # (B, B)
    if same is not None:
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=same.device)
        off = ((same | same.t()) & ~eye).to(logits_ab.device)
        logits_ab = logits_ab.masked_fill(off, float("-inf"))
    logits_ba = logits_ab.t()
    if b_negatives is not None and b_negatives.numel():
        if b_negatives.ndim != 2 or b_negatives.shape[1] != a.shape[1]:
            raise ValueError(
                f"b_negatives must be (M, {a.shape[1]}), got {tuple(b_negatives.shape)}"
            )
        neg = F.normalize(b_negatives, dim=-1) if normalize else b_negatives
        logits_neg = logit_scale * a @ neg.t()  # (B, M)
        if same_negatives is not None:
            logits_neg = logits_neg.masked_fill(same_negatives.to(logits_neg.device), float("-inf"))
        logits_ab = torch.cat([logits_ab, logits_neg], dim=1)
    loss = F.cross_entropy(logits_ab, targets)
    if symmetric:
        loss = (loss + F.cross_entropy(logits_ba, targets)) / 2
    return loss


def contrastive_classification(
    embeddings: torch.Tensor,
    class_embeddings: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: Union[float, torch.Tensor],
    normalize: bool = True,
) -> torch.Tensor:
    """Cross-entropy of cosine logits against class (text) embeddings.

    Args:
        embeddings: (N, D) e.g. masked-crop image embeddings.
        class_embeddings: (K, D) text embeddings of the candidate classes.
        labels: (N,) int64 in [0, K).
        logit_scale: s = 1/τ.
        normalize: L2-normalise both sides here.

    Returns:
        the scalar loss (0 with zero gradient for N = 0).
    """
    if embeddings.shape[0] == 0:
        return embeddings.sum() * 0.0
    if normalize:
        embeddings = F.normalize(embeddings, dim=-1)
        class_embeddings = F.normalize(class_embeddings, dim=-1)
    return F.cross_entropy(logit_scale * embeddings @ class_embeddings.t(), labels)
