"""What each kopf handler does, as plain functions with explicit arguments (main.py only wires them).

A `Trace` is one LatencyTrace or ClusterLatencyTrace as the handlers see it: its kind (data, not code
paths), its live body, its nodes' views and its place among its namespace's traces.
- `evaluate`: whether the trace may run, and its parsed spec: the spec's own validity, the administrator's
  limits, and the number of LatencyTraces per namespace (the oldest ones run; later ones wait).
- `trace_status`: the status from that, its old status and its nodes' views (used on create/update/resume,
  where a refused spec is reported at once, and by the periodic refresh).
- `run_worker`: the trace's daemon (worker.TraceWorker).
- `detach`: on deletion, remove the trace from every node it is on.
- `orphans`/`collect_orphans`: entries on a node whose trace no longer exists (deleted while the
  operator was away, say) are removed whenever that node's object changes or is listed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from latencytrace.node_agent.contract import TraceKind

from . import aggregation, conditions, spec as specs
from .aggregation import NodeTraceView
from .config import OperatorConfig
from .nodeconfig import NodeConfigs
from .worker import Runtime, TraceWorker, publish

# The status keys this operator owns; a key it no longer sets is removed (merge patch: null).
STATUS_KEYS = ("observedGeneration", "phase", "conditions", "startTime", "completionTime", "matchedPods",
               "tracedPods", "matchedNodes", "nodes", "export")


@dataclass(frozen=True)
class Trace:
    kind: TraceKind
    body: Mapping  # kopf's live view of the object
    views: Callable[[], Iterable[NodeTraceView]]  # its entries in the LatencyTraceNode index
    rank: Callable[[], int | None]  # its place among its namespace's LatencyTraces (None: not counted)
    worker: Any = None  # its TraceWorker, once running

    @property
    def namespace(self) -> str | None:
        return self.body.get("metadata", {}).get("namespace")

    @property
    def name(self) -> str:
        return self.body.get("metadata", {}).get("name", "")

    @property
    def uid(self) -> str:
        return self.body.get("metadata", {}).get("uid", "")

    @property
    def ref(self) -> str:
        return self.kind.ref(self.namespace, self.name)


def rank(index: Mapping, body: Mapping) -> int | None:
    """The position of a LatencyTrace among its namespace's (oldest first), from the namespace_traces index."""
    meta = body.get("metadata", {})
    if "namespace" not in meta:
        return None
    mine = (meta.get("creationTimestamp") or "", meta.get("name", ""), meta.get("uid", ""))
    peers = sorted(index.get(meta["namespace"], []))
    return peers.index(mine) if mine in peers else len(peers)


def evaluate(trace: Trace, limits: specs.Limits) -> tuple[specs.TraceSpec | None, str | None, str]:
    """(the spec to trace or None, why not, the condition reason)."""
    try:
        spec = specs.parse(trace.body.get("spec", {}), limits, trace.kind)
    except specs.SpecError as e:
        return None, str(e), e.reason
    position = trace.rank() if trace.kind.namespaced and limits.traces_per_namespace else None
    if position is not None and position >= limits.traces_per_namespace:
        return None, (f"this namespace has more LatencyTraces than this cluster allows "
                      f"({limits.traces_per_namespace}; the oldest run): delete one to start this one"), \
            "TooManyTraces"
    return spec, None, ""


def trace_status(trace: Trace, status: Mapping, cfg: OperatorConfig, now: datetime) -> tuple[dict, str | None]:
    """(the status to have, the reason the trace is not accepted or None)."""
    spec, invalid, reason = evaluate(trace, cfg.limits())
    views = trace.views()
    generation = trace.body.get("metadata", {}).get("generation", 0)
    start = status.get("startTime") or (conditions.timestamp(now) if spec is not None else None)
    end = specs.deadline(spec, conditions.parse_time(start)) if spec is not None else None
    completed = end is not None and now >= end
    summary = None
    if spec is not None and not completed:
        summary = aggregation.summarize(views, now, cfg.agent_stale_seconds, cfg.failing_nodes_listed)
    over = getattr(trace.worker, "pods_over_limit", None) if spec is not None else None
    facts = conditions.TraceFacts(generation, invalid, completed, spec.duration if spec else None,
                                  summary or conditions.Summary(), invalid_reason=reason or "InvalidSpec",
                                  pods_over_limit=over, explicit_duration="duration" in trace.body.get("spec", {}))
    completion = conditions.timestamp(end) if completed else None
    return aggregation.trace_status(status, facts, summary, start, completion, now), invalid


def acceptance_changed(old: Mapping, new: Mapping) -> bool:
    def accepted(status: Mapping):
        return next((c.get("status") for c in status.get("conditions", []) if c.get("type") == conditions.ACCEPTED),
                    None)
    return accepted(old) != accepted(new)


def status_patch(old: Mapping, new: Mapping) -> dict | None:
    """A merge patch turning `old` into `new` (None if nothing changes)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in STATUS_KEYS if k in old and k not in new})
    return patch or None


async def run_worker(rt: Runtime, memo, stopped, trace: Trace, logger: logging.Logger) -> None:
    worker = TraceWorker(rt, trace.kind, trace.namespace, trace.name, trace.uid, trace.views, logger,
                         lambda: evaluate(trace, rt.cfg.limits())[0])
    memo.worker = worker  # the trace's other handlers poke it, and deletion closes it
    await worker.run(stopped, trace.body)


def poke(memo) -> None:
    worker = getattr(memo, "worker", None)
    if worker is not None:
        worker.poke()


async def detach(rt: Runtime, worker: TraceWorker | None, uid: str, views: Iterable[NodeTraceView]) -> list[str]:
    """Remove trace `uid` from every node that carries it; return the nodes that could not be written.

    The nodes come from the index and from what the worker wrote (the index may not have seen its
    last writes yet). The worker is closed first, under its lock, so that it writes nothing after.
    """
    nodes = {v.node for v in views if v.published is not None}
    if worker is not None:
        async with worker.lock:
            worker.closed = True
        nodes |= set(worker.published)
    _, failed = await publish(rt, uid, dict.fromkeys(nodes))
    return sorted(failed)


def orphans(spec: Mapping, live: Callable[[str], bool]) -> list[str]:
    """Uids of the traces in a node's spec that no longer exist (read from the object as it is: this
    runs on every LatencyTraceNode event, and only the uids matter)."""
    traces = spec.get("traces") if isinstance(spec, Mapping) else None
    if not isinstance(traces, list):
        return []
    uids = [t.get("uid") for t in traces if isinstance(t, Mapping)]
    return [u for u in uids if isinstance(u, str) and u and not live(u)]


def collect_orphans(nodes: NodeConfigs, node: str, spec: Mapping, live: Callable[[str], bool],
                    logger: logging.Logger) -> None:
    for uid in orphans(spec, live):
        logger.info("removing the entry of deleted trace %s from node %s", uid, node)
        nodes.apply(node, uid, None)


