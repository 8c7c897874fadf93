"""What each kopf handler does, as plain functions with explicit arguments (main.py only wires them).

- `trace_status`: the LatencyTrace status from its spec, its old status and its nodes' views (used on
  create/update/resume, where an invalid spec is reported at once, and by the periodic refresh).
- `run_worker`: the trace's daemon (worker.TraceWorker).
- `detach`: on deletion, remove the trace from every node it is on.
- `orphans`/`collect_orphans`: entries on a node whose trace no longer exists (deleted while the
  operator was away, say) are removed whenever that node's object changes or is listed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from latencytrace.node_agent.contract import NodeSpec

from . import aggregation, conditions, spec as specs
from .aggregation import NodeTraceView
from .config import OperatorConfig
from .nodeconfig import NodeConfigs
from .worker import Runtime, TraceWorker, publish

# The status keys this operator owns; a key it no longer sets is removed (merge patch: null).
STATUS_KEYS = ("observedGeneration", "phase", "conditions", "startTime", "completionTime", "matchedPods",
               "tracedPods", "matchedNodes", "nodes")


def trace_status(raw_spec: Mapping, generation: int, status: Mapping, views: Iterable[NodeTraceView],
                 cfg: OperatorConfig, now: datetime) -> tuple[dict, str | None]:
    """(the status to have, the reason the spec is invalid or None)."""
    try:
        spec = specs.parse(raw_spec, cfg.max_duration_seconds)
        invalid = None
    except specs.SpecError as e:
        spec, invalid = None, str(e)
    start = status.get("startTime") or (conditions.timestamp(now) if spec is not None else None)
    end = specs.deadline(spec, conditions.parse_time(start)) if spec is not None else None
    completed = end is not None and now >= end
    summary = None
    if spec is not None and not completed:
        summary = aggregation.summarize(views, now, cfg.agent_stale_seconds, cfg.failing_nodes_listed)
    facts = conditions.TraceFacts(generation, invalid, completed, spec.duration if spec else None,
                                  summary or conditions.Summary())
    completion = conditions.timestamp(end) if completed else None
    return aggregation.trace_status(status, facts, summary, start, completion, now), invalid


def status_patch(old: Mapping, new: Mapping) -> dict | None:
    """A merge patch turning `old` into `new` (None if nothing changes)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in STATUS_KEYS if k in old and k not in new})
    return patch or None


async def run_worker(rt: Runtime, memo, stopped, body: Mapping, views: Callable[[], Iterable[NodeTraceView]],
                     logger: logging.Logger) -> None:
    meta = body["metadata"]
    worker = TraceWorker(rt, meta["namespace"], meta["name"], meta["uid"], views, logger)
    memo.worker = worker  # the trace's other handlers poke it, and deletion closes it
    await worker.run(stopped, body)


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
    """Uids of the traces in a node's spec that no longer exist."""
    try:
        node_spec = NodeSpec.model_validate(dict(spec))
    except ValueError:
        return []
    return [t.uid for t in node_spec.traces if not live(t.uid)]


def collect_orphans(nodes: NodeConfigs, node: str, spec: Mapping, live: Callable[[str], bool],
                    logger: logging.Logger) -> None:
    for uid in orphans(spec, live):
        logger.info("removing the entry of deleted trace %s from node %s", uid, node)
        nodes.apply(node, uid, None)


