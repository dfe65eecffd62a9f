"""The benchmarks behind tools/benchmark.py, one module per sub-command (``two_stage``, ``clip``,
``clip_options``, ``mining``, ``mixreorg``, ``pacl``, ``proposals``: functions taking a model or a
config and returning dicts of numbers, no command line), ``machine`` (peak RSS, foreign CPU load,
random blobs, JSON output) and ``stats``: the arithmetic (FLOP counts, rates, load accounting,
summaries) as pure functions, unit-tested in tests/test_benchmark_stats.py, plus the one shared
measurement of the machine's fp32 matmul peak (``stats.matmul_gflops``)."""
