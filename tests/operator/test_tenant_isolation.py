"""Tenant isolation on a real API server, with the real operator (a host process) and the chart's RBAC:

- who may create what: the chart's aggregated roles give a namespace's admins and editors the namespaced
  LatencyTrace and its viewers read access, in their namespace only, and nobody the ClusterLatencyTrace;
- a LatencyTrace asking for other namespaces is refused at admission (and by the operator, for objects
  written before the rule);
- what a trace selects: a LatencyTrace its own namespace's pods only, a ClusterLatencyTrace the pods of
  every namespace its namespaceSelector matches, each carried to the agents with its kind;
- each agent writes only its own node's LatencyTraceNode status (the chart's ValidatingAdmissionPolicy);
- the administrator's limits, enforced by the operator with a condition: traces per namespace, pods per
  trace, the cost knobs, export endpoints outside the allow-list, and the default duration applied to a
  trace without one.
"""

from __future__ import annotations

import json
import os

import pytest

from latencytrace.node_agent import contract
from tests.cluster.procs import Proc, free_port, wait_until

from .chart import CHART
from .conftest import BIN, kget

pytest_plugins = ["tests.cluster.fixtures"]

ALLOWED = "http://collector.team-a.svc:4317"
LIMITS = dict(LATENCYTRACE_OPERATOR_TRACES_PER_NAMESPACE="2", LATENCYTRACE_OPERATOR_PODS_PER_TRACE="2",
              LATENCYTRACE_OPERATOR_DEFAULT_DURATION_SECONDS="1800",
              LATENCYTRACE_OPERATOR_MIN_SLOW_THRESHOLD_MICROSECONDS="100",
              LATENCYTRACE_OPERATOR_MAX_SPANS_PER_SECOND="20", LATENCYTRACE_OPERATOR_MIN_SAMPLE_ONE_IN="1000",
              LATENCYTRACE_OPERATOR_ALLOWED_ENDPOINTS=json.dumps([ALLOWED]))


class Tenants:
    def __init__(self, cp, nodes, tag: str):
        self.cp, self.nodes, self.tag = cp, nodes, tag
        self.a, self.b = f"tenant-a-{tag}", f"tenant-b-{tag}"

    def pod(self, ns: str, name: str, node: str, labels: dict) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "example.invalid/app:1"}]}}
        self.cp.kubectl("create", "-f", "-", input=json.dumps(pod))

    def apply(self, kind: contract.TraceKind, name: str, spec: dict, ns: str | None = None, *as_user: str):
        meta = {"name": name, **({"namespace": ns} if ns else {})}
        body = {"apiVersion": contract.API_VERSION, "kind": kind.kind, "metadata": meta, "spec": spec}
        return self.cp.kubectl(*as_user, "apply", "-f", "-", input=json.dumps(body), check=False)

    def entries(self, kind: contract.TraceKind, name: str) -> dict[str, list[str]]:
        """{node: ["namespace/pod", ...]} of the trace's entries in every LatencyTraceNode."""
        out = {}
        for obj in kget(self.cp, contract.NODE_PLURAL)["items"]:
            for t in obj["spec"].get("traces", []):
                if t["name"] == name and t.get("kind") == kind.kind:
                    out[obj["metadata"]["name"]] = sorted(f"{p['namespace']}/{p['name']}" for p in t["pods"])
        return out

    def condition(self, kind: contract.TraceKind, name: str, ns: str | None, type_: str) -> dict:
        where = ("-n", ns) if ns else ()
        status = kget(self.cp, *where, kind.plural, name).get("status", {})
        return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


@pytest.fixture(scope="module")
def tenants(control_plane, crds, fake_nodes, tmp_path_factory):
    cp = control_plane
    tag = f"{os.getpid()}"
    t = Tenants(cp, fake_nodes, tag)
    release_ns = t.release_ns = f"lt-system-{tag}"
    for ns in (t.a, t.b, release_ns):
        cp.kubectl("create", "namespace", ns)
    tmp = tmp_path_factory.mktemp("tenants")
    release = f"t{tag}"
    cp.helm("install", release, str(CHART), "-n", release_ns, "--skip-crds")
    t.release = release
    t.pod(t.a, "web-1", fake_nodes[0], {"app": "web"})
    t.pod(t.a, "web-2", fake_nodes[1], {"app": "web"})
    t.pod(t.a, "web-3", fake_nodes[1], {"app": "web"})
    t.pod(t.b, "web-1", fake_nodes[0], {"app": "web"})
    t.operator = Proc("operator", [str(BIN / "latencytrace-operator")], tmp / "operator.log",
                      env=cp.process_env(LATENCYTRACE_OPERATOR_NAMESPACE=release_ns,
                                         LATENCYTRACE_OPERATOR_LEASE_NAME="tenant-operator",
                                         LATENCYTRACE_OPERATOR_IDENTITY="tenant-operator",
                                         LATENCYTRACE_OPERATOR_HEALTH_PORT=str(free_port()),
                                         LATENCYTRACE_OPERATOR_STATUS_INTERVAL_SECONDS="1",
                                         LATENCYTRACE_OPERATOR_DEBOUNCE_SECONDS="0.2", **LIMITS), cwd=tmp)
    try:
        wait_until("operator leading", lambda: "leading (Lease" in t.operator.log.read_text(), 60, [t.operator])
        # kopf lists and starts its watches a while after the Lease is won (a minute was seen on a loaded
        # machine with a busy API server): the tests start once it has handled a trace, created and deleted.
        assert t.apply(contract.NAMESPACED, "warm-up", {"podNames": ["web-1"], "duration": "1m"}, t.a).returncode == 0
        wait_until("the operator handling traces",
                   lambda: t.condition(contract.NAMESPACED, "warm-up", t.a, "Accepted").get("status") == "True",
                   180, [t.operator])
        cp.kubectl("delete", "lt", "warm-up", "-n", t.a, "--timeout=180s", timeout=200)
        yield t
    finally:
        for kind in contract.TRACE_KINDS:
            cp.kubectl("delete", kind.plural, "-A", "-l", f"tenant-test={tag}", "--wait=false", check=False)
        cp.kubectl("delete", "lt", "--all", "-n", t.a, "--timeout=60s", check=False)
        cp.kubectl("delete", "lt", "--all", "-n", t.b, "--timeout=60s", check=False)
        cp.kubectl("delete", "clt", "--all", "--timeout=60s", check=False)
        t.operator.stop()
        cp.helm("uninstall", release, "-n", release_ns, "--no-hooks", check=False)
        for ns in (t.a, t.b, release_ns):
            cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def as_user(name: str) -> tuple[str, ...]:
    return (f"--as={name}",)


def can(cp, user: str, *args: str) -> bool:
    return cp.kubectl("auth", "can-i", f"--as={user}", *args, check=False).stdout.strip() == "yes"


