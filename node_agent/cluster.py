"""The in-cluster agent (`latencytrace-agent run`): its node's LatencyTraceNode in, measurements and a
status report out.

It watches only its own node's object (field selector metadata.name=<node>), turns the spec into
targets for `Agent.reconcile` (a pod selected by several traces is traced once, with their settings
merged), looks again for pods not found yet, publishes an interval to the sinks every period, and
patches the object's status (per-pod states, probes, export health, a Ready condition, a heartbeat) at
a bounded rate. Probes are loaded when the node first has something to trace and unloaded after it has
had nothing for a while. API errors are retried with backoff and logged once; SIGTERM detaches.

A pod is mapped to its network namespace on the host (targets.PodLocator): by its UID in the cgroup
paths of its processes (/proc/*/cgroup, needs the host PID namespace), else by the namespace that holds
one of its pod IPs (every namespace reachable from /proc/*/ns/net and /run/netns).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

from kubernetes import client
from pydantic import ValidationError

from latencytrace.operator import conditions  # the one place conditions are built

from . import config as agent_config, endpoints, health, segments, targets
from .agent import Agent, Desired, TargetState
from .contract import (CONTRACT_VERSION, GROUP, KIND_BY_NAME, NODE_PLURAL, TRACE_KIND, VERSION, Condition, ExportReport, NodeSpec,
                       NodeStatus, NodeTrace, PodReport, ProbeReport, TraceReport, TraceSettings, UnavailableProbe)
from .export import OtlpSink, config as export_config, sink_from_settings
from .kube import ListWatch, Trouble, api_client, describe
from .tracer import MAX_TIME_ONE_IN, ProbeStatus, TargetSettings
from .version import version

log = logging.getLogger("latencytrace.agent")

# -- spec -> targets (pure) ---------------------------------------------------------------------------
def segment_mask(t: TraceSettings) -> int:
    """The trace's segments, limited to its directions (empty list: all of them)."""
    return segments.mask(t.segments) & segments.of_directions(segments.direction_mask(t.directions))


def merge_settings(traces: Iterable[TraceSettings]) -> TargetSettings:
    """One pod, several traces: trace what any of them asks for (union of directions and segments,
    lowest slow threshold, most frequent span sampling, most frequent timing (lowest timeOneIn), highest
    span rate). Never one tenant's cost raised by another's: the traces of one pod are its own namespace's
    LatencyTraces and administrators' ClusterLatencyTraces only, each accepted within the administrator's
    limits (limits.minTimeOneIn among them), so the merge is within them. A trace that asked for sparser
    timing gets the pod's finer timing; what a pod got is in its exported data (latencytrace.time_one_in)."""
    traces = list(traces)
    sampling = [t.sample_one_in for t in traces if t.sample_one_in > 0]
    return TargetSettings(
        slow_ns=min(t.slow_threshold_microseconds for t in traces) * 1000,
        sample_one_in=min(sampling) if sampling else 0,
        time_one_in=min(t.time_one_in for t in traces),
        seg_mask=functools.reduce(lambda m, t: m | segment_mask(t), traces, 0),
        dir_mask=segments.direction_mask(d for t in traces for d in t.directions),
        events_per_sec=max(t.spans_per_second for t in traces),
    )


def pod_key(uid: str) -> str:
    return f"pod:{uid}"


def desired_targets(spec: NodeSpec, locator: targets.PodLocator) -> list[Desired]:
    """The targets a node spec asks for: one per pod, whichever traces select it."""
    by_pod: dict[str, tuple] = {}
    for t in spec.traces:
        for p in t.pods:
            ref, traces = by_pod.get(p.uid, (p, []))
            traces.append(t)
            by_pod[p.uid] = (ref, traces)
    return [Desired(key=pod_key(uid), label=f"{ref.namespace}/{ref.name}",
                    resolve=functools.partial(locator.locate, ref), settings=merge_settings(traces), pod=ref,
                    traces=tuple(sorted(t.ref for t in traces)))
            for uid, (ref, traces) in sorted(by_pod.items())]


