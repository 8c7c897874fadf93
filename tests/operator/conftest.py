"""Fixtures of the real-control-plane tests (the `control_plane` fixture itself comes from
tests.cluster.fixtures, registered by each test module that uses it)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.cluster.install import apply_crds

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts: never the repository on PYTHONPATH


def kget(cp, *args: str) -> dict:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def crds(control_plane):
    apply_crds(control_plane)


@pytest.fixture
def namespace(control_plane):
    name = f"lt-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def fake_nodes(control_plane) -> list[str]:
    """Two kwok nodes for workloads that must be scheduled (Deployments, DaemonSets)."""
    return control_plane.create_fake_nodes(2)
