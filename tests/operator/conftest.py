"""Fixtures of the real-control-plane tests (the `control_plane` fixture itself comes from
tests.cluster.fixtures, registered by each test module that uses it)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from latencytrace.node_agent.contract import TRACE_KINDS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts: never the repository on PYTHONPATH


def kget(cp, *args: str) -> dict:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def crds(control_plane):
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                          *(f"crd/{kind.plural}.latencytrace.io" for kind in TRACE_KINDS),
                          "crd/latencytracenodes.latencytrace.io")


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
