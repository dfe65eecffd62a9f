"""Benchmark arithmetic: FLOP counts, rates, fractions of the machine's matmul peak, CPU-time
accounting from /proc, and robust summaries.

Every function but ``matmul_gflops`` is pure (numbers in, numbers out). Divisions by a time clamp
the time at ``EPS_S`` so that a timer that read 0 gives a large finite rate, not an error.
"""

import time
from typing import Mapping, Optional, Sequence, Tuple

__all__ = [
    "EPS_S",
    "busy_cpu_s_from_proc_stat",
    "foreign_cpu_cores",
    "fraction_of_peak",
    "gflops_per_s",
    "median_run",
    "matmul_flops",
    "matmul_gflops",
    "per_item_ms",
    "process_cpu_s_from_proc_pid_stat",
    "rate",
    "share",
    "speedup",
    "weighted_flops",
]

# smallest time a rate divides by (seconds)
EPS_S = 1e-9


def matmul_flops(n: int) -> int:
    """FLOPs of an (n x n) @ (n x n) matrix product: n^2 dot products of n multiply-adds, 2 n^3."""
    return 2 * int(n) ** 3


def gflops_per_s(flops: float, seconds: float) -> float:
    """``flops`` done in ``seconds`` -> GFLOP/s."""
    return flops / max(seconds, EPS_S) / 1e9


def fraction_of_peak(achieved_gflops_per_s: float, peak_gflops_per_s: float) -> float:
    """Achieved GFLOP/s as a fraction of the machine's fp32 matmul peak (``matmul_gflops``)."""
    if peak_gflops_per_s <= 0:
        raise ValueError(f"peak GFLOP/s must be positive, got {peak_gflops_per_s}")
    return achieved_gflops_per_s / peak_gflops_per_s


def rate(count: float, seconds: float) -> float:
    """Items per second."""
    return count / max(seconds, EPS_S)


def per_item_ms(seconds: float, count: int) -> float:
    """Milliseconds per item of ``count`` items that took ``seconds`` together."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    return 1e3 * seconds / count


def share(part: float, whole: float) -> float:
    """``part / whole`` (e.g. crop preparation time over CLIP time); ``whole`` clamped at EPS_S."""
    return part / max(whole, EPS_S)


def speedup(rate_new: float, rate_base: float) -> float:
    """How many times faster ``rate_new`` is than ``rate_base`` (both items per second)."""
    if rate_base <= 0:
        raise ValueError(f"baseline rate must be positive, got {rate_base}")
    return rate_new / rate_base


def weighted_flops(flops_by_size: Mapping[int, float], count_by_size: Mapping[int, int]) -> float:
    """Total FLOPs of a mix of work items: sum over sizes of (FLOPs of one item of that size) x
    (items of that size), e.g. CLIP crops of several sides.

    Raises:
        KeyError: a size with items but no FLOP count.
    """
    return float(sum(flops_by_size[s] * n for s, n in count_by_size.items() if n))


def median_run(runs: Sequence[Tuple[float, ...]]) -> Tuple[float, ...]:
    """The middle run of ``runs`` sorted by its first entry (wall time), the upper middle of an
    even count: one real run (its wall and CPU times belong together), not an average of two."""
    if not runs:
        raise ValueError("no runs")
    return sorted(runs)[len(runs) // 2]


def busy_cpu_s_from_proc_stat(cpu_line: str, clock_ticks_per_s: int) -> float:
    """CPU seconds all processes spent busy, from the aggregate ``cpu`` line of /proc/stat: the sum
    of user, nice, system, idle, iowait, irq, softirq and steal ticks, less idle and iowait."""
    fields = [int(v) for v in cpu_line.split()[1:]]
    if len(fields) < 4:
        raise ValueError(f"not a /proc/stat cpu line: {cpu_line!r}")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / clock_ticks_per_s


def process_cpu_s_from_proc_pid_stat(stat_text: str, clock_ticks_per_s: int) -> float:
    """utime + stime of a process in seconds, from the text of /proc/<pid>/stat (fields 14 and 15;
    the command name in parentheses may contain spaces, so fields are counted after its ')')."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / clock_ticks_per_s


def foreign_cpu_cores(
    busy_delta_s: Optional[float], own_delta_s: float, wall_s: float
) -> Optional[float]:
    """CPU cores other processes kept busy during a measurement: (machine busy CPU seconds - this
    process's) per wall second, at least 0 (the two counters are read at slightly different times);
    None without a machine counter."""
    if busy_delta_s is None:
        return None
    return max(0.0, busy_delta_s - own_delta_s) / max(wall_s, EPS_S)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 (n x n) @ (n x n) GFLOP/s over ``repeats`` timed products after one warm-up, with
    torch's current threads: the machine's practical peak that CLIP rates are compared with."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return gflops_per_s(matmul_flops(n), best)
