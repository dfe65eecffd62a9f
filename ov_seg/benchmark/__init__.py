"""Arithmetic of the benchmark tools (tools/benchmark*.py): FLOP counts, rates, load accounting and
summaries as pure functions (``stats``, unit-tested in tests/test_benchmark_stats.py), plus the one
shared measurement of the machine's fp32 matmul peak (``stats.matmul_gflops``)."""
