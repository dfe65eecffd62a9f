"""Single-pass mask embeddings: one image-tower forward on the whole image instead of one per crop.

An opt-in fast mode of the two-stage model (``MODEL.TWO_STAGE.FAST.CLIP_MODE "single_pass"``). The
image is resized to a short side of ``size`` pixels (a multiple of the patch size on each side) and
encoded once; each mask's embedding is then read from the dense tokens, in one of two ways
(``SINGLE_PASS_POOLING``):

- ``"attention"`` (attention masking, as SAN's side tokens / MaskCLIP+ do): for the last ``layers``
  transformer blocks, one extra query token per mask is appended; it attends to itself and the
  patches its mask covers, and nothing attends to it, so the image tokens are unchanged. The queries
  start as the class token (towers that pool the class token, e.g. OpenAI's) or as the mean of the
  mask's patch tokens (towers that average-pool, e.g. the project's tiny ones), and end through
  ``ln_post`` and the projection: a pooled embedding restricted to the mask. Cost: one forward with
  Q extra tokens in the last blocks.
- ``"region"`` (the closest to a masked crop): for the last ``layers`` blocks each mask gets its own
  sequence (a query token and the tokens of its patches, taken from the shared forward) in which
  tokens attend only within the sequence; the embedding is read as the tower pools (the query for
  class-token towers, the mean of the mask's patch tokens for average-pooling towers). Cost: Q
  sequences of (1 + patches of the mask) tokens in the last blocks.
- ``"mean"`` (mask pooling, as FC-CLIP does with its CNN CLIP): the projected dense tokens averaged
  over the mask's patches (weighted by the fraction of each patch the mask covers).

A patch belongs to a mask when at least half of it is covered (when no patch is, the patches it
touches). Mask prompts (trained for masked crops) are not used. The image context leaks into every
embedding: cheaper, less accurate than crops (accuracy cost in notes/fast_inference.md).
"""

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

__all__ = ["SinglePassMaskEmbedder", "SINGLE_PASS_POOLINGS", "patch_coverage"]


def patch_coverage(masks: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch covered by each binary mask.

    Args:
        masks: (Q, H, W) bool. grid: (h, w) patch grid the image was resized to.

    Returns:
        (Q, h·w) float in [0, 1] (area-resampled).
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0, grid[0] * grid[1]), dtype=torch.float32)
    cov = F.interpolate(masks[:, None].float(), size=tuple(grid), mode="area")
    return cov.flatten(1)


def _membership(coverage: torch.Tensor) -> torch.Tensor:
    """(Q, N) coverage -> (Q, N) bool patches of each mask: coverage >= 0.5, else any coverage."""
    member = coverage >= 0.5
    return torch.where(member.any(dim=1, keepdim=True), member, coverage > 0)


