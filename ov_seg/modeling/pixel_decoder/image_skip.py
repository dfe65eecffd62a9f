"""Mask features finer than the pixel decoder's stride 4, guided by the image itself.

MaskFormer dots each mask embedding with per-pixel embeddings at stride 4, so a mask's outline is a
bilinear upsampling of a 4× coarser map: thin parts (a star's points, a cross's arms) blur. When a
masked crop of the proposal is what CLIP classifies, the crop's outline *is* that blurred mask.
``ImageGuidedMaskFeatures`` adds, at a finer stride, a shallow convolutional branch on the
normalised image to the upsampled per-pixel embeddings: a mask embedding can then follow colour
edges that the stride-4 features cannot place. Enabled by ``MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE``
(0 = off, MaskFormer as published).
"""

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from torch import nn
from torch.nn import functional as F

__all__ = ["ImageGuidedMaskFeatures", "build_image_skip"]


class ImageGuidedMaskFeatures(nn.Module):
    """``E' = upsample(E) + proj(conv(conv(image)))`` at stride ``stride`` of the padded input.

    The image branch: 3×3 conv (stride ``stride``) → 3×3 conv, each with norm and ReLU, then a 1×1
    projection to the mask dimension, initialised to zero so that training starts from the
    upsampled stride-4 embeddings.
    """

    @configurable
    def __init__(self, *, mask_dim: int, channels: int, stride: int, norm: str = "GN"):
        """
        Args:
            mask_dim: channels C_E of the pixel decoder's mask features.
            channels: width of the image branch.
            stride: output stride relative to the padded input (1 or 2; the mask features are at
                4).
            norm: normalisation of the image branch's convolutions (``get_norm`` name; "" = none).
        """
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"IMAGE_SKIP_STRIDE must be 1 or 2 (finer than 4), got {stride}")
        self.convs = nn.Sequential(
            Conv2d(
                3,
                channels,
                3,
                stride=stride,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, channels),
                activation=F.relu,
            ),
            Conv2d(
                channels,
                channels,
                3,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, channels),
                activation=F.relu,
            ),
        )
        for conv in self.convs:
            weight_init.c2_msra_fill(conv)
        self.proj = nn.Conv2d(channels, mask_dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @classmethod
    def from_config(cls, cfg):
        p = cfg.MODEL.PIXEL_DECODER
        return {
            "mask_dim": p.MASK_DIM,
            "channels": p.IMAGE_SKIP_CHANNELS,
            "stride": p.IMAGE_SKIP_STRIDE,
            "norm": p.NORM,
        }

    def forward(self, mask_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask_features: (B, C_E, H_pad / 4, W_pad / 4) per-pixel embeddings.
            images: (B, 3, H_pad, W_pad) normalised, padded images.

        Returns:
            (B, C_E, H_pad / s, W_pad / s) embeddings, s = ``stride``.
        """
        image_features = self.proj(self.convs(images))
        up = F.interpolate(
            mask_features, size=image_features.shape[-2:], mode="bilinear", align_corners=False
        )
        return up + image_features.to(up.dtype)


def build_image_skip(cfg):
    """``ImageGuidedMaskFeatures`` of ``MODEL.PIXEL_DECODER``; None when IMAGE_SKIP_STRIDE is 0."""
    if cfg.MODEL.PIXEL_DECODER.IMAGE_SKIP_STRIDE == 0:
        return None
    return ImageGuidedMaskFeatures(cfg)
