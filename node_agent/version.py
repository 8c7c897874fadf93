"""The installed latencytrace version (status reports and OTLP resources carry it)."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def version() -> str:
    try:
        return metadata.version("latencytrace")
    except metadata.PackageNotFoundError:
        return "unknown"