def test_namespace_roles_give_the_namespaced_kind_only(tenants):
    """The chart's aggregated ClusterRoles, through Kubernetes' own admin/edit/view roles bound per namespace."""
    cp, a, b = tenants.cp, tenants.a, tenants.b
    for user, role in (("alice", "admin"), ("erin", "edit"), ("victor", "view")):
        cp.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}", f"--user={user}", "-n", a)
    lt, clt = "latencytraces.latencytrace.io", "clusterlatencytraces.latencytrace.io"
    wait_until("aggregated into admin", lambda: can(cp, "alice", "create", lt, "-n", a), 30)
    for user in ("alice", "erin"):
        assert can(cp, user, "create", lt, "-n", a) and can(cp, user, "delete", lt, "-n", a)
        assert not can(cp, user, "create", lt, "-n", b)  # another tenant's namespace
        assert not can(cp, user, "create", clt) and not can(cp, user, "list", clt)
        assert not can(cp, user, "patch", lt, "--subresource=status", "-n", a)  # the operator's
    wait_until("aggregated into view", lambda: can(cp, "victor", "list", lt, "-n", a), 30)
    assert not can(cp, "victor", "create", lt, "-n", a) and not can(cp, "victor", "get", clt)
    # Nobody but an administrator, unless bound to the chart's cluster-tracer role.
    assert not can(cp, "mallory", "create", clt)
    cp.kubectl("create", "clusterrolebinding", f"carol-{tenants.tag}", f"--clusterrole={tenants.release}-latencytrace"
               "-cluster-tracer", "--user=carol")
    try:
        assert can(cp, "carol", "create", clt) and not can(cp, "carol", "create", lt, "-n", a)
    finally:
        cp.kubectl("delete", "clusterrolebinding", f"carol-{tenants.tag}")
    # For real: alice's namespaced trace is created, her cluster trace is forbidden.
    assert tenants.apply(contract.NAMESPACED, "by-alice", {"podNames": ["web-1"], "duration": "1m"}, a,
                         *as_user("alice")).returncode == 0
    out = tenants.apply(contract.CLUSTER, f"by-alice-{tenants.tag}", {"namespaceSelector": {}}, None,
                        *as_user("alice"))
    assert out.returncode != 0 and "forbidden" in out.stderr.lower()
    # This test is about who may do what; how deletion detaches is the end-to-end scenario's (the fixture
    # removes what is left).
    cp.kubectl("delete", "lt", "by-alice", "-n", a, "--wait=false")


def test_a_latencytrace_asking_for_other_namespaces_is_refused_at_admission(tenants):
    out = tenants.apply(contract.NAMESPACED, "everywhere", {"namespaceSelector": {}, "podSelector": {}}, tenants.a)
    assert out.returncode != 0
    assert "a LatencyTrace selects pods of its own namespace only" in out.stderr, out.stderr
    out = tenants.apply(contract.CLUSTER, f"names-{tenants.tag}", {"namespaceSelector": {}, "podNames": ["a"]})
    assert out.returncode != 0 and "podNames name pods of one namespace" in out.stderr, out.stderr


def test_a_latencytrace_selects_pods_of_its_own_namespace_only(tenants):
    t = tenants
    assert t.apply(contract.NAMESPACED, "web", {"podSelector": {"matchLabels": {"app": "web"}},
                                                "directions": ["receive"]}, t.b).returncode == 0
    wait_until("tenant b's trace published", lambda: t.entries(contract.NAMESPACED, "web") != {}, 30, [t.operator])
    # Tenant b has one pod labelled app=web; tenant a's pods with the same label are not selected.
    assert t.entries(contract.NAMESPACED, "web") == {t.nodes[0]: [f"{t.b}/web-1"]}


def test_a_cluster_trace_selects_across_namespaces_and_carries_its_kind(tenants):
    t = tenants
    name = f"all-web-{t.tag}"
    spec = {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                                       "values": [t.a, t.b]}]},
            "podSelector": {"matchLabels": {"app": "web"}}, "duration": "10m"}
    assert t.apply(contract.CLUSTER, name, spec).returncode == 0
    # Four pods selected, two traced: the cluster's pods-per-trace limit (first by namespace and name).
    wait_until("cluster trace published", lambda: sum(map(len, t.entries(contract.CLUSTER, name).values())) == 2,
               30, [t.operator])
    assert t.entries(contract.CLUSTER, name) == {t.nodes[0]: [f"{t.a}/web-1"], t.nodes[1]: [f"{t.a}/web-2"]}
    entry = next(e for o in kget(t.cp, contract.NODE_PLURAL)["items"] for e in o["spec"]["traces"] if e["name"] == name)
    assert (entry["kind"], entry["namespace"]) == ("ClusterLatencyTrace", "")
    wait_until("pod limit reported", lambda: t.condition(contract.CLUSTER, name, None, "Degraded").get("reason")
               == "PodLimitExceeded", 30, [t.operator])
    assert "4 pods selected; this cluster traces at most 2 per trace" in \
        t.condition(contract.CLUSTER, name, None, "Degraded")["message"]
    assert t.cp.kubectl("get", "clt", name).stdout.split("\n")[0].split()[:2] == ["NAME", "PHASE"]


