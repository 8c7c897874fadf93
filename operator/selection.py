"""Which pods a LatencyTrace selects and on which nodes they run: pure functions over API objects.

The operator keeps every scheduled, unfinished pod of the cluster in one cache (podcache.py, listed and
watched with the field selector ACTIVE_PODS), as `placed_pod` keeps it: node, PodRef and labels. A trace's
selection runs here on that cache's pods of the namespaces it can select (`namespaces_of`, `selects`,
`pods_by_node`): label selector, namespace, names, with Kubernetes' semantics. `pod_query` says the same
selection as API server selectors, for a one-off list (the control-plane benchmark's floor) and to test
that both agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


@dataclass(frozen=True, slots=True, eq=False)
class PlacedPod:
    """What the operator keeps of a pod it may trace: a few hundred bytes, not the whole object."""

    node: str
    ref: PodRef
    labels: Mapping[str, str]


def placed_pod(pod: dict) -> PlacedPod | None:
    """The pod as the cache keeps it; None for pods not on a node, finished, or sharing the host's
    network namespace (nothing per pod to trace there)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    node = spec.get("nodeName")
    if not node or spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return PlacedPod(node, PodRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], ips=ips),
                     meta.get("labels") or {})


def labels_match(sel: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes' label selector semantics: every term holds; NotIn and DoesNotExist hold for a missing key."""
    if sel is None:
        return True
    if any(labels.get(k) != v for k, v in sel.match_labels.items()):
        return False
    for req in sel.match_expressions:
        value = labels.get(req.key)
        held = {"In": value is not None and value in req.values, "NotIn": value is None or value not in req.values,
                "Exists": value is not None, "DoesNotExist": value is None}[req.operator]
        if not held:
            return False
    return True


def selects(spec: TraceSpec, trace_namespace: str | None, namespaces: set[str] | None, pod: PlacedPod) -> bool:
    """Whether the trace selects `pod`. `namespaces` are the names `namespace_query` matched (None: not
    known yet, or no namespaceSelector)."""
    ns = pod.ref.namespace
    if spec.pod_names is not None:  # names, in the trace's namespace; no label selector with them
        return ns == trace_namespace and pod.ref.name in spec.pod_names
    if spec.namespace_selector is not None:
        if namespaces is None or ns not in namespaces:
            return False
    elif ns != trace_namespace:
        return False
    return labels_match(spec.pod_selector, pod.labels)


def namespaces_of(spec: TraceSpec, trace_namespace: str | None, namespaces: set[str] | None) -> set[str]:
    """The namespaces whose pods the trace can select (`selects` holds for no pod elsewhere): its own, or
    those its namespaceSelector matched (none while they are not known)."""
    if spec.pod_names is None and spec.namespace_selector is not None:
        return set(namespaces or ())
    return {trace_namespace} if trace_namespace is not None else set()


def pods_by_node(pods: Iterable[PlacedPod], spec: TraceSpec, trace_namespace: str | None,
                 namespaces: set[str] | None) -> dict[str, list[PodRef]]:
    """The pods the trace selects (`selects`) grouped by node, each list sorted by namespace and name."""
    out: dict[str, list[PodRef]] = {}
    for pod in pods:
        if selects(spec, trace_namespace, namespaces, pod):
            out.setdefault(pod.node, []).append(pod.ref)
    for refs in out.values():
        refs.sort(key=lambda r: (r.namespace, r.name, r.uid))
    return out
