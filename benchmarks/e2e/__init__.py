"""The pieces of ``benchmarks.bench_e2e``, one job per module: ``models`` (what is benchmarked),
``variants`` (dense, ARMOR, plain 2:4), ``decode`` (greedy decoding, eager and CUDA graphs) and
``measure`` (prefill, memory and disk)."""
