"""Where each target's data goes, and under which resource.

Each traced pod is its own resource (the agent's resource with the pod's k8s attributes), so that its
metrics and spans describe the pod as the semantic conventions have it; the agent's own metrics have the
agent's resource. A target goes to the agent's default endpoint, unless the LatencyTrace that selected it names its own
(`spec.export.otlpEndpoint`); a pod selected by several traces goes to each of their destinations. A
trace's `resourceAttributes` are added to the resource of what it receives. The agent's own metrics
(probe cost, health) go to the default endpoint, or, without one, to every endpoint a trace names.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.semconv._incubating.attributes import host_attributes
from opentelemetry.semconv.attributes import service_attributes

from ..contract import ExportOverrides
from ..targets import Target
from . import attributes as a

SERVICE_NAME = "latencytrace-agent"


@dataclass(frozen=True)
class Route:
    endpoint: str | None  # None: the agent's default destination
    resource_attributes: tuple[tuple[str, str], ...] = ()


DEFAULT = Route(None)


def base_resource(service_version: str, node_name: str | None, extra: Mapping[str, str]) -> Resource:
    """Our identity, then OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME (the user's word wins over our
    defaults), then the agent's configured attributes."""
    ours = {service_attributes.SERVICE_NAME: SERVICE_NAME, service_attributes.SERVICE_VERSION: service_version,
            host_attributes.HOST_NAME: socket.gethostname()}
    if node_name:
        ours[a.K8S_NODE_NAME] = node_name
    return Resource.create(ours).merge(OTELResourceDetector().detect()).merge(Resource(dict(extra)))


class Router:
    def __init__(self, base: Resource, has_default: bool, default_endpoint: str | None = None):
        self.base = base
        self.has_default = has_default
        self.default_endpoint = default_endpoint
        self._exports: dict[str, ExportOverrides] = {}
        self._resources: dict[tuple[Route, tuple], Resource] = {}

    def set_exports(self, exports: Mapping[str, ExportOverrides]) -> None:
        """Export overrides by trace ("namespace/name")."""
        # A trace naming the agent's own endpoint is the default destination, not a second exporter to it
        # (which would send the pods of that trace and of a trace without override twice).
        self._exports = {name: ov.model_copy(update={"otlp_endpoint": None})
                         if ov.otlp_endpoint and ov.otlp_endpoint == self.default_endpoint else ov
                         for name, ov in exports.items()}
        self._resources.clear()

    def routes(self, target: Target) -> set[Route]:
        if not target.traces:
            return {DEFAULT} if self.has_default else set()
        out = set()
        for name in target.traces:
            ov = self._exports.get(name) or ExportOverrides()
            if ov.otlp_endpoint is None and not self.has_default:
                continue  # nowhere to send it: the trace names no endpoint and the agent has none
            out.add(Route(ov.otlp_endpoint, tuple(sorted(ov.resource_attributes.items()))))
        return out

    def node_routes(self) -> set[Route]:
        if self.has_default:
            return {DEFAULT}
        return {Route(ov.otlp_endpoint) for ov in self._exports.values() if ov.otlp_endpoint}

    def endpoints(self) -> set[str | None]:
        """Every destination in use (None: the default)."""
        out: set[str | None] = {None} if self.has_default else set()
        out.update(ov.otlp_endpoint for ov in self._exports.values() if ov.otlp_endpoint)
        return out

    def resource(self, route: Route, target: Mapping[str, object] | None = None) -> Resource:
        """The resource of what goes along `route`: the agent's (`target` None), or a traced target's, which
        is the agent's with the pod's attributes (see target_resource). The pod's own attributes win over any
        the agent was given for itself (OTEL_RESOURCE_ATTRIBUTES often names the agent's pod and container,
        which are not the traced pod's: every k8s.* attribute but the node's and cluster's is dropped), and
        over a trace's resourceAttributes, which come after the agent's (a trace cannot rename its pods)."""
        key = (route, tuple(sorted(target.items())) if target else ())
        r = self._resources.get(key)
        if r is None:
            if len(self._resources) >= _MAX_RESOURCES:  # pods come and go: forget them all now and then
                self._resources.clear()
            r = self.base
            if target:
                r = Resource({k: v for k, v in r.attributes.items()
                              if not k.startswith("k8s.") or k.startswith(_AGENT_K8S)}, r.schema_url)
            r = r.merge(Resource(dict(route.resource_attributes)))
            if target:
                r = r.merge(Resource(dict(target)))
            r = self._resources[key] = HashedResource(r.attributes, r.schema_url)
        return r


class HashedResource(Resource):
    """A Resource that computes its hash once (equal to a Resource with the same attributes, and hashed
    alike). The SDK's span encoder groups every span by its resource, and Resource.__hash__ dumps the
    attributes to JSON each time. With the resources made here once per pod and route, the SDK's
    encode_spans went from 24.6k to 30.7k spans a second on one core of this VM (6 runs each)."""

    def __init__(self, attributes, schema_url: str | None = None):
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


_AGENT_K8S = ("k8s.node.", "k8s.cluster.")  # the agent's k8s attributes that are also its targets'
_MAX_RESOURCES = 4096


def exports_of(traces: Iterable) -> dict[str, ExportOverrides]:
    """{trace ref (namespace/name, or ClusterLatencyTrace/name): export overrides} of contract.NodeTrace objects."""
    return {t.ref: t.export for t in traces}
