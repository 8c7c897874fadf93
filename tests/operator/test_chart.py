"""The Helm chart without a cluster: lint, values documented and schema-checked, and the rendered
workloads hardened as intended (see test_cluster_helm.py for the API server's view)."""

import json
import re

import pytest
import yaml

from .chart import CHART, CI_VALUES, find, helm, render


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_is_clean(values):
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in out.stdout and "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


def test_every_value_is_documented():
    """Each value has a `##` comment; a group (a key whose children are values) needs none, and the
    contents of a documented map value (resources, updateStrategy) are data."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, stack = [], []  # stack: (indent, documented) of the enclosing keys
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prev = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
        documented = prev.startswith("##")
        inside_value = any(doc for _, doc in stack)
        is_group = line.rstrip().endswith(":") and i + 1 < len(lines) and \
            len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
        if not documented and not is_group and not inside_value:
            undocumented.append(line.strip())
        stack.append((indent, documented))
    assert undocumented == []


def test_schema_covers_the_values_and_rejects_nonsense():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    for component in ("operator", "agent", "otlp"):
        assert set(values[component]) <= set(schema["properties"][component]["properties"])
    with pytest.raises(Exception) as e:
        render("--set", "agent.maxTargets=0")
    assert "maxTargets" in str(e.value.stderr)


def test_operator_is_locked_down():
    dep = find(render(), "Deployment", "-operator")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]
    env = {e["name"]: e for e in c["env"]}
    assert env["LATENCYTRACE_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_agent_has_what_it_needs_and_no_more():
    ds = find(render(), "DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["hostPID"] and pod["tolerations"] == [{"operator": "Exists"}]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]}
    assert not c["securityContext"]["privileged"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/btf", "/run/netns"):
        assert mounts[path]["readOnly"], path
    hostpaths = {v["name"]: v for v in pod["volumes"] if "hostPath" in v}
    assert all(mounts[m]["readOnly"] for m in mounts if any(m == v["hostPath"]["path"] for v in hostpaths.values()))
    env = {e["name"]: e for e in c["env"]}
    assert env["LATENCYTRACE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["resources"]["requests"] and c["resources"]["limits"]


def test_privileged_and_otlp_secret_are_opt_in():
    docs = render("-f", str(CHART / "ci" / "privileged-values.yaml"))
    [c] = find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["privileged"] and "capabilities" not in c["securityContext"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
    assert "/sys/kernel/debug" not in mounts and "/sys/kernel/tracing" not in mounts  # raw tracepoints need neither
    docs = render("-f", str(CHART / "ci" / "otlp-values.yaml"))
    [c] = find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {"name": "otlp-auth", "key": "headers"}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
    assert find(docs, "Deployment")["spec"]["replicas"] == 2
