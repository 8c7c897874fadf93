"""Marker: makes the CRD manifests importable as package data (importlib.resources)."""
