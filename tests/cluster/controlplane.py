"""A real, local Kubernetes control plane for tests: etcd, kube-apiserver with real
RBAC, optionally kube-controller-manager + kube-scheduler, and kwok playing the
kubelet for fake Nodes. Everything listens on 127.0.0.1 only, on free ports, with
its state, logs and certificates under one work directory.

    with ControlPlane(tmp_path) as cp:
        cp.create_fake_nodes(2)
        cp.kubectl("get", "nodes")
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from . import versions
from .kubeconfig import write_kubeconfig
from .pki import PKI, CertPair
from .procs import Proc, free_port, http_get, http_ok, insecure_tls, stop_group, wait_until

HERE = Path(__file__).resolve().parent
KWOK_STAGES = HERE / "kwok-stages.yaml"

# Addresses that only ever appear inside API objects; nothing listens on or routes
# to them. Pod and node IPs come from the RFC 2544 benchmarking range so they can
# never collide with (or be mistaken for) a real private network.
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "198.18.0.0/16"
NODE_IP_PREFIX = "198.19"

# kwok manages exactly the Nodes carrying this annotation (kwok's own convention).
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

ADMIN_USER = "latencytrace-admin"
START_ATTEMPTS = 3


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\nstdout:\n{self.stdout or ''}\n"
                f"stderr:\n{self.stderr or ''}")


def run_tool(argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str], *,
             check: bool = True, input: str | None = None,
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in argv]
    result = subprocess.run(argv, env=dict(env), input=input, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CommandError(result.returncode, argv, result.stdout, result.stderr)
    return result


class ControlPlane:
    """One control plane. start() brings it up (building binaries on first use) and
    stop() tears it down; both are safe to call more than once.

    with_controllers: also run kube-controller-manager (all default controllers:
      serviceaccount(-token), namespace, garbagecollector, daemonset, deployment,
      replicaset, nodelifecycle, ...) and kube-scheduler. Without it nothing creates
      the "default" ServiceAccounts, so pods need an existing ServiceAccount, and
      nothing schedules pods (set spec.nodeName yourself).
    with_kwok: run kwok so Nodes from create_fake_nodes() become Ready and pods
      bound to them become Running with a pod IP.
    detach: leave the servers running when this Python process exits (used by
      `python -m tests.cluster up`); stop later with stop_from_state(workdir).
    node_ip: serve on this address instead of loopback (a real node's kubelet and its pods reach the
      API server there; kubelets refuse a loopback node IP), and publish it as the endpoint of the
      `kubernetes` Service so that in-cluster clients find the API server through kube-proxy.
      The address must exist on this machine before start() (tests/cluster/node.py makes it).
    apiserver_args: extra kube-apiserver flags (e.g. --watch-cache=false, so that
      watches are served by etcd itself and an etcd compaction expires them).
    """

    def __init__(self, workdir: str | os.PathLike[str], with_controllers: bool = True,
                 with_kwok: bool = True, *, with_scheduler: bool | None = None,
                 detach: bool = False, startup_timeout: float = 120.0,
                 node_ip: str | None = None, apiserver_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir).resolve()
        self.node_ip = node_ip
        self.with_controllers = with_controllers
        self.with_scheduler = with_controllers if with_scheduler is None else with_scheduler
        self.with_kwok = with_kwok
        self.detach = detach
        self.startup_timeout = startup_timeout
        self.apiserver_args = tuple(apiserver_args)
        self.bins: dict[str, Path] = {}
        self.ports: dict[str, int] = {}
        # Set by _make_pki() at start():
        self.pki: PKI
        self.serving: CertPair
        self.sa_keys: CertPair
        self.kubelet_client: CertPair
        self._admin_tls: ssl.SSLContext
        self._procs: list[Proc] = []
        self._next_node = 0
        self._atexit_registered = False

    # ---- public surface -------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """Admin (system:masters) kubeconfig; certificates embedded."""
        return self.workdir / "kubeconfig"

    @property
    def api_host(self) -> str:
        return self.node_ip or "127.0.0.1"

    @property
    def api_url(self) -> str:
        return f"https://{self.api_host}:{self.ports['apiserver']}"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    def env(self) -> dict[str, str]:
        """Environment for running other clients (kubectl, helm, the operator)
        against this cluster; helm's dirs are kept inside the work dir."""
        helm = self.workdir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(helm / "cache"),
            "HELM_CONFIG_HOME": str(helm / "config"),
            "HELM_DATA_HOME": str(helm / "data"),
        }

    def process_env(self, **extra: str) -> dict[str, str]:
        """Environment for the project's own processes (operator, agents) against this cluster: never the
        repository on PYTHONPATH (its operator/ folder would shadow the standard library's `operator`)."""
        env = {k: v for k, v in self.env().items() if k != "PYTHONPATH"}
        env.update(extra)
        return env

    def kubectl(self, *args: str | os.PathLike[str], check: bool = True, input: str | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Runs the pinned kubectl as cluster admin; output captured as text."""
        return run_tool([self._tool("kubectl"), *args], self.env(), check=check, input=input,
                        timeout=timeout)

    def helm(self, *args: str | os.PathLike[str], check: bool = True, input: str | None = None,
             timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Runs the pinned helm against this cluster (built on first use)."""
        return run_tool([self._tool("helm"), *args], self.env(), check=check, input=input,
                        timeout=timeout)

    def compact_etcd(self) -> int:
        """Compacts etcd's history up to its current revision (through etcd's JSON gateway, as
        `etcdctl compact` does): every older resourceVersion is gone from then on. Returns the revision."""
        base = f"http://127.0.0.1:{self.ports['etcd']}/v3/kv"
        rev = int(_post_json(f"{base}/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        _post_json(f"{base}/compaction", {"revision": str(rev), "physical": True})
        return rev

    def create_fake_nodes(self, names_or_count: int | Iterable[str],
                          labels: Mapping[str, str] | None = None, *,
                          taints: Sequence[Mapping[str, str]] = (), wait_ready: bool = True,
                          timeout: float = 60.0) -> list[str]:
        """Creates Nodes that kwok manages; returns their names. An int makes
        kwok-node-<i> names. Each gets a unique InternalIP and generous capacity.
        With wait_ready (needs with_kwok), returns once every node is Ready."""
        if isinstance(names_or_count, int):
            names = [f"kwok-node-{self._next_node + i}" for i in range(names_or_count)]
        else:
            names = list(names_or_count)
        items = []
        for name in names:
            index = self._next_node
            self._next_node += 1
            items.append(_fake_node(name, _node_ip(index), labels or {}, taints))
        self.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                            "items": items}))
        if wait_ready and names:
            if not self.with_kwok:
                raise ValueError("wait_ready needs with_kwok=True (kwok makes nodes Ready)")
            self.kubectl("wait", "--for=condition=Ready", f"--timeout={int(timeout)}s",
                         *[f"node/{n}" for n in names], timeout=timeout + 10)
        return names

    def start(self) -> ControlPlane:
        if self._procs:
            return self
        tools = ["etcd", "kube-apiserver", "kubectl"]
        if self.with_controllers:
            tools.append("kube-controller-manager")
        if self.with_scheduler:
            tools.append("kube-scheduler")
        if self.with_kwok:
            tools.append("kwok")
        self.bins.update(versions.ensure_tools(*tools))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.detach and not self._atexit_registered:
            # Backstop for an interpreter exit without stop(); children also get
            # PDEATHSIG if the interpreter dies outright.
            atexit.register(self.stop)
            self._atexit_registered = True
        # free_port() closes the port it found before a server binds it, and an outgoing connection can
        # take that ephemeral port meanwhile (seen once in a full run): then start again on new ports.
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_all()
                break
            except (RuntimeError, TimeoutError) as e:
                self.stop()
                if attempt == START_ATTEMPTS or "address already in use" not in str(e):
                    raise
                shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)  # a new etcd on new ports
            except BaseException:
                self.stop()
                raise
        self._write_state()
        return self

    def _start_all(self) -> None:
        self._make_pki()
        self._start_etcd()
        self._start_apiserver()
        if self.with_controllers:
            self._start_controller_manager()
        if self.with_scheduler:
            self._start_scheduler()
        if self.with_kwok:
            self._start_kwok()
        self._wait_components()

    def stop(self) -> None:
        """Stops every process this object started, newest first (clients before
        the apiserver, the apiserver before etcd). Leaves the work dir (logs)."""
        while self._procs:
            self._procs.pop().stop()
        if self.state_file.exists():
            self.state_file.unlink()

    def stop_apiserver(self) -> None:
        """Stops just the kube-apiserver (SIGTERM, SIGKILL if it lingers): its clients find nothing on its
        port until start_apiserver(). etcd and the other components keep running."""
        [proc] = [p for p in self._procs if p.name == "kube-apiserver"]
        proc.stop()

    def start_apiserver(self) -> None:
        """Starts the kube-apiserver again, on the same port with the same certificates and etcd (so every
        client's kubeconfig and tokens stay valid), and waits for its /readyz."""
        [index] = [i for i, p in enumerate(self._procs) if p.name == "kube-apiserver"]
        assert not self._procs[index].alive(), "the kube-apiserver is running"
        self._start_apiserver()
        self._procs.insert(index, self._procs.pop())  # stop() keeps stopping clients before it
        wait_until("kube-apiserver /readyz", lambda: http_ok(f"{self.api_url}/readyz", self._admin_tls),
                   self.startup_timeout, [self._procs[index]])
        self._write_state()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- startup --------------------------------------------------------------

    def _tool(self, name: str) -> Path:
        if name not in self.bins:
            self.bins.update(versions.ensure_tools(name))
        return self.bins[name]

    def _spawn(self, name: str, argv: Sequence[str | os.PathLike[str]],
               env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(name, [str(a) for a in argv], self.workdir / "logs" / f"{name}.log",
                    env=dict(env) if env is not None else None, cwd=self.workdir,
                    die_with_parent=not self.detach)
        self._procs.append(proc)
        return proc

    def _make_pki(self) -> None:
        pki = PKI(self.workdir / "pki")
        self.pki = pki
        self.ports["apiserver"] = free_port()
        service_ip = _first_ip(SERVICE_CIDR)
        self.serving = pki.serving(
            "apiserver",
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"],
            ips=sorted({"127.0.0.1", self.api_host, service_ip}),
        )
        self.sa_keys = pki.service_account_keys()
        server = self.api_url
        admin = pki.client("admin", ADMIN_USER, ("system:masters",))
        write_kubeconfig(self.kubeconfig, server, pki.ca, admin, ADMIN_USER)
        # The controller manager and scheduler use their own identities so the
        # bootstrap RBAC roles (system:kube-controller-manager, system:kube-scheduler)
        # apply to them as in a real cluster.
        # How the API server authenticates to kubelets (logs, exec, port-forward).
        self.kubelet_client = pki.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client")
        kcm = pki.client("controller-manager", "system:kube-controller-manager")
        write_kubeconfig(self.workdir / "controller-manager.kubeconfig", server, pki.ca, kcm,
                         "system:kube-controller-manager")
        sched = pki.client("scheduler", "system:kube-scheduler")
        write_kubeconfig(self.workdir / "scheduler.kubeconfig", server, pki.ca, sched,
                         "system:kube-scheduler")
        # kwok acts as the kubelet of every fake node; admin keeps that simple.
        self._admin_tls = ssl.create_default_context(cafile=str(pki.ca.cert))
        self._admin_tls.load_cert_chain(str(admin.cert), str(admin.key))

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.ports["etcd"] = client
        data = self.workdir / "etcd-data"
        # ETCD_* variables from the environment would override our flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        proc = self._spawn("etcd", [
            self.bins["etcd"], "--name=latencytrace", f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=latencytrace=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new", "--logger=zap", "--log-outputs=stderr",
        ], env)
        wait_until("etcd /health", lambda: b'"true"' in http_get(
            f"http://127.0.0.1:{client}/health"), self.startup_timeout, [proc])

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._spawn("kube-apiserver", [
            self.bins["kube-apiserver"],
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            f"--bind-address={self.api_host}", f"--advertise-address={self.api_host}",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.sa_keys.cert}",
            f"--service-account-signing-key-file={self.sa_keys.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Real authorization: RBAC for everyone but system:masters, so tests can
            # check least privilege by impersonating service accounts.
            "--authorization-mode=Node,RBAC",
            # On top of the default plugins (NamespaceLifecycle, LimitRanger,
            # ServiceAccount, PodSecurity, ResourceQuota, webhooks, ...).
            "--enable-admission-plugins=NodeRestriction",
            # The eBPF agent DaemonSet runs privileged.
            "--allow-privileged=true",
            # A loopback advertise address is not a valid Endpoints IP: without a real node no pod
            # talks to the "kubernetes" Service; with one, its endpoint is the node IP we serve on.
            f"--endpoint-reconciler-type={'lease' if self.node_ip else 'none'}",
            # Kubelets are reached by their InternalIP (node names need not resolve here), with a
            # client certificate of ours, and their serving certificates checked against our CA.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={self.kubelet_client.cert}",
            f"--kubelet-client-key={self.kubelet_client.key}",
            f"--kubelet-certificate-authority={pki.ca.cert}",
            "--profiling=false",
            *self.apiserver_args,
        ])

    def _start_controller_manager(self) -> None:
        port = self.ports["controller-manager"] = free_port()
        self._spawn("kube-controller-manager", [
            self.bins["kube-controller-manager"],
            f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'controller-manager-certs'}",
            "--leader-elect=false",
            # Every controller that is on by default: daemonset, deployment,
            # replicaset, serviceaccount, serviceaccount-token, namespace,
            # garbage-collector, nodelifecycle, root-ca-cert-publisher, ...
            "--controllers=*",
            # Each controller uses its own service account, as in production.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.sa_keys.key}",
            f"--root-ca-file={self.pki.ca.cert}",
            f"--cluster-signing-cert-file={self.pki.ca.cert}",
            f"--cluster-signing-key-file={self.pki.ca.key}",
            "--cluster-name=latencytrace",
            "--kube-api-qps=100", "--kube-api-burst=200",
            "--profiling=false",
        ])

    def _start_scheduler(self) -> None:
        port = self.ports["scheduler"] = free_port()
        self._spawn("kube-scheduler", [
            self.bins["kube-scheduler"],
            f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
        ])

    def _start_kwok(self) -> None:
        port = self.ports["kwok"] = free_port()
        home = self.workdir / "kwok-home"
        home.mkdir(exist_ok=True)
        key, value = FAKE_NODE_ANNOTATION
        # HOME moved so a ~/.kwok/kwok.yaml on the machine cannot change behaviour.
        self._spawn("kwok", [
            self.bins["kwok"],
            f"--kubeconfig={self.kubeconfig}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--cidr={POD_CIDR}",
            # Otherwise kwok listens on 0.0.0.0; this port serves only /healthz etc.
            f"--server-address=127.0.0.1:{port}",
            "--node-lease-duration-seconds=40",
        ], {**os.environ, "HOME": str(home)})

    def _wait_components(self) -> None:
        t = self.startup_timeout
        procs = list(self._procs)
        wait_until("kube-apiserver /readyz",
                   lambda: http_ok(f"{self.api_url}/readyz", self._admin_tls), t, procs)
        tls = insecure_tls()  # the controllers' health ports serve self-signed certs
        if self.with_controllers:
            wait_until("kube-controller-manager /healthz", lambda: http_ok(
                f"https://127.0.0.1:{self.ports['controller-manager']}/healthz", tls), t, procs)
            # Proof that the serviceaccount controller runs: pods need this SA.
            wait_until("ServiceAccount default/default", lambda: http_ok(
                f"{self.api_url}/api/v1/namespaces/default/serviceaccounts/default",
                self._admin_tls), t, procs)
        if self.with_scheduler:
            wait_until("kube-scheduler /readyz", lambda: http_ok(
                f"https://127.0.0.1:{self.ports['scheduler']}/readyz", tls), t, procs)
        if self.with_kwok:
            wait_until("kwok /healthz", lambda: http_ok(
                f"http://127.0.0.1:{self.ports['kwok']}/healthz"), t, procs)

    def _write_state(self) -> None:
        state = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "api_url": self.api_url,
            "ports": self.ports,
            "bins": {k: str(v) for k, v in self.bins.items()},
            "procs": [{"name": p.name, "pid": p.pid, "exe": p.argv[0]} for p in self._procs],
        }
        self.state_file.write_text(json.dumps(state, indent=2))


