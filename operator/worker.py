"""One LatencyTrace's worker: keeps the trace's entries on the nodes equal to its selected pods.

It runs as the trace's kopf daemon, so it starts with the trace (and on operator start), and stops when
the trace is deleted or the operator exits. It selects its pods from the operator's pod cache (podcache.py),
which wakes it when a pod it selects (before or after the change) changes, and publishes after each burst
of pod churn, after a spec change (its handler pokes it), when the duration expires (everything is
removed), and on every resync (drift repair). It never publishes before the cache's first complete pod
list, so an operator restart re-derives the same entries and writes none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubernetes import client

from latencytrace.node_agent.contract import NodeTrace, TraceKind
from latencytrace.node_agent.kube import Trouble

from . import heap, nodeconfig, selection, spec as specs
from .aggregation import NodeTraceView
from .conditions import parse_time
from .config import OperatorConfig
from .nodeconfig import NodeConfigs
from .podcache import PodCache
from .selection import PlacedPod


@dataclass
class Runtime:
    """Operator-wide objects, made once at startup and shared by every handler (through kopf's memo)."""

    cfg: OperatorConfig
    api: client.ApiClient
    nodes: NodeConfigs
    pool: concurrent.futures.ThreadPoolExecutor
    pods: PodCache
    workers: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # the running trace workers

    def node_object_gone(self, node: str) -> None:
        """A LatencyTraceNode was deleted (by the garbage collector with its Node, say): each worker that
        thinks it carries an entry there publishes it again. Safe from any thread."""
        for worker in list(self.workers):
            worker.node_object_gone(node)

    @classmethod
    def create(cls, cfg: OperatorConfig, api: client.ApiClient) -> Runtime:
        rt = cls(cfg, api, NodeConfigs(api, cfg.request_timeout_seconds),
                 concurrent.futures.ThreadPoolExecutor(cfg.publish_concurrency, thread_name_prefix="publish"),
                 PodCache(api, cfg.watch_timeout_seconds, after_list=heap.settle).start())
        rt.pool.submit(rt.nodes.warm)
        return rt

    def close(self) -> None:
        self.pods.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def start_time(body: Mapping) -> datetime | None:
    """Duration counts from acceptance (status.startTime); until that is written, from creation."""
    return parse_time(body.get("status", {}).get("startTime") or body.get("metadata", {}).get("creationTimestamp"))


def expired(spec: specs.TraceSpec, body: Mapping, now: datetime) -> bool:
    end = specs.deadline(spec, start_time(body))
    return end is not None and now >= end


async def publish(rt: Runtime, uid: str, todo: Mapping[str, NodeTrace | None]) -> tuple[dict, dict]:
    """Write `todo` ({node: entry or None}) in parallel; return ({node: entry now there}, {node: error})."""
    loop = asyncio.get_running_loop()
    nodes = list(todo)
    results = await asyncio.gather(*(loop.run_in_executor(rt.pool, rt.nodes.apply, n, uid, todo[n]) for n in nodes),
                                   return_exceptions=True)
    done, failed = {}, {}
    for node, res in zip(nodes, results):
        (failed if isinstance(res, BaseException) else done)[node] = res
    return done, failed


def within_limit(pods: Mapping[str, list], limit: int) -> tuple[dict[str, list], int]:
    """At most `limit` pods (0: all), the first by namespace and name; and how many were selected."""
    total = sum(len(refs) for refs in pods.values())
    if not limit or total <= limit:
        return dict(pods), total
    keep = {(r.namespace, r.name, r.uid) for r in
            sorted((r for refs in pods.values() for r in refs), key=lambda r: (r.namespace, r.name, r.uid))[:limit]}
    out = {node: [r for r in refs if (r.namespace, r.name, r.uid) in keep] for node, refs in pods.items()}
    return {node: refs for node, refs in out.items() if refs}, total


class TraceWorker:
    def __init__(self, rt: Runtime, kind: TraceKind, namespace: str | None, name: str, uid: str,
                 views: Callable[[], Iterable[NodeTraceView]], logger: logging.Logger,
                 admitted: Callable[[], specs.TraceSpec | None]):
        self.rt, self.kind, self.namespace, self.name, self.uid = rt, kind, namespace, name, uid
        self.views = views  # this trace's views in the LatencyTraceNode index
        self.admitted = admitted  # the spec to trace, or None while the trace is not accepted (handlers.evaluate)
        self.pods_over_limit: tuple[int, int] | None = None  # (selected, limit) while over the pod limit
        self.log = logger
        ref = kind.ref(namespace, name)
        self.lock = asyncio.Lock()  # held while writing; deletion takes it, then closes the worker
        self.closed = False
        self.published: dict[str, NodeTrace] = {}
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._spec: specs.TraceSpec | None = None  # what pod_changed selects by: the admitted spec while active
        self._namespaces: set[str] | None = None
        self._trouble = Trouble(logger, f"publishing trace {ref}")
        self._ns_trouble = Trouble(logger, f"listing namespaces for trace {ref}")

    def poke(self) -> None:
        """Something changed (spec, pods): look again. Safe from any thread."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def node_object_gone(self, node: str) -> None:
        """`node`'s LatencyTraceNode was deleted: what this worker published there is gone with it."""
        def forget() -> None:
            if self.published.pop(node, None) is not None:
                self._wake.set()

        self._loop.call_soon_threadsafe(forget)

    def _seed(self) -> None:
        """What the nodes carry now, as the index saw it: the base for the next diff."""
        self.published = {v.node: v.published for v in self.views() if v.published is not None}

    def pod_changed(self, old: PlacedPod | None, new: PlacedPod | None) -> None:
        """The pod cache saw a pod change (from its thread): look again if this trace selects it, before or
        after. Until the namespaces of a namespaceSelector are known, every pod may be one."""
        spec, namespaces = self._spec, self._namespaces
        if spec is None:
            return
        if spec.namespace_selector is not None and namespaces is None:
            self.poke()
        elif any(p is not None and selection.selects(spec, self.namespace, namespaces, p) for p in (old, new)):
            self.poke()

    def _list_namespaces(self, label_selector: str) -> set[str]:
        core = client.CoreV1Api(self.rt.api)
        items = core.list_namespace(label_selector=label_selector,
                                    _request_timeout=self.rt.cfg.request_timeout_seconds).items
        return {ns.metadata.name for ns in items}

    async def _refresh_namespaces(self, spec: specs.TraceSpec | None) -> float | None:
        """Re-select the namespaces of a namespaceSelector (None without one); on API error, the seconds
        until the next try."""
        query = None if spec is None else selection.namespace_query(spec)
        if query is None:
            self._namespaces = None
            return None
        try:
            self._namespaces = await asyncio.get_running_loop().run_in_executor(
                self.rt.pool, self._list_namespaces, query)
        except Exception as e:  # API trouble: keep the last selection, try again soon
            return self._ns_trouble.failed(e)
        self._ns_trouble.ok()
        return None

    def desired(self, spec: specs.TraceSpec, generation: int) -> dict[str, NodeTrace] | None:
        """Entries per node from the current pods; None until the first pod list has arrived."""
        if not self.rt.pods.synced.is_set():
            return None
        if spec.namespace_selector is not None and self._namespaces is None:
            return None
        candidates = self.rt.pods.pods_in(selection.namespaces_of(spec, self.namespace, self._namespaces))
        selected = selection.pods_by_node(candidates, spec, self.namespace, self._namespaces)
        limit = self.rt.cfg.pods_per_trace
        pods, total = within_limit(selected, limit)
        self.pods_over_limit = (total, limit) if limit and total > limit else None
        return nodeconfig.entries_by_node(self.kind, self.namespace or "", self.name, self.uid, generation,
                                          spec.settings(), pods)

    async def _publish(self, desired: Mapping[str, NodeTrace]) -> float | None:
        """Write what changed; on failure, the seconds until the next try."""
        todo = nodeconfig.changes(desired, self.published)
        if not todo:
            return None
        async with self.lock:
            if self.closed:
                return None
            done, failed = await publish(self.rt, self.uid, todo)
        for node, entry in done.items():
            if entry is None:
                self.published.pop(node, None)
            else:
                self.published[node] = entry
        if failed:
            node, err = next(iter(failed.items()))
            return self._trouble.failed(RuntimeError(f"{len(failed)} nodes, e.g. {node}: {err}"))
        # A node whose Node object is missing got nothing: it is being re-created (a kubelet re-registering)
        # or its pods go soon (the pod garbage collector). Look again, with backoff, until one of them happens.
        absent = sorted(n for n, entry in done.items() if entry is None and todo[n] is not None)
        if absent:
            return self._trouble.failed(RuntimeError(f"{len(absent)} nodes do not exist (yet), e.g. {absent[0]}"))
        self._trouble.ok()
        self.log.debug("published trace to %d nodes (%d changed)", len(self.published), len(todo))
        return None

    async def _wait(self, stopped, timeout: float | None) -> None:
        waiters = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stopped.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._wake.clear()

    async def run(self, stopped, body: Mapping) -> None:
        """The daemon's body. `body` is kopf's live view of the trace (updated in place)."""
        cfg = self.rt.cfg
        self._seed()
        self.rt.workers.add(self)
        self.rt.pods.subscribe(self)
        generation, spec = None, None
        next_resync = 0.0  # list namespaces at once
        try:
            while not stopped:
                meta = body.get("metadata", {})
                if meta.get("generation") != generation:
                    generation = meta.get("generation")
                    next_resync = 0.0  # a new selection may name other namespaces
                # Every turn: acceptance also depends on the namespace's other traces. Refused, nothing stays
                # published (the status handlers report why).
                admitted = self.admitted()
                if admitted != spec:
                    if spec is None:
                        next_resync = 0.0
                    spec = admitted
                now = datetime.now(UTC)
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + cfg.resync_seconds
                    self._seed()  # drift repair: anything changed behind our back is rewritten
                    if (retry := await self._refresh_namespaces(spec)) is not None:
                        next_resync = time.monotonic() + retry
                active = spec is not None and not expired(spec, body, now)
                self._spec = spec if active else None
                desired = self.desired(spec, int(generation or 0)) if active else {}
                retry_in = await self._publish(desired) if desired is not None else None
                listed = self.rt.pods.synced.is_set()
                await self._wait(stopped, self._timeout(spec, body, next_resync, active, retry_in))
                # Let a burst of pod churn gather; but the first pod list is whole: publish it at once.
                if not stopped and listed:
                    await stopped.wait(cfg.debounce_seconds)
        finally:
            self.rt.workers.discard(self)
            self.rt.pods.unsubscribe(self)

    def _timeout(self, spec, body, next_resync: float, active: bool, retry_in: float | None) -> float:
        waits = [max(0.0, next_resync - time.monotonic())]
        if retry_in is not None:
            waits.append(retry_in)
        if active and spec is not None:
            end = specs.deadline(spec, start_time(body))
            if end is not None:
                waits.append(max(0.0, (end - datetime.now(UTC)).total_seconds()))
        return min(waits)
