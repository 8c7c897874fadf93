"""From the agents' per-node reports to each LatencyTrace's status, small at any number of nodes.

The operator indexes every LatencyTraceNode by the traces it carries (`index_node`, a kopf index), so
that a trace's status is computed from its own nodes only: counts of matched, traced and failing pods
and nodes, plus the first few failing nodes with their error, and the health of the OTLP destination
the trace's data goes to (its own endpoint, or the agents' default), from each agent's export report.
Full per-node detail stays in each LatencyTraceNode, where the agent wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from latencytrace.node_agent.contract import (Condition, DestinationReport, ExportReport, NodeSpec, NodeStatus,
                                              NodeTrace, TraceReport)

from . import conditions
from .conditions import DestinationHealth, Summary, TraceFacts

MESSAGE_LIMIT = 500  # the CRD allows 512 per failing node
# Reasons an agent gives for not being ready that are part of its normal life, not a failure.
TRANSIENT_REASONS = ("Starting", "Stopped", "Idle")


@dataclass(frozen=True)
class NodeTraceView:
    """One node as far as one trace is concerned."""

    node: str
    published: NodeTrace | None  # the trace's entry in the node's spec
    report: TraceReport | None  # what the node's agent says about it
    generation: int  # of the LatencyTraceNode
    observed_generation: int  # the generation the agent applied
    created: datetime | None
    heartbeat: datetime | None
    ready: Condition | None
    export: ExportReport | None = None  # the agent's export health, every destination of the node


def index_node(name: str, meta: Mapping, spec: Mapping, status: Mapping) -> dict[str, NodeTraceView]:
    """kopf index function: {trace uid: view} for every trace in the node's spec or report."""
    try:
        node_spec = NodeSpec.model_validate(dict(spec))
    except ValidationError:
        node_spec = NodeSpec(node_name=name)
    try:
        node_status = NodeStatus.model_validate(dict(status or {}))
    except ValidationError:
        node_status = NodeStatus()
    entries = {t.uid: t for t in node_spec.traces}
    reports = {r.uid: r for r in node_status.traces}
    ready = next((c for c in node_status.conditions if c.type == conditions.READY), None)
    common = dict(node=name, generation=int(meta.get("generation") or 0),
                  observed_generation=node_status.observed_generation,
                  created=conditions.parse_time(meta.get("creationTimestamp")),
                  heartbeat=conditions.parse_time(node_status.heartbeat_time), ready=ready,
                  export=node_status.export if status else None)
    return {uid: NodeTraceView(published=entries.get(uid), report=reports.get(uid), **common)
            for uid in entries.keys() | reports.keys()}


def _clip(text: str) -> str:
    return conditions.bounded(text, MESSAGE_LIMIT)


def _fresh(view: NodeTraceView, now: datetime, stale_seconds: float) -> bool:
    return view.heartbeat is not None and (now - view.heartbeat).total_seconds() <= stale_seconds


def traced_pods(view: NodeTraceView) -> int:
    """Pods of the published entry the agent reports as traced (a pod removed since is not counted)."""
    if view.published is None or view.report is None:
        return 0
    wanted = {p.uid for p in view.published.pods}
    return sum(1 for p in view.report.pods if p.state == "Tracing" and p.uid in wanted)


def node_failure(view: NodeTraceView, now: datetime, stale_seconds: float) -> str | None:
    """Why this node fails the trace, or None (tracing, or still coming up)."""
    if view.heartbeat is None:
        age = (now - view.created).total_seconds() if view.created else 0.0
        return None if age <= stale_seconds else f"no agent has reported for {int(age)}s (is it running on this node?)"
    if not _fresh(view, now, stale_seconds):
        return f"agent silent since {conditions.timestamp(view.heartbeat)}"
    if view.ready is not None and view.ready.status != "True" and view.ready.reason not in TRANSIENT_REASONS:
        return f"agent not ready: {view.ready.reason}" + (f": {view.ready.message}" if view.ready.message else "")
    failed = [p for p in (view.report.pods if view.report else []) if p.state == "Failed"]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more pods)" if len(failed) > 1 else ""
        return f"pod {first.namespace}/{first.name}: {first.message or 'failed'}{more}"
    return None


