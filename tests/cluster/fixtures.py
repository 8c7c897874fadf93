"""pytest fixtures for the local control plane and Jaeger.

Enable with, in tests/conftest.py:   pytest_plugins = ["tests.cluster.fixtures"]

Missing binaries are built (never skipped) before the first fixture starts; the
build's progress lines are shown live even while pytest captures output.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import versions
from .controlplane import ControlPlane
from .jaeger import Jaeger

CONTROL_PLANE_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                       "kubectl", "kwok", "helm")


def _ensure_tools_visibly(config: pytest.Config, *tools: str) -> None:
    # A first build takes minutes; with capture on, its progress would be hidden
    # until the end, so capture is suspended for it.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        versions.ensure_tools(*tools)
        return
    with capman.global_and_fixture_disabled():
        versions.ensure_tools(*tools)


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane for the session: etcd, kube-apiserver (RBAC),
    kube-controller-manager, kube-scheduler and kwok. No nodes are created here;
    call control_plane.create_fake_nodes(...) in the test or a module fixture.
    Tests share it: use a namespace of their own and clean up cluster-scoped objects."""
    _ensure_tools_visibly(pytestconfig, *CONTROL_PLANE_TOOLS)
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"), with_controllers=True,
                      with_kwok=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def jaeger(pytestconfig: pytest.Config,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """Jaeger v2 all-in-one with in-memory storage, shared by the session."""
    _ensure_tools_visibly(pytestconfig, "jaeger")
    j = Jaeger(tmp_path_factory.mktemp("jaeger"))
    j.start()
    try:
        yield j
    finally:
        j.stop()
