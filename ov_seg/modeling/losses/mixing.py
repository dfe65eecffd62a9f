"""MixReorg's mixed patch reorganisation (Cai, Ren et al., ICCV 2023) as pure functions.

A batch of B token sequences (B, N, d) on an h x w grid is split into tuples of M consecutive
images. Each tuple draws one cell-to-source assignment π over c x c cells of the grid (each member
gets its share of cells), and member m of the tuple becomes a mixed image that takes, at every
position i, the token of member (π(i) + m) mod M **at the same position**. Every source token
therefore appears exactly once among the tuple's mixed images: mixing is a permutation of the B·N
tokens, ``restore_tokens`` inverts it exactly, and the mixed label map (which caption each mixed
token belongs to) is the source index.

``mixed_segmentation_loss`` is the segmentation loss on mixed images: with segment tokens z_k, soft
token-to-segment assignments A (N, G) and the tuple's caption embeddings t_j,

    G_kj = cos(z_k, t_j) · s      P(i, j) = Σ_k A(i, k) · softmax_j(G_kj)
    L_seg = mean_i -log P(i, Y_i)

where s is the contrastive logit scale and j runs over the captions of the mixed image's tuple only.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "MixPlan",
    "make_mix_plan",
    "mix_tokens",
    "restore_tokens",
    "mixed_segmentation_loss",
    "tuple_mean",
]


@dataclass
class MixPlan:
    """How the tokens of a batch are mixed.

    Attributes:
        source: (B, N) int64, batch index of the image each mixed token comes from (its position
            is kept).
        inverse: (B, N) int64, for source image s and position i, the mixed image that holds
            token (s, i).
        tuple_id: (B,) int64, the tuple each image belongs to (images mix only inside their tuple).
    """

    source: torch.Tensor
    inverse: torch.Tensor
    tuple_id: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.source.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.source.shape[1])

    def same_tuple(self) -> torch.Tensor:
        """(B, B) bool: images ``b`` and ``c`` are in the same tuple."""
        return self.tuple_id[:, None] == self.tuple_id[None, :]


def _cell_counts(num_cells: int, shares: Sequence[float]) -> torch.Tensor:
    """Integer cell counts per source proportional to ``shares`` (largest remainder), summing to
    ``num_cells``."""
    w = torch.tensor([float(s) for s in shares], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"mixing shares must be non-negative with a positive sum, got {list(shares)}"
        )
    exact = w / w.sum() * num_cells
    counts = exact.floor().long()
    rest = num_cells - int(counts.sum())
    if rest > 0:
        order = torch.argsort(exact - counts.double(), descending=True)
        counts[order[:rest]] += 1
    return counts


def make_mix_plan(
    batch_size: int,
    grid: Sequence[int],
    *,
    num_mix: int = 2,
    cell: int = 1,
    shares: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> MixPlan:
    """Draw a random mixing of a batch.

    Args:
        batch_size: B. Images are grouped into tuples of ``num_mix`` consecutive images; the last
            tuple holds the remainder (a tuple of one image is left unmixed: batch size 1 has no
            partner).
        grid: (h, w) token grid; token i is at row i // w, column i % w.
        num_mix: M, images per tuple (>= 1).
        cell: c, side of the square mixing cells in tokens (cells at the border may be smaller).
        shares: share of cells per π value (length >= M; the first M_t are renormalised for a tuple
            of M_t < M images). Mixed image m takes share k from member (k + m) mod M, so every
            mixed image keeps share 0 of its own tokens. None = uniform 1/M.
        generator: torch random generator (CPU) for reproducible draws.
        device: device of the returned tensors.

    Returns:
        a ``MixPlan`` with (B, N) ``source`` and ``inverse`` maps.
    """
    h, w = int(grid[0]), int(grid[1])
    if batch_size < 1 or h < 1 or w < 1:
        raise ValueError(f"need a non-empty batch and grid, got batch {batch_size}, grid {(h, w)}")
    if num_mix < 1 or cell < 1:
        raise ValueError(f"num_mix and cell must be >= 1, got {num_mix}, {cell}")
    if shares is not None and len(shares) and len(shares) < num_mix:
        raise ValueError(f"{len(shares)} mixing shares for {num_mix} images per tuple")
    n = h * w
    rows = torch.arange(h).repeat_interleave(w) // cell
    cols = torch.arange(w).repeat(h) // cell
    cells_w = (w + cell - 1) // cell
    token_cell = rows * cells_w + cols  # (N,) cell index of each token
    num_cells = int(token_cell.max()) + 1

    source = torch.empty(batch_size, n, dtype=torch.long)
    tuple_id = torch.arange(batch_size) // num_mix
    for start in range(0, batch_size, num_mix):
        size = min(num_mix, batch_size - start)
        if size == 1:
            source[start] = start
            continue
        sh = list(shares[:size]) if shares is not None and len(shares) else [1.0] * size
        counts = _cell_counts(num_cells, sh)
        pi_cells = torch.repeat_interleave(torch.arange(size), counts)
        pi_cells = pi_cells[torch.randperm(num_cells, generator=generator)]
        pi = pi_cells[token_cell]  # (N,) in [0, size)
        for m in range(size):
            source[start + m] = start + (pi + m) % size
    inverse = torch.empty_like(source)
    inverse.scatter_(
        0, source, torch.arange(batch_size)[:, None].expand(batch_size, n).contiguous()
    )
    return MixPlan(source.to(device), inverse.to(device), tuple_id.to(device))


def _gather_rows(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[b, i] = tokens[rows[b, i], i] for tokens (B, N, ...) and rows (B, N)."""
    b, n = rows.shape
    if tokens.shape[:2] != (b, n):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match the plan ({b}, {n})")
    flat = tokens.reshape(b * n, *tokens.shape[2:])
    index = rows * n + torch.arange(n, device=rows.device)[None, :]
    return flat[index.reshape(-1)].reshape(tokens.shape)


