"""Tests of benchmarks: the continual-learning driver and its data helpers."""
