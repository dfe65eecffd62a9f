"""Registry of pixel decoders (backbone features → per-pixel embeddings)."""

from typing import Dict

from detectron2.layers import ShapeSpec

from ov_seg.utils.registry import NamedRegistry, get_registered

__all__ = ["PIXEL_DECODER_REGISTRY", "build_pixel_decoder"]

PIXEL_DECODER_REGISTRY = NamedRegistry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Registry of pixel decoders. A registered class is ``@configurable`` with ``from_config(cls, cfg,
input_shape)`` (``input_shape``: the backbone's ``output_shape()``) and a method
``forward_features(features) -> (mask_features (B, C_E, H/4, W/4), encoder_features or None)``;
``encoder_features`` is the memory for MASK_FORMER.TRANSFORMER_IN_FEATURE "transformer_encoder".
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]):
    """The pixel decoder named by ``cfg.MODEL.PIXEL_DECODER.NAME``."""
    name = cfg.MODEL.PIXEL_DECODER.NAME
    cls = get_registered(PIXEL_DECODER_REGISTRY, name, "pixel decoder (MODEL.PIXEL_DECODER.NAME)")
    return cls(cfg, input_shape=input_shape)
