"""CPU thread settings: never oversubscribe the cores (2 cores here; a second busy thread made a
training step 4x slower)."""

import os

import torch


def free_cores() -> int:
    """CPU cores this process may use (affinity mask when available)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def set_num_threads(num_threads: int = 0, num_processes: int = 1) -> int:
    """Set torch intra-op threads; ``num_threads`` <= 0 means the free cores split across processes.

    Returns:
        the number of threads set.
    """
    if num_threads <= 0:
        num_threads = max(1, free_cores() // max(1, num_processes))
    torch.set_num_threads(num_threads)
    return num_threads
