"""`latencytrace-operator`: the kopf handlers (wiring only; the work is in handlers.py) and `run()`.

Both kinds of trace (LatencyTrace, ClusterLatencyTrace) get the same handlers, stacked: the kind comes
from the resource kopf passes (contract.KIND_BY_PLURAL) and flows on as data.

Run with KUBECONFIG set outside a cluster. Settings: LATENCYTRACE_OPERATOR_* (config.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import threading
from datetime import UTC, datetime

import kopf

from latencytrace.node_agent.contract import (GROUP, KIND_BY_PLURAL, NODE_KIND, NODE_PLURAL, TRACE_KINDS, TRACE_PLURAL,
                                              VERSION)
from latencytrace.node_agent.kube import api_client

from . import aggregation, config, handlers, heap, leader
from .worker import Runtime

TRACES = [(GROUP, VERSION, kind.plural) for kind in TRACE_KINDS]
NAMESPACED_TRACE = (GROUP, VERSION, TRACE_PLURAL)
NODE = (GROUP, VERSION, NODE_PLURAL)


def for_each_kind(*decorators):
    """Apply each kopf decorator factory once per kind of trace."""
    def wrap(fn):
        for make in decorators:
            for res in TRACES:
                fn = make(*res)(fn)
        return fn
    return wrap

try:
    CONFIG = config.load()
except config.ConfigError as _e:
    sys.exit(f"latencytrace-operator: {_e}")


class DiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base in annotations, but none for LatencyTraceNodes. kopf builds one for every event of
    every resource it watches (a deep copy of the whole object, managed fields and status included, and a
    second copy of what is left) to find what changed for on.create/on.update handlers; LatencyTraceNodes
    have none here (an index and an event handler), so that copy was made for nothing, a thousand times
    while a trace is published to a thousand nodes."""

    def build(self, *, body, extra_fields=None):
        if body.get("kind") == NODE_KIND:
            return {}
        return super().build(body=body, extra_fields=extra_fields)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = DiffBase(prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # Kubernetes events for problems only
    settings.posting.reporting_component = "latencytrace-operator"
    settings.posting.reporting_instance = CONFIG.identity
    settings.posting.event_name_prefix = "latencytrace-"
    settings.watching.server_timeout = CONFIG.watch_timeout_seconds
    settings.watching.client_timeout = CONFIG.watch_timeout_seconds + 30
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = CONFIG.request_timeout_seconds
    # kopf retries a request that finds no API server (or a 5xx) over its error_backoffs, then gives up and
    # the operator exits. Its default (54 s in all) is shorter than an API server restart on a busy control
    # plane; these ride out some 4.5 minutes (4xx answers are never retried).
    settings.networking.error_backoffs = (1, 1, 2, 3, 5, 8, 13, 21, 30, 30, 30, 30, 30, 30, 30)
    settings.execution.max_workers = CONFIG.publish_concurrency
    # The CRDs are installed before the operator (Helm's crds/); not watching CRDs and namespaces
    # saves the permissions to do so.
    settings.scanning.disabled = True
    heap.configure()
    memo.runtime = Runtime.create(CONFIG, api_client(CONFIG.kubeconfig, CONFIG.publish_concurrency + 8))


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_) -> None:
    memo.runtime.close()


@for_each_kind(kopf.index)
def trace_uids(uid: str, **_) -> dict:
    return {uid: True}


@kopf.index(*NAMESPACED_TRACE)
def namespace_traces(namespace: str, name: str, uid: str, meta, **_) -> dict:
    """{namespace: (created, name, uid)} of every LatencyTrace: the per-namespace limit's order."""
    return {namespace: (meta.get("creationTimestamp") or "", name, uid)}


@kopf.index(*NODE)
def node_views(name: str, meta, spec, status, **_) -> dict:
    return aggregation.index_node(name, meta, spec, status)


def _trace(resource, body, uid: str, memo, node_views, namespace_traces) -> handlers.Trace:
    return handlers.Trace(KIND_BY_PLURAL[resource.plural], body, lambda: list(node_views.get(uid, [])),
                          lambda: handlers.rank(namespace_traces, body), getattr(memo, "worker", None))


@for_each_kind(kopf.on.create, lambda *res: kopf.on.update(*res, field="spec"), kopf.on.resume)
def accept(resource, body, status, uid: str, patch: kopf.Patch, memo: kopf.Memo, node_views: kopf.Index,
           namespace_traces: kopf.Index, **_) -> None:
    new, invalid = handlers.trace_status(_trace(resource, body, uid, memo, node_views, namespace_traces), status,
                                         CONFIG, datetime.now(UTC))
    patch.status.update(handlers.status_patch(status, new) or {})
    handlers.poke(memo)
    if invalid is not None:
        raise kopf.PermanentError(f"not accepted: {invalid}")


