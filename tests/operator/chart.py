"""Shared helpers for the chart tests: paths, the pinned helm, rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.cluster import versions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "latencytrace"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def helm(*args: str) -> subprocess.CompletedProcess:
    binary = versions.ensure_tools("helm")["helm"]
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=True, timeout=120)


def render(*args: str) -> list[dict]:
    out = helm("template", "lt", str(CHART), "--namespace", "latencytrace-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc
