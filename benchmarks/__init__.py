"""Tally's benchmark suite (`make bench`): measurements, not tests; see benchmarks/run.py."""
