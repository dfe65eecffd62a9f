"""Transformer decoders (registry ``TRANSFORMER_DECODER_REGISTRY``); import registers them."""

from . import detr_decoder  # noqa: F401 (registration)
from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .detr_decoder import DETRTransformerDecoder

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder", "DETRTransformerDecoder"]
