"""Registry of mask-classification transformer decoders."""

from ov_seg.utils.registry import NamedRegistry, get_registered

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder"]

TRANSFORMER_DECODER_REGISTRY = NamedRegistry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry of transformer decoders turning learned queries into per-query embeddings and masks.
A registered class is ``@configurable`` with ``from_config(cls, cfg, in_channels)``; its forward
takes ``(x, mask_features)`` — the memory (B, C_in, h, w) and per-pixel embeddings (B, C_E, H, W) —
and returns ``{"query_embeds": (L, B, Q, d), "pred_masks": (L, B, Q, H, W)}`` (L supervised
layers).
"""


def build_transformer_decoder(cfg, in_channels: int):
    """The decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``.

    Args:
        in_channels: channels of the memory feature the decoder attends to.
    """
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    cls = get_registered(
        TRANSFORMER_DECODER_REGISTRY,
        name,
        "transformer decoder (MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME)",
    )
    return cls(cfg, in_channels=in_channels)
