"""`latencytrace-uninstall`: run by the chart's pre-delete hook so that `helm uninstall` leaves nothing
behind that only the operator could remove.

Helm deletes what it rendered, never what the operator made or added: the LatencyTraceNodes and the
operator's finalizer on users' LatencyTraces. Left alone, a LatencyTrace could then never be deleted
(its finalizer has no one to remove it) and the agents' per-node objects would linger. So, in order:
1. stop the operator (scale its Deployment to 0 and wait for its replicas to go), so that it cannot
   add a finalizer or publish a node's object again behind our back;
2. take the operator's finalizer (and only it) off every LatencyTrace and ClusterLatencyTrace; they stay,
   as Helm leaves every custom resource;
3. delete every LatencyTraceNode: each node's agent sees its object go and unloads its probes before
   Helm deletes the DaemonSet.
Each step is idempotent, so a hook retried after a failure finishes the job.
"""

from __future__ import annotations

import logging
import sys
import time

from kubernetes import client
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from latencytrace.node_agent.contract import GROUP, NODE_PLURAL, TRACE_KINDS, VERSION, TraceKind
from latencytrace.node_agent.envconfig import ConfigError, from_env
from latencytrace.node_agent.kube import api_client, or_none

FINALIZER = f"{GROUP}/finalizer"  # kopf's, as operator/main.py configures it
log = logging.getLogger("latencytrace.uninstall")


class UninstallConfig(BaseSettings):
    """LATENCYTRACE_UNINSTALL_*: which operator to stop first (both empty: none, e.g. operator.enabled off)."""

    model_config = SettingsConfigDict(env_prefix="LATENCYTRACE_UNINSTALL_", extra="ignore", frozen=True)
    kubeconfig: str | None = Field(default=None, validation_alias=AliasChoices("KUBECONFIG"))
    namespace: str = ""
    operator_deployment: str = ""
    stop_timeout_seconds: float = Field(default=120.0, gt=0)


def stop_operator(apps: client.AppsV1Api, namespace: str, deployment: str, timeout: float) -> None:
    if or_none(apps.read_namespaced_deployment, deployment, namespace) is None:
        return
    apps.patch_namespaced_deployment_scale(deployment, namespace, {"spec": {"replicas": 0}})
    deadline = time.monotonic() + timeout
    while True:
        dep = or_none(apps.read_namespaced_deployment, deployment, namespace)
        if dep is None or not (dep.status.replicas or 0):
            log.info("operator %s/%s stopped", namespace, deployment)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"operator {namespace}/{deployment} still has {dep.status.replicas} replicas "
                               f"after {timeout:.0f}s")
        time.sleep(1)


def remove_finalizers(custom: client.CustomObjectsApi) -> int:
    removed = 0
    for kind in TRACE_KINDS:
        for trace in custom.list_cluster_custom_object(GROUP, VERSION, kind.plural)["items"]:
            removed += _remove_finalizer(custom, kind, trace["metadata"])
    return removed


def _remove_finalizer(custom: client.CustomObjectsApi, kind: TraceKind, meta: dict) -> int:
    finalizers = meta.get("finalizers") or []
    if FINALIZER not in finalizers:
        return 0
    # A JSON patch that tests the list first: a concurrent change fails it rather than being lost.
    patch = [{"op": "test", "path": "/metadata/finalizers", "value": finalizers},
             {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != FINALIZER]}]
    json_patch = "application/json-patch+json"  # the client would send a merge patch by default
    if kind.namespaced:
        custom.patch_namespaced_custom_object(GROUP, VERSION, meta["namespace"], kind.plural, meta["name"], patch,
                                              _content_type=json_patch)
    else:
        custom.patch_cluster_custom_object(GROUP, VERSION, kind.plural, meta["name"], patch, _content_type=json_patch)
    return 1


def delete_node_objects(custom: client.CustomObjectsApi) -> int:
    names = [o["metadata"]["name"] for o in custom.list_cluster_custom_object(GROUP, VERSION, NODE_PLURAL)["items"]]
    for name in names:
        or_none(custom.delete_cluster_custom_object, GROUP, VERSION, NODE_PLURAL, name)
    return len(names)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = from_env(UninstallConfig)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    api = api_client(cfg.kubeconfig)
    try:
        if cfg.namespace and cfg.operator_deployment:
            stop_operator(client.AppsV1Api(api), cfg.namespace, cfg.operator_deployment, cfg.stop_timeout_seconds)
        custom = client.CustomObjectsApi(api)
        traces = remove_finalizers(custom)
        nodes = delete_node_objects(custom)
    except Exception as e:  # the hook's log is what the user sees when `helm uninstall` fails
        log.error("uninstall cleanup failed: %s", e)
        return 1
    log.info("finalizer removed from %d (Cluster)LatencyTraces; %d LatencyTraceNodes deleted", traces, nodes)
    return 0
