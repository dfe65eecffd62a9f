#!/usr/bin/env python
"""Benchmark masked-crop CLIP classification: crops/s, crop preparation vs CLIP time, CLIP GFLOP/s
as a fraction of a plain fp32 matmul's GFLOP/s on the same machine and threads.

    OMP_NUM_THREADS=1 python tools/benchmark_clip.py --models ovseg-tiny-vit8-64 ViT-B-16 --crops
    100

Random weights (no download). One image (``--image-sizes``: 64 px for the tiny model, 512 px for
real models) with ``--crops`` random blob masks; the crops go through the image tower in one batch
(with mask prompts of depth 3, as the mask-adapted CLIP runs). Prints one line per model and a JSON
summary (``--json`` writes it to a file).
"""

import argparse
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ov_seg.benchmark.stats import fraction_of_peak, gflops_per_s, matmul_gflops, rate, share
from ov_seg.modeling.clip import (
    MaskPromptVisionEncoder,
    build_clip,
    clip_sizes,
    prepare_masked_crops,
)


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_masks(k: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """k soft elliptic blobs of random centre / radii in a (size x size) image."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c = torch.rand(k, 2, generator=generator) * size
    r = (0.05 + 0.25 * torch.rand(k, 2, generator=generator)) * size
    d = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + (
        (yy - c[:, 1, None, None]) / r[:, 1, None, None]
    ) ** 2
    return torch.sigmoid(4 * (1 - d))


@torch.no_grad()
def bench_model(name: str, crops: int, repeats: int, image_size: int, depth: int) -> dict:
    model = build_clip(name, None).eval()
    sizes = clip_sizes(model)
    enc = MaskPromptVisionEncoder(model.visual, depth=min(depth, sizes.vision_layers)).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, image_size, image_size, generator=g) * 255
    masks = random_masks(crops, image_size, g)

    def prep():
        return prepare_masked_crops(image, masks, 0.4, 1.0, sizes.image_size)

    out = prep()
    t_prep = _timeit(prep, repeats)
    t_clip = _timeit(lambda: enc(out.images, out.masks), repeats)
    with FlopCounterMode(display=False) as counter:
        enc(out.images, out.masks)
    flops = counter.get_total_flops()
    n = int(out.valid.sum())
    return {
        "model": name,
        "crop_size": sizes.image_size,
        "crops": n,
        "prep_s": t_prep,
        "clip_s": t_clip,
        "crops_per_s": rate(n, t_prep + t_clip),
        "prep_fraction": share(t_prep, t_prep + t_clip),
        "clip_gflop": flops / 1e9,
        "clip_gflops_per_s": gflops_per_s(flops, t_clip),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ovseg-tiny-vit8-64", "ViT-B-16"])
    p.add_argument("--crops", type=int, default=100)
    p.add_argument(
        "--image-sizes",
        type=int,
        nargs="+",
        default=[64, 512],
        help="image side per model (toy world: 64; real images: 512)",
    )
    p.add_argument("--depth", type=int, default=3, help="mask prompt depth")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = keep torch's setting)"
    )
    p.add_argument("--json", default="", help="also write the summary to this file")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mm = matmul_gflops(1024)
    summary = {
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "matmul_gflops_per_s": mm,
        "models": [],
    }
    print(
        f"threads {summary['threads']}, load average {summary['load_average']:.1f}, "
        f"fp32 matmul 1024^3: {mm:.1f} GFLOP/s"
    )
    if len(args.image_sizes) not in (1, len(args.models)):
        p.error("--image-sizes needs one size, or one per model")
    image_sizes = (
        args.image_sizes * len(args.models) if len(args.image_sizes) == 1 else args.image_sizes
    )
    for name, image_size in zip(args.models, image_sizes):
        r = bench_model(name, args.crops, args.repeats, image_size, args.depth)
        r["image_size"] = image_size
        r["fraction_of_matmul"] = fraction_of_peak(r["clip_gflops_per_s"], mm)
        summary["models"].append(r)
        print(
            f"{name:>20}: {r['crops']} crops of {r['crop_size']} px from a {image_size} px image: "
            f"{r['crops_per_s']:.1f} crops/s | "
            f"crop prep {1e3 * r['prep_s']:.1f} ms ({100 * r['prep_fraction']:.1f}%) | CLIP "
            f"{1e3 * r['clip_s']:.1f} ms, {r['clip_gflop']:.1f} GFLOP, "
            f"{r['clip_gflops_per_s']:.1f} GFLOP/s "
            f"= {100 * r['fraction_of_matmul']:.0f}% of matmul",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
