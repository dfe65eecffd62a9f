"""Thread settings honour the cores a job is given."""

import os

import torch

from ov_seg.utils.threads import free_cores, set_num_threads


def test_free_cores_capped_by_omp_num_threads(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert free_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(affinity + 5))
    assert free_cores() == affinity  # never more than the affinity mask
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert free_cores() == affinity


def test_set_num_threads_splits_free_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_num_threads(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        expected = max(1, len(os.sched_getaffinity(0)) // 2)
        assert set_num_threads(0, num_processes=2) == expected
        assert set_num_threads(3) == 3  # an explicit count wins
    finally:
        torch.set_num_threads(before)


def test_test_loader_workers_from_the_free_cores(monkeypatch):
    from ov_seg.engine.setup import get_ov_seg_cfg
    from ov_seg.utils import threads

    cfg = get_ov_seg_cfg()
    cfg.DATALOADER.NUM_WORKERS = 3
    assert threads.test_loader_workers(cfg) == 3  # default -2: DATALOADER.NUM_WORKERS, as before
    monkeypatch.setattr(threads, "free_cores", lambda: 4)
    cfg.TEST.NUM_WORKERS, cfg.RUNTIME.NUM_THREADS = -1, 1
    assert threads.test_loader_workers(cfg) == 3  # 4 free cores - 1 compute thread
    cfg.RUNTIME.NUM_THREADS = 6
    assert threads.test_loader_workers(cfg) == 0  # never negative
    cfg.RUNTIME.NUM_THREADS = 0  # the compute threads take every free core
    assert threads.test_loader_workers(cfg) == 0
    cfg.TEST.NUM_WORKERS = 2
    assert threads.test_loader_workers(cfg) == 2  # an explicit count wins
