"""Noun-to-proposal assignment on score tensors (pure functions).

OVSeg's rule: every noun of a caption independently takes the proposal whose masked crop CLIP scores
highest for it; optionally only when that score reaches a minimum. ``one_to_one`` is an option
beyond the paper: a maximum-score matching (Hungarian) in which no two nouns share a proposal.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = ["Assignment", "assign_nouns", "cosine_scores"]


class Assignment(NamedTuple):
    """Result of ``assign_nouns`` for N nouns."""

    proposal: torch.Tensor  # (N,) int64 index of the chosen proposal, -1 when none
    score: torch.Tensor  # (N,) float score of the chosen proposal (-inf when none)
    keep: torch.Tensor  # (N,) bool: a proposal was chosen and its score >= min_score


def cosine_scores(
    noun_embeddings: torch.Tensor,
    crop_embeddings: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cosine similarity of every noun with every proposal.

    Args:
        noun_embeddings: (N, D) text embeddings.
        crop_embeddings: (Q', D) embeddings of the valid proposals' masked crops (Q' = valid.sum()),
        or
            (Q, D) when ``valid`` is None.
        valid: (Q,) bool, False for proposals without a crop (empty masks).

    Returns:
        (N, Q) float scores in [-1, 1]; -inf in the columns of invalid proposals.
    """
    if noun_embeddings.ndim != 2 or crop_embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be (N, D) and (Q, D), got {tuple(noun_embeddings.shape)}, "
            f"{tuple(crop_embeddings.shape)}"
        )
    sims = (
        F.normalize(noun_embeddings.float(), dim=-1)
        @ F.normalize(crop_embeddings.float(), dim=-1).T
    )
    if valid is None:
        return sims
    if int(valid.sum()) != crop_embeddings.shape[0]:
        raise ValueError(
            f"{crop_embeddings.shape[0]} crop embeddings for {int(valid.sum())} valid proposals"
        )
    out = sims.new_full((noun_embeddings.shape[0], valid.shape[0]), float("-inf"))
    out[:, valid] = sims
    return out


def assign_nouns(
    scores: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    min_score: Optional[float] = None,
    one_to_one: bool = False,
) -> Assignment:
    """Give every noun its best-scoring proposal.

    Args:
        scores: (N, Q) noun-proposal scores (higher = better match); -inf marks impossible pairs.
        valid: (Q,) bool; invalid proposals are never chosen.
        min_score: a noun whose best score is below this keeps ``proposal`` but gets ``keep=False``.
        one_to_one: no two nouns share a proposal (maximum total score; nouns beyond the number of
        valid
            proposals get -1); default False: independent argmax per noun (ties: the lowest index).

    Returns:
        ``Assignment(proposal (N,), score (N,), keep (N,))``.

    Raises:
        ValueError: ``scores`` is not 2-D or ``valid`` does not have Q entries.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, Q), got {tuple(scores.shape)}")
    n, q = scores.shape
    scores = scores.float()
    if valid is not None:
        if valid.shape != (q,):
            raise ValueError(f"valid must be ({q},), got {tuple(valid.shape)}")
        scores = scores.masked_fill(~valid.bool().unsqueeze(0), float("-inf"))
    proposal = torch.full((n,), -1, dtype=torch.int64)
    score = torch.full((n,), float("-inf"))
    if n > 0 and q > 0:
        if one_to_one:
            from scipy.optimize import linear_sum_assignment

            finite = torch.isfinite(scores)
            cost = torch.where(finite, -scores, torch.full_like(scores, 1e9)).numpy()
            rows, cols = linear_sum_assignment(cost)
            rows, cols = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(
                cols, dtype=torch.int64
            )
            ok = finite[rows, cols]
            proposal[rows[ok]] = cols[ok]
            score[rows[ok]] = scores[rows[ok], cols[ok]]
        else:
            idx = scores.argmax(dim=1)  # first maximum on ties
            best = scores.gather(1, idx.unsqueeze(1)).squeeze(1)
            found = torch.isfinite(best)
            proposal[found] = idx[found]
            score[found] = best[found]
    keep = proposal >= 0
    if min_score is not None:
        keep &= score >= min_score
    return Assignment(proposal, score, keep)