# ---- detached control planes (python -m tests.cluster up/down) -----------------

def load_state(workdir: str | os.PathLike[str]) -> dict | None:
    path = Path(workdir) / "state.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def process_matches(pid: int, exe: str) -> bool:
    """True if `pid` still runs `exe` (guards against a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # A console script runs as `python <script>`: its path is the second word.
    return exe in (w.decode(errors="replace") for w in cmdline[:2])


def stop_from_state(workdir: str | os.PathLike[str]) -> int:
    """Stops a detached control plane from its state.json; returns how many
    processes were still running."""
    state = load_state(workdir)
    if state is None:
        return 0
    stopped = 0
    for proc in reversed(state["procs"]):
        if process_matches(proc["pid"], proc["exe"]):
            stop_group(proc["pid"])
            stopped += 1
    (Path(workdir) / "state.json").unlink(missing_ok=True)
    return stopped


# ---- helpers --------------------------------------------------------------------

def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _first_ip(cidr: str) -> str:
    import ipaddress
    return str(next(ipaddress.ip_network(cidr).hosts()))


def _node_ip(index: int) -> str:
    return f"{NODE_IP_PREFIX}.{index // 250}.{index % 250 + 1}"


def _fake_node(name: str, ip: str, labels: Mapping[str, str],
               taints: Sequence[Mapping[str, str]]) -> dict:
    # Status is kept on Node create (a kubelet registers the same way), so capacity
    # and the address are set here; kwok's node-initialize stage adds conditions.
    resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
    key, value = FAKE_NODE_ANNOTATION
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **labels,
            },
        },
        "spec": {"taints": [dict(t) for t in taints]} if taints else {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": ip},
                          {"type": "Hostname", "address": name}],
        },
    }
