"""Which pods a LatencyTrace selects and on which nodes they run: pure functions over API objects.

The selection is pushed to the API server as far as selectors allow (label selector, and field
selectors for "scheduled and not finished"), so that a watch only ever carries the pods that matter.
What selectors cannot say (a list of names, namespace membership, host-network pods) is filtered here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from latencytrace.node_agent.contract import PodRef

from .spec import LabelSelector, TraceSpec

# Scheduled, and not finished: a finished pod has no network namespace left to trace.
ACTIVE_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


@dataclass(frozen=True)
class PodQuery:
    """One list/watch call: pods in `namespace` (None: all namespaces) matching both selectors."""

    namespace: str | None
    label_selector: str
    field_selector: str


def selector_string(sel: LabelSelector | None) -> str:
    """A LabelSelector as the API's `labelSelector` query parameter ("" selects everything)."""
    if sel is None:
        return ""
    parts = [f"{k}={v}" for k, v in sorted(sel.match_labels.items())]
    for req in sel.match_expressions:
        values = ",".join(sorted(req.values))
        parts.append({"In": f"{req.key} in ({values})", "NotIn": f"{req.key} notin ({values})",
                      "Exists": req.key, "DoesNotExist": f"!{req.key}"}[req.operator])
    return ",".join(parts)


def pod_query(spec: TraceSpec, trace_namespace: str) -> PodQuery:
    if spec.pod_names is not None:
        fields = ACTIVE_PODS
        if len(spec.pod_names) == 1:  # one name is a field selector; several are filtered here
            fields += f",metadata.name={spec.pod_names[0]}"
        return PodQuery(trace_namespace, "", fields)
    # With a namespaceSelector the watch spans all namespaces and namespace membership is checked
    # here: namespaces come and go far less often than pods, so they are re-listed on resync.
    namespace = None if spec.namespace_selector is not None else trace_namespace
    return PodQuery(namespace, selector_string(spec.pod_selector), ACTIVE_PODS)


def namespace_query(spec: TraceSpec) -> str | None:
    """Label selector for the namespaces to list, or None when the trace's own namespace is meant."""
    return None if spec.namespace_selector is None else selector_string(spec.namespace_selector)


def placed_pod(pod: dict) -> tuple[str, PodRef] | None:
    """(node, PodRef) of a pod an agent can trace; None for pods not on a node, finished, or sharing
    the host's network namespace (nothing per pod to trace there). The trace worker's pod watch keeps
    only this of each pod (its transform): a few hundred bytes, not the whole object."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    node = spec.get("nodeName")
    if not node or spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return node, PodRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], ips=ips)


def pods_by_node(placed: Iterable[tuple[str, PodRef]], spec: TraceSpec, trace_namespace: str,
                 namespaces: set[str] | None) -> dict[str, list[PodRef]]:
    """The selected pods grouped by node, each list sorted by namespace and name.

    `placed` is `placed_pod` of what `pod_query` returned (the pods it gave None for left out);
    `namespaces` the names `namespace_query` matched (None when the spec has no namespaceSelector).
    """
    names = set(spec.pod_names) if spec.pod_names is not None else None
    out: dict[str, list[PodRef]] = {}
    for node, ref in placed:
        if names is not None and (ref.namespace != trace_namespace or ref.name not in names):
            continue
        if namespaces is not None and ref.namespace not in namespaces:
            continue
        if names is None and namespaces is None and ref.namespace != trace_namespace:
            continue
        out.setdefault(node, []).append(ref)
    for refs in out.values():
        refs.sort(key=lambda r: (r.namespace, r.name, r.uid))
    return out
