"""Int8 dynamic quantization of a CLIP image tower's linear layers (an opt-in fast mode on CPU).

``torch.ao.quantization.quantize_dynamic`` converts ``nn.Linear`` modules only, and open_clip's
attention is an ``nn.MultiheadAttention`` whose projections are not ``nn.Linear`` modules (its
``out_proj`` is even marked non-quantizable). ``quantize_vision_linears`` therefore first swaps each
self-attention for ``LinearSelfAttention`` (the same computation with ``nn.Linear`` in / out
projections and ``scaled_dot_product_attention``), then quantizes every ``nn.Linear`` of the tower:
the QKV, output and MLP projections, i.e. all but the patch embedding and the final projection.
Weights are int8 per output channel, activations are quantized per batch on the fly (fbgemm /
x86 kernels). Outputs change (≈1e-2 relative): an approximation, measured in
notes/fast_inference.md.
"""

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearSelfAttention", "replace_self_attention", "quantize_vision_linears"]


class LinearSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, no dropout) with ``nn.Linear`` projections.

    Called like the module it replaces: ``attn(x, x, x, need_weights=False, attn_mask=mask)`` ->
    ``(out, None)``; ``x`` (B, T, C) when ``batch_first`` else (T, B, C); ``attn_mask`` additive
    float (T, T) or (B·heads, T, T), or bool (True = masked out, PyTorch's convention).
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise TypeError("LinearSelfAttention supports plain self-attention only")
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearSelfAttention computes self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, t, c = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(
                    attn_mask, float("-inf")
                )
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(b, h, t, t)
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, T, c / h)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, c))
        return (out if self.batch_first else out.transpose(0, 1)), None


def replace_self_attention(module: nn.Module) -> int:
    """Swap every ``nn.MultiheadAttention`` child named ``attn`` (open_clip's residual blocks) for
    a ``LinearSelfAttention`` in place. Returns the number swapped."""
    count = 0
    for parent in module.modules():
        attn = getattr(parent, "attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            parent.attn = LinearSelfAttention(attn).to(attn.in_proj_weight.device)
            count += 1
    return count


def quantize_vision_linears(visual: nn.Module) -> nn.Module:
    """Int8 dynamic quantization of an open_clip image tower, in place (CPU inference only).

    Args:
        visual: ``clip.visual`` (an open_clip ``VisionTransformer``), on the CPU, with its final
            weights loaded (quantized modules do not load float state dicts).

    Returns:
        ``visual``, its attention swapped (``replace_self_attention``) and every ``nn.Linear``
        replaced by a dynamically quantized one.
    """
    replace_self_attention(visual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(
            visual, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    # open_clip's blocks read their dtype from mlp.c_fc.weight unless this attribute is set
    for block in getattr(getattr(visual, "transformer", None), "resblocks", []):
        block.mlp.c_fc.int8_original_dtype = torch.float32
    return visual
