"""PACL training cost (``tools/benchmark.py pacl``): step time and peak memory against the batch
size B.

Φ scores all B x B image-caption pairs, each with its own attention pooling over N patches, so a
dense implementation keeps O(B² · (N + D)) activations for backward. ``pacl_compatibility`` computes
Φ in chunks of texts and (``CHECKPOINT_CHUNKS``) recomputes each chunk in backward, which keeps the
memory linear in B.

Two benchmarks (``measure``):

- ``loss``: embedder + Φ + InfoNCE, forward and backward, on random patch tokens with the sizes
  (N, d_v, D) of a CLIP (``loss_sizes``).
- ``step``: a full PACL training step (frozen CLIP forward on random images, embedder, Φ, loss,
  backward, AdamW step) with ``step_model``.

Peak memory: on CPU the highest resident set size sampled every millisecond during the timed steps,
on CUDA ``max_memory_allocated``; both minus the memory held before the first step. ``sweep`` runs
each configuration in a fresh subprocess (``measure_isolated``) so that the peaks do not mix.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

__all__ = ["MODES", "clip_loss_sizes", "measure", "measure_isolated", "sweep", "table"]

# mode -> (chunked, checkpoint chunks); the chunk size is ``chunk_size``
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


def clip_loss_sizes(model_name: str) -> Tuple[int, int, int]:
    """(N patches, d_v vision width, D embedding) of the open_clip model ``model_name``."""
    from ov_seg.modeling.clip import build_clip, clip_sizes

    sizes = clip_sizes(build_clip(model_name))
    return sizes.grid_size**2, sizes.vision_width, sizes.embed_dim


def measure(
    bench: str,
    mode: str,
    batch_size: int,
    loss_sizes: Optional[Sequence[int]] = None,
    loss_model: str = "ViT-B-16",
    step_model: str = "ovseg-tiny-vit8-64",
    iters: int = 3,
    threads: int = 1,
    device: str = "cpu",
    chunk_size: int = 64,
) -> dict:
    """One (bench, B, mode) measurement in this process: median of ``iters`` steps after one
    warm-up step, and the peak memory over them.

    Returns:
        {bench, mode, B, pairs (B²), N, [d_v,] D, model, chunk_size, checkpoint, step_s, peak_mib,
        device, threads}.
    """
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    from ov_seg.modeling.heads.pacl import build_pacl_embedder
    from ov_seg.modeling.losses.pacl import pacl_info_nce

    chunked, ckpt = MODES[mode]
    chunk = chunk_size if chunked else 0
    b = batch_size
    if bench == "loss":
        n, d_v, dim = loss_sizes if loss_sizes else clip_loss_sizes(loss_model)
        # the embedder only reads the projection's shape: no CLIP is built here
        stand_in = SimpleNamespace(visual=SimpleNamespace(proj=torch.empty(d_v, dim)))
        embedder = build_pacl_embedder("residual_mlp", stand_in).to(device)
        tokens = torch.randn(b, n, d_v, device=device)
        texts = torch.randn(b, dim, device=device)

        def step():
            loss = pacl_info_nce(embedder(tokens), texts, 10.0, chunk_size=chunk, checkpoint=ckpt)
            loss.backward()

        shape = {"N": n, "d_v": d_v, "D": dim, "model": loss_model}
    elif bench == "step":
        from ov_seg.modeling.clip import build_clip, clip_sizes
        from ov_seg.modeling.meta_arch.pacl import PACL

        clip = build_clip(step_model)
        sizes = clip_sizes(clip)
        model = PACL(
            clip_model=clip,
            embedder=build_pacl_embedder("residual_mlp", clip),
            chunk_size=chunk,
            checkpoint_chunks=ckpt,
            prompt_weight=0.0,  # the caption loss only (no noun prompts in this benchmark)
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

        shape = {"N": sizes.grid_size**2, "D": sizes.embed_dim, "model": step_model}
    else:
        raise ValueError(f"bench must be 'loss' or 'step', got {bench!r}")
    held = _held_mib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with _RSSPeak() as rss:
        for _ in range(iters + 1):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak
    return {
        "bench": bench,
        "mode": mode,
        "B": b,
        "pairs": b * b,
        **shape,
        "chunk_size": chunk,
        "checkpoint": ckpt,
        "step_s": round(statistics.median(times[1:]), 4),
        "peak_mib": round(peak - held, 1),
        "device": str(device),
        "threads": threads,
    }


_CHILD = (
    "import json, sys; from ov_seg.benchmark.pacl import measure; "
    "print(json.dumps(measure(**json.loads(sys.argv[1]))))"
)


def measure_isolated(timeout: float = 600, **kwargs) -> dict:
    """``measure(**kwargs)`` in a fresh Python process (OMP_NUM_THREADS = ``threads``); a failure
    or a timeout gives a row {bench, mode, B, error}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(kwargs.get("threads", 1))}
    cmd = [sys.executable, "-c", _CHILD, json.dumps(kwargs)]
    head = {"bench": kwargs["bench"], "mode": kwargs["mode"], "B": kwargs["batch_size"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**head, "error": f"timeout {timeout}s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {**head, "error": tail[0][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(
    bench: str,
    batch_sizes: Iterable[int],
    modes: Iterable[str],
    timeout: float = 600,
    on_row: Callable[[dict], None] = lambda _: None,
    **kwargs,
) -> List[dict]:
    """``measure_isolated`` for every (B, mode) of ``bench``; ``on_row`` sees each row as it comes.
    For ``loss``, ``loss_sizes`` are read once here from ``loss_model`` unless given."""
    if bench == "loss" and not kwargs.get("loss_sizes"):
        kwargs["loss_sizes"] = list(clip_loss_sizes(kwargs.get("loss_model", "ViT-B-16")))
    if bench != "loss":
        kwargs.pop("loss_sizes", None)
    rows = []
    for b in batch_sizes:
        for mode in modes:
            row = measure_isolated(timeout, bench=bench, mode=mode, batch_size=b, **kwargs)
            rows.append(row)
            on_row(row)
    return rows


def table(rows: Sequence[dict]) -> str:
    """The rows as a text table (bench, mode, B, pairs, step_s, peak_MiB; errors inline)."""
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
