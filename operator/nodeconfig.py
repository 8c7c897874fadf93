"""Per-node configuration: one LatencyTraceNode per node, holding every trace's pods on that node.

Writing is server-side apply with one field manager per trace (`latencytrace-operator/<trace uid>`):
each trace applies only its own entry of `spec.traces` (a list the CRD declares a map keyed by uid), and
the API server merges it with the entries other traces own. Why a manager per trace and not one for the
operator: apply removes exactly the fields its manager stops declaring, so a trace can add, change and
remove its entry with one request that names nothing of the other traces: no read before the write, no
resourceVersion to carry, no conflict between traces publishing to the same node at the same time (one
operator-wide manager would have to declare every trace's entry in each request, that is, read first).
The object's managedFields also show which trace wrote which entry. The apply is forced: the operator
is the authority on its traces' entries, so an entry edited by hand (or written by an operator version
from before field managers, with an update) is taken back, as the full rewrite before did.

So a change of one trace on one node is one request. The operator's trace worker writes only what
differs from what it published (worker.py), so nothing changed means nothing sent. What the apply
returns is the object as stored, which is checked instead of read:
- an entry that is still not what was applied (another manager owns fields of it: an entry written by
  hand or with an update) is rewritten whole, with a read and a write that carries the resourceVersion
  (and a fresh read on conflict), the way every write was made before;
- an object left without entries is deleted, with its resourceVersion as precondition, so that a trace
  that added itself meanwhile keeps it (409: read again; an agent's status write also changes the
  resourceVersion, so the delete is retried while the object still carries no entry).
The agent owns the status (a subresource): an apply to the object never touches it.

Ownership: a cluster-scoped object cannot be owned by a namespaced LatencyTrace, so traces are tracked
by uid inside the spec (and stale entries collected by the operator), and the object is owned by its
Node: when the node leaves the cluster, the garbage collector removes its configuration too. Nothing is
published for a node that does not exist. Every trace's apply declares the same owner reference, labels
and nodeName, which they then own together: none of them goes while a trace is on the node.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping

from kubernetes import client
from pydantic import ValidationError
from kubernetes.client.rest import ApiException

from latencytrace.node_agent.contract import (API_VERSION, GROUP, NODE_KIND, NODE_PLURAL, VERSION, NodeSpec,
                                              NodeTrace, PodRef, TraceKind, TraceSettings)
from latencytrace.node_agent.kube import or_none

log = logging.getLogger(__name__)

MANAGED_BY = {"app.kubernetes.io/managed-by": "latencytrace-operator"}
CONFLICT_RETRIES = 8
FIELD_MANAGER_PREFIX = "latencytrace-operator/"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
NODE_LIST_SECONDS = 30.0  # Nodes are listed again for a name not known, at most this often
APPLY = "application/apply-patch+yaml"  # JSON is YAML: the client sends the dict as JSON


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


def field_manager(uid: str) -> str:
    """The field manager of trace `uid`'s entries (the API server allows 128 characters)."""
    return f"{FIELD_MANAGER_PREFIX}{uid}"


def apply_config(node: str, node_uid: str | None, entry: NodeTrace | None) -> dict:
    """What trace `entry.uid` declares on node `node` by server-side apply: its entry (None: none, which
    removes it) and the fields every trace declares alike (labels, owner, nodeName, contractVersion)."""
    obj = build_object(NodeSpec(node_name=node, traces=[entry] if entry is not None else []), node_uid)
    if entry is None:
        del obj["spec"]["traces"]
    return obj


def entry_of(obj: Mapping | None, uid: str) -> NodeTrace | dict | None:
    """Trace `uid`'s entry in a LatencyTraceNode as the API server returned it (None: not there; the raw
    dict if it is no valid entry, which then equals no entry this operator writes)."""
    for t in ((obj or {}).get("spec") or {}).get("traces") or []:
        if t.get("uid") == uid:
            try:
                return NodeTrace.model_validate(t)
            except ValidationError:
                return t
    return None


