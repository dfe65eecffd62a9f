"""Inference speed and peak memory of ProposalMaskFormer configs (``tools/benchmark.py proposals``):
random weights, one random image, eval mode; ms/image (wall and process CPU time) and the peak
resident memory during inference (Linux VmHWM, reset before the timed passes) and its increase over
the resident memory before them."""

import resource
import time
from pathlib import Path
from typing import Sequence

import torch

from ov_seg.engine import Trainer

__all__ = ["DEFAULT_OPTS", "benchmark_proposals", "proposal_config"]

# random weights, no download, one template (the cached embeddings make the steady state
# independent of the template count)
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


def proposal_config(config_file: str, opts: Sequence[str] = ()):
    """The frozen config of ``config_file`` + ``DEFAULT_OPTS`` + ``opts`` (as train_net sets up)."""
    from detectron2.engine import default_argument_parser

    from ov_seg.engine.setup import setup_cfg

    args = default_argument_parser().parse_args(
        ["--config-file", config_file, *DEFAULT_OPTS, *opts]
    )
    return setup_cfg(args, default_setup_enabled=False)


def benchmark_proposals(cfg, size: Sequence[int] = (480, 640), iters: int = 5) -> dict:
    """``iters`` timed eval forwards of one random (H, W) = ``size`` image through the model of
    ``cfg`` after one warm-up forward (allocator, text embeddings of the vocabulary).

    Returns:
        {image_size [H, W], params_M, threads, iters, ms_per_image_wall, ms_per_image_cpu,
        peak_rss_MB, peak_rss_increase_MB (None where the peak cannot be reset)}.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
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
        "image_size": [h, w],
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "threads": torch.get_num_threads(),
        "iters": iters,
        "ms_per_image_wall": round(1000 * wall / iters, 1),
        "ms_per_image_cpu": round(1000 * cpu / iters, 1),
        "peak_rss_MB": round(peak / 1024, 1),
        "peak_rss_increase_MB": round((peak - rss_before) / 1024, 1) if exact_peak else None,
    }
