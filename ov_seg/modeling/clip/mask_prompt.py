"""OVSeg's mask prompt tuning around open_clip's ``VisionTransformer`` (its own layers, no copy).

For a masked crop, the patches that lie entirely outside the mask carry no information (they are the
pixel mean); mask prompt tuning replaces their tokens with learnable prompts: at the input (patch
embeddings, before the class token and positional embedding are added) and after transformer blocks
1 .. depth-1. The class token is never replaced. With depth 0, no mask, or a mask with no
fully-masked patch, the encoder is exactly open_clip's.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

__all__ = [
    "MaskPromptVisionEncoder",
    "class_token_block",
    "VisionOutput",
    "patch_keep_mask",
    "interpolate_grid_embedding",
]


class VisionOutput(NamedTuple):
    """Output of ``MaskPromptVisionEncoder`` (unpacks as a 3-tuple)."""

    embedding: torch.Tensor  # (B, D) pooled image embedding after the projection, not normalised
    # (B, h*w, d_v) patch tokens after ln_post, before the projection; None when the encoder was
    # asked for the embedding only and skipped them (class-token pooling)
    tokens: Optional[torch.Tensor]
    grid: Tuple[int, int]  # (h, w) patch grid of the input


def class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` computed for the class token only.

    The class token's output depends on every token through the keys and values of the attention,
    but no other token's output is needed when the block is the last one and the pooling takes the
    class token: the query, attention row, output projection and MLP then run for 1 token instead
    of 1 + h*w (for ViT-B/16 at 224 px: about 0.8 of a block, 7 % of the tower's FLOPs).

    Args:
        block: the block (its ``attn`` an ``nn.MultiheadAttention``, batch-first).
        x: (B, 1 + N, d) batch-first tokens, the class token first.

    Returns:
        (B, 1, d): the block's output at the class token (equal to ``block(x)[:, :1]`` up to
        float rounding).
    """
    y = block.ln_1(x)
    q = y[:, :1]
    attn = block.attn(q, y, y, need_weights=False)[0]
    out = x[:, :1] + block.ls_1(attn)
    return out + block.ls_2(block.mlp(block.ln_2(out)))


def patch_keep_mask(
    masks: torch.Tensor, patch_size: Tuple[int, int], grid: Tuple[int, int]
) -> torch.Tensor:
    """Which patches keep their token: those with at least one foreground pixel.

    Args:
        masks: (B, H, W) bool, or float (foreground where >= 0.5).
        patch_size: (p_h, p_w).
        grid: (h, w) patches of the input (pixels beyond h*p_h / w*p_w are ignored, as conv1 does).

    Returns:
        (B, h*w) bool, False where every pixel of the patch is background (the token gets the
        prompt).
    """
    fg = masks if masks.dtype == torch.bool else masks >= 0.5
    (ph, pw), (gh, gw) = patch_size, grid
    fg = fg[:, : gh * ph, : gw * pw].reshape(fg.shape[0], gh, ph, gw, pw)
    return fg.any(dim=4).any(dim=2).flatten(1)


