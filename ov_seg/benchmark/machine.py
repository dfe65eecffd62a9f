"""What the benchmarks read off the machine and share: peak RSS, CPU time, the foreign CPU load
during a measurement (/proc/stat), random blob masks, and writing a result as JSON."""

import json
import os
import resource
import time
from typing import Dict, Optional

import torch

from .stats import busy_cpu_s_from_proc_stat, foreign_cpu_cores

__all__ = [
    "LoadMonitor",
    "machine_busy_s",
    "own_cpu_s",
    "peak_rss_mib",
    "random_blobs",
    "write_json",
]


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def own_cpu_s() -> float:
    """User + system CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> Optional[float]:
    """CPU seconds all processes of the machine spent busy (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            return busy_cpu_s_from_proc_stat(f.readline(), os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None


class LoadMonitor:
    """Foreign CPU load between ``start()`` and ``stop()``: busy CPU seconds of the machine minus
    this process's, per wall second (in cores)."""

    def start(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()
        self.load0 = os.getloadavg()
        return self

    def stop(self) -> Dict[str, object]:
        wall = time.perf_counter() - self.t0
        busy, own = machine_busy_s(), own_cpu_s() - self.own0
        out = {
            "wall_s": round(wall, 2),
            "own_cpu_cores": round(own / wall, 2),
            "loadavg_before": [round(v, 2) for v in self.load0],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        }
        if busy is not None and self.busy0 is not None:
            out["foreign_cpu_cores"] = round(foreign_cpu_cores(busy - self.busy0, own, wall), 2)
        return out


def random_blobs(q: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(q, H, W) soft elliptic blobs in (0, 1), radii 5-30 % of the longer side, random centres."""
    yy = torch.arange(height).float().view(1, -1, 1)
    xx = torch.arange(width).float().view(1, 1, -1)
    side = max(height, width)
    c = torch.rand(q, 2, generator=generator) * torch.tensor([width, height])
    r = (0.05 + 0.25 * torch.rand(q, 2, generator=generator)) * side
    d = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + (
        (yy - c[:, 1, None, None]) / r[:, 1, None, None]
    ) ** 2
    return torch.sigmoid(4 * (1 - d))


def write_json(path: str, result, indent: int = 2) -> None:
    """Write ``result`` to ``path`` atomically (a temporary file, then a rename), folders made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=indent)
    os.replace(tmp, path)
