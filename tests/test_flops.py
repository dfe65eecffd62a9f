"""``ov_seg.utils.flops``: attention counted by hand on tiny problems."""

import torch
import torch.nn.functional as F
from torch import nn

from ov_seg.utils.flops import count_flops, flop_count_analysis


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _MHA(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]


def test_scaled_dot_product_attention_by_hand():
    # 2 images x 3 heads, 5 queries, 7 keys, q/k dim 4, v dim 6
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    qk = 2 * 3 * 5 * 7 * 4  # multiply-adds of Q Kᵀ
    av = 2 * 3 * 5 * 7 * 6  # of the weights times V
    analysis = flop_count_analysis(_SDPA(), (q, k, v))
    assert analysis.total() == qk + av
    assert not analysis.unsupported_ops()


def test_multihead_attention_fast_path_and_training_path_agree():
    """``nn.MultiheadAttention`` in eval without gradients runs one fused op; with gradients, the
    projections and SDPA separately: both count projections + attention."""
    torch.manual_seed(0)
    dim, heads, batch, length, source = 8, 2, 3, 5, 6
    module = _MHA(dim, heads).eval()
    x, memory = torch.randn(batch, length, dim), torch.randn(batch, source, dim)
    projections = batch * (2 * length * dim * dim + 2 * source * dim * dim)  # q, out; k, v
    attention = batch * heads * length * source * 2 * (dim // heads)
    with torch.no_grad():
        fused = count_flops(module, (x, memory))
    with torch.enable_grad():
        unfused = count_flops(module, (x, memory))
    assert fused == unfused == projections + attention