def mix_tokens(tokens: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Mixed sequences: ``mixed[b, i] = tokens[plan.source[b, i], i]``.

    Args:
        tokens: (B, N, ...) per-image token features (or any per-token tensor, e.g. labels).
        plan: a ``MixPlan`` for (B, N).

    Returns:
        (B, N, ...) the mixed tokens (a permutation of the input tokens).
    """
    return _gather_rows(tokens, plan.source)


def restore_tokens(mixed: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Restored sequences: ``restored[s, i]`` is the token at position i of the mixed image that
    carries token (s, i); ``restore_tokens(mix_tokens(x, plan), plan) == x`` exactly.

    Args:
        mixed: (B, N, ...) tokens laid out as the mixed images.
        plan: the ``MixPlan`` that produced the layout.

    Returns:
        (B, N, ...) tokens back in their source images.
    """
    return _gather_rows(mixed, plan.inverse)


def tuple_mean(x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """Mean of ``x`` (B, ...) over the images of each tuple, broadcast back to (B, ...)."""
    same = plan.same_tuple().to(x.dtype)
    weights = same / same.sum(dim=1, keepdim=True)
    return torch.einsum("bc,c...->b...", weights, x)


def mixed_segmentation_loss(
    segment_embeds: torch.Tensor,
    assignments: torch.Tensor,
    text_embeds: torch.Tensor,
    plan: MixPlan,
    logit_scale: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    batch_negatives: bool = False,
) -> torch.Tensor:
    """L_seg: classify every token of every mixed image into its source caption through the
    segments.

    Args:
        segment_embeds: (B, G, D) segment embeddings z_k of the mixed images (any norm).
        assignments: (B, N, G) soft token-to-segment assignments A of the mixed images (rows sum
            to 1).
        text_embeds: (B, D) caption embedding t_b of each source image (need not be normalised).
        plan: the ``MixPlan``; labels are ``plan.source`` and the captions compared are those of the
            mixed image's tuple.
        logit_scale: scalar s (already exponentiated and clamped).
        token_mask: (B, N) bool, tokens to score (False for padding); None = all.
        batch_negatives: softmax_j over every caption of the batch instead of the tuple's (a
            token must then pick its source caption among all B).

    Returns:
        scalar loss; 0 (with a gradient path) when every tuple has a single image.
    """
    z = F.normalize(segment_embeds, dim=-1)
    t = F.normalize(text_embeds, dim=-1)
    logits = torch.einsum("bgd,cd->bgc", z, t) * logit_scale  # (B, G, B)
    if not batch_negatives:
        logits = logits.masked_fill(~plan.same_tuple()[:, None, :], float("-inf"))
    seg_probs = logits.softmax(dim=-1)  # (B, G, B): softmax_j over the tuple's captions
    token_probs = torch.einsum("bng,bgc->bnc", assignments, seg_probs)  # P(i, j)
    picked = token_probs.gather(2, plan.source[..., None]).squeeze(2)  # P(i, Y_i)
    nll = -torch.log(picked.clamp_min(1e-8))
    if token_mask is not None:
        nll = nll[token_mask]
    return nll.mean()
