"""The only place conditions are built: the LatencyTrace's and the agents' (LatencyTraceNode) alike.

Kubernetes conventions: one entry per type, status True/False/Unknown, a CamelCase reason, a message
for humans, observedGeneration, and a lastTransitionTime that changes only when the status flips.
Messages are bounded (`bounded`, MESSAGE_LIMIT): they carry errors from kernels, compilers and users'
specs, and a status is read by people and written on every change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from latencytrace.node_agent.contract import Condition

ACCEPTED, TRACING, DEGRADED, COMPLETED = "Accepted", "Tracing", "Degraded", "Completed"
READY = "Ready"  # the agent's condition on its LatencyTraceNode, and the trace's summary condition
MESSAGE_LIMIT = 1024  # characters of a condition message (Kubernetes allows 32768)


def bounded(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text`, or its start and how much was cut when it is longer than `limit` characters."""
    if len(text) <= limit:
        return text
    tail = ""
    for _ in range(3):  # the count's own length changes what is kept: settle it
        keep = max(limit - len(tail), 0)
        tail = f"... ({len(text) - keep} more characters)"
    return text[:max(limit - len(tail), 0)] + tail


def timestamp(now: datetime | None = None) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def make(type_: str, status: bool, reason: str, message: str = "", generation: int | None = None) -> Condition:
    return Condition(type=type_, status="True" if status else "False", reason=reason, message=bounded(message),
                     observed_generation=generation)


def merge(old: Iterable[Mapping | Condition], new: Iterable[Condition], now: datetime) -> list[Condition]:
    """`new` with each lastTransitionTime kept from `old` when that type's status did not flip."""
    before = {}
    for c in old:
        c = c if isinstance(c, Condition) else Condition.model_validate(c)
        before[c.type] = c
    out = []
    for c in new:
        prev = before.get(c.type)
        since = prev.last_transition_time if prev is not None and prev.status == c.status else None
        out.append(c.model_copy(update={"last_transition_time": since or timestamp(now)}))
    return out


@dataclass(frozen=True)
class DestinationHealth:
    """One OTLP destination of a trace, as the agents of its nodes report it."""

    endpoint: str | None  # None: the agents' default, whose endpoint they do not know
    default: bool
    nodes: int  # nodes exporting the trace's data there
    unhealthy_nodes: int  # of those, nodes whose last export there failed
    dropped_batches: int  # summed over the nodes, since each agent started (all traces sharing it)
    last_error: str | None  # "node: error" of the first unhealthy node (by name)

    def wire(self) -> dict:
        out = {"endpoint": self.endpoint, "default": self.default, "healthy": self.unhealthy_nodes == 0,
               "nodes": self.nodes, "unhealthyNodes": self.unhealthy_nodes, "droppedBatches": self.dropped_batches,
               "lastError": self.last_error}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Summary:
    """The agents' reports of one trace, summed over its nodes."""

    matched_pods: int = 0
    traced_pods: int = 0
    matched_nodes: int = 0
    ready_nodes: int = 0
    tracing_nodes: int = 0
    failing_nodes: int = 0
    failing_sample: tuple[tuple[str, str], ...] = ()  # (node, error) of the first failing nodes
    destinations: tuple[DestinationHealth, ...] = ()  # where the trace's data is exported, and how that goes


@dataclass(frozen=True)
class TraceFacts:
    """What the LatencyTrace conditions are decided from."""

    generation: int
    invalid: str | None = None  # why the trace is not accepted
    completed: bool = False
    duration: str | None = None
    summary: Summary = Summary()
    invalid_reason: str = "InvalidSpec"  # InvalidSpec, NotAllowed (the administrator's limits), TooManyTraces
    pods_over_limit: tuple[int, int] | None = None  # (pods selected, the most one trace traces) when over
    explicit_duration: bool = True  # False: the duration is the cluster's default


def trace_conditions(f: TraceFacts) -> list[Condition]:
    """Accepted, Tracing, Degraded, Completed, then the summary Ready (see `ready`)."""
    detail = _detail_conditions(f)
    return detail + [ready(f, {c.type: c for c in detail})]