# -- the LatencyTraceNode, untrusted (pure) ----------------------------------------------------------------
def trace_problem(t: NodeTrace, endpoint_allowed: Callable[[str], bool] | None = None) -> str | None:
    """Why this agent cannot trace `t` as given (the operator checked it; whoever else can write the
    object did not necessarily), or None. `endpoint_allowed`: the administrator's export allow-list."""
    if t.export.otlp_endpoint is not None:
        why = endpoints.problem(t.export.otlp_endpoint)
        if why:
            return f"export.otlpEndpoint {why}"
        if endpoint_allowed is not None and not endpoint_allowed(t.export.otlp_endpoint):
            return (f"export.otlpEndpoint {endpoints.shown(t.export.otlp_endpoint)} is not among the endpoints "
                    "this agent is allowed to export to")
    unknown = [s for s in t.segments if s not in segments.BY_NAME]
    if unknown:
        return f"unknown segments {endpoints.shown(', '.join(unknown))}"
    if t.slow_threshold_microseconds < 1 or t.spans_per_second < 0 or t.sample_one_in < 0:
        return "slowThresholdMicroseconds must be >= 1, spansPerSecond and sampleOneIn >= 0"
    if not 1 <= t.time_one_in <= MAX_TIME_ONE_IN:
        return f"timeOneIn must be 1 to {MAX_TIME_ONE_IN}"
    for p in t.pods:
        for ip in p.ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                return f"pod {endpoints.shown(p.namespace)}/{endpoints.shown(p.name)}: {endpoints.shown(ip)} is not an IP address"
    return None


def _text(raw: object, key: str) -> str:
    v = raw.get(key) if isinstance(raw, Mapping) else None
    return v if isinstance(v, str) else "?"


def rejected_report(raw: object, why: str) -> TraceReport:
    """The report of a trace entry this agent refused: each of its pods Failed with the reason."""
    pods = raw.get("pods") if isinstance(raw, Mapping) else None
    reports = [PodReport(namespace=_text(p, "namespace"), name=_text(p, "name"), uid=_text(p, "uid"), state="Failed",
                         message=conditions.bounded(f"trace not applied: {why}", POD_MESSAGE_LIMIT))
               for p in (pods if isinstance(pods, list) else [])[:1024]]
    kind = _text(raw, "kind")
    return TraceReport(kind=kind if kind in KIND_BY_NAME else TRACE_KIND, name=_text(raw, "name"),
                       namespace=_text(raw, "namespace"), uid=_text(raw, "uid"), pods=reports)


def parse_node_spec(raw: object, node_name: str, endpoint_allowed: Callable[[str], bool] | None = None,
                    ) -> tuple[NodeSpec, list[TraceReport]]:
    """The node spec with every trace entry this agent can trace, and a report for each one it cannot:
    one bad entry fails that trace, never the others or the agent."""
    raw = raw if isinstance(raw, Mapping) else {}
    version = raw.get("contractVersion", CONTRACT_VERSION)
    spec = NodeSpec(node_name=node_name, contract_version=version if type(version) is int else CONTRACT_VERSION)
    entries = raw.get("traces")
    rejected: list[TraceReport] = []
    for item in entries if isinstance(entries, list) else []:
        try:
            t = NodeTrace.model_validate(item)
            why = trace_problem(t, endpoint_allowed)
        except ValidationError as e:
            t, why = None, "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                                     for err in e.errors(include_input=False)[:5])
        if why is None:
            spec.traces.append(t)
        else:
            log.warning("not tracing %s/%s: %s", _text(item, "namespace"), _text(item, "name"), why)
            rejected.append(rejected_report(item, why))
    return spec, rejected


# -- agent state -> status (pure) ---------------------------------------------------------------------
POD_MESSAGE_LIMIT = 512  # what the operator passes on per failing node anyway
DESTINATIONS_LISTED = 32  # export destinations in the node's status (the default first); the CRD's maxItems
DESTINATION_ERROR_LIMIT = 512  # characters of a destination's last error; the CRD's maxLength


def pod_report(namespace: str, name: str, uid: str, st: TargetState | None) -> PodReport:
    if st is None:
        return PodReport(namespace=namespace, name=name, uid=uid, state="Pending")
    inode = st.target.ns.inode if st.target is not None else None
    return PodReport(namespace=namespace, name=name, uid=uid, state=st.state, netns_inode=inode,
                     message=conditions.bounded(st.message, POD_MESSAGE_LIMIT))


def trace_reports(traces: Iterable[NodeTrace], states: Mapping[str, TargetState]) -> list[TraceReport]:
    out = []
    for t in traces:
        pods = [pod_report(p.namespace, p.name, p.uid, states.get(pod_key(p.uid))) for p in t.pods]
        out.append(TraceReport(kind=t.kind, name=t.name, namespace=t.namespace, uid=t.uid, pods=pods,
                               pods_tracing=sum(1 for p in pods if p.state == "Tracing")))
    return out


