"""The chart against a real API server: every CI values file validates server-side, install, upgrade
and uninstall work, the workloads look as intended, and RBAC grants exactly what each part needs."""

from __future__ import annotations

import pytest

from .chart import CHART, CI_VALUES
from .conftest import kget

pytest_plugins = ["tests.cluster.fixtures"]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_chart_validates_on_the_server(control_plane, crds, namespace, values):
    rendered = control_plane.helm("template", "lt", str(CHART), "-n", namespace, "-f", str(values)).stdout
    result = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    assert "(server dry run)" in result.stdout


# kwok plays pods without running them, so the pre-delete hook's Job would never complete here; the hook
# runs for real on the real node (tests/node/test_lifecycle.py).
NO_HOOKS = "--no-hooks"


@pytest.fixture
def release(control_plane, crds, fake_nodes, namespace):
    """(namespace, release name): names of cluster-scoped objects include the release, so one per test."""
    name = f"r{namespace[-6:]}"
    try:
        control_plane.helm("install", name, str(CHART), "-n", namespace, "--wait", "--timeout=90s")
        yield namespace, name
    finally:
        control_plane.helm("uninstall", name, "-n", namespace, "--wait", "--timeout=90s", NO_HOOKS, check=False)


def test_install_upgrade_uninstall(control_plane, release):
    ns, RELEASE = release
    dep = kget(control_plane, "-n", ns, "deployment", f"{RELEASE}-latencytrace-operator")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-latencytrace-operator"
    assert pod["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]
    ds = kget(control_plane, "-n", ns, "daemonset", f"{RELEASE}-latencytrace-agent")
    assert ds["spec"]["template"]["spec"]["hostPID"] is True
    assert ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] == \
        ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]

    control_plane.helm("upgrade", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout=90s",
                       "--set", "agent.intervalSeconds=3", "--set", "operator.replicas=2",
                       "--set", "otlp.endpoint=http://collector:4317")
    ds = kget(control_plane, "-n", ns, "daemonset", f"{RELEASE}-latencytrace-agent")
    env = {e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LATENCYTRACE_AGENT_INTERVAL_SECONDS"] == "3"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
    assert kget(control_plane, "-n", ns, "deployment", f"{RELEASE}-latencytrace-operator")["spec"]["replicas"] == 2
    history = control_plane.helm("history", RELEASE, "-n", ns, "-o", "json").stdout
    assert '"revision":2' in history.replace(" ", "")

    control_plane.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout=90s", NO_HOOKS)
    assert control_plane.kubectl("get", "-n", ns, "daemonset", f"{RELEASE}-latencytrace-agent",
                                 check=False).returncode != 0
    assert control_plane.kubectl("get", "clusterrole", f"{RELEASE}-latencytrace-agent", check=False).returncode != 0


def can(control_plane, release: tuple[str, str], sa: str, *args: str) -> bool:
    ns, name = release
    out = control_plane.kubectl("auth", "can-i", f"--as=system:serviceaccount:{ns}:{name}-latencytrace-{sa}",
                                *args, check=False).stdout.strip()
    return out == "yes"


OPERATOR_MAY = [
    ("watch", "latencytraces.latencytrace.io", "-A"),
    ("patch", "latencytraces.latencytrace.io", "-n", "anywhere"),
    ("patch", "latencytraces.latencytrace.io", "--subresource=status", "-n", "anywhere"),
    ("create", "latencytracenodes.latencytrace.io"),
    ("delete", "latencytracenodes.latencytrace.io"),
    ("watch", "pods", "-A"),
    ("list", "namespaces"),
    ("get", "nodes"),
    ("list", "nodes"),  # every Node's uid (metadata) in one request, for the LatencyTraceNodes' owner
    ("create", "events", "-n", "anywhere"),
]
OPERATOR_MAY_NOT = [
    ("create", "latencytraces.latencytrace.io", "-n", "anywhere"),
    ("delete", "latencytraces.latencytrace.io", "-n", "anywhere"),
    ("patch", "latencytracenodes.latencytrace.io", "--subresource=status"),  # the agents' part
    ("delete", "pods", "-n", "anywhere"),
    ("get", "secrets", "-n", "anywhere"),
    ("watch", "nodes"),
    ("watch", "namespaces"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
]
AGENT_MAY = [
    ("watch", "latencytracenodes.latencytrace.io"),
    ("get", "latencytracenodes.latencytrace.io"),
    ("patch", "latencytracenodes.latencytrace.io", "--subresource=status"),
]
AGENT_MAY_NOT = [
    ("update", "latencytracenodes.latencytrace.io"),  # the spec is the operator's
    ("create", "latencytracenodes.latencytrace.io"),
    ("delete", "latencytracenodes.latencytrace.io"),
    ("list", "latencytraces.latencytrace.io", "-A"),
    ("list", "pods", "-A"),
    ("get", "nodes"),
    ("get", "secrets", "-n", "anywhere"),
    ("create", "events", "-n", "anywhere"),
]


def test_rbac_is_least_privilege(control_plane, release):
    ns, name = release
    assert [a for a in OPERATOR_MAY if not can(control_plane, release, "operator", *a)] == []
    assert [a for a in OPERATOR_MAY_NOT if can(control_plane, release, "operator", *a)] == []
    assert [a for a in AGENT_MAY if not can(control_plane, release, "agent", *a)] == []
    assert [a for a in AGENT_MAY_NOT if can(control_plane, release, "agent", *a)] == []
    # Leader election: only the operator's own Lease, only in the release namespace.
    lease = f"leases.coordination.k8s.io/{name}-latencytrace-operator"
    assert can(control_plane, release, "operator", "update", lease, "-n", ns)
    assert not can(control_plane, release, "operator", "update", "leases.coordination.k8s.io/other", "-n", ns)
    assert not can(control_plane, release, "operator", "update", lease, "-n", "default")
    assert not can(control_plane, release, "agent", "update", lease, "-n", ns)
