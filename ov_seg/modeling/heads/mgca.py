"""MGCA's dense image side (Liu et al., "Multi-Grained Cross-modal Alignment"): the CLIP image
tower read densely (patch tokens at any input size, optionally through a value-path last block)
and the decoder g that upsamples the dense embeddings. The meta-architecture is
``ov_seg.modeling.meta_arch.mgca``.
"""

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from timm.layers import LayerNorm2d
from torch import nn

from ov_seg.modeling.clip import interpolate_grid_embedding

__all__ = ["DenseCLIPEncoder", "MGCADecoder"]


class DenseCLIPEncoder(nn.Module):
    """Dense tokens from an open_clip ``VisionTransformer`` at any input size, with an optional
    value-path last block.

    Args:
        visual: the CLIP image tower (its modules are used, not copied).
        freeze_at: leading blocks kept frozen (run without gradient); -1 = all but the last block;
            the number of blocks freezes the whole tower (then ``ln_post`` and the projection stay
            frozen too).
        value_path: run the last block with every token attending only to itself (MaskCLIP's value
            path: x + out_proj(v(ln_1 x)), then the MLP), which keeps tokens local.
    """

    def __init__(self, visual: nn.Module, freeze_at: int = -1, value_path: bool = True):
        super().__init__()
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise TypeError(
                "MGCA needs an open_clip VisionTransformer image tower without attention pooling"
            )
        blocks = visual.transformer.resblocks
        if value_path and not isinstance(blocks[-1], ResidualAttentionBlock):
            raise TypeError(
                f"value_path needs open_clip ResidualAttentionBlock, got {type(blocks[-1])}"
            )
        num = len(blocks)
        freeze_at = num - 1 if freeze_at < 0 else freeze_at
        if freeze_at > num:
            raise ValueError(f"FREEZE_AT {freeze_at} exceeds the tower's {num} blocks")
        self.visual = visual
        self.freeze_at = freeze_at
        self.value_path = value_path
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = tuple(visual.grid_size)
        # requires_grad of every image-tower parameter: the embeddings train only with FREEZE_AT 0,
        # blocks from FREEZE_AT on, ln_post and the projection unless the whole tower is frozen
        visual.requires_grad_(freeze_at < num)
        embeddings = [
            visual.conv1,
            visual.ln_pre,
            visual.class_embedding,
            visual.positional_embedding,
        ]
        for item in [*embeddings, *blocks[:freeze_at]]:
            item.requires_grad_(freeze_at == 0)

    @staticmethod
    def _value_path_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        d = attn.embed_dim
        v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        x = x + block.ls_1(attn.out_proj(v))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense projected tokens.

        Args:
            images: (B, 3, H, W) CLIP-normalised, H and W multiples of the patch size.

        Returns:
            (B, D, H/p, W/p) tokens after ``ln_post`` and CLIP's projection.
        """
        v = self.visual
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        blocks = v.transformer.resblocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze_at == 0):
            x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, N, d_v)
            pos = v.positional_embedding.to(x.dtype)
            pos = torch.cat([pos[:1], interpolate_grid_embedding(pos[1:], self.native_grid, grid)])
            cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = v.ln_pre(torch.cat([cls, x], dim=1) + pos)
        batch_first = v.transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(blocks):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.freeze_at):
                last = i == len(blocks) - 1
                if last and self.value_path:
                    x = self._value_path_block(block, x)
                else:
                    x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        tokens = v.ln_post(x[:, 1:]) @ v.proj  # (B, N, D)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)


class MGCADecoder(nn.Module):
    """Decoder g: 2× bilinear upsample, then residual pre-activation 3×3 convs (LayerNorm, GELU).

    ``Z = up(X) + conv_L(GELU(LN(... conv_1(GELU(LN(up(X)))))))``, the last conv zero-initialised.

    Args:
        dim: channels D (in and out).
        num_layers: conv layers (TCL's GDecoder: 2).
        upsample: integer upsampling factor (2; 1 = none).
        kernel_size: conv kernel (3).
    """

    def __init__(self, dim: int, num_layers: int = 2, upsample: int = 2, kernel_size: int = 3):
        super().__init__()
        if upsample < 1:
            raise ValueError(f"DECODER_UPSAMPLE must be >= 1, got {upsample}")
        self.upsample = int(upsample)
        layers = []
        for _ in range(num_layers):
            layers += [
                LayerNorm2d(dim),
                nn.GELU(),
                nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2),
            ]
        self.layers = nn.Sequential(*layers)
        if num_layers:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h·up, w·up)."""
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return x + self.layers(x)