class SinglePassMaskEmbedder(nn.Module):
    """Per-mask CLIP embeddings from one forward of an open_clip ``VisionTransformer``.

    Args:
        visual: ``clip.visual`` (referenced, not owned).
        pooling: ``SINGLE_PASS_POOLINGS`` name, "attention", "region" or "mean".
        layers: "attention" / "region": the per-mask tokens join the last ``layers`` blocks
            (>= 1).
        size: short side of the resized image in pixels (rounded to the patch size); 0 = the
            model's native input size.
    """

    def __init__(
        self, visual: nn.Module, pooling: str = "attention", layers: int = 3, size: int = 0
    ):
        super().__init__()
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise TypeError("single-pass mask embeddings need an open_clip VisionTransformer")
        if pooling not in SINGLE_PASS_POOLINGS:
            raise KeyError(
                f"unknown single-pass pooling {pooling!r}; known: {sorted(SINGLE_PASS_POOLINGS)}"
            )
        depth = len(visual.transformer.resblocks)
        if not 1 <= layers <= depth:
            raise ValueError(f"single-pass query layers must be in [1, {depth}], got {layers}")
        object.__setattr__(self, "visual", visual)
        self.pooling = pooling
        self.layers = int(layers)
        patch = visual.patch_size
        self.patch_size = (int(patch[0]), int(patch[1]))
        native = visual.image_size
        self.size = int(size) or int(native[0] if isinstance(native, (tuple, list)) else native)

    def input_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(H', W') the image is resized to: short side ``size``, both multiples of the patch."""
        h, w = image_size
        scale = self.size / min(h, w)
        ph, pw = self.patch_size
        return max(ph, round(h * scale / ph) * ph), max(pw, round(w * scale / pw) * pw)

    def _tokens(self, image: torch.Tensor, stop: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Run blocks [0, stop) on the normalised (1, 3, H', W') image -> ((1, 1 + N, d), grid)."""
        from .mask_prompt import interpolate_grid_embedding

        visual = self.visual
        grid = (image.shape[-2] // self.patch_size[0], image.shape[-1] // self.patch_size[1])
        x = visual.conv1(image).flatten(2).transpose(1, 2)  # (1, N, d)
        native = tuple(visual.grid_size)
        pos = visual.positional_embedding.to(x.dtype)
        pos = torch.cat([pos[:1], interpolate_grid_embedding(pos[1:], native, grid)])
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + pos)
        for block in visual.transformer.resblocks[:stop]:
            x = self._block(block, x)
        return x, grid

    def _block(self, block: nn.Module, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        if self.visual.transformer.batch_first:
            return block(x, attn_mask=attn_mask)
        return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: (3, H, W) normalised with the CLIP pixel statistics.
            masks: (Q, H, W) bool, every mask non-empty.

        Returns:
            (Q, D) embeddings, not normalised.
        """
        size = self.input_size(tuple(image.shape[-2:]))
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(
                image[None], size=size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        return SINGLE_PASS_POOLINGS[self.pooling](self, image[None], masks)


def _attention_pooling(embedder: SinglePassMaskEmbedder, image, masks) -> torch.Tensor:
    blocks = embedder.visual.transformer.resblocks
    stop = len(blocks) - embedder.layers
    x, grid = embedder._tokens(image, stop)  # (1, 1 + N, d)
    member = _membership(patch_coverage(masks, grid))  # (Q, N)
    q, n = member.shape[0], x.shape[1]
    # [class, patches, queries]: image tokens attend to image tokens only; query i attends to
    # itself and its patches
    allowed = torch.zeros(n + q, n + q, dtype=torch.bool, device=x.device)
    allowed[:n, :n] = True
    allowed[n:, 1:n] = member
    allowed[n:, n:] = torch.eye(q, dtype=torch.bool, device=x.device)
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(
        ~allowed, float("-inf")
    )
    if embedder.visual.pool_type == "tok":
        queries = x[:, :1].expand(-1, q, -1)
    else:  # average-pooling towers: the mask's mean patch token
        weights = member.to(x.dtype)
        queries = ((weights / weights.sum(dim=1, keepdim=True)) @ x[0, 1:])[None]
    x = torch.cat([x, queries], dim=1)
    for block in blocks[stop:]:
        x = embedder._block(block, x, bias)
    return embedder._project(x[0, n:])


def _region_pooling(embedder: SinglePassMaskEmbedder, image, masks) -> torch.Tensor:
    blocks = embedder.visual.transformer.resblocks
    stop = len(blocks) - embedder.layers
    x, grid = embedder._tokens(image, stop)  # (1, 1 + N, d)
    member = _membership(patch_coverage(masks, grid))  # (Q, N)
    q = member.shape[0]
    count = member.sum(dim=1)  # (Q,) >= 1
    length = int(count.max())
    # per mask: its patch indices first (stable order), padded with the last index
    order = member.float().argsort(dim=1, descending=True, stable=True)[:, :length]  # (Q, L)
    used = torch.arange(length, device=x.device)[None] < count[:, None]  # (Q, L)
    patches = x[0, 1:][order]  # (Q, L, d)
    avg = embedder.visual.pool_type != "tok"
    if avg:
        first = (used.to(x.dtype)[..., None] * patches).sum(1) / count[:, None].to(x.dtype)
    else:
        first = x[0, :1].expand(q, -1)
    seq = torch.cat([first[:, None], patches], dim=1)  # (Q, 1 + L, d)
    keep = torch.cat([torch.ones_like(used[:, :1]), used], dim=1)  # (Q, 1 + L)
    heads = blocks[0].attn.num_heads
    bias = torch.zeros(q, 1 + length, 1 + length, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill_(~keep[:, None, :], float("-inf"))
    bias = bias.repeat_interleave(heads, dim=0)  # (Q·heads, T, T)
    for block in blocks[stop:]:
        seq = embedder._block(block, seq, bias)
    if not avg:
        return embedder._project(seq[:, 0])
    tokens = embedder._project(seq[:, 1:])  # (Q, L, D), ln_post before pooling as the tower does
    weights = used.to(tokens.dtype)[..., None]
    return (weights * tokens).sum(1) / count[:, None].to(tokens.dtype)


def _mean_pooling(embedder: SinglePassMaskEmbedder, image, masks) -> torch.Tensor:
    x, grid = embedder._tokens(image, len(embedder.visual.transformer.resblocks))
    dense = embedder._project(x[0, 1:])  # (N, D)
    cov = patch_coverage(masks, grid)
    weights = cov * _membership(cov)
    return (weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)) @ dense


# name -> fn(embedder, image (1, 3, H', W'), masks (Q, H, W) bool) -> (Q, D)
SINGLE_PASS_POOLINGS: Dict[str, Callable] = {
    "attention": _attention_pooling,
    "region": _region_pooling,
    "mean": _mean_pooling,
}
