"""Benchmark scripts of cnn_bench (not part of the installed package).

Run them as scripts from the repository root, e.g. ``python benchmarks/throughput.py --help``;
``BENCHMARKS.md`` lists the commands and their results.
"""
