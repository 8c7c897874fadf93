"""Install latencytrace into a running local control plane the way a user would, then run its
processes on this machine: the operator and one agent per fake node.

The CRDs are applied and the chart is installed with helm (so the Deployment, DaemonSet and RBAC exist
as in a real cluster); kwok only plays their pods. The real processes run here, configured with the
environment the chart renders for their containers, plus what a pod would get from Kubernetes itself
(its node name from the downward API, a kubeconfig in place of the in-cluster service account).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .controlplane import ControlPlane
from .procs import Proc, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "latencytrace"
BIN = Path(sys.executable).parent  # the venv's console scripts (never the repository on PYTHONPATH)
NAMESPACE = "latencytrace"
RELEASE = "latencytrace"


def apply_crds(cp: ControlPlane) -> None:
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/latencytraces.latencytrace.io", "crd/latencytracenodes.latencytrace.io")


def helm_install(cp: ControlPlane, values: dict) -> list[dict]:
    """`helm install` the chart; returns the rendered objects."""
    values_file = cp.workdir / "latencytrace-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    cp.kubectl("create", "namespace", NAMESPACE, check=False)
    cp.helm("upgrade", "--install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(values_file), "--wait=false")
    manifest = cp.helm("get", "manifest", RELEASE, "-n", NAMESPACE).stdout
    return [d for d in yaml.safe_load_all(manifest) if d]


def container_env(objects: list[dict], kind: str, downward: dict[str, str]) -> dict[str, str]:
    """The environment the chart gives the first container of the `kind` workload; `downward` answers
    its downward-API fields (metadata.name, metadata.namespace, spec.nodeName) as Kubernetes would."""
    obj = next(o for o in objects if o["kind"] == kind)
    env: dict[str, str] = {}
    for item in obj["spec"]["template"]["spec"]["containers"][0].get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif (field := item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")) in downward:
            env[item["name"]] = downward[field]
        # Secret references (OTLP headers) are left out: the local cluster's chart values set none.
    return env


def start(cp: ControlPlane, name: str, argv: list[str], env: dict[str, str]) -> Proc:
    base = cp.process_env(**env)
    base["KUBECONFIG"] = str(cp.kubeconfig)
    return Proc(name, argv, cp.workdir / "logs" / f"{name}.log", env=base, cwd=cp.workdir, die_with_parent=False)


def install(cp: ControlPlane, nodes: list[str], values: dict) -> list[Proc]:
    """CRDs, chart, operator and agents; returns the processes started (detached)."""
    apply_crds(cp)
    objects = helm_install(cp, values)
    operator_env = container_env(objects, "Deployment", {"metadata.namespace": NAMESPACE,
                                                         "metadata.name": "latencytrace-operator-local"})
    operator_env["LATENCYTRACE_OPERATOR_HEALTH_PORT"] = str(free_port())  # a host port, not a pod's
    procs = [start(cp, "latencytrace-operator", [str(BIN / "latencytrace-operator")], operator_env)]
    try:
        wait_until("operator leading", lambda: "leading (Lease" in procs[0].log.read_text(errors="replace"),
                   60, procs)
        for node in nodes:
            env = container_env(objects, "DaemonSet", {"metadata.namespace": NAMESPACE,
                                                       "metadata.name": f"latencytrace-agent-{node}",
                                                       "spec.nodeName": node})
            env["LATENCYTRACE_AGENT_HEALTH_PORT"] = "0"  # agents side by side on one host: any free port
            procs.append(start(cp, f"latencytrace-agent-{node}", [str(BIN / "latencytrace-agent"), "run"], env))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def record(cp: ControlPlane, procs: list[Proc], **extra) -> None:
    """Add processes (and anything else `down` must clean up) to the detached cluster's state."""
    state = json.loads(cp.state_file.read_text())
    state["procs"] += [{"name": p.name, "pid": p.pid, "exe": p.argv[0]} for p in procs]
    state.update(extra)
    cp.state_file.write_text(json.dumps(state, indent=2))
