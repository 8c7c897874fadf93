"""Per-node configuration: one LatencyTraceNode per node, holding every trace's pods on that node.

Each trace only ever changes its own entry (keyed by the trace's uid) in a node's spec, with a read,
a write that carries the resourceVersion it read, and a fresh read on conflict; so traces can publish
concurrently without a lock and every write is idempotent (an unchanged entry writes nothing). A node
with no entries left has its object deleted.

Ownership: a cluster-scoped object cannot be owned by a namespaced LatencyTrace, so traces are tracked
by uid inside the spec (and stale entries collected by the operator), and the object is owned by its
Node: when the node leaves the cluster, the garbage collector removes its configuration too. Nothing is
published for a node that does not exist.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from kubernetes import client
from kubernetes.client.rest import ApiException

from latencytrace.node_agent.contract import (API_VERSION, GROUP, NODE_KIND, NODE_PLURAL, VERSION, NodeSpec,
                                              NodeTrace, PodRef, TraceKind, TraceSettings)
from latencytrace.node_agent.kube import or_none

log = logging.getLogger(__name__)

MANAGED_BY = {"app.kubernetes.io/managed-by": "latencytrace-operator"}
CONFLICT_RETRIES = 8


def entries_by_node(kind: TraceKind, namespace: str, name: str, uid: str, generation: int, settings: TraceSettings,
                    pods: Mapping[str, list[PodRef]]) -> dict[str, NodeTrace]:
    """This trace's entry for each node that runs at least one of its pods (namespace "" for a cluster trace)."""
    base = settings.model_dump()
    return {node: NodeTrace(**base, kind=kind.kind, name=name, namespace=namespace, uid=uid, generation=generation,
                            pods=refs)
            for node, refs in pods.items() if refs}


def with_trace(spec: NodeSpec, uid: str, entry: NodeTrace | None) -> NodeSpec:
    """`spec` with the entry of trace `uid` replaced by `entry` (None removes it); stable order."""
    traces = [t for t in spec.traces if t.uid != uid]
    if entry is not None:
        traces.append(entry)
    traces.sort(key=lambda t: (t.namespace, t.kind, t.name, t.uid))
    return spec.model_copy(update={"traces": traces})


def changes(desired: Mapping[str, NodeTrace], published: Mapping[str, NodeTrace]) -> dict[str, NodeTrace | None]:
    """Per node, the entry to write (None: remove) to go from `published` to `desired`."""
    out: dict[str, NodeTrace | None] = {n: e for n, e in desired.items() if published.get(n) != e}
    out.update({n: None for n in published if n not in desired})
    return out


def build_object(spec: NodeSpec, node_uid: str | None) -> dict:
    meta: dict = {"name": spec.node_name, "labels": dict(MANAGED_BY)}
    if node_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": spec.node_name, "uid": node_uid}]
    return {"apiVersion": API_VERSION, "kind": NODE_KIND, "metadata": meta, "spec": spec.wire()}


class NodeConfigs:
    """Reads and writes LatencyTraceNode specs (never their status: that is the agent's)."""

    def __init__(self, api: client.ApiClient | None, request_timeout: float = 30.0, *, custom=None, core=None):
        """`custom` and `core` stand in for the API groups in tests."""
        self.custom = custom or client.CustomObjectsApi(api)
        self.core = core or client.CoreV1Api(api)
        self.timeout = request_timeout
        # The LatencyTraceNodes that exist (listed once, then kept by the operator's watch): a node without
        # one is created straight away instead of first being read. A stale answer costs a 409, after
        # which the object is read as usual.
        self._existing: set[str] | None = None
        self._lock = threading.Lock()
        self._node_uids: dict[str, str] = {}  # a Node's uid never changes while its name lives

    def seen(self, node: str, exists: bool) -> None:
        """The watch saw a LatencyTraceNode appear, change (exists) or go (not). One that goes may have
        been garbage-collected with its Node, which may come back under the same name with a new uid:
        the Node is read again before the next object for it is created (the API server accepts an
        owner reference to a deleted uid, and the garbage collector then removes the object)."""
        with self._lock:
            if self._existing is not None:
                (self._existing.add if exists else self._existing.discard)(node)
            if not exists:
                self._node_uids.pop(node, None)

    def _maybe_exists(self, node: str) -> bool:
        with self._lock:
            if self._existing is None:
                listed = self.custom.list_cluster_custom_object(GROUP, VERSION, NODE_PLURAL,
                                                                _request_timeout=self.timeout)
                self._existing = {o["metadata"]["name"] for o in listed.get("items", [])}
            return node in self._existing

    def get(self, node: str) -> dict | None:
        return or_none(self.custom.get_cluster_custom_object, GROUP, VERSION, NODE_PLURAL, node,
                       _request_timeout=self.timeout)

    def _node_uid(self, node: str) -> str | None:
        uid = self._node_uids.get(node)
        if uid is not None:
            return uid
        found = or_none(self.core.read_node, node, _request_timeout=self.timeout)
        if found is None:
            return None
        uid = self._node_uids[node] = found.metadata.uid
        return uid

    def apply(self, node: str, uid: str, entry: NodeTrace | None) -> NodeTrace | None:
        """Make node `node` carry `entry` for trace `uid` (None: not at all); return what it carries."""
        if entry is not None and not self._maybe_exists(node):
            try:
                return self._create(node, entry)
            except ApiException as e:
                if e.status != 409:  # 409: it exists after all; go on as for any existing object
                    raise
        obj = self.get(node)
        for _ in range(CONFLICT_RETRIES):
            try:
                if obj is None:
                    return self._create(node, entry)
                current = NodeSpec.model_validate(obj["spec"])
                wanted = with_trace(current, uid, entry)
                if wanted == current:
                    return entry
                if not wanted.traces:
                    self._delete(node, obj["metadata"]["resourceVersion"])
                    return None
                obj = {**obj, "spec": wanted.wire()}
                self.custom.replace_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, node, obj,
                                                          _request_timeout=self.timeout)
                return entry
            except ApiException as e:
                if e.status not in (404, 409):  # 409: someone wrote in between; 404: it went away
                    raise
                obj = self.get(node)
        raise RuntimeError(f"LatencyTraceNode {node} kept changing under {CONFLICT_RETRIES} attempts to write it")

    def _create(self, node: str, entry: NodeTrace | None) -> NodeTrace | None:
        if entry is None:
            return None
        node_uid = self._node_uid(node)
        if node_uid is None:
            log.info("node %s does not exist; publishing nothing for it", node)
            return None
        spec = NodeSpec(node_name=node, traces=[entry])
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, build_object(spec, node_uid),
                                                     _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 422 and node_uid == self._node_uids.get(node):
                self._node_uids.pop(node, None)  # the Node was re-created under the same name: ask again
            raise
        self.seen(node, True)
        return entry

    def _delete(self, node: str, resource_version: str) -> None:
        # The precondition makes the delete fail (409) if another trace added itself meanwhile.
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=resource_version))
        self.custom.delete_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, node, body=body,
                                                 _request_timeout=self.timeout)
