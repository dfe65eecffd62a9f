#!/usr/bin/env python
"""Inference speed and peak memory of ProposalMaskFormer configs (random weights, random images).

    OMP_NUM_THREADS=1 python tools/benchmark_proposals.py \\
        --config-files configs/toyworld/proposal_R18.yaml configs/proposal/R50.yaml --size 480 640

For each config: build the model (MODEL.WEIGHTS "", MODEL.CLIP.PRETRAINED ""), warm up (this also
embeds
the vocabulary once for the open-vocabulary head; MODEL.CLIP.TEMPLATES "single" by default to keep
that
short — the cached embeddings make the steady state independent of the template count), then time
``--iters`` forward passes of one image in eval mode. Prints ms/image (wall and process CPU time)
and the
peak resident memory during inference (Linux VmHWM, reset before the timed passes) and its increase
over
the resident memory before them; ``--output`` also writes the numbers as JSON.
"""

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
from detectron2.engine import default_argument_parser

import ov_seg  # noqa: F401 (registration)
from ov_seg.engine import Trainer
from ov_seg.engine.setup import setup_cfg

DEFAULT_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.WEIGHTS",
    "",
    "MODEL.CLIP.PRETRAINED",
    "",
    "MODEL.CLIP.TEMPLATES",
    "single",
]


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field in kB (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def benchmark(config_file: str, size, iters: int, opts) -> dict:
    args = default_argument_parser().parse_args(
        ["--config-file", config_file, *DEFAULT_OPTS, *opts]
    )
    cfg = setup_cfg(args, default_setup_enabled=False)
    model = Trainer.build_model(cfg).eval()
    h, w = size
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    inputs = [{"image": image, "height": h, "width": w}]
    with torch.no_grad():
        model(inputs)  # warm-up (allocator, text embeddings of the vocabulary)
        rss_before = _status_kb("VmRSS")
        exact_peak = _reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            model(inputs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_kb("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "config": config_file,
        "image_size": [h, w],
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "threads": torch.get_num_threads(),
        "iters": iters,
        "ms_per_image_wall": round(1000 * wall / iters, 1),
        "ms_per_image_cpu": round(1000 * cpu / iters, 1),
        "peak_rss_MB": round(peak / 1024, 1),
        "peak_rss_increase_MB": round((peak - rss_before) / 1024, 1) if exact_peak else None,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-files", nargs="+", required=True)
    parser.add_argument("--size", nargs=2, type=int, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--output", default="", help="JSON file for the results")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every config")
    a = parser.parse_args()
    if a.iters < 1:
        parser.error("--iters must be >= 1")
    opts = ["RUNTIME.NUM_THREADS", str(a.threads), *a.opts]
    results = []
    for config_file in a.config_files:
        r = benchmark(config_file, a.size, a.iters, opts)
        results.append(r)
        print(
            f"{r['config']}: {r['params_M']}M params, {r['image_size'][1]}x{r['image_size'][0]}, "
            f"{r['threads']} thread(s): {r['ms_per_image_wall']} ms/image wall, "
            f"{r['ms_per_image_cpu']} ms/image CPU, peak RSS {r['peak_rss_MB']} MB "
            f"(+{r['peak_rss_increase_MB']} MB during inference)",
            flush=True,
        )
    if a.output:
        tmp = a.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
