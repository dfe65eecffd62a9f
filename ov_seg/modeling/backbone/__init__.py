"""Extra backbones registered in detectron2's ``BACKBONE_REGISTRY``."""

from .swin import D2SwinTransformer, build_swin_backbone

__all__ = ["D2SwinTransformer", "build_swin_backbone"]