def probe_report(status: ProbeStatus | None) -> ProbeReport:
    if status is None:
        return ProbeReport()
    attached = sorted({p.tracepoint for p in status.attached})
    unavailable = [UnavailableProbe(tracepoint=p.tracepoint, reason=why, segments=list(p.feeds))
                   for p, why in status.unavailable]
    return ProbeReport(attached=attached, unavailable=unavailable)


def ready_condition(*, failure: tuple[str, str] | None, loaded: bool, targets_n: int, probes: ProbeReport,
                    generation: int) -> Condition:
    if failure is not None:
        return conditions.agent_ready(False, failure[0], failure[1], generation)
    if not loaded:
        return conditions.agent_ready(True, "Idle", "nothing to trace on this node; probes not loaded", generation)
    return conditions.agent_ready(True, "Tracing", f"{targets_n} pods traced; {len(probes.attached)} tracepoints "
                                  f"attached, {len(probes.unavailable)} unavailable", generation)


def readiness(*, failure: tuple[str, str] | None, wanted: bool, loaded: bool, pending: Iterable[str],
              report_error: str | None, targets_n: int, attached_n: int) -> tuple[bool, str]:
    """The readiness probe's answer: the programs this node needs are attached (or it needs none) and the
    last status report reached the API server."""
    pending = sorted(pending)
    if failure is not None:
        return False, f"{failure[0]}: {failure[1]}"
    if wanted and not loaded:
        return False, "this node has pods to trace and the probes are not loaded yet"
    if pending:
        return False, f"probes not attached yet: {', '.join(pending)}"
    if report_error is not None:
        return False, f"the last status report to the API server failed: {report_error}"
    if not loaded:
        return True, "nothing to trace on this node; probes not loaded"
    return True, f"{targets_n} pods traced; {attached_n} tracepoints attached"


# -- the loop -------------------------------------------------------------------------------------------
def export_policy() -> Callable[[str], bool]:
    """Which trace endpoints this agent exports to (LATENCYTRACE_EXPORT_ALLOWED_ENDPOINTS and the default).
    With export settings that cannot be read (the sink reports why when it is made), none."""
    try:
        return export_config.load().trace_endpoint_allowed
    except export_config.ExportConfigError:
        return lambda _: False


