"""Marker: makes the C sources importable as package data (importlib.resources)."""
