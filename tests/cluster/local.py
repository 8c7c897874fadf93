"""The local cluster as a user has one: a control plane, the real node (tests/cluster/node.py) running
latencytrace's chart from the images built here (tests/cluster/images.py), the OpenTelemetry backends as
most users run them (agents -> an OpenTelemetry Collector -> Prometheus for metrics, Jaeger for traces),
and kwok's fake nodes on request (they carry no real pods: for scale only).

`.ci/cluster up` makes one that outlives the command (detach); the `real_cluster` pytest fixture makes
one for the test session. Either way `stop()` (or `.ci/cluster down`, from the recorded state) removes
every process, mount, link, cgroup and file it made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from . import images, install
from .controlplane import ControlPlane, stop_from_state
from .jaeger import Jaeger
from .node import NODE_IP, NODE_NAME, RealNode, teardown
from .otelcol import Collector
from .prometheus import Prometheus

NAMESPACE = install.NAMESPACE
RELEASE = install.RELEASE

# The local cluster's chart values: quick intervals for a demo and tests; everything to the collector,
# which sends spans to Jaeger and metrics (exponential histograms, exemplars) to Prometheus.
LOCAL_VALUES = {
    "operator": {"statusIntervalSeconds": 2},
    "agent": {"intervalSeconds": 2, "statusSeconds": 10, "statusMinGapSeconds": 1, "retrySeconds": 2},
    "otlp": {"insecure": True},
}


class LocalCluster:
    def __init__(self, workdir: str | os.PathLike[str], *, kwok_nodes: int = 0, detach: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        self.kwok_nodes = kwok_nodes
        self.detach = detach
        self.node = RealNode(self.workdir / "logs", detach=detach)
        self.cp = ControlPlane(self.workdir, with_controllers=True, with_kwok=kwok_nodes > 0, detach=detach,
                               node_ip=NODE_IP)
        self.jaeger = Jaeger(self.workdir / "jaeger", detach=detach)
        self.prometheus = Prometheus(self.workdir / "prometheus", detach=detach)
        self.collector: Collector | None = None
        self.fake_nodes: list[str] = []

    @property
    def node_name(self) -> str:
        return NODE_NAME

    def start(self) -> LocalCluster:
        built = images.ensure_all()  # before anything runs: a first build takes minutes
        self.node.prepare()
        try:
            self.cp.start()
            self.node.start(self.cp, built)
            if self.kwok_nodes:
                self.fake_nodes = self.cp.create_fake_nodes(self.kwok_nodes)
            self.jaeger.start()
            self.prometheus.start()
            self.collector = Collector(self.workdir / "otelcol", traces_to=self.jaeger.otlp_grpc_endpoint,
                                       metrics_to=self.prometheus.otlp_http_endpoint, detach=self.detach).start()
            if self.detach:
                install.record(self.cp, [self.jaeger.proc, self.prometheus.proc, self.collector.proc],
                               jaeger={"ports": self.jaeger.ports, "query_url": self.jaeger.query_url},
                               prometheus={"url": self.prometheus.url},
                               collector={"otlp_grpc": self.collector.otlp_grpc_endpoint})
        except BaseException:
            self.stop()
            raise
        return self

    def values(self, **overrides) -> dict:
        """The chart values of the local cluster: LOCAL_VALUES, OTLP to this cluster's collector."""
        values = json.loads(json.dumps(LOCAL_VALUES))
        assert self.collector is not None, "start() the cluster first"
        values["otlp"]["endpoint"] = f"http://{self.collector.otlp_grpc_endpoint}"  # the agent is on the host network
        return _merge(values, overrides)

    def helm_install(self, values: dict | None = None, *, timeout: str = "5m") -> None:
        """`helm upgrade --install` of the chart with the built images; returns once its pods are Ready."""
        values_file = self.workdir / "latencytrace-values.yaml"
        values_file.write_text(yaml.safe_dump(values if values is not None else self.values()))
        self.cp.helm("upgrade", "--install", RELEASE, str(install.CHART), "-n", NAMESPACE, "--create-namespace",
                     "-f", str(values_file), "--wait", f"--timeout={timeout}", timeout=600)

    def stop(self) -> None:
        if self.collector is not None:
            self.collector.stop()
        self.prometheus.stop()
        self.jaeger.stop()
        self.node.stop()
        if self.detach:
            stop_from_state(self.cp.workdir)
        self.cp.stop()


def down(workdir: Path) -> int:
    """Stops a detached local cluster from what it recorded; returns how many processes were running."""
    teardown()  # the node first: its pods are removed through the runtime while it can
    return stop_from_state(workdir)


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base