@for_each_kind(lambda *res: kopf.timer(*res, interval=CONFIG.status_interval_seconds,
                                       initial_delay=CONFIG.status_interval_seconds))
def refresh_status(resource, body, status, uid: str, patch: kopf.Patch, memo: kopf.Memo, node_views: kopf.Index,
                   namespace_traces: kopf.Index, **_) -> None:
    new, _ = handlers.trace_status(_trace(resource, body, uid, memo, node_views, namespace_traces), status,
                                   CONFIG, datetime.now(UTC))
    patch.status.update(handlers.status_patch(status, new) or {})
    if handlers.acceptance_changed(status, new):
        handlers.poke(memo)  # e.g. an older trace of the namespace was deleted: this one may trace now


@for_each_kind(kopf.daemon)
async def trace_worker(resource, stopped: kopf.DaemonStopped, body: kopf.Body, uid: str, memo: kopf.Memo,
                       node_views: kopf.Index, namespace_traces: kopf.Index, logger: logging.Logger, **_) -> None:
    await handlers.run_worker(memo.runtime, memo, stopped, _trace(resource, body, uid, memo, node_views,
                                                                  namespace_traces), logger)


@for_each_kind(kopf.on.delete)
async def detach(uid: str, memo: kopf.Memo, node_views: kopf.Index, **_) -> None:
    failed = await handlers.detach(memo.runtime, getattr(memo, "worker", None), uid, list(node_views.get(uid, [])))
    if failed:
        raise kopf.TemporaryError(f"could not detach from nodes {', '.join(failed[:5])}", delay=5)


@kopf.on.event(*NODE)
async def collect_orphans(type: str, name: str, spec, memo: kopf.Memo, trace_uids: kopf.Index, logger, **_) -> None:
    # Runs for every LatencyTraceNode event (a thousand while a trace is published to a thousand nodes):
    # the check stays on the event loop, and only a write, when there is an orphan, goes to a thread.
    memo.runtime.nodes.seen(name, exists=type != "DELETED")
    if type == "DELETED":
        memo.runtime.node_object_gone(name)
    if type != "DELETED" and spec and handlers.orphans(spec, trace_uids.__contains__):
        await asyncio.get_running_loop().run_in_executor(
            memo.runtime.pool, handlers.collect_orphans, memo.runtime.nodes, name, spec, trace_uids.__contains__,
            logger)


_RETRY = re.compile(r"Request attempt #(\d+)\S* failed; will retry")


def _first_attempt_only(record: logging.LogRecord) -> bool:
    """kopf logs every failed attempt of one request ("Request attempt #3/9 failed; will retry"): only the
    first passes; the outcome (success, or "escalating" after the last) is logged by kopf on its own."""
    m = _RETRY.match(record.getMessage())
    return m is None or m.group(1) == "1"


def run() -> int:
    """Entry point: wait for leadership (if enabled), then run kopf until SIGTERM or leadership loss."""
    logging.basicConfig(level=CONFIG.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if CONFIG.log_level != "DEBUG":  # kopf logs every timer run at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # An API server away for a while is one trouble, logged once: kopf logs each attempt of a request at
    # ERROR (urllib3's own retry warnings are quieted by api_client).
    for handler in logging.getLogger().handlers:
        handler.addFilter(_first_attempt_only)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    api = api_client(CONFIG.kubeconfig)
    with leader.leadership(api, CONFIG, stop) as leading:
        if leading is None:
            return 0  # asked to stop while waiting to lead
        asyncio.run(_operate(leading))
    return 1 if leading.lost.is_set() else 0


async def _operate(leading: leader.Leading) -> None:
    # An asyncio flag, not the threading one: kopf would wait for a thread blocked on the latter.
    stop_flag = asyncio.Event()
    loop = asyncio.get_running_loop()
    leading.on_lost(lambda: loop.call_soon_threadsafe(stop_flag.set))
    # Our identity, given: kopf would otherwise derive one from the user name, and the operator's image
    # runs as a UID with no passwd entry (getpass fails there).
    await kopf.operator(clusterwide=True, standalone=True, liveness_endpoint=CONFIG.liveness_endpoint,
                        identity=CONFIG.identity,
                        stop_flag=stop_flag)
