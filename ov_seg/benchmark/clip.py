"""Masked-crop CLIP classification (``tools/benchmark.py clip``): crops/s, crop preparation vs CLIP
time, CLIP GFLOP/s (as a fraction of an fp32 matmul's, measured by the caller).

Random weights (no download). One image with ``crops`` random blob masks; the crops go through the
image tower in one batch with mask prompts (depth 3 as the mask-adapted CLIP runs).
"""

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ov_seg.modeling.clip import (
    MaskPromptVisionEncoder,
    build_clip,
    clip_sizes,
    prepare_masked_crops,
)

from .machine import random_blobs
from .stats import gflops_per_s, rate, share

__all__ = ["best_time", "bench_clip_model"]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def bench_clip_model(
    name: str, crops: int = 100, repeats: int = 3, image_size: int = 64, depth: int = 3
) -> dict:
    """One CLIP ``name`` (random weights): ``crops`` masked crops of one ``image_size`` image.

    Returns:
        {model, crop_size, crops (valid crops encoded), prep_s, clip_s (best of ``repeats``),
        crops_per_s, prep_fraction (of prep + CLIP), clip_gflop (flop counter, the whole batch),
        clip_gflops_per_s}.
    """
    model = build_clip(name, None).eval()
    sizes = clip_sizes(model)
    enc = MaskPromptVisionEncoder(model.visual, depth=min(depth, sizes.vision_layers)).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, image_size, image_size, generator=g) * 255
    masks = random_blobs(crops, image_size, image_size, g)

    def prep():
        return prepare_masked_crops(image, masks, 0.4, 1.0, sizes.image_size)

    out = prep()
    t_prep = best_time(prep, repeats)
    t_clip = best_time(lambda: enc(out.images, out.masks), repeats)
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