class NodeAgent:
    def __init__(self, cfg: agent_config.AgentConfig, api: client.ApiClient, make_agent=None):
        self.cfg = cfg
        self.custom = client.CustomObjectsApi(api)
        self.make_agent = make_agent or self._make_agent
        self.agent: Agent | None = None
        self.sink: OtlpSink | None = None  # made with the agent (by _make_agent)
        self.wake = threading.Event()
        self.watch = ListWatch(self.custom.list_cluster_custom_object, GROUP, VERSION, NODE_PLURAL,
                               field_selector=f"metadata.name={cfg.node_name}", on_change=self.wake.set, log=log,
                               timeout_seconds=cfg.watch_timeout_seconds)
        self.spec = NodeSpec(node_name=cfg.node_name)
        self.endpoint_allowed = export_policy()  # defense in depth: the operator checked the endpoints too
        self.rejected: list[TraceReport] = []  # trace entries of the spec this agent refused
        self.locator = targets.PodLocator()
        self.generation = 0
        self.exists = False
        self.states: dict[str, TargetState] = {}
        self.failure: tuple[str, str] | None = None  # (reason, message) while the agent cannot work
        self.wanted = False  # the spec names pods on this node
        self.report_error: str | None = None  # why the last status report failed
        self.health = health.Health(cfg.liveness_seconds, cfg.health_load_seconds)
        self.health_server: health.HealthServer | None = None
        self.conditions: list[Condition] = []
        self.events_lost = 0
        self.idle_since: float | None = time.monotonic()
        self.retry_at: float | None = None
        self.sent: dict | None = None  # last status sent, without its heartbeat
        self.sent_at = 0.0
        self.status_trouble = Trouble(log, f"reporting status of LatencyTraceNode {cfg.node_name}")
        self.start_trouble = Trouble(log, "loading the probes")

    def _make_agent(self) -> Agent:
        self.sink = sink_from_settings(node_name=self.cfg.node_name, traces=self.spec.traces)
        return Agent(sizes=self.cfg.sizes(), sinks=[self.sink], stats_policy=self.cfg.stats_policy(),
                     tracepoints=self.cfg.tracepoints)

    # -- configuration ----------------------------------------------------------------------------
    def read_spec(self) -> None:
        objs = self.watch.snapshot()
        obj = objs[0] if objs else None
        self.exists = obj is not None
        generation = obj.get("metadata", {}).get("generation", 0) if obj else 0
        self.generation = generation if type(generation) is int else 0
        spec, self.rejected = parse_node_spec(obj.get("spec") if obj else None, self.cfg.node_name,
                                              self.endpoint_allowed)
        if spec.contract_version > CONTRACT_VERSION:
            self.failure = ("ContractVersionUnsupported",
                            f"the operator publishes contract version {spec.contract_version}; this agent "
                            f"understands {CONTRACT_VERSION}: upgrade the agent")
            spec, self.rejected = NodeSpec(node_name=self.cfg.node_name), []
        elif self.failure and self.failure[0] == "ContractVersionUnsupported":
            self.failure = None
        self.spec = spec
        if self.sink is not None:  # a sink made later gets the traces when it is made
            self.sink.set_traces(spec.traces)

    def reconcile(self) -> None:
        desired = desired_targets(self.spec, self.locator)
        self.wanted = bool(desired)
        now = time.monotonic()
        if desired:
            self.locator.refresh()  # one pass over /proc and the namespaces for all the pods
        if desired and self.agent is None:
            self._load()
        if self.agent is not None:
            self.states = self.agent.reconcile(desired)
        else:
            self.states = {}
        self.idle_since = None if desired else (self.idle_since or now)
        waiting = any(s.state != "Tracing" for s in self.states.values()) or (desired and self.agent is None)
        self.retry_at = now + self.cfg.retry_seconds if waiting else None

    def _load(self) -> None:
        agent = None
        try:
            agent = self.make_agent()  # its export sink too: a bad OTLP setting is reported like the rest
            with self.health.busy("loading the probes (BCC compiles them)"):
                agent.start()
        except Exception as e:  # no BTF, no headers, not privileged: report it and try again later
            self.failure = ("TracerFailed", str(e))
            self.start_trouble.failed(e)
            try:
                if agent is not None:
                    agent.close()
            except Exception:
                log.debug("closing the half-started agent failed", exc_info=True)
            return
        self.start_trouble.ok()
        self.agent = agent
        if self.failure and self.failure[0] == "TracerFailed":
            self.failure = None
        log.info("probes loaded: %d attached, %d unavailable", len(agent.tracer.status.attached),
                 len(agent.tracer.status.unavailable))

    def unload(self) -> None:
        if self.agent is not None:
            self.agent.close()  # closing the BPF program detaches every probe
            self.agent, self.sink = None, None
            self.states = {}
            log.info("probes unloaded")

    # -- reporting ---------------------------------------------------------------------------------
    def collect(self) -> None:
        if self.agent is None:
            return
        if self.agent.vanished():  # a traced pod's namespace was deleted: stop tracing it now, report it
            self.reconcile()
        self.agent.refresh_addresses()  # a pod's IP arrives after its namespace: the host side must learn it
        self.agent.refresh_host_devices()  # a NIC, bond or VLAN added or removed meanwhile, a new pod's veth
        interval = self.agent.collect()
        self.events_lost = interval.counters.get("events_lost", 0) + interval.counters.get("events_dropped_userspace", 0)
        self.agent.publish(interval)

    def status(self, now: datetime) -> NodeStatus:
        probes = probe_report(self.agent.tracer.status if self.agent is not None else None)
        ready = ready_condition(failure=self.failure, loaded=self.agent is not None, probes=probes,
                                targets_n=sum(1 for s in self.states.values() if s.state == "Tracing"),
                                generation=self.generation)
        self.conditions = conditions.merge(self.conditions, [ready], now)
        try:
            export = self.sink.report() if self.sink is not None else ExportReport()
        except Exception as e:  # one trace's exporter must not stop the status of all the others
            log.exception("the export health report failed")
            export = ExportReport(healthy=False, last_error=f"export health unknown: {type(e).__name__}: {e}")
        if export.last_error:
            export.last_error = conditions.bounded(export.last_error)
        export.destinations = [d.model_copy(update={"last_error": conditions.bounded(d.last_error, DESTINATION_ERROR_LIMIT)})
                               if d.last_error else d for d in export.destinations[:DESTINATIONS_LISTED]]
        return NodeStatus(observed_generation=self.generation, agent_version=version(),
                          heartbeat_time=conditions.timestamp(now), conditions=self.conditions, probes=probes,
                          traces=trace_reports(self.spec.traces, self.states) + self.rejected, export=export,
                          events_lost=self.events_lost)

    def report(self, force: bool = False) -> None:
        """Patch the status if it changed (at most every status_min_gap_seconds) or a heartbeat is due."""
        if not self.exists:
            self.report_error = None  # no object, nothing to report to
            return
        doc = self.status(datetime.now(UTC)).model_dump(by_alias=True, mode="json")  # nulls clear fields
        content = {k: v for k, v in doc.items() if k != "heartbeatTime"}
        age = time.monotonic() - self.sent_at
        due = age >= self.cfg.status_seconds or (content != self.sent and age >= self.cfg.status_min_gap_seconds)
        if not (due or force):
            return
        try:
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, NODE_PLURAL, self.cfg.node_name,
                                                           {"status": doc}, _request_timeout=10)
            self.status_trouble.ok()
            self.sent, self.sent_at = content, time.monotonic()
            self.report_error = None
        except Exception as e:  # 404 (deleted meanwhile) or API trouble: the next round tries again
            self.sent_at = time.monotonic() - self.cfg.status_seconds + self.status_trouble.failed(e)
            self.report_error = describe(e)

    def next_timeout(self, next_collect: float) -> float:
        now = time.monotonic()
        deadlines = [next_collect if self.agent is not None else now + self.cfg.status_seconds]
        if self.exists:  # without an object there is no report to send
            deadlines.append(self.sent_at + self.cfg.status_seconds)
        if self.sent is not None and self.sent_at + self.cfg.status_min_gap_seconds > now:
            deadlines.append(self.sent_at + self.cfg.status_min_gap_seconds)  # a change held back by the gap
        if self.retry_at is not None:
            deadlines.append(self.retry_at)
        if self.agent is not None and self.idle_since is not None and self.cfg.idle_unload_seconds:
            deadlines.append(self.idle_since + self.cfg.idle_unload_seconds)
        return max(0.05, min(deadlines) - now)

    def update_health(self) -> None:
        """After each turn: the heartbeat, and the readiness the turn left."""
        tracer = self.agent.tracer if self.agent is not None else None
        self.health.set_ready(*readiness(
            failure=self.failure, wanted=self.wanted, loaded=self.agent is not None,
            pending=[p.tracepoint for p in tracer.pending()] if tracer else [], report_error=self.report_error,
            targets_n=sum(1 for s in self.states.values() if s.state == "Tracing"),
            attached_n=len({p.tracepoint for p in tracer.status.attached}) if tracer else 0))
        if self.watch.trouble.last is not None:
            self.health.waiting_for(f"the LatencyTraceNode has not been read yet: {self.watch.trouble.last}")
        self.health.beat()

    def run(self, stop: threading.Event) -> None:
        """The main loop, until `stop` is set. Raises health.HealthError at once if the health endpoint's
        port cannot be bound."""
        self.health_server = health.HealthServer(self.health, self.cfg.health_address, self.cfg.health_port).start()
        self.watch.start()
        next_collect = time.monotonic() + self.cfg.interval_seconds
        try:
            while not stop.is_set():
                changed = self.wake.is_set()
                self.wake.clear()
                now = time.monotonic()
                read = changed and self.watch.synced.is_set()
                if read:
                    self.read_spec()
                    self.reconcile()
                elif self.retry_at is not None and now >= self.retry_at:
                    self.reconcile()
                if self.agent is not None and self.idle_since is not None and self.cfg.idle_unload_seconds \
                        and now - self.idle_since >= self.cfg.idle_unload_seconds:
                    self.unload()
                if self.agent is not None and now >= next_collect:
                    self.collect()
                    next_collect = now + self.cfg.interval_seconds
                self.report()
                if read:
                    self.health.started()  # the first read, and what it asked for, are done
                self.update_health()
                self.wake.wait(self.next_timeout(next_collect))
        finally:
            self.watch.stop()
            try:
                self.shutdown()
            finally:
                self.health_server.close()

    def shutdown(self) -> None:
        try:
            self.unload()
        finally:
            self.failure = ("Stopped", "the agent stopped; nothing is traced on this node")
            self.states = {}
            self.report(force=True)


def main() -> int:
    try:
        cfg = agent_config.load()
    except agent_config.ConfigError as e:
        print(f"latencytrace-agent: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(cfg.log_level)
    node_agent = NodeAgent(cfg, api_client(cfg.kubeconfig))
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        node_agent.wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("agent for node %s starting", cfg.node_name)
    try:
        node_agent.run(stop)
    except health.HealthError as e:
        print(f"latencytrace-agent: {e}", file=sys.stderr)
        return 2
    return 0
