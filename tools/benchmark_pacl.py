#!/usr/bin/env python
"""Benchmark PACL training: step time and peak memory against the batch size B.

Φ scores all B x B image-caption pairs, each with its own attention pooling over N patches, so a
dense implementation keeps O(B² · (N + D)) activations for backward. ``pacl_compatibility`` computes
Φ in chunks of texts and (``CHECKPOINT_CHUNKS``) recomputes each chunk in backward, which keeps the
memory linear in B.

Two benchmarks, each configuration in a fresh subprocess:

- ``loss``: embedder + Φ + InfoNCE, forward and backward, on random patch tokens with the sizes
  (N, d_v, D) of ``--loss-model`` (default ViT-B-16 at 224: N = 196, d_v = 768, D = 512).
- ``step``: a full PACL training step (frozen CLIP forward on random images, embedder, Φ, loss,
  backward, AdamW step) with ``--step-model`` (default the toy world's tiny CLIP).

Peak memory: on CPU the highest resident set size sampled every millisecond during the timed steps,
on CUDA ``max_memory_allocated``; both minus the memory held before the first step.

    python tools/benchmark_pacl.py                    # both benchmarks, chunked vs dense
    python tools/benchmark_pacl.py --bench loss --batch-sizes 256 1024 --modes chunked
    python tools/benchmark_pacl.py --output /tmp/pacl/bench.jsonl

Prints one table per benchmark (median step time over ``--iters`` after one warm-up step, peak
memory); ``--output`` also appends JSON lines.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

# mode -> (chunked, checkpoint chunks); the chunk size is --chunk-size
MODES = {"chunked": (True, True), "chunked_nockpt": (True, False), "dense": (False, False)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RSSPeak:
    """Highest RSS (MiB) sampled by a background thread while active (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _held_mib(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return _rss_mib()


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(args) -> dict:
    """One (bench, B, mode) measurement in this process."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    from ov_seg.modeling.heads.pacl import build_pacl_embedder
    from ov_seg.modeling.losses.pacl import pacl_info_nce

    chunked, ckpt = MODES[args.mode]
    chunk = args.chunk_size if chunked else 0
    b = args.batch_size
    if args.bench == "loss":
        n, d_v, dim = args.loss_sizes
        # the embedder only reads the projection's shape: no CLIP is built here
        stand_in = SimpleNamespace(visual=SimpleNamespace(proj=torch.empty(d_v, dim)))
        embedder = build_pacl_embedder("residual_mlp", stand_in).to(device)
        tokens = torch.randn(b, n, d_v, device=device)
        texts = torch.randn(b, dim, device=device)

        def step():
            loss = pacl_info_nce(embedder(tokens), texts, 10.0, chunk_size=chunk, checkpoint=ckpt)
            loss.backward()

        shape = {"N": n, "d_v": d_v, "D": dim, "model": args.loss_model}
    else:
        from ov_seg.modeling.clip import build_clip, clip_sizes
        from ov_seg.modeling.meta_arch.pacl import PACL

        clip = build_clip(args.step_model)
        sizes = clip_sizes(clip)
        model = PACL(
            clip_model=clip,
            embedder=build_pacl_embedder("residual_mlp", clip),
            chunk_size=chunk,
            checkpoint_chunks=ckpt,
            prompt_weight=0.0,  # the caption loss only (the inputs carry no ``nouns``)
        ).to(device)
        model.train()
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        size = sizes.image_size
        inputs = [
            {
                "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8),
                "captions": [f"a photo of thing number {i}"],
            }
            for i in range(b)
        ]

        def step():
            optim.zero_grad(set_to_none=True)
            loss = sum(model(inputs).values())
            loss.backward()
            optim.step()

        shape = {"N": sizes.grid_size**2, "D": sizes.embed_dim, "model": args.step_model}
    held = _held_mib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with _RSSPeak() as rss:
        for _ in range(args.iters + 1):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak
    return {
        "bench": args.bench,
        "mode": args.mode,
        "B": b,
        "pairs": b * b,
        **shape,
        "chunk_size": chunk,
        "checkpoint": ckpt,
        "step_s": round(statistics.median(times[1:]), 4),
        "peak_mib": round(peak - held, 1),
        "device": str(device),
        "threads": args.threads,
    }


def _table(rows):
    head = f"{'bench':<5} {'mode':<15} {'B':>5} {'pairs':>8} {'step_s':>8} {'peak_MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['bench']:<5} {r['mode']:<15} {r['B']:>5} {'':>8} error: {r['error']}")
            continue
        lines.append(
            f"{r['bench']:<5} {r['mode']:<15} {r['B']:>5} {r['pairs']:>8} {r['step_s']:>8.3f} "
            f"{r['peak_mib']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bench", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    p.add_argument("--modes", nargs="+", default=["chunked", "dense"], choices=sorted(MODES))
    p.add_argument(
        "--loss-model", default="ViT-B-16", help="open_clip model whose sizes the loss uses"
    )
    p.add_argument(
        "--step-model", default="ovseg-tiny-vit8-64", help="CLIP of the full-step benchmark"
    )
    p.add_argument(
        "--chunk-size", type=int, default=64, help="texts per chunk of the chunked modes"
    )
    p.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--output", default="", help="also append JSON lines here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    p.add_argument("--loss-sizes", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.bench = args.bench[0]
        print(json.dumps(_worker(args)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    loss_sizes = []
    if "loss" in args.bench:
        from ov_seg.modeling.clip import build_clip, clip_sizes

        sizes = clip_sizes(build_clip(args.loss_model))
        loss_sizes = [str(sizes.grid_size**2), str(sizes.vision_width), str(sizes.embed_dim)]
    for bench in args.bench:
        rows = []
        for b in args.batch_sizes:
            for mode in args.modes:
                cmd = [
                    sys.executable, __file__, "--worker", "--bench", bench, "--batch-size", str(b),
                    "--mode", mode, "--loss-model", args.loss_model,
                    "--step-model", args.step_model, "--iters", str(args.iters),
                    "--threads", str(args.threads), "--device", args.device,
                    "--chunk-size", str(args.chunk_size),
                    *(["--loss-sizes", *loss_sizes] if bench == "loss" else []),
                ]  # fmt: skip
                try:
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, env=env, timeout=args.timeout
                    )
                    if proc.returncode != 0:
                        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                        row = {"bench": bench, "mode": mode, "B": b, "error": tail[0][:120]}
                    else:
                        row = json.loads(proc.stdout.strip().splitlines()[-1])
                except subprocess.TimeoutExpired:
                    row = {
                        "bench": bench,
                        "mode": mode,
                        "B": b,
                        "error": f"timeout {args.timeout}s",
                    }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.output:
                    with open(args.output, "a") as f:
                        f.write(json.dumps(row) + "\n")
        print(_table(rows), flush=True)


if __name__ == "__main__":
    main()
