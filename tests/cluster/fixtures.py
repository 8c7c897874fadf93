"""pytest fixtures for the local control plane, the backends (Jaeger, Prometheus, an OpenTelemetry
Collector) and the project's images.

Enable with, in tests/conftest.py:   pytest_plugins = ["tests.cluster.fixtures"]

Missing binaries and images are built (never skipped) right after collection, before any
test runs, so a first build on a new machine (several minutes) is not charged to
a test's pytest-timeout; its progress lines are shown live although pytest
captures output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from . import images, versions
from .controlplane import ControlPlane
from .jaeger import Jaeger
from .local import LocalCluster
from .otelcol import Collector
from .prometheus import Prometheus
from .node import NODE_TOOLS

CONTROL_PLANE_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                       "kubectl", "kwok", "helm")
FIXTURE_TOOLS = {"control_plane": CONTROL_PLANE_TOOLS, "jaeger": ("jaeger",), "prometheus": ("prometheus",),
                 "collector": ("otelcol", "prometheus", "jaeger"),
                 "real_cluster": CONTROL_PLANE_TOOLS + NODE_TOOLS + ("jaeger", "prometheus", "otelcol")}
# Fixtures that need the images built from the Dockerfile (and the workload and pause images).
FIXTURE_IMAGES = {"real_cluster", "images_built"}
T = TypeVar("T")


def _visibly(config: pytest.Config, build: Callable[[], T]) -> T:
    # A first build takes minutes; with capture on, its progress would be hidden
    # until the end, so capture is suspended for it.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        return build()
    with capman.global_and_fixture_disabled():
        return build()


def _ensure_tools_visibly(config: pytest.Config, *tools: str) -> None:
    _visibly(config, lambda: versions.ensure_tools(*tools))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds the tools that the collected tests' fixtures will need."""
    if session.config.option.collectonly:
        return
    needed: list[str] = []
    with_images = False
    for item in session.items:
        for fixture in getattr(item, "fixturenames", ()):
            for tool in FIXTURE_TOOLS.get(fixture, ()):
                if tool not in needed:
                    needed.append(tool)
            with_images |= fixture in FIXTURE_IMAGES
    if needed:
        _ensure_tools_visibly(session.config, *needed)
    if with_images:
        _visibly(session.config, images.ensure_all)


@pytest.fixture(scope="session")
def images_built(pytestconfig: pytest.Config) -> dict[str, Path]:
    """{image name: OCI archive} of the project's images (tests/cluster/images.py), built once, before
    the first test that needs them (see pytest_collection_finish)."""
    return _visibly(pytestconfig, images.ensure_all)


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


@pytest.fixture(scope="session")
def prometheus(pytestconfig: pytest.Config,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus 3 with its OTLP receiver and exemplar storage on, shared by the session: each test
    tells its data apart by labels of its own (a pod name, a namespace inode)."""
    _ensure_tools_visibly(pytestconfig, "prometheus")
    with Prometheus(tmp_path_factory.mktemp("prometheus")) as p:
        yield p


@pytest.fixture(scope="session")
def collector(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory,
              prometheus: Prometheus, jaeger: Jaeger) -> Iterator[Collector]:
    """An OpenTelemetry Collector (OTLP in; memory_limiter, batch; traces to the session's Jaeger over
    OTLP/gRPC, metrics to its Prometheus over OTLP/HTTP), shared by the session."""
    _ensure_tools_visibly(pytestconfig, "otelcol")
    with Collector(tmp_path_factory.mktemp("otelcol"), traces_to=jaeger.otlp_grpc_endpoint,
                   metrics_to=prometheus.otlp_http_endpoint) as c:
        yield c


@pytest.fixture(scope="session")
def real_cluster(pytestconfig: pytest.Config,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The local cluster with its real node (containerd, kubelet, kube-proxy, CNI) and the backends (a
    collector, Prometheus, Jaeger); the
    images built from the Dockerfile are in the node's store. latencytrace is not installed: tests
    install the chart (LocalCluster.helm_install). There is one real node per machine."""
    _ensure_tools_visibly(pytestconfig, *FIXTURE_TOOLS["real_cluster"])
    cluster = LocalCluster(tmp_path_factory.mktemp("real-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