def destination(view: NodeTraceView) -> DestinationReport | None:
    """The agent's report on the destination this trace's data goes to from that node: the trace's own
    endpoint, else the default (None when the agent reports neither, e.g. it exports nowhere)."""
    if view.published is None or view.export is None:
        return None
    own = view.published.export.otlp_endpoint
    reports = view.export.destinations
    if own is None:
        return next((d for d in reports if d.default), None)
    # A trace naming the agent's own endpoint goes through the default's exporter: a trace's own first.
    return next((d for d in sorted(reports, key=lambda d: d.default) if d.endpoint == own), None)


def export_health(views: Iterable[NodeTraceView], now: datetime, stale_seconds: float) -> tuple[DestinationHealth, ...]:
    """Per destination, over the nodes whose agent reported recently."""
    by: dict[tuple[str | None, bool], list[tuple[str, DestinationReport]]] = {}
    for v in views:
        d = destination(v) if _fresh(v, now, stale_seconds) else None
        if d is not None:
            by.setdefault((d.endpoint, d.default), []).append((v.node, d))
    out = []
    for (endpoint, default), reports in sorted(by.items(), key=lambda kv: (not kv[0][1], kv[0][0] or "")):
        reports.sort(key=lambda nd: nd[0])
        bad = [(n, d) for n, d in reports if not d.healthy]
        error = next((f"{n}: {d.last_error}" for n, d in bad if d.last_error), None)
        out.append(DestinationHealth(endpoint, default, len(reports), len(bad), sum(d.dropped_batches for _, d in reports),
                                     _clip(error) if error else None))
    return tuple(out)


def summarize(views: Iterable[NodeTraceView], now: datetime, stale_seconds: float, listed: int) -> Summary:
    views = list(views)
    matched_pods = traced = matched_nodes = ready = tracing = 0
    failing: list[tuple[str, str]] = []
    for v in views:
        if v.published is None:
            continue  # the agent still reports a trace its node no longer carries
        matched_nodes += 1
        matched_pods += len(v.published.pods)
        fresh = _fresh(v, now, stale_seconds)
        n = traced_pods(v) if fresh else 0
        traced += n
        tracing += n > 0
        ready += fresh and v.ready is not None and v.ready.status == "True" and v.observed_generation >= v.generation
        why = node_failure(v, now, stale_seconds)
        if why is not None:
            failing.append((v.node, _clip(why)))
    failing.sort()
    return Summary(matched_pods, traced, matched_nodes, ready, tracing, len(failing), tuple(failing[:listed]),
                   destinations=export_health(views, now, stale_seconds))


def trace_status(old: Mapping, facts: TraceFacts, summary: Summary | None, start: str | None,
                 completion: str | None, now: datetime) -> dict:
    """The LatencyTrace status to write. A completed trace keeps the counts and export health it had (for
    the record); its traced pods drop to zero as the agents detach."""
    conds = conditions.merge(old.get("conditions", []), conditions.trace_conditions(facts), now)
    status: dict = {
        "observedGeneration": facts.generation,
        "phase": conditions.phase(conds),
        "conditions": [c.wire() for c in conds],
    }
    if start:
        status["startTime"] = start
    if completion:
        status["completionTime"] = completion
    if summary is not None:
        status.update(matchedPods=summary.matched_pods, tracedPods=summary.traced_pods,
                      matchedNodes=summary.matched_nodes,
                      nodes={"ready": summary.ready_nodes, "tracing": summary.tracing_nodes,
                             "failing": summary.failing_nodes,
                             "failingNodes": [{"name": n, "message": m} for n, m in summary.failing_sample]},
                      export={"destinations": [d.wire() for d in summary.destinations]})
    else:
        for key in ("matchedPods", "matchedNodes", "export"):
            if key in old:
                status[key] = old[key]
        status["tracedPods"] = 0
        status["nodes"] = {"ready": 0, "tracing": 0, "failing": 0, "failingNodes": []}
    return status

