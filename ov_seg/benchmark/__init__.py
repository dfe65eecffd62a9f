"""The benchmarks behind tools/benchmark.py, one module per sub-command (two_stage, clip,
clip_options, mining, mixreorg, pacl, proposals: functions taking a model / config and returning
dicts of numbers), ``machine`` (peak RSS, foreign CPU load, random blobs, JSON output) and the
arithmetic: FLOP counts, rates, load accounting and
summaries as pure functions (``stats``, unit-tested in tests/test_benchmark_stats.py), plus the one
shared measurement of the machine's fp32 matmul peak (``stats.matmul_gflops``)."""