class NodeConfigs:
    """Writes LatencyTraceNode specs (never their status: that is the agent's)."""

    def __init__(self, api: client.ApiClient | None, request_timeout: float = 30.0, *, custom=None, core=None):
        """`custom` and `core` stand in for the API groups in tests."""
        self.custom = custom or client.CustomObjectsApi(api)
        self.core = core or client.CoreV1Api(api)
        self.timeout = request_timeout
        self._lock = threading.Lock()
        self._node_uids: dict[str, str] = {}  # a Node's uid never changes while its name lives
        self._list_lock = threading.Lock()
        self._node_list_at = -NODE_LIST_SECONDS
        self._node_list_allowed: bool | None = None

    def seen(self, node: str, exists: bool) -> None:
        """The watch saw a LatencyTraceNode appear, change (exists) or go (not). One that goes may have
        been garbage-collected with its Node, which may come back under the same name with a new uid:
        the Node is read again before the next object for it is written (the API server accepts an
        owner reference to a deleted uid, and the garbage collector then removes the object)."""
        if not exists:
            with self._lock:
                self._node_uids.pop(node, None)

    def get(self, node: str) -> dict | None:
        return or_none(self.custom.get_cluster_custom_object, GROUP, VERSION, NODE_PLURAL, node,
                       _request_timeout=self.timeout)

    def _node_uid(self, node: str) -> str | None:
        with self._lock:
            uid = self._node_uids.get(node)
        if uid is not None:
            return uid
        self._list_nodes()
        with self._lock:
            uid = self._node_uids.get(node)
        if uid is not None:
            return uid
        # A Node newer than the list (or no permission to list): this one alone. Only its metadata, as
        # JSON: its uid is all that is wanted, and a whole Node (status, images) parsed into a V1Node
        # model costs the operator more CPU than the request.
        resp = or_none(self.core.read_node, node, _request_timeout=self.timeout, _preload_content=False,
                       _headers={"Accept": METADATA_ONLY})
        if resp is None:
            return None
        uid = json.loads(resp.data)["metadata"]["uid"]
        with self._lock:
            self._node_uids[node] = uid
        return uid

    def warm(self) -> None:
        """List the Nodes' uids now (at operator start, in a thread), so that a trace's first writes find them
        (at 1000 nodes the list takes half a second, and every write waits for it). Trouble is left to the
        writes, which list again."""
        try:
            self._list_nodes()
        except Exception as e:
            log.info("listing Nodes at start: %s; the first write lists them again", e)

    def _list_nodes(self) -> None:
        """Every Node's uid in one request (metadata only), instead of one request per node: at most once
        per NODE_LIST_SECONDS, and the threads that need it meanwhile wait for the one list in flight."""
        with self._list_lock:
            if self._node_list_allowed is False or time.monotonic() - self._node_list_at < NODE_LIST_SECONDS:
                return
            try:
                resp = self.core.list_node(_request_timeout=self.timeout, _preload_content=False,
                                           _headers={"Accept": METADATA_LIST})
            except ApiException as e:
                if e.status != 403:
                    raise
                log.info("not allowed to list Nodes: reading each Node's uid on its own")
                self._node_list_allowed = False
                return
            uids = {o["metadata"]["name"]: o["metadata"]["uid"] for o in json.loads(resp.data).get("items") or []}
            self._node_list_at = time.monotonic()
            with self._lock:
                self._node_uids.update(uids)

    def apply(self, node: str, uid: str, entry: NodeTrace | None) -> NodeTrace | None:
        """Make node `node` carry `entry` for trace `uid` (None: not at all); return what it carries."""
        with self._lock:
            node_uid = self._node_uids.get(node)
        if entry is not None:
            node_uid = self._node_uid(node)
            if node_uid is None:
                log.info("node %s does not exist; publishing nothing for it", node)
                return None
        manager = field_manager(uid)
        if len(manager) > 128:  # not a uid the API server makes (an entry written by hand): no apply
            return self._rewrite(node, uid, entry)
        try:
            obj = self._apply(node, manager, apply_config(node, node_uid, entry))
        except ApiException as e:
            if e.status != 422:
                raise
            # Invalid: the Node may have been re-created under the same name (ask for its uid again next
            # time); or the entry is partly another manager's, so that taking ours out would leave an
            # entry without its required fields: rewrite it whole (an invalid entry of ours fails there too).
            with self._lock:
                if node_uid is not None and self._node_uids.get(node) == node_uid:
                    self._node_uids.pop(node, None)
            return self._rewrite(node, uid, entry)
        if not self._carries(obj, uid, entry):  # fields of the entry another manager owns: rewrite it whole
            return self._rewrite(node, uid, entry)
        if not (obj.get("spec") or {}).get("traces"):
            self._rewrite(node, uid, entry, obj)  # the last entry left: delete it while it stays empty
        return entry

    @staticmethod
    def _carries(obj: Mapping, uid: str, entry: NodeTrace | None) -> bool:
        """Whether the object as stored carries exactly `entry` for trace `uid`: the stored entry is what
        was sent (compared as JSON first: parsing it into the model costs more than the request)."""
        stored = next((t for t in (obj.get("spec") or {}).get("traces") or [] if t.get("uid") == uid), None)
        if entry is None or stored is None:
            return stored is None and entry is None
        return stored == entry.wire() or entry_of(obj, uid) == entry

    def _apply(self, node: str, manager: str, config: dict) -> dict:
        resp = self.custom.patch_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, node, config, field_manager=manager,
                                                       force=True, _content_type=APPLY, _preload_content=False,
                                                       _request_timeout=self.timeout)
        return json.loads(resp.data)

    def _rewrite(self, node: str, uid: str, entry: NodeTrace | None, obj: dict | None = None) -> NodeTrace | None:
        """The whole spec with trace `uid`'s entry replaced: read (unless `obj` was just read), write
        with the resourceVersion read, read again on conflict. For entries another field manager holds a
        part of, and for an object left without entries, which is deleted while it stays so: a conflict
        is then either a trace that added itself (it stays) or the agent's status write (a status write
        changes the resourceVersion too)."""
        obj = obj if obj is not None else self.get(node)
        for _ in range(CONFLICT_RETRIES):
            try:
                if obj is None:  # gone since: an apply makes it afresh, owned by the trace alone
                    if entry is not None:
                        self._apply(node, field_manager(uid)[:128], apply_config(node, self._node_uid(node), entry))
                    return entry
                current = NodeSpec.model_validate(obj["spec"])
                wanted = with_trace(current, uid, entry)
                if not wanted.traces:
                    self._delete(node, obj["metadata"]["resourceVersion"])
                    return None
                if wanted == current:
                    return entry
                obj = {**obj, "spec": wanted.wire()}
                self.custom.replace_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, node, obj,
                                                          _request_timeout=self.timeout)
                return entry
            except ApiException as e:
                if e.status not in (404, 409):  # 409: someone wrote in between; 404: it went away
                    raise
                obj = self.get(node)
        raise RuntimeError(f"LatencyTraceNode {node} kept changing under {CONFLICT_RETRIES} attempts to write it")

    def _delete(self, node: str, resource_version: str) -> None:
        # The precondition makes the delete fail (409) if another trace added itself meanwhile.
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=resource_version))
        self.custom.delete_cluster_custom_object(GROUP, VERSION, NODE_PLURAL, node, body=body,
                                                 _request_timeout=self.timeout)
