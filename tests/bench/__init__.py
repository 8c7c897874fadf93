"""Benchmarks of latencytrace: tracing overhead, measurement fidelity and control-plane scale.

Run with `.ci/bench` (or `.venv/bin/python -m tests.bench --help`). Every figure is a ratio or a
difference against a baseline measured in the same run, because the machines these run on are noisy;
nothing here asserts a timing.
"""
