"""The Helm chart without a cluster: lint, values documented and schema-checked, and the rendered
workloads hardened as intended (see test_cluster_helm.py for the API server's view)."""

import json
import re

import pytest
import yaml

from latencytrace.node_agent import health, probes, segments
from latencytrace.operator.config import OperatorConfig

from . import chartdoc
from .chart import CHART, CI_VALUES, find, helm, render


def test_the_ci_combinations_are_there():
    assert {p.name for p in CI_VALUES} >= {"default-values.yaml", "operator-only-values.yaml", "otlp-values.yaml",
                                           "privileged-values.yaml"}


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_is_clean(values):
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in out.stdout and "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


def leaves(data: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        path = f"{prefix}{k}"
        out += leaves(v, path + ".") if isinstance(v, dict) and v else [path]
    return out


def test_every_value_is_documented():
    """Each value has a `##` comment; a group (a key whose children are values) needs none, and the
    contents of a documented map value (resources, updateStrategy) are data."""
    text = (CHART / "values.yaml").read_text()
    parsed = chartdoc.parse(text)
    assert parsed.undocumented == []
    documented = {v.path for v in parsed.values}
    # Every leaf of values.yaml is a documented value or inside one: the parser missed nothing.
    missed = [p for p in leaves(yaml.safe_load(text))
              if not any(p == d or p.startswith(d + ".") for d in documented)]
    assert missed == []
    assert {"agent.health.port", "agent.readinessProbe", "operator.healthPort", "otlp.endpoint"} <= documented


def test_undocumented_values_are_found():
    parsed = chartdoc.parse("## doc\na: 1\nb: 2\ngroup:\n  ## doc\n  c: 3\n  d: []\n")
    assert [v.path for v in parsed.values] == ["a", "group.c"] and parsed.undocumented == ["b", "group.d"]


def test_readme_values_table_is_generated_from_values_yaml():
    readme = (CHART / "README.md").read_text()
    assert chartdoc.generated_readme(readme, (CHART / "values.yaml").read_text()) == readme, \
        "run python -m tests.operator.chartdoc"
    assert "| `agent.health.port` | `9847` |" in readme
    assert "/sys/kernel/debug" not in readme  # no template mounts it


def test_schema_covers_the_values_and_rejects_nonsense():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    for component in ("operator", "agent", "otlp"):
        assert set(values[component]) <= set(schema["properties"][component]["properties"])
    with pytest.raises(Exception) as e:
        render("--set", "agent.maxTargets=0")
    assert "maxTargets" in str(e.value.stderr)


def test_allowed_segments_reach_the_operator_and_the_schema_knows_every_segment():
    """limits.segments: the schema takes the segment table's names only (segments.py is the one table), and
    the operator gets them as its setting; by default no setting (every segment allowed)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["limits"]["properties"]["segments"]["items"]["enum"] == list(segments.NAMES)
    dep = find(render("--set", "limits.segments={rx_total,rx_socket_queue}"), "Deployment", "-operator")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    cfg = OperatorConfig(allowed_segments=json.loads(env["LATENCYTRACE_OPERATOR_ALLOWED_SEGMENTS"]))
    assert cfg.limits().allowed_segments == {"rx_total", "rx_socket_queue"}
    [c] = find(render(), "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    assert "LATENCYTRACE_OPERATOR_ALLOWED_SEGMENTS" not in {e["name"] for e in c["env"]}
    with pytest.raises(Exception) as e:
        render("--set", "limits.segments={rx_nope}")
    assert "/limits/segments/0" in str(e.value.stderr)


def test_the_values_example_of_allowed_segments_keeps_the_node_wide_hooks_off():
    """values.yaml's example for limits.segments is the set the benchmark's lean arms measure
    (tests/bench/overhead.LEAN_SEGMENTS), and it needs none of the hooks its comment says it keeps off."""
    from tests.bench.overhead import LEAN_SEGMENTS

    comment = (CHART / "values.yaml").read_text().split("\n  segments: []")[0].rsplit("## Segments a trace", 1)[1]
    [example] = re.findall(r"E\.g\. \[([^]]+)\]", " ".join(comment.replace("##", " ").split()))
    assert tuple(example.split(", ")) == LEAN_SEGMENTS
    on = {p.tracepoint for p in probes.PROBES if probes.needed(p, segments.mask(list(LEAN_SEGMENTS)))}
    node_wide = {p.tracepoint for p in probes.PROBES if p.tracepoint.split(":")[0] in ("irq", "raw_syscalls")}
    assert node_wide and not on & node_wide
    assert not on & {"net:net_dev_start_xmit", "net:net_dev_xmit", "skb:consume_skb"}
    assert len({p.program for p in probes.PROBES if p.tracepoint in on}) == 7


def test_operator_is_locked_down():
    dep = find(render(), "Deployment", "-operator")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    env = {e["name"]: e for e in c["env"]}
    assert env["LATENCYTRACE_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_operator_probes_ask_the_operators_health_endpoint():
    dep = find(render("--set", "operator.healthPort=8181"), "Deployment", "-operator")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    cfg = OperatorConfig(health_port=int(env["LATENCYTRACE_OPERATOR_HEALTH_PORT"]))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        # What kopf (and the standby server) serve: that path, on the port the operator is told to use.
        assert f"http://{cfg.health_host}:{ports[get['port']]}{get['path']}" == cfg.liveness_endpoint, probe
        assert "host" not in get  # the pod's own IP: the operator is not on the host network


def host_mounts(pod: dict) -> dict[str, bool]:
    """Each host path the agent container mounts, and whether read-only."""
    [c] = pod["containers"]
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    return {hostpaths[m["name"]]: m.get("readOnly", False) for m in c["volumeMounts"] if m["name"] in hostpaths}


def test_agent_probes_reach_its_health_endpoint_on_loopback():
    ds = find(render("--set", "agent.health.port=9999"), "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["hostNetwork"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert (env["LATENCYTRACE_AGENT_HEALTH_PORT"], env["LATENCYTRACE_AGENT_HEALTH_ADDRESS"]) == ("9999", "127.0.0.1")
    assert c["ports"] == [{"name": "health", "containerPort": 9999, "protocol": "TCP"}]
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert (get["host"], get["port"]) == ("127.0.0.1", "health"), probe
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/startupz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    # Routes the agent serves: the chart asks for nothing the agent does not answer.
    assert set(paths.values()) == set(health.ROUTES)
    # Generous start: the kubelet waits minutes for the first BCC compile before it restarts anything.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}
    [c6] = find(render("--set", "agent.health.address=::"), "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert c6["livenessProbe"]["httpGet"]["host"] == "::1"
    with pytest.raises(Exception) as e:
        render("--set", "agent.health.address=10.0.0.1")  # the probes could not reach it on loopback
    assert "address" in str(e.value.stderr)


def test_agent_has_what_it_needs_and_no_more():
    ds = find(render(), "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["hostPID"] and pod["tolerations"] == [{"operator": "Exists"}]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]}
    assert not c["securityContext"]["privileged"]
    assert host_mounts(pod) == {"/sys/kernel/btf": True, "/run/netns": True}  # host path -> read-only
    env = {e["name"]: e for e in c["env"]}
    assert env["LATENCYTRACE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["resources"]["requests"] and c["resources"]["limits"]


def test_privileged_and_otlp_secret_are_opt_in():
    docs = render("-f", str(CHART / "ci" / "privileged-values.yaml"))
    [c] = find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["privileged"] and "capabilities" not in c["securityContext"]
    # Raw tracepoints need neither debugfs nor tracefs; every host path is read-only.
    assert host_mounts(find(docs, "DaemonSet")["spec"]["template"]["spec"]) == {
        "/sys/kernel/btf": True, "/run/netns": True, "/lib/modules": True, "/usr/src": True}
    docs = render("-f", str(CHART / "ci" / "otlp-values.yaml"))
    [c] = find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {"name": "otlp-auth", "key": "headers"}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
    assert find(docs, "Deployment")["spec"]["replicas"] == 2
