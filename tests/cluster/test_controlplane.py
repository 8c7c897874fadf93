"""The local control plane works as the project's tests need it to: nodes become
Ready, scheduled pods run with an IP, RBAC really denies, helm installs."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest

from .controlplane import ControlPlane, stop_from_state
from .procs import http_ok, listening_addresses

# Registers the fixtures unless tests/conftest.py already did (pytest loads a plugin
# once by name, so this never starts a second session control plane).
pytest_plugins = ["tests.cluster.fixtures"]


@pytest.fixture
def namespace(control_plane: ControlPlane):
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def nodes(control_plane: ControlPlane) -> list[str]:
    names = control_plane.create_fake_nodes(2, labels={"latencytrace.test/pool": "a"})
    yield names
    control_plane.kubectl("delete", "node", *names, "--wait=false")


def test_api_is_ready(control_plane: ControlPlane) -> None:
    assert control_plane.kubeconfig.exists()
    assert control_plane.api_url.startswith("https://127.0.0.1:")
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]


def test_everything_listens_on_loopback_only(control_plane: ControlPlane) -> None:
    for proc in control_plane._procs:
        addresses = listening_addresses(proc.pid)
        assert addresses, f"{proc.name} listens nowhere?"
        assert all(a.startswith("127.0.0.1:") for a in addresses), (proc.name, addresses)


def test_fake_nodes_become_ready(control_plane: ControlPlane, nodes: list[str]) -> None:
    for name in nodes:
        node = json.loads(control_plane.kubectl("get", "node", name, "-o", "json").stdout)
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
        assert node["metadata"]["labels"]["latencytrace.test/pool"] == "a"
        assert any(a["type"] == "InternalIP" for a in node["status"]["addresses"])


def test_scheduled_pod_runs_with_ip(control_plane: ControlPlane, nodes: list[str],
                                    namespace: str) -> None:
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probe", "namespace": namespace},
        # No nodeName: kube-scheduler must place it (only fake nodes exist).
        "spec": {"containers": [{"name": "c", "image": "example.invalid/probe:1"}],
                 "nodeSelector": {"latencytrace.test/pool": "a"}},
    }
    control_plane.kubectl("create", "-f", "-", input=json.dumps(pod))
    control_plane.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/probe",
                          "--timeout=60s", timeout=70)
    got = json.loads(control_plane.kubectl("get", "-n", namespace, "pod/probe", "-o",
                                           "json").stdout)
    assert got["spec"]["nodeName"] in nodes
    assert got["status"]["phase"] == "Running"
    assert got["status"]["podIP"]


def test_daemonset_lands_on_every_fake_node(control_plane: ControlPlane,
                                            nodes: list[str], namespace: str) -> None:
    ds = {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {"hostNetwork": True,
                         "nodeSelector": {"latencytrace.test/pool": "a"},
                         "containers": [{"name": "a", "image": "example.invalid/agent:1",
                                         "securityContext": {"privileged": True}}]},
            },
        },
    }
    control_plane.kubectl("create", "-f", "-", input=json.dumps(ds))
    control_plane.kubectl("rollout", "status", "-n", namespace, "daemonset/agent",
                          "--timeout=60s", timeout=70)
    pods = json.loads(control_plane.kubectl("get", "pods", "-n", namespace, "-l", "app=agent",
                                            "-o", "json").stdout)["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(nodes)
    # hostNetwork pods report their node's IP, as on a real node.
    assert all(p["status"]["podIP"] == p["status"]["hostIP"] for p in pods)


def test_rbac_denies_service_account(control_plane: ControlPlane, namespace: str) -> None:
    sa = f"system:serviceaccount:{namespace}:reader"
    control_plane.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    control_plane.kubectl("create", "role", "pod-reader", "-n", namespace,
                          "--verb=get,list,watch", "--resource=pods")
    control_plane.kubectl("create", "rolebinding", "reader", "-n", namespace,
                          "--role=pod-reader", f"--serviceaccount={namespace}:reader")

    def can(*args: str) -> str:
        # can-i exits 1 for "no"; the answer is on stdout either way.
        return control_plane.kubectl("auth", "can-i", f"--as={sa}", "-n", namespace, *args,
                                     check=False).stdout.strip()

    assert can("list", "pods") == "yes"
    assert can("delete", "pods") == "no"
    assert can("list", "secrets") == "no"
    assert can("list", "nodes") == "no"
    # Impersonated requests really are rejected by the apiserver, not only by can-i.
    allowed = control_plane.kubectl("get", "pods", "-n", namespace, f"--as={sa}")
    assert allowed.returncode == 0
    denied = control_plane.kubectl("create", "configmap", "x", "-n", namespace, f"--as={sa}",
                                   check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_helm_template_and_install(control_plane: ControlPlane, namespace: str,
                                   tmp_path: Path) -> None:
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(textwrap.dedent("""\
        apiVersion: v2
        name: hello
        version: 0.1.0
        kubeVersion: ">=1.30.0-0"
    """))
    (chart / "values.yaml").write_text("greeting: hi\n")
    (chart / "templates" / "configmap.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: {{ .Release.Name }}-greeting
        data:
          greeting: {{ .Values.greeting | quote }}
          kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}
    """))
    rendered = control_plane.helm("template", "demo", str(chart), "--set", "greeting=hello")
    assert "name: demo-greeting" in rendered.stdout and '"hello"' in rendered.stdout

    control_plane.helm("install", "demo", str(chart), "-n", namespace, "--wait",
                       "--timeout=60s")
    cm = json.loads(control_plane.kubectl("get", "configmap", "demo-greeting", "-n", namespace,
                                          "-o", "json").stdout)
    assert cm["data"]["greeting"] == "hi"
    # helm saw the real server version (the binaries are version-stamped).
    assert cm["data"]["kubeVersion"].startswith("v1.")
    releases = json.loads(control_plane.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [r["status"] for r in releases] == ["deployed"]
    control_plane.helm("uninstall", "demo", "-n", namespace, "--wait")


def test_own_instance_stops_cleanly(tmp_path: Path) -> None:
    """A second, minimal instance (no controllers, no kwok) next to the session one:
    stop() leaves no process and no listener behind."""
    cp = ControlPlane(tmp_path / "cp", with_controllers=False, with_kwok=False)
    with cp:
        pids = [p.pid for p in cp._procs]
        url = cp.api_url
        assert http_ok(f"{url}/readyz", cp._admin_tls)
        assert cp.state_file.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert not cp.state_file.exists()
    assert stop_from_state(tmp_path / "cp") == 0


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