def ready(f: TraceFacts, by_type: Mapping[str, Condition]) -> Condition:
    """The summary condition GitOps tools and `kubectl wait --for=condition=Ready` read (kstatus).

    True only while the trace is accepted, not completed, and every pod it selects is traced on every
    node that hosts it, with no node failing. False otherwise, with the reason of what is missing:
    the Accepted reason when refused (InvalidSpec, NotAllowed, TooManyTraces); Completed once the
    duration expired (a finished trace traces nothing: wait for condition=Completed for its end);
    PodLimitExceeded, NodesFailing, NoPodsMatched, or PodsPending while agents are still attaching.
    """
    g, s = f.generation, f.summary
    if f.invalid is not None:
        return make(READY, False, f.invalid_reason, "the trace is not accepted: " + f.invalid, g)
    if f.completed:
        return make(READY, False, "Completed", f"the duration ({f.duration}) expired; nothing is traced any more", g)
    degraded = by_type[DEGRADED]
    if degraded.status == "True":
        return make(READY, False, degraded.reason, degraded.message, g)
    if s.matched_pods == 0:
        return make(READY, False, "NoPodsMatched", "no selected pod is scheduled to a node", g)
    if s.traced_pods < s.matched_pods or s.tracing_nodes < s.matched_nodes:
        return make(READY, False, "PodsPending", f"{s.traced_pods} of {s.matched_pods} pods traced on "
                    f"{s.tracing_nodes} of {s.matched_nodes} nodes; waiting for the agents", g)
    return make(READY, True, "AllPodsTraced",
                f"all {s.matched_pods} selected pods traced on {s.matched_nodes} nodes", g)


def _detail_conditions(f: TraceFacts) -> list[Condition]:
    g, s = f.generation, f.summary
    if f.invalid is not None:
        r = f.invalid_reason
        return [make(ACCEPTED, False, r, f.invalid, g),
                make(TRACING, False, r, "nothing is traced until the trace is accepted", g),
                make(DEGRADED, False, r, "", g),
                make(COMPLETED, False, r, "", g)]
    accepted = make(ACCEPTED, True, "Valid", "spec accepted", g)
    if f.completed:
        return [accepted,
                make(TRACING, False, "Completed", "the duration expired; every agent detached", g),
                make(DEGRADED, False, "Completed", "", g),
                make(COMPLETED, True, "DurationExpired", f"traced for {f.duration}", g)]
    if s.matched_pods == 0:
        tracing = make(TRACING, False, "NoPodsMatched", "no selected pod is scheduled to a node", g)
    elif s.traced_pods == 0:
        tracing = make(TRACING, False, "WaitingForAgents",
                       f"{s.matched_pods} pods on {s.matched_nodes} nodes selected; no agent reports one traced yet", g)
    else:
        tracing = make(TRACING, True, "PodsTraced",
                       f"{s.traced_pods} of {s.matched_pods} pods traced on {s.tracing_nodes} of {s.matched_nodes} nodes", g)
    failing = ""
    if s.failing_nodes:
        sample = "; ".join(f"{node}: {err}" for node, err in s.failing_sample)
        failing = f"{s.failing_nodes} of {s.matched_nodes} nodes failing" + (f" ({sample})" if sample else "")
    if f.pods_over_limit is not None:
        selected, limit = f.pods_over_limit
        degraded = make(DEGRADED, True, "PodLimitExceeded",
                        f"{selected} pods selected; this cluster traces at most {limit} per trace (the first {limit} "
                        "by namespace and name)" + (f"; {failing}" if failing else ""), g)
    elif failing:
        degraded = make(DEGRADED, True, "NodesFailing", failing, g)
    else:
        degraded = make(DEGRADED, False, "AsExpected", "", g)
    if f.duration:
        completed = make(COMPLETED, False, "Running", f"completes {f.duration} after it started" +
                         ("" if f.explicit_duration else " (the cluster's default duration)"), g)
    else:
        completed = make(COMPLETED, False, "NoDuration", "traces until deleted", g)
    return [accepted, tracing, degraded, completed]


def phase(conditions: Iterable[Condition]) -> str:
    """One word for `kubectl get lt`, derived from the conditions."""
    true = {c.type for c in conditions if c.status == "True"}
    if ACCEPTED not in true:
        return "Invalid"
    if COMPLETED in true:
        return "Completed"
    if DEGRADED in true:
        return "Degraded"
    return "Tracing" if TRACING in true else "Pending"


def agent_ready(ready: bool, reason: str, message: str, generation: int) -> Condition:
    return make(READY, ready, reason, message, generation)
