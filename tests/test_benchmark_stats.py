"""The benchmark tools' arithmetic (ov_seg.benchmark.stats) on known values."""

import pytest
import torch

from ov_seg.benchmark.stats import (
    EPS_S,
    busy_cpu_s_from_proc_stat,
    foreign_cpu_cores,
    fraction_of_peak,
    gflops_per_s,
    matmul_flops,
    matmul_gflops,
    median_run,
    per_item_ms,
    process_cpu_s_from_proc_pid_stat,
    rate,
    share,
    speedup,
    weighted_flops,
)


def test_matmul_flops_is_what_the_flop_counter_counts():
    from torch.utils.flop_counter import FlopCounterMode

    a, b = torch.randn(16, 16), torch.randn(16, 16)
    with FlopCounterMode(display=False) as counter:
        a @ b
    assert matmul_flops(16) == counter.get_total_flops() == 8192


def test_rates_and_ratios():
    assert gflops_per_s(6e9, 2.0) == pytest.approx(3.0)
    assert fraction_of_peak(25.0, 100.0) == pytest.approx(0.25)
    assert rate(100, 4.0) == pytest.approx(25.0)
    assert per_item_ms(0.5, 10) == pytest.approx(50.0)
    assert share(3.0, 12.0) == pytest.approx(0.25)
    assert speedup(300.0, 100.0) == pytest.approx(3.0)
    # a timer that read 0 gives a finite rate (clamped at EPS_S), not ZeroDivisionError
    assert rate(1, 0.0) == pytest.approx(1 / EPS_S)
    assert share(1.0, 0.0) == pytest.approx(1 / EPS_S)


@pytest.mark.parametrize(
    "fn, args",
    [(fraction_of_peak, (1.0, 0.0)), (per_item_ms, (1.0, 0)), (speedup, (1.0, 0.0))],
)
def test_degenerate_denominators_raise(fn, args):
    with pytest.raises(ValueError):
        fn(*args)


def test_weighted_flops():
    # 3 crops of 224 px at 10 GFLOP and 5 of 112 px at 2.5 GFLOP
    assert weighted_flops({224: 10e9, 112: 2.5e9}, {224: 3, 112: 5}) == pytest.approx(42.5e9)
    assert weighted_flops({224: 10e9}, {224: 0}) == 0.0
    with pytest.raises(KeyError):
        weighted_flops({224: 10e9}, {112: 1})


def test_median_run_keeps_wall_and_cpu_of_one_run():
    runs = [(3.0, 1.0), (1.0, 9.0), (2.0, 5.0)]
    assert median_run(runs) == (2.0, 5.0)
    assert median_run([(4.0, 0.0), (1.0, 0.0)]) == (4.0, 0.0)  # upper middle of two
    with pytest.raises(ValueError):
        median_run([])


def test_proc_stat_busy_seconds():
    # user nice system idle iowait irq softirq steal guest guest_nice, 100 ticks per second
    line = "cpu  1000 50 200 5000 300 10 20 5 0 0"
    assert busy_cpu_s_from_proc_stat(line, 100) == pytest.approx(
        (1000 + 50 + 200 + 10 + 20 + 5) / 100
    )
    assert busy_cpu_s_from_proc_stat("cpu 100 0 100 400", 100) == pytest.approx(2.0)  # no iowait
    with pytest.raises(ValueError):
        busy_cpu_s_from_proc_stat("cpu 1 2", 100)


def test_proc_pid_stat_cpu_seconds_with_spaces_in_the_name():
    # fields after the name: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime(14) stime(15) ...
    text = "4242 (spacy worker 1) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0"
    assert process_cpu_s_from_proc_pid_stat(text, 100) == pytest.approx(4.0)


def test_foreign_cpu_cores():
    # the machine was busy 30 CPU-s in 10 s, 12 of them ours: 1.8 other cores
    assert foreign_cpu_cores(30.0, 12.0, 10.0) == pytest.approx(1.8)
    assert foreign_cpu_cores(11.0, 12.0, 10.0) == 0.0  # counters read apart: never negative
    assert foreign_cpu_cores(None, 12.0, 10.0) is None


def test_matmul_gflops_measures_a_positive_rate():
    # a measurement, not arithmetic: a tiny product, only its sign and finiteness are certain
    value = matmul_gflops(n=64, repeats=2)
    assert 0 < value < 1 / EPS_S