@pytest.mark.parametrize("spec, fragment", [
    ({"slowThresholdMicroseconds": 50}, "spec.slowThresholdMicroseconds: 50 is below this cluster's minimum (100)"),
    ({"spansPerSecond": 100}, "spec.spansPerSecond: 100 is above this cluster's maximum (20)"),
    ({"sampleOneIn": 10}, "spec.sampleOneIn: 1 in 10 is more often than this cluster allows"),
    ({"export": {"otlpEndpoint": "http://169.254.169.254:80"}},
     "'http://169.254.169.254:80' is not an endpoint this cluster's administrator allows"),
])
def test_what_the_administrator_does_not_allow_is_refused_with_a_condition(tenants, spec, fragment):
    t = tenants
    name = f"over-{abs(hash(fragment)) % 10_000}"
    assert t.apply(contract.NAMESPACED, name, {"podNames": ["web-1"], "spansPerSecond": 5, **spec}, t.a).returncode == 0
    try:
        wait_until("refused", lambda: t.condition(contract.NAMESPACED, name, t.a, "Accepted").get("reason")
                   == "NotAllowed", 30, [t.operator])
        assert fragment in t.condition(contract.NAMESPACED, name, t.a, "Accepted")["message"]
        ready = t.condition(contract.NAMESPACED, name, t.a, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "NotAllowed") and fragment in ready["message"]
        assert t.entries(contract.NAMESPACED, name) == {}  # nothing reaches an agent
    finally:
        t.cp.kubectl("delete", "lt", name, "-n", t.a, "--timeout=60s")


def test_allowed_endpoint_default_duration_and_traces_per_namespace(tenants):
    t = tenants
    first = {"podNames": ["web-1"], "spansPerSecond": 5, "export": {"otlpEndpoint": ALLOWED}}
    assert t.apply(contract.NAMESPACED, "first", first, t.a).returncode == 0
    wait_until("first published", lambda: t.entries(contract.NAMESPACED, "first") != {}, 30, [t.operator])
    # No duration given: the cluster's default (30m), never "until deleted". (The status is a write of its
    # own, which may land after the entries.)
    default = "completes 30m after it started (the cluster's default duration)"
    wait_until("first's Completed condition", lambda: t.condition(contract.NAMESPACED, "first", t.a, "Completed").get(
        "message") == default, 30, [t.operator])
    assert t.apply(contract.NAMESPACED, "second", {"podNames": ["web-2"], "spansPerSecond": 5}, t.a).returncode == 0
    assert t.apply(contract.NAMESPACED, "third", {"podNames": ["web-3"], "spansPerSecond": 5}, t.a).returncode == 0
    wait_until("third refused", lambda: t.condition(contract.NAMESPACED, "third", t.a, "Accepted").get("reason")
               == "TooManyTraces", 30, [t.operator])
    assert t.entries(contract.NAMESPACED, "third") == {}
    assert t.entries(contract.NAMESPACED, "second") != {} or wait_until(
        "second published", lambda: t.entries(contract.NAMESPACED, "second") != {}, 30, [t.operator]) is None
    # Deleting an older one lets the waiting trace start.
    t.cp.kubectl("delete", "lt", "first", "-n", t.a, "--timeout=60s")
    wait_until("third published", lambda: t.entries(contract.NAMESPACED, "third") != {}, 30, [t.operator])
    # Its status and its entries are two writes of their own (kopf patches the status after the handler that
    # pokes the worker returns; the worker publishes from the pod cache at once): either may land first.
    wait_until("third accepted", lambda: t.condition(contract.NAMESPACED, "third", t.a, "Accepted").get("status")
               == "True", 30, [t.operator])


