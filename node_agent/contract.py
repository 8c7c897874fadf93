"""The operator-agent contract: what the operator publishes for a node and what that node's agent reports.

Both live in one cluster-scoped `LatencyTraceNode` object per node (name = node name): the operator owns
`.spec` (the traces and pods this node must trace), the node's agent owns `.status` (what it attached,
per pod, and its probe health). An agent only ever reads its own node's object. This module is the only
definition of that shape; the operator and the agent both import it. Field names are camelCase on the
wire, as everywhere in Kubernetes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

CONTRACT_VERSION = 1
GROUP = "latencytrace.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
NODE_KIND = "LatencyTraceNode"
NODE_PLURAL = "latencytracenodes"
TRACE_KIND = "LatencyTrace"
TRACE_PLURAL = "latencytraces"
CLUSTER_TRACE_KIND = "ClusterLatencyTrace"
CLUSTER_TRACE_PLURAL = "clusterlatencytraces"

PodState = Literal["Tracing", "Pending", "NotFound", "Failed"]
TraceKindName = Literal["LatencyTrace", "ClusterLatencyTrace"]


@dataclass(frozen=True)
class TraceKind:
    """One of the two kinds of trace, as data: the operator handles both through the same code.

    A LatencyTrace (namespaced) selects pods of its own namespace only; a ClusterLatencyTrace
    (cluster-scoped, an administrator's) selects pods across the namespaces its namespaceSelector matches.
    """

    kind: TraceKindName
    plural: str
    namespaced: bool

    def ref(self, namespace: str | None, name: str) -> str:
        """How a trace is named in logs, reports and routing: namespace/name, or Kind/name for a cluster
        trace (a kind is not a valid namespace name, so the two never collide)."""
        return f"{namespace}/{name}" if self.namespaced else f"{self.kind}/{name}"


NAMESPACED = TraceKind(TRACE_KIND, TRACE_PLURAL, namespaced=True)
CLUSTER = TraceKind(CLUSTER_TRACE_KIND, CLUSTER_TRACE_PLURAL, namespaced=False)
TRACE_KINDS = (NAMESPACED, CLUSTER)
KIND_BY_PLURAL = {k.plural: k for k in TRACE_KINDS}
KIND_BY_NAME = {k.kind: k for k in TRACE_KINDS}


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict:
        """The JSON-ready dict as it goes into the API server."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ExportOverrides(_Model):
    otlp_endpoint: str | None = None
    resource_attributes: dict[str, str] = Field(default_factory=dict)


class PodRef(_Model):
    namespace: str
    name: str
    uid: str
    ips: list[str] = Field(default_factory=list)


class TraceSettings(_Model):
    """What a LatencyTrace asks of the agent, after the operator applied defaults and validation."""

    directions: list[Literal["receive", "transmit"]] = Field(default_factory=lambda: ["receive", "transmit"])
    segments: list[str] = Field(default_factory=list)  # empty: all segments
    slow_threshold_microseconds: int = 1000
    spans_per_second: int = 10  # per pod
    sample_one_in: int = 0  # also report 1 in N timed packets that are not slow; 0: none
    time_one_in: int = 1  # time 1 packet in N, chosen at its first boundary (1: all); every packet is counted
    export: ExportOverrides = Field(default_factory=ExportOverrides)


class NodeTrace(TraceSettings):
    kind: TraceKindName = TRACE_KIND
    name: str
    namespace: str  # "" for a ClusterLatencyTrace
    uid: str
    generation: int = 0
    pods: list[PodRef] = Field(default_factory=list)

    @property
    def ref(self) -> str:
        return KIND_BY_NAME[self.kind].ref(self.namespace, self.name)


class NodeSpec(_Model):
    contract_version: int = CONTRACT_VERSION
    node_name: str
    traces: list[NodeTrace] = Field(default_factory=list)


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PodReport(_Model):
    namespace: str
    name: str
    uid: str
    state: PodState
    netns_inode: int | None = None
    message: str = ""


class TraceReport(_Model):
    kind: TraceKindName = TRACE_KIND
    name: str
    namespace: str
    uid: str
    pods_tracing: int = 0
    pods: list[PodReport] = Field(default_factory=list)


class UnavailableProbe(_Model):
    tracepoint: str
    reason: str
    segments: list[str] = Field(default_factory=list)


class ProbeReport(_Model):
    attached: list[str] = Field(default_factory=list)
    unavailable: list[UnavailableProbe] = Field(default_factory=list)


class DestinationReport(_Model):
    """One OTLP destination this agent exports to: the default (the agent's endpoint) or a trace's own."""

    endpoint: str | None = None  # None: the default destination's endpoint is not known (environment)
    default: bool = False
    healthy: bool = True  # the last export worked (or none was tried yet)
    dropped_batches: int = 0  # since the agent started, all traces sharing this destination together
    last_error: str | None = None


class ExportReport(_Model):
    endpoint: str | None = None
    healthy: bool = True
    dropped_batches: int = 0
    last_error: str | None = None
    destinations: list[DestinationReport] = Field(default_factory=list)


class NodeStatus(_Model):
    contract_version: int = CONTRACT_VERSION
    observed_generation: int = 0
    agent_version: str = ""
    heartbeat_time: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    probes: ProbeReport = Field(default_factory=ProbeReport)
    traces: list[TraceReport] = Field(default_factory=list)
    export: ExportReport = Field(default_factory=ExportReport)
    events_lost: int = 0
