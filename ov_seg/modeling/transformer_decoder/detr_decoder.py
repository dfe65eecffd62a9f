"""DETR-style decoder with N learned queries and per-layer mask predictions (MaskFormer)."""

from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import nn

from .build import TRANSFORMER_DECODER_REGISTRY
from .layers import MLP, SinePositionEncoding, TransformerDecoderLayer, flatten_with_pos

__all__ = ["DETRTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register("DETRTransformerDecoder")
class DETRTransformerDecoder(nn.Module):
    """N learned queries attend to one feature map through ``dec_layers`` DETR decoder layers.

    Every layer's output goes through a shared LayerNorm; a 3-layer MLP maps it to a mask embedding
    that is dotted with the per-pixel embeddings: ``pred_masks = einsum("bqc,bchw->bqhw", MLP(q),
    mask_features)``. Class logits are left to a class head (``ov_seg.modeling.heads``) applied to
    ``query_embeds``.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        dropout: float,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_proj: bool,
        deep_supervision: bool,
    ):
        """
        Args:
            in_channels: channels of the memory feature.
            hidden_dim: decoder width d.
            num_queries: number of learned queries N.
            nheads, dim_feedforward, dec_layers, dropout, pre_norm: decoder layer settings.
            mask_dim: channels C_E of the per-pixel embeddings.
            enforce_input_proj: project the memory with a 1x1 conv even when ``in_channels ==
                hidden_dim``.
            deep_supervision: return the outputs of every layer (else only the last).
        """
        super().__init__()
        if dec_layers < 1 or num_queries < 1:
            raise ValueError(f"need >= 1 decoder layer and query, got {dec_layers}, {num_queries}")
        self.num_queries = num_queries
        self.deep_supervision = deep_supervision
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.pos_encoding = SinePositionEncoding(hidden_dim)
        if in_channels != hidden_dim or enforce_input_proj:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        else:
            self.input_proj = nn.Identity()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
            for _ in range(dec_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int):
        m = cfg.MODEL.MASK_FORMER
        return {
            "in_channels": in_channels,
            "hidden_dim": m.HIDDEN_DIM,
            "num_queries": m.NUM_OBJECT_QUERIES,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_layers": m.DEC_LAYERS,
            "dropout": m.DROPOUT,
            "pre_norm": m.PRE_NORM,
            "mask_dim": cfg.MODEL.PIXEL_DECODER.MASK_DIM,
            "enforce_input_proj": m.ENFORCE_INPUT_PROJ,
            "deep_supervision": m.DEEP_SUPERVISION,
        }

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, C_in, h, w) memory feature.
            mask_features: (B, C_E, H, W) per-pixel embeddings.

        Returns:
            dict with ``query_embeds`` (L, B, Q, d) — normalised decoder outputs — and
            ``pred_masks`` (L, B, Q, H, W) mask logits, L = ``dec_layers`` with deep supervision,
            else 1 (last layer).
        """
        memory, pos = flatten_with_pos(self.input_proj(x), self.pos_encoding)
        b = memory.shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, memory, query_pos=query_pos, pos=pos)
            if self.deep_supervision or i == len(self.layers) - 1:
                outputs.append(self.norm(tgt))
        query_embeds = torch.stack(outputs)  # (L, B, Q, d)
        pred_masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(query_embeds), mask_features)
        return {"query_embeds": query_embeds, "pred_masks": pred_masks}
