#!/usr/bin/env python
"""Measure the exact throughput options of the masked-crop image tower one at a time: threads,
``torch.no_grad`` vs ``torch.inference_mode``, batch size, channels-last input, attention module
(open_clip's ``nn.MultiheadAttention`` vs ``LinearSelfAttention`` / SDPA) and needless copies
(non-contiguous input).

    python tools/benchmark_clip_options.py --model ViT-B-16 --crops 32 --json out.json

Random weights, mask prompts of depth 3 on random masks, crops of the model's input size. Each
variant: median of ``--repeats`` timed runs after one warm-up; GFLOP/s from
``torch.utils.flop_counter`` and its fraction of an fp32 2048² matmul measured with the same
threads, just before the variant. Prints one line per variant and a JSON summary.
"""

import argparse
import copy
import json
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ov_seg.benchmark.stats import fraction_of_peak, gflops_per_s, matmul_gflops, rate
from ov_seg.modeling.clip import MaskPromptVisionEncoder, build_clip, clip_sizes
from ov_seg.modeling.clip.quantize import quantize_vision_linears, replace_self_attention


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--crops", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--int8", action="store_true", help="also the int8 dynamic quantized tower")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    clip = build_clip(args.model, None)
    size = clip_sizes(clip).image_size
    enc = MaskPromptVisionEncoder(clip.visual, 3, register_visual=False).eval()
    g = torch.Generator().manual_seed(0)
    crops = torch.randn(args.crops, 3, size, size, generator=g)
    masks = torch.rand(args.crops, size, size, generator=g) > 0.3
    masks[:, : size // 3] = False

    def run(encoder, x, m, batch, mode):
        ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
        with ctx():
            for i in range(0, x.shape[0], batch):
                encoder(x[i : i + batch], m[i : i + batch])

    lin = copy.deepcopy(clip.visual)
    replace_self_attention(lin)
    enc_lin = MaskPromptVisionEncoder(lin, 3, prompts=enc.prompts.data, register_visual=False)
    # counted with LinearSelfAttention (same FLOPs): the counter does not see inside
    # nn.MultiheadAttention's fused inference path
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc_lin(crops[:2], masks[:2])
    flop_per_crop = counter.get_total_flops() / 2
    variants = []
    for t in args.threads:
        variants.append((f"threads {t}, no_grad, batch all", t, enc, crops, args.crops, "no_grad"))
    t = max(args.threads)
    variants.append(
        (f"threads {t}, inference_mode, batch all", t, enc, crops, args.crops, "inference_mode")
    )
    for b in args.batch_sizes:
        variants.append(
            (f"threads {t}, inference_mode, batch {b}", t, enc, crops, b, "inference_mode")
        )
    cl = crops.contiguous(memory_format=torch.channels_last)
    variants.append(
        (
            f"threads {t}, inference_mode, channels_last input",
            t,
            enc,
            cl,
            args.crops,
            "inference_mode",
        )
    )
    strided = torch.randn(args.crops, 3, size, 2 * size, generator=g)[..., ::2]
    variants.append(
        (
            f"threads {t}, inference_mode, non-contiguous input",
            t,
            enc,
            strided,
            args.crops,
            "inference_mode",
        )
    )
    variants.append(
        (
            f"threads {t}, inference_mode, LinearSelfAttention (SDPA)",
            t,
            enc_lin,
            crops,
            args.crops,
            "inference_mode",
        )
    )
    if args.int8:
        q = copy.deepcopy(clip.visual)
        quantize_vision_linears(q)
        enc_q = MaskPromptVisionEncoder(q, 3, prompts=enc.prompts.data, register_visual=False)
        variants.append(
            (
                f"threads {t}, inference_mode, int8 dynamic",
                t,
                enc_q,
                crops,
                args.crops,
                "inference_mode",
            )
        )
    out = {
        "model": args.model,
        "crops": args.crops,
        "gflop_per_crop": flop_per_crop / 1e9,
        "variants": [],
    }
    for name, threads, encoder, x, batch, mode in variants:
        torch.set_num_threads(threads)
        peak = matmul_gflops()
        load = os.getloadavg()[0]
        run(encoder, x[: min(batch, x.shape[0])], masks, batch, mode)  # warm-up
        times = [_time(lambda: run(encoder, x, masks, batch, mode)) for _ in range(args.repeats)]
        sec = statistics.median(times)
        gflops = gflops_per_s(flop_per_crop * args.crops, sec)
        r = {
            "variant": name,
            "threads": threads,
            "s_per_crop": sec / args.crops,
            "crops_per_s": rate(args.crops, sec),
            "gflops_per_s": gflops,
            "matmul_gflops_per_s": peak,
            "fraction_of_matmul": fraction_of_peak(gflops, peak),
            "loadavg": load,
        }
        out["variants"].append(r)
        print(
            f"{name:<55s} {1e3 * r['s_per_crop']:8.1f} ms/crop {gflops:7.1f} GFLOP/s "
            f"matmul {peak:6.1f} -> {100 * r['fraction_of_matmul']:5.1f}%  load {load:.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
