"""Transformer building blocks shared by the pixel decoder's encoder and the DETR-style decoder."""

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MLP",
    "SinePositionEncoding",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "flatten_with_pos",
]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SinePositionEncoding(nn.Module):
    """2-D sine / cosine position encoding of a feature map (DETR), coordinates scaled to (0, 2π].

    Args:
        num_channels: output channels (even); half encode y, half encode x.
        temperature: wavelength base.
    """

    def __init__(self, num_channels: int, temperature: float = 10000.0):
        super().__init__()
        if num_channels % 4 != 0:
            raise ValueError(
                f"sine position encoding needs channels divisible by 4, got {num_channels}"
            )
        self.num_pos_feats = num_channels // 2
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, C, H, W) feature map (only its shape, device and dtype are used).

        Returns:
            (B, num_channels, H, W) position encoding.
        """
        b, _, h, w = x.shape
        scale = 2 * math.pi
        eps = 1e-6
        y = torch.arange(1, h + 1, device=x.device, dtype=torch.float32) / (h + eps) * scale
        xs = torch.arange(1, w + 1, device=x.device, dtype=torch.float32) / (w + eps) * scale
        i = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (
            2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_y = y[:, None] / dim_t  # (H, F)
        pos_x = xs[:, None] / dim_t  # (W, F)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=2
        )  # (H, W, 2F)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(x.dtype)


def flatten_with_pos(x: torch.Tensor, pos_encoding: nn.Module):
    """(B, C, H, W) feature map → tokens (B, HW, C) and their position encodings (B, HW, C)."""
    pos = pos_encoding(x).flatten(2).transpose(1, 2)
    return x.flatten(2).transpose(1, 2), pos


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class _FeedForward(nn.Module):
    def __init__(self, dim: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class _ResidualBlocks(nn.Module):
    """``num_blocks`` residual blocks sharing one norm / dropout pattern (post-norm or pre-norm)."""

    def __init__(self, dim: int, num_blocks: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_blocks))
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(num_blocks))
        self.pre_norm = pre_norm

    def residual(self, i: int, x: torch.Tensor, fn) -> torch.Tensor:
        """x + fn(x) with block ``i``'s dropout and LayerNorm (pre-norm: before fn; else after)."""
        y = fn(self.norms[i](x)) if self.pre_norm else fn(x)
        x = x + self.dropouts[i](y)
        return x if self.pre_norm else self.norms[i](x)


class TransformerEncoderLayer(_ResidualBlocks):
    """Self-attention (position encoding added to queries and keys) + FFN.

    Args:
        dim: token width. nheads: attention heads. dim_feedforward: FFN width.
        dropout: dropout rate.
        pre_norm: LayerNorm before (True) or after (False, DETR) each residual block.
    """

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__(dim, 2, dropout, pre_norm)
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(dim, dim_feedforward, dropout)

    def forward(self, src: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """src, pos: (B, S, dim) → (B, S, dim)."""

        def self_attention(x):
            q = k = _with_pos(x, pos)
            return self.self_attn(q, k, value=x, need_weights=False)[0]

        src = self.residual(0, src, self_attention)
        return self.residual(1, src, self.ffn)


class TransformerDecoderLayer(_ResidualBlocks):
    """DETR decoder layer: query self-attention, cross-attention to the memory, FFN.

    Query positions (the learned query embeddings) are added to the queries and keys of the
    self-attention and to the queries of the cross-attention; memory positions to its keys.
    Arguments as ``TransformerEncoderLayer``.
    """

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__(dim, 3, dropout, pre_norm)
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(dim, dim_feedforward, dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        query_pos: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tgt: (B, Q, dim) queries. memory: (B, S, dim). query_pos: (B, Q, dim). pos: (B, S, dim).

        Returns:
            (B, Q, dim) updated queries.
        """

        def self_attention(x):
            q = k = _with_pos(x, query_pos)
            return self.self_attn(q, k, value=x, need_weights=False)[0]

        def cross_attention(x):
            q, k = _with_pos(x, query_pos), _with_pos(memory, pos)
            return self.cross_attn(q, k, value=memory, need_weights=False)[0]

        tgt = self.residual(0, tgt, self_attention)
        tgt = self.residual(1, tgt, cross_attention)
        return self.residual(2, tgt, self.ffn)
