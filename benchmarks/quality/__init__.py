"""Helpers of benchmarks/bench_quality.py: data preparation, feature caches, systems, tables."""