def test_an_agent_writes_only_its_own_nodes_status(tenants, control_plane):
    """The chart's ValidatingAdmissionPolicy: node A's agent identity (the agent's service account, with a token
    bound to its pod on node A, as the kubelet mounts it) may patch node A's LatencyTraceNode status and is
    refused on node B's."""
    import base64
    import ssl
    import urllib.error
    import urllib.request

    from tests.cluster.controlplane import run_tool

    cp, ns = control_plane, tenants.release_ns
    node_a, node_b = cp.create_fake_nodes([f"vap-{tenants.tag}-a", f"vap-{tenants.tag}-b"])
    sa = f"{tenants.release}-latencytrace-agent"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-a", "namespace": ns},
           "spec": {"nodeName": node_a, "serviceAccountName": sa, "automountServiceAccountToken": False,
                    "containers": [{"name": "agent", "image": "example.invalid/agent:1"}]}}
    cp.kubectl("create", "-f", "-", input=json.dumps(pod))
    for node in (node_a, node_b):
        body = {"apiVersion": contract.API_VERSION, "kind": contract.NODE_KIND, "metadata": {"name": node},
                "spec": contract.NodeSpec(node_name=node).wire()}
        cp.kubectl("create", "-f", "-", input=json.dumps(body))
    try:
        token = cp.kubectl("create", "token", sa, "-n", ns, "--bound-object-kind=Pod",
                           "--bound-object-name=agent-a").stdout.strip()
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["kubernetes.io"]["node"]["name"] == node_a  # the node claim the policy compares
        env = {**cp.env(), "KUBECONFIG": os.devnull}
        agent = [str(cp.bins["kubectl"]), f"--server={cp.api_url}", f"--certificate-authority={cp.pki.ca.cert}",
                 f"--token={token}"]
        tls = ssl.create_default_context(cafile=str(cp.pki.ca.cert))

        def patch(node: str) -> tuple[int, str]:
            """A status patch as the agent sends it (a merge patch of the status subresource, no read first)."""
            req = urllib.request.Request(
                f"{cp.api_url}/apis/{contract.API_VERSION}/{contract.NODE_PLURAL}/{node}/status",
                json.dumps({"status": {"agentVersion": "test"}}).encode(), method="PATCH",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"})
            try:
                with urllib.request.urlopen(req, context=tls, timeout=30) as resp:
                    return resp.status, ""
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert patch(node_a)[0] == 200
        code, why = patch(node_b)
        assert code == 403
        assert f"a latencytrace agent writes only its own node's LatencyTraceNode: this one is {node_b}, the agent " \
               f"runs on {node_a}" in why, why
        assert kget(cp, contract.NODE_PLURAL, node_b).get("status", {}).get("agentVersion") != "test"
        # RBAC alone would allow it: the refusal is the policy's, not a missing permission.
        assert run_tool([*agent, "auth", "can-i", "patch", f"{contract.NODE_PLURAL}/{node_b}", "--subresource=status"],
                        env, check=False).stdout.strip() == "yes"
    finally:
        cp.kubectl("delete", contract.NODE_PLURAL, node_a, node_b, "--wait=false", check=False)
        cp.kubectl("delete", "pod", "agent-a", "-n", ns, "--wait=false", check=False)
        cp.kubectl("delete", "node", node_a, node_b, "--wait=false", check=False)


def test_the_static_limits_are_refused_at_apply_time(tenants, control_plane):
    """The chart's trace-limits ValidatingAdmissionPolicy, rendered with stricter limits: `kubectl apply` of
    a trace asking for a longer duration, a lower slow threshold, a higher span rate, more frequent
    sampling or segments other than allowed (or not saying which) fails with the reason, for both kinds; a
    trace within the limits is created; a trace written before the policy (over its limits now) still takes
    writes that leave its spec alone (the operator's finalizer and annotations), and only those."""
    from .chart import render

    cp, t = control_plane, tenants
    name = f"limits-{t.tag}"
    docs = render("--show-only", "templates/trace-limits-policy.yaml", "--set", "limits.maxDurationSeconds=3600",
                  "--set", "limits.minSlowThresholdMicroseconds=100", "--set", "limits.maxSpansPerSecond=20",
                  "--set", "limits.minSampleOneIn=1000", "--set", "limits.minTimeOneIn=8",
                  "--set", "limits.segments={rx_host_to_pod,rx_socket_queue,rx_total}")
    for d in docs:
        d["metadata"]["name"] = name
        if d["kind"] == "ValidatingAdmissionPolicyBinding":
            d["spec"]["policyName"] = name
    old = {"podNames": ["web-1"], "duration": "2h"}  # written before the policy: over its maxima (and timing every packet)
    labels = {"tenant-test": t.tag}

    def apply(kind, trace: str, spec: dict, ns: str | None = None, *flags: str):
        meta = {"name": trace, "labels": labels, **({"namespace": ns} if ns else {})}
        body = {"apiVersion": contract.API_VERSION, "kind": kind.kind, "metadata": meta, "spec": spec}
        return cp.kubectl("apply", *flags, "-f", "-", input=json.dumps(body), check=False)

    assert apply(contract.NAMESPACED, "before-policy", old, t.a).returncode == 0
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    try:
        wait_until("the policy in force", lambda: apply(contract.NAMESPACED, "probe", {
            "podNames": ["web-1"], "duration": "2h"}, t.a, "--dry-run=server").returncode != 0, 60)
        refused = {
            "spec.duration: 2h is longer than this cluster allows (3600s)": {"duration": "2h"},
            "spec.slowThresholdMicroseconds: 5 is below this cluster's minimum (100)": {"slowThresholdMicroseconds": 5},
            "spec.spansPerSecond: 50 is above this cluster's maximum (20)": {"spansPerSecond": 50},
            "spec.sampleOneIn: 1 in 10 is more often than this cluster allows (0, or at least 1000)": {"sampleOneIn": 10},
            "spec.timeOneIn: timing 1 packet in 4 is more often than this cluster allows (at least 1 in 8)":
                {"timeOneIn": 4},
            # the schema's default (every packet timed) is checked as if written
            "spec.timeOneIn: timing 1 packet in 1 is more often": {},
            "spec.segments: rx_irq not allowed: this cluster allows traces only rx_host_to_pod, rx_socket_queue, "
            "rx_total": {"segments": ["rx_total", "rx_irq"], "timeOneIn": 8},
            # no list asks for every segment
            "spec.segments: list the segments to trace: this cluster allows": {"segments": None, "timeOneIn": 8},
        }
        for why, extra in refused.items():
            spec = {"podNames": ["web-1"], "segments": ["rx_total"], **extra}
            spec = {k: v for k, v in spec.items() if v is not None}
            out = apply(contract.NAMESPACED, "over", spec, t.a)
            assert out.returncode != 0 and why in out.stderr and name in out.stderr, (extra, out.stderr)
        out = apply(contract.CLUSTER, "over", {"namespaceSelector": {}, "segments": ["rx_total"], "spansPerSecond": 50})
        assert out.returncode != 0 and "spec.spansPerSecond: 50 is above" in out.stderr, out.stderr
        within = {"podNames": ["web-1"], "duration": "1h", "slowThresholdMicroseconds": 100, "spansPerSecond": 20,
                  "sampleOneIn": 1000, "timeOneIn": 8, "segments": ["rx_total", "rx_socket_queue"]}
        assert apply(contract.NAMESPACED, "within", within, t.a).returncode == 0
        # The trace from before the policy: its metadata can be written (as the operator writes its finalizer
        # and annotations), its spec only back within the limits.
        cp.kubectl("annotate", "-n", t.a, "lt", "before-policy", f"latencytrace.io/test={t.tag}")
        cp.kubectl("label", "-n", t.a, "lt", "before-policy", "more=labels")
        out = apply(contract.NAMESPACED, "before-policy", {**old, "spansPerSecond": 5}, t.a)
        assert out.returncode != 0 and "spec.duration: 2h is longer" in out.stderr, out.stderr
        assert apply(contract.NAMESPACED, "before-policy", {**old, "duration": "30m", "timeOneIn": 8,
                                                            "segments": ["rx_total"]}, t.a).returncode == 0
    finally:
        cp.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False)
        for trace in ("before-policy", "within"):
            cp.kubectl("delete", "-n", t.a, "lt", trace, "--wait=false", check=False)
