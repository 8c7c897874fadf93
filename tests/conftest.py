"""Shared pytest setup: the real control plane and Jaeger fixtures (tests/cluster) for every test."""

pytest_plugins = ["tests.cluster.fixtures"]
