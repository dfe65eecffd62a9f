"""fvcore FLOP counts that include attention.

fvcore's ``FlopCountAnalysis`` counts by traced aten op and has no handle for the fused attention
ops, so it counts 0 for them (listed as unsupported): ``aten::scaled_dot_product_attention``
(``F.scaled_dot_product_attention``, and ``nn.MultiheadAttention`` with gradients on) and
``aten::_native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, which
hides its projections too). ``flop_count_analysis`` adds handles for both, in fvcore's unit: one
multiply-add = one "flop", as its matmul and linear handles count.
"""

from typing import Any, List

from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["attention_flops", "count_flops", "flop_count_analysis"]


def attention_flops(batch: int, queries: int, keys: int, qk_dim: int, v_dim: int) -> int:
    """Multiply-adds of softmax(Q Kᵀ) V over ``batch`` (batch x heads) problems: Q Kᵀ is
    queries x keys x qk_dim, the product with V queries x keys x v_dim (the softmax and scaling,
    elementwise, are not counted, as fvcore counts no elementwise op)."""
    return batch * queries * keys * (qk_dim + v_dim)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention(query (..., L, E), key (..., S, E), value (..., S,
    Ev), ...)``."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return attention_flops(_numel(q[:-2]), q[-2], k[-2], q[-1], v[-1])


def _native_mha_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::_native_multi_head_attention(query (B, L, E), key (B, S, E), value (B, S, E),
    embed_dim, num_heads, qkv_weight, ...)``: the q / k / v and output projections and the
    attention (the heads split E)."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    dim = q[-1]
    batch, length, source = _numel(q[:-2]), q[-2], k[-2]
    projections = batch * (length * dim * dim + 2 * source * dim * dim + length * dim * dim)
    return projections + attention_flops(batch, length, source, dim, dim)


def flop_count_analysis(module: nn.Module, inputs) -> FlopCountAnalysis:
    """``FlopCountAnalysis(module, inputs)`` with the attention handles, warnings off."""
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(
        "aten::scaled_dot_product_attention",
        _sdpa_flop_jit,
        "aten::_native_multi_head_attention",
        _native_mha_flop_jit,
    )
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def count_flops(module: nn.Module, inputs) -> int:
    """Total fvcore "flops" (multiply-adds) of ``module(*inputs)``, attention included."""
    return int(flop_count_analysis(module, inputs).total())
