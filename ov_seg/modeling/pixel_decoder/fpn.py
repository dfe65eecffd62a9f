"""MaskFormer's FPN pixel decoders: plain, and with a transformer encoder on the coarsest level."""

from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn
from torch.nn import functional as F

from ov_seg.modeling.transformer_decoder.layers import (
    SinePositionEncoding,
    TransformerEncoderLayer,
    flatten_with_pos,
)

from .build import PIXEL_DECODER_REGISTRY

__all__ = ["BasePixelDecoder", "TransformerEncoderPixelDecoder"]


def _conv(in_ch: int, out_ch: int, kernel: int, norm: str, relu: bool) -> Conv2d:
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel_size=kernel,
        padding=kernel // 2,
        bias=not norm,
        norm=get_norm(norm, out_ch),
        activation=F.relu if relu else None,
    )
    weight_init.c2_xavier_fill(conv)
    return conv


@PIXEL_DECODER_REGISTRY.register("BasePixelDecoder")
class BasePixelDecoder(nn.Module):
    """Top-down FPN over the backbone features; the finest level gives the per-pixel embeddings.

    The coarsest level only gets a 3x3 conv; each finer level adds a 1x1 lateral conv of its feature
    to the nearest-upsampled coarser output, then a 3x3 conv. ``mask_features`` = 3x3 conv of the
    finest output.
    """

    @configurable
    def __init__(
        self, *, input_shape: Dict[str, ShapeSpec], conv_dim: int, mask_dim: int, norm: str
    ):
        """
        Args:
            input_shape: backbone features used (name → ShapeSpec with channels and stride).
            conv_dim: FPN channels.
            mask_dim: channels C_E of the per-pixel embeddings.
            norm: normalisation of the FPN convs ("GN", "BN", "" ...).
        """
        super().__init__()
        if not input_shape:
            raise ValueError("the pixel decoder needs at least one backbone feature")
        self.in_features: List[str] = [
            k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        ]
        channels = [input_shape[k].channels for k in self.in_features]
        self.common_stride = input_shape[self.in_features[0]].stride
        # index 0 = coarsest level
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for i, ch in enumerate(reversed(channels)):
            self.lateral_convs.append(
                _conv(ch, conv_dim, 1, norm, relu=False) if i > 0 else nn.Identity()
            )
            self.output_convs.append(
                _conv(ch if i == 0 else conv_dim, conv_dim, 3, norm, relu=True)
            )
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        p = cfg.MODEL.PIXEL_DECODER
        missing = [f for f in p.IN_FEATURES if f not in input_shape]
        if missing:
            raise KeyError(
                f"MODEL.PIXEL_DECODER.IN_FEATURES {missing} not produced by the backbone "
                f"(it gives {sorted(input_shape)})"
            )
        return {
            "input_shape": {k: input_shape[k] for k in p.IN_FEATURES},
            "conv_dim": p.CONVS_DIM,
            "mask_dim": p.MASK_DIM,
            "norm": p.NORM,
        }

    def _coarsest(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Output of the coarsest level, and the encoder features (None here)."""
        return self.output_convs[0](x), None

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            features: backbone features {name: (B, C, H / stride, W / stride)}.

        Returns:
            mask_features (B, C_E, H / s, W / s) at the finest stride s, and the transformer-encoder
            features (B, conv_dim, h, w) of the coarsest level, or None when there is no encoder.
        """
        feats = [features[k] for k in reversed(self.in_features)]
        y, encoder_features = self._coarsest(feats[0])
        for lateral, output, x in zip(self.lateral_convs[1:], self.output_convs[1:], feats[1:]):
            y = lateral(x) + F.interpolate(y, size=x.shape[-2:], mode="nearest")
            y = output(y)
        return self.mask_features(y), encoder_features

    def forward(self, features: Dict[str, torch.Tensor]):
        return self.forward_features(features)


@PIXEL_DECODER_REGISTRY.register("TransformerEncoderPixelDecoder")
class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """``BasePixelDecoder`` whose coarsest feature is first projected to ``conv_dim`` and passed
    through a transformer encoder (sine positions); the encoder output is also the decoder memory
    (MASK_FORMER.TRANSFORMER_IN_FEATURE "transformer_encoder")."""

    @configurable
    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        conv_dim: int,
        mask_dim: int,
        norm: str,
        enc_layers: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        pre_norm: bool,
    ):
        """
        Args:
            input_shape, conv_dim, mask_dim, norm: as ``BasePixelDecoder``.
            enc_layers: transformer encoder layers on the coarsest level.
            nheads, dim_feedforward, dropout, pre_norm: encoder layer settings.
        """
        super().__init__(input_shape=input_shape, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        coarsest = input_shape[self.in_features[-1]].channels
        self.input_proj = Conv2d(coarsest, conv_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.input_proj)
        self.pos_encoding = SinePositionEncoding(conv_dim)
        self.encoder = nn.ModuleList(
            TransformerEncoderLayer(conv_dim, nheads, dim_feedforward, dropout, pre_norm)
            for _ in range(enc_layers)
        )
        self.encoder_norm = nn.LayerNorm(conv_dim) if pre_norm else nn.Identity()
        # the coarsest output conv now takes conv_dim channels
        self.output_convs[0] = _conv(conv_dim, conv_dim, 3, norm, relu=True)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        m = cfg.MODEL.MASK_FORMER
        ret.update(
            enc_layers=cfg.MODEL.PIXEL_DECODER.TRANSFORMER_ENC_LAYERS,
            nheads=m.NHEADS,
            dim_feedforward=m.DIM_FEEDFORWARD,
            dropout=m.DROPOUT,
            pre_norm=m.PRE_NORM,
        )
        return ret

    def _coarsest(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.input_proj(x)
        b, c, h, w = x.shape
        tokens, pos = flatten_with_pos(x, self.pos_encoding)
        for layer in self.encoder:
            tokens = layer(tokens, pos=pos)
        encoded = self.encoder_norm(tokens).transpose(1, 2).reshape(b, c, h, w)
        return self.output_convs[0](encoded), encoded
