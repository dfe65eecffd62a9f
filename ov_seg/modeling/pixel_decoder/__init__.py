"""Pixel decoders (registry ``PIXEL_DECODER_REGISTRY``); import registers them."""

from . import fpn  # noqa: F401 (registration)
from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .fpn import BasePixelDecoder, TransformerEncoderPixelDecoder
from .image_skip import ImageGuidedMaskFeatures, build_image_skip

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "BasePixelDecoder",
    "TransformerEncoderPixelDecoder",
    "ImageGuidedMaskFeatures",
    "build_image_skip",
]
