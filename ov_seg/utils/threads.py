"""CPU thread settings: never oversubscribe the cores (2 cores here; a second busy thread made a
training step 4x slower)."""

import os

import torch


def free_cores() -> int:
    """CPU cores this process may use: the affinity mask, capped by ``OMP_NUM_THREADS`` when the
    environment sets it (the usual way to leave cores to other jobs on a shared machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        cores = min(cores, int(env))
    return max(1, cores)


def set_num_threads(num_threads: int = 0, num_processes: int = 1) -> int:
    """Set torch intra-op threads; ``num_threads`` <= 0 means the free cores split across processes.

    Returns:
        the number of threads set.
    """
    if num_threads <= 0:
        num_threads = max(1, free_cores() // max(1, num_processes))
    torch.set_num_threads(num_threads)
    return num_threads


def test_loader_workers(cfg) -> int:
    """Worker processes of the test loader from ``TEST.NUM_WORKERS``: -2 =
    ``DATALOADER.NUM_WORKERS``; -1 = the free cores minus the compute threads
    (``RUNTIME.NUM_THREADS``, 0 = all free cores: then no worker); >= 0 = that many."""
    n = int(cfg.TEST.NUM_WORKERS)
    if n >= 0:
        return n
    if n == -1:
        cores = free_cores()
        compute = int(cfg.RUNTIME.NUM_THREADS)
        return max(0, cores - (compute if compute > 0 else cores))
    return int(cfg.DATALOADER.NUM_WORKERS)
