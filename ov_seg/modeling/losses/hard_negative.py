"""Hard-negative InfoNCE (pure functions).

For a query q, its positive k⁺ and a candidate negative set 𝒩 (``single_stage.md`` §1)::

    L_hn(q, k⁺, 𝒩) = -log e^{cos(q,k⁺)/τ} / (e^{cos(q,k⁺)/τ} + Σ_{k ∈ Top_{k_n}(𝒩)} e^{cos(q,k)/τ})

``Top_{k_n}`` keeps the k_n negatives most similar to q. The candidates are either one pool shared
by every query, ``(M, D)``, or one pool per query, ``(Q, M, D)``; a boolean ``valid`` mask
``(Q, M)`` removes the candidates that are no negatives for a query (same text as the positive,
other positives, ...). A query whose pool is empty keeps only its positive: its loss is 0 and its
gradient is 0, never NaN.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["masked_topk", "hard_negative_info_nce", "same_text_matrix"]


def masked_topk(
    scores: torch.Tensor, valid: Optional[torch.Tensor], k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` entries along the last dim among the ``valid`` ones.

    Args:
        scores: (..., M) scores.
        valid: (..., M) bool, or None (all valid).
        k: how many to keep; ``k <= 0`` or ``k >= M`` keeps all M.

    Returns:
        values (..., k'), indices (..., k') and their validity (..., k') with k' = min(k, M) (M for
        k <= 0). Invalid entries can only fill the slots left when fewer than k' candidates are
        valid; their value is ``-inf``.
    """
    m = scores.shape[-1]
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    masked = scores.masked_fill(~valid, float("-inf"))
    kk = m if k <= 0 else min(k, m)
    if kk == m:
        return masked, torch.arange(m, device=scores.device).expand_as(scores), valid
    values, idx = masked.topk(kk, dim=-1)
    return values, idx, valid.gather(-1, idx)


def hard_negative_info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    k_neg: int = 16,
    logit_scale: Union[float, torch.Tensor] = 1.0 / 0.07,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_hn for Q queries, each against its positive and its k_n hardest valid negatives.

    Args:
        query: (Q, D) queries q (normalised here).
        positive: (Q, D) positives k⁺ (normalised here).
        negatives: (M, D) candidates shared by every query, or (Q, M, D) one pool per query.
        valid: (Q, M) bool, True where the candidate is a negative for the query; None = all.
        k_neg: k_n, the number of hardest negatives kept; ``<= 0`` keeps every valid candidate.
        logit_scale: 1/τ (a float or a 0-dim tensor, already exponentiated and clamped).
        reduction: "mean" (a scalar, 0 with zero gradient when Q = 0) or "none" ((Q,) losses).

    Returns:
        the loss.

    Raises:
        ValueError: when shapes disagree or ``reduction`` is unknown.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if query.ndim != 2 or positive.shape != query.shape:
        raise ValueError(
            f"query {tuple(query.shape)} and positive {tuple(positive.shape)} must be (Q, D)"
        )
    q_count, dim = query.shape
    shared = negatives.ndim == 2
    if negatives.shape[-1] != dim or (not shared and negatives.shape[0] != q_count):
        raise ValueError(
            f"negatives {tuple(negatives.shape)} must be (M, {dim}) or ({q_count}, M, {dim})"
        )
    m = negatives.shape[-2]
    if valid is not None and tuple(valid.shape) != (q_count, m):
        raise ValueError(f"valid {tuple(valid.shape)} must be ({q_count}, {m})")
    q = F.normalize(query, dim=-1)
    pos = (q * F.normalize(positive, dim=-1)).sum(-1, keepdim=True)  # (Q, 1)
    n = F.normalize(negatives, dim=-1)
    neg = q @ n.t() if shared else torch.einsum("qd,qmd->qm", q, n)  # (Q, M)
    # scale before masking: a -inf logit times a learnable scale would give a NaN scale gradient
    neg, _, _ = masked_topk(neg * logit_scale, valid, k_neg)
    logits = torch.cat([pos * logit_scale, neg], dim=1)
    losses = -torch.log_softmax(logits, dim=1)[:, 0]
    if reduction == "none":
        return losses
    if q_count == 0:  # keeps the graph (and the device) without producing NaN
        return query.sum() * 0.0 + positive.sum() * 0.0 + negatives.sum() * 0.0
    return losses.mean()


def same_text_matrix(texts_a, texts_b=None, device=None) -> torch.Tensor:
    """(len(a), len(b)) bool: whether two strings are equal after lower-casing and stripping.

    Used to drop negatives that carry the positive's text string.
    """
    texts_b = texts_a if texts_b is None else texts_b
    keys = {}
    ids_a = [keys.setdefault(t.strip().lower(), len(keys)) for t in texts_a]
    ids_b = [keys.setdefault(t.strip().lower(), len(keys)) for t in texts_b]
    a = torch.tensor(ids_a, dtype=torch.long, device=device)
    b = torch.tensor(ids_b, dtype=torch.long, device=device)
    return a[:, None] == b[None, :]
