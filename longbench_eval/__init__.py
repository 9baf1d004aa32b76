"""Helpers of ``longbench.py``: LongBench tables, data, prompts, scoring, prediction files,
generation with any cache method, and torchrun data parallelism. Each module is importable on
its own so tests can exercise one rule at a time."""
