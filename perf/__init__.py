"""Benchmarks (pytest-benchmark): `.venv/bin/python -m pytest perf -q`.  Not part of the test suite's run."""
