"""Attribute keys of everything latencytrace exports, and the attributes that identify a target.

Keys come from the semantic-conventions package where OpenTelemetry defines one (k8s.*, network.*,
source.*, destination.*, error.*); the rest carry our own `latencytrace.` prefix, as the conventions ask
of names they do not define, so that a future convention cannot clash with them.
"""

from __future__ import annotations

from opentelemetry.semconv._incubating.attributes import (
    destination_attributes,
    k8s_attributes,
    network_attributes as network_incubating,
    source_attributes,
)
from opentelemetry.semconv.attributes import error_attributes, network_attributes, server_attributes

from ..targets import Target

K8S_POD_NAME = k8s_attributes.K8S_POD_NAME
K8S_POD_UID = k8s_attributes.K8S_POD_UID
K8S_NAMESPACE_NAME = k8s_attributes.K8S_NAMESPACE_NAME
K8S_NODE_NAME = k8s_attributes.K8S_NODE_NAME
NETWORK_IO_DIRECTION = network_incubating.NETWORK_IO_DIRECTION
NETWORK_INTERFACE_NAME = network_incubating.NETWORK_INTERFACE_NAME
NETWORK_TRANSPORT = network_attributes.NETWORK_TRANSPORT
NETWORK_TYPE = network_attributes.NETWORK_TYPE
SOURCE_ADDRESS = source_attributes.SOURCE_ADDRESS
SOURCE_PORT = source_attributes.SOURCE_PORT
DESTINATION_ADDRESS = destination_attributes.DESTINATION_ADDRESS
DESTINATION_PORT = destination_attributes.DESTINATION_PORT
ERROR_TYPE = error_attributes.ERROR_TYPE
SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
SERVER_PORT = server_attributes.SERVER_PORT

SEGMENT = "latencytrace.segment"
TRACE = "latencytrace.trace"  # "namespace/name" of the LatencyTrace(s) that selected the pod
TARGET = "latencytrace.target"  # label of a standalone target (no pod)
NETNS_INODE = "latencytrace.netns.inode"
PROBE = "latencytrace.probe"
METRIC = "latencytrace.metric"
EVENT_KIND = "latencytrace.event.kind"
PACKET_LENGTH = "latencytrace.packet.length"
CPU_FIRST = "latencytrace.cpu.first"
CPU_LAST = "latencytrace.cpu.last"
COUNTER = "latencytrace.counter"
# On latency histogram points of a pod timed 1 packet in N (N > 1; absent: every packet timed): the
# histogram counts are of the timed packets, latencytrace.network.packet.count has every packet.
TIME_ONE_IN = "latencytrace.time_one_in"
# The attribute set the SDKs give to measurements beyond a cardinality limit (metrics SDK spec).
OVERFLOW = {"otel.metric.overflow": True}


def target_resource(target: Target) -> dict[str, str | int]:
    """What identifies a target, as resource attributes of its metrics and spans (the traced pod is the
    resource, per the semantic conventions' k8s resource attributes): the pod, or for a standalone target
    its label and namespace inode. A pod's inode is left out: it changes when the sandbox restarts, the pod
    does not. The node (k8s.node.name) and the agent (service.*) come from the agent's own resource."""
    if target.pod is not None:
        return {K8S_POD_NAME: target.pod.name, K8S_POD_UID: target.pod.uid, K8S_NAMESPACE_NAME: target.pod.namespace}
    return {TARGET: target.label, NETNS_INODE: target.ns.inode}


def target_point_attributes(target: Target) -> dict[str, str]:
    """What a target adds to its data points besides segment, direction and error.type: the traces that
    selected it, one value for all of them so that its packets are counted once."""
    return traces_attributes(target.traces)


def traces_attributes(traces: tuple[str, ...]) -> dict[str, str]:
    """target_point_attributes of a target selected by `traces`."""
    return {TRACE: ",".join(sorted(traces))} if traces else {}
