"""The exact throughput options of the masked-crop image tower, one at a time
(``tools/benchmark.py clip-options``): threads, ``torch.no_grad`` vs ``torch.inference_mode``, batch
size, channels-last input, attention module (open_clip's ``nn.MultiheadAttention`` vs
``LinearSelfAttention`` / SDPA), needless copies (non-contiguous input), optionally int8.

Random weights, mask prompts of depth 3 on random masks, crops of the model's input size. Each
variant: median of ``repeats`` timed runs after one warm-up; GFLOP/s from
``torch.utils.flop_counter`` and its fraction of an fp32 2048² matmul measured with the same
threads, just before the variant.
"""

import copy
import os
import statistics
import time
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ov_seg.modeling.clip import MaskPromptVisionEncoder, build_clip, clip_sizes
from ov_seg.modeling.clip.quantize import quantize_vision_linears, replace_self_attention

from .stats import fraction_of_peak, gflops_per_s, matmul_gflops, rate

__all__ = ["benchmark_clip_options"]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(encoder, x, m, batch, mode):
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx():
        for i in range(0, x.shape[0], batch):
            encoder(x[i : i + batch], m[i : i + batch])


def benchmark_clip_options(
    model: str = "ViT-B-16",
    crops: int = 32,
    repeats: int = 3,
    threads: Sequence[int] = (1, 2),
    batch_sizes: Sequence[int] = (4, 8, 16),
    int8: bool = False,
    matmul_n: int = 2048,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Every variant of the module docstring on ``crops`` crops of CLIP ``model``.

    Returns:
        {model, crops, gflop_per_crop, variants: [{variant, threads, s_per_crop, crops_per_s,
        gflops_per_s, matmul_gflops_per_s, fraction_of_matmul, loadavg}]}; torch's thread count is
        restored afterwards.
    """
    threads_before = torch.get_num_threads()
    torch.manual_seed(0)
    clip = build_clip(model, None)
    size = clip_sizes(clip).image_size
    enc = MaskPromptVisionEncoder(clip.visual, 3, register_visual=False).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(crops, 3, size, size, generator=g)
    masks = torch.rand(crops, size, size, generator=g) > 0.3
    masks[:, : size // 3] = False

    lin = copy.deepcopy(clip.visual)
    replace_self_attention(lin)
    enc_lin = MaskPromptVisionEncoder(lin, 3, prompts=enc.prompts.data, register_visual=False)
    # counted with LinearSelfAttention (same FLOPs): the counter does not see inside
    # nn.MultiheadAttention's fused inference path
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc_lin(x[:2], masks[:2])
    flop_per_crop = counter.get_total_flops() / 2
    t = max(threads)
    im = "inference_mode"
    variants = [(f"threads {n}, no_grad, batch all", n, enc, x, crops, "no_grad") for n in threads]
    variants.append((f"threads {t}, inference_mode, batch all", t, enc, x, crops, im))
    for b in batch_sizes:
        variants.append((f"threads {t}, inference_mode, batch {b}", t, enc, x, b, im))
    cl = x.contiguous(memory_format=torch.channels_last)
    variants.append((f"threads {t}, inference_mode, channels_last input", t, enc, cl, crops, im))
    strided = torch.randn(crops, 3, size, 2 * size, generator=g)[..., ::2]
    name = f"threads {t}, inference_mode, non-contiguous input"
    variants.append((name, t, enc, strided, crops, im))
    name = f"threads {t}, inference_mode, LinearSelfAttention (SDPA)"
    variants.append((name, t, enc_lin, x, crops, im))
    if int8:
        q = copy.deepcopy(clip.visual)
        quantize_vision_linears(q)
        enc_q = MaskPromptVisionEncoder(q, 3, prompts=enc.prompts.data, register_visual=False)
        variants.append((f"threads {t}, inference_mode, int8 dynamic", t, enc_q, x, crops, im))
    out = {"model": model, "crops": crops, "gflop_per_crop": flop_per_crop / 1e9, "variants": []}
    try:
        for name, n, encoder, inputs, batch, mode in variants:
            torch.set_num_threads(n)
            peak = matmul_gflops(matmul_n)
            load = os.getloadavg()[0]
            _run(encoder, inputs[: min(batch, crops)], masks, batch, mode)  # warm-up
            times = [
                _time(lambda: _run(encoder, inputs, masks, batch, mode)) for _ in range(repeats)
            ]
            sec = statistics.median(times)
            gflops = gflops_per_s(flop_per_crop * crops, sec)
            r = {
                "variant": name,
                "threads": n,
                "s_per_crop": sec / crops,
                "crops_per_s": rate(crops, sec),
                "gflops_per_s": gflops,
                "matmul_gflops_per_s": peak,
                "fraction_of_matmul": fraction_of_peak(gflops, peak),
                "loadavg": load,
            }
            out["variants"].append(r)
            log(
                f"{name:<55s} {1e3 * r['s_per_crop']:8.1f} ms/crop {gflops:7.1f} GFLOP/s "
                f"matmul {peak:6.1f} -> {100 * r['fraction_of_matmul']:5.1f}%  load {load:.2f}"
            )
    finally:
        torch.set_num_threads(threads_before)
    return out