def interpolate_grid_embedding(
    embedding: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of per-patch embeddings laid out on a grid.

    Args:
        embedding: (..., src_h*src_w, C).
        src_grid, dst_grid: (h, w).

    Returns:
        (..., dst_h*dst_w, C); ``embedding`` itself when the grids are equal.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return embedding
    lead, (n, c) = embedding.shape[:-2], embedding.shape[-2:]
    if n != src_grid[0] * src_grid[1]:
        raise ValueError(f"{n} embeddings do not form a {src_grid} grid")
    x = embedding.reshape(-1, src_grid[0], src_grid[1], c).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    x = x.to(embedding.dtype).permute(0, 2, 3, 1).reshape(*lead, dst_grid[0] * dst_grid[1], c)
    return x


class MaskPromptVisionEncoder(nn.Module):
    """open_clip ``VisionTransformer`` with mask prompts, patch-token outputs and any input size.

    Args:
        visual: the open_clip ``VisionTransformer`` (``clip.visual``); its modules are reused
            (shared, not copied): training its weights trains the CLIP's.
        depth: number of prompt depths (0 = plain encoder, no prompt parameters).
        prompts: optional initial prompts (depth, grid², width) (e.g. from an exported checkpoint);
            default N(0, 0.02²).
        register_visual: register ``visual`` as the submodule ``visual`` (default). ``False`` only
            references it: the encoder's state dict then holds just the prompts, for a parent that
            already owns the CLIP (``.to()`` still moves the referenced tower).

    Inputs of a size different from the model's native size use a bicubically interpolated
    positional embedding (and prompts); their side must be a multiple of the patch size to use every
    pixel. Patch dropout (if the model has any) is not applied.
    """

    def __init__(
        self,
        visual: nn.Module,
        depth: int = 3,
        prompts: Optional[torch.Tensor] = None,
        register_visual: bool = True,
    ):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"mask prompts need an open_clip VisionTransformer, got {type(visual).__name__}"
            )
        if visual.attn_pool is not None:
            raise TypeError("mask prompts do not support attentional-pooling vision towers")
        layers = len(visual.transformer.resblocks)
        if not 0 <= depth <= layers:
            raise ValueError(f"mask prompt depth must be in [0, {layers}], got {depth}")
        if register_visual:
            self.visual = visual
        else:
            object.__setattr__(self, "visual", visual)
        self._owns_visual = bool(register_visual)
        self.depth = int(depth)
        self.patch_size = tuple(visual.patch_size)
        self.native_grid = tuple(visual.grid_size)
        width = visual.conv1.out_channels
        num = self.native_grid[0] * self.native_grid[1]
        if depth > 0:
            if prompts is None:
                prompts = torch.randn(depth, num, width) * 0.02
            if tuple(prompts.shape) != (depth, num, width):
                raise ValueError(
                    f"prompts must have shape {(depth, num, width)} (depth, grid², width), "
                    f"got {tuple(prompts.shape)}"
                )
            self.prompts = nn.Parameter(prompts.detach().clone().float())
        else:
            self.register_parameter("prompts", None)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if not self._owns_visual:
            self.visual._apply(fn, *args, **kwargs)
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def grid_for(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) patch grid for an input of (H, W) pixels."""
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

    def _positional_embedding(self, grid: Tuple[int, int], dtype) -> torch.Tensor:
        pos = self.visual.positional_embedding.to(dtype)
        if tuple(grid) == self.native_grid:
            return pos
        return torch.cat([pos[:1], interpolate_grid_embedding(pos[1:], self.native_grid, grid)])

    def _prompts(self, grid: Tuple[int, int], dtype) -> torch.Tensor:
        return interpolate_grid_embedding(self.prompts, self.native_grid, grid).to(dtype)

    def class_token_only(self) -> bool:
        """Whether the last block may run for the class token alone when the patch tokens are not
        needed: class-token pooling (no attentional pooling), a plain ``nn.MultiheadAttention``
        in the last block (not a quantized copy) and batch-first blocks."""
        visual = self.visual
        last = visual.transformer.resblocks[-1]
        return (
            visual.pool_type == "tok"
            and visual.attn_pool is None
            and visual.transformer.batch_first
            and type(getattr(last, "attn", None)) is nn.MultiheadAttention
            and not hasattr(last, "ln_1_kv")
        )

    def forward(
        self,
        images: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        need_tokens: bool = True,
    ) -> VisionOutput:
        """Encode normalised images, with mask prompts on the fully masked-out patches.

        Args:
            images: (B, 3, H, W) normalised with ``CLIP_PIXEL_MEAN`` / ``CLIP_PIXEL_STD``.
            masks: (B, H, W) foreground masks (bool, or float thresholded at 0.5) or None.
            need_tokens: False when only the embedding is used: with class-token pooling the
                last block then runs for the class token alone (``class_token_block``; the same
                embedding up to float rounding) and ``tokens`` is None.

        Returns:
            ``VisionOutput(embedding (B, D), tokens (B, h*w, d_v) or None, grid (h, w))``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        visual = self.visual
        grid = self.grid_for(images.shape[-2:])
        if min(grid) < 1:
            raise ValueError(
                f"input {tuple(images.shape[-2:])} is smaller than a patch {self.patch_size}"
            )
        replace = None
        if masks is not None and self.depth > 0:
            if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
                raise ValueError(
                    f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)} "
                    "(B, H, W)"
                )
            replace = ~patch_keep_mask(masks, self.patch_size, grid)  # (B, N)
            if not bool(replace.any()):
                replace = None
        prompts = self._prompts(grid, images.dtype) if replace is not None else None
        replace_col = replace.unsqueeze(-1) if replace is not None else None

        x = visual.conv1(images)  # (B, d_v, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, d_v)
        if prompts is not None:
            x = torch.where(replace_col, prompts[0].unsqueeze(0), x)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid, x.dtype)
        x = visual.ln_pre(x)
        batch_first = visual.transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1)
        blocks = visual.transformer.resblocks
        cls_only = not need_tokens and self.class_token_only()
        for i, block in enumerate(blocks):
            if cls_only and i == len(blocks) - 1:
                x = class_token_block(block, x)  # (B, 1, d): only the class token is pooled
                break
            x = block(x)
            if prompts is not None and i + 1 < self.depth:
                xb = x if batch_first else x.transpose(0, 1)
                patches = torch.where(replace_col, prompts[i + 1].unsqueeze(0), xb[:, 1:])
                xb = torch.cat([xb[:, :1], patches], dim=1)
                x = xb if batch_first else xb.transpose(0, 1)
        if not batch_first:
            x = x.transpose(0, 1)
        pooled, tokens = visual._pool(x)
        if cls_only:
            tokens = None
        elif visual.final_ln_after_pool:
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return VisionOutput(pooled, tokens, grid)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, native_grid={self.native_grid}"
