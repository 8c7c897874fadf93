"""A real Kubernetes node on this machine, joined to a local control plane: containerd (Debian's) with
runc, the kubelet and kube-proxy (built from Go modules at the control plane's version), and the CNI
plugins bridge, host-local, loopback and portmap giving every pod a real network namespace on a bridge.

    node = RealNode(logs_dir)
    node.prepare()                                     # the node IP the API server will serve on
    cp = ControlPlane(workdir, node_ip=NODE_IP).start()
    node.start(cp, images.ensure_all())                # containerd, images, kubelet, kube-proxy; Ready
    ...
    node.stop()                                        # everything it made, undone

There is one real node per machine: its interfaces, iptables rules and cgroups are the host's. It keeps
its state in fixed directories and records everything it makes in a state file as it makes it, so that
`stop()` — or `teardown()` from another process after a crash — undoes exactly that and nothing else:
pods are stopped and removed through the runtime (CNI DEL removes their veths, IP reservations and
portmap rules), kube-proxy removes its own iptables chains (`--cleanup`), then mounts under the node's
directories, its links, its cgroups and every directory it created go.

Facts of these machines that shape the configuration (measured here):
- no CAP_SYS_RESOURCE: containerd must not raise oom_score_adj (`restrict_oom_score_adj`), or runc
  fails every sandbox with "can't get final child's PID from pipe: EOF";
- cgroups are a v1 hybrid: runc (crun refuses hybrid mode), the cgroupfs driver and `failCgroupV1: false`;
- no systemd: this module starts and stops containerd and the kubelet itself;
- no registry: images are imported into containerd's store, the pause image among them, before the
  kubelet starts; nothing is ever pulled;
- a kubelet refuses a loopback node IP: the node IP lives on an interface made here, from the
  RFC 2544 benchmarking range (never routed anywhere), and the API server serves on it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from . import versions
from .controlplane import ControlPlane, run_tool
from .kubeconfig import write_kubeconfig
from .procs import Proc, free_port, http_ok, stop_group, wait_until

NODE_NAME = "latencytrace-node"
# RFC 2544 addresses, as the control plane's fake ones: 198.19.0-3.x are kwok nodes' InternalIPs.
NODE_IP = "198.19.255.1"
POD_CIDR = "198.19.128.0/24"
# The interface holding NODE_IP: a bridge with no ports (this kernel has no dummy links); addresses on a
# link that is up are local whether or not it has a carrier.
HOST_LINK = "lt-node0"
BRIDGE = "lt-cni0"  # the CNI bridge; pods' veths are its ports
# The kubelet's cgroupRoot: all of its cgroups live under /<CGROUP_ROOT>/kubepods in every hierarchy.
CGROUP_ROOT = "latencytrace-node"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"

STATE = Path(os.environ.get("LATENCYTRACE_NODE_STATE", "/var/lib/latencytrace-node"))
RUN = Path(os.environ.get("LATENCYTRACE_NODE_RUN", "/run/latencytrace-node"))
CGROUP_FS = Path("/sys/fs/cgroup")
# Paths that the kubelet, containerd and libcni use whatever they are told; removed at teardown only
# if they did not exist before the node started.
FIXED_PATHS = [Path("/var/lib/kubelet"), Path("/var/log/pods"), Path("/var/log/containers"),
               Path("/var/lib/cni"), Path("/run/netns"), Path("/etc/cni"), Path("/opt/cni"),
               Path("/opt/containerd")]
NODE_TOOLS = ("kubelet", "kube-proxy", "crictl", "bridge", "host-local", "loopback", "portmap")
APT_PACKAGES = ("containerd", "runc", "iptables", "conntrack")


class NodeBusy(RuntimeError):
    """Another real node runs on this machine (there can be one)."""


def _sh(*argv: str | os.PathLike[str], check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return run_tool(argv, os.environ, check=check, timeout=timeout)


def ensure_packages() -> None:
    """The Debian packages the node runs on (containerd with runc, iptables for kube-proxy, conntrack)."""
    missing = [p for p in APT_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env=env, stdout=subprocess.DEVNULL)


class NodeState:
    """What the node made, written to disk as it is made (teardown reads it, even from another process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {
            "procs": [], "links": [], "cgroups": [], "created": [], "containerd": None, "chains_before": None}

    def add(self, key: str, value) -> None:
        if value not in self.data[key]:
            self.data[key].append(value)
        self.save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def state_file() -> Path:
    # Under /var/lib, not /run: a crashed run's record must survive for the next teardown.
    return STATE.parent / f"{STATE.name}.json"


def _alive(pid: int, exe: str) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return argv0 == exe


class RealNode:
    """The node's lifecycle. `detach` leaves its processes running when this Python process exits
    (`.ci/cluster up`); `teardown()` stops them later from the state file."""

    def __init__(self, logs: Path, *, detach: bool = False, startup_timeout: float = 180.0) -> None:
        self.logs = logs
        self.detach = detach
        self.startup_timeout = startup_timeout
        self.bins: dict[str, Path] = {}
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Proc] = {}
        self.state: NodeState | None = None
        self.cp: ControlPlane | None = None

    # ---- public surface ---------------------------------------------------------------------------

    @property
    def containerd_socket(self) -> Path:
        return RUN / "containerd.sock"

    def prepare(self) -> RealNode:
        """Claims the machine's one node and makes the node IP, which the API server must serve on."""
        ensure_packages()
        self.bins.update(versions.ensure_tools(*NODE_TOOLS))
        old = NodeState(state_file())
        if any(_alive(p["pid"], p["exe"]) for p in old.data["procs"]):
            raise NodeBusy(f"a real node already runs on this machine (state: {state_file()}); "
                           "stop it first with `.ci/cluster down`")
        teardown()  # a crashed run's leftovers, as recorded
        self.state = NodeState(state_file())
        self.state.save()
        for path in FIXED_PATHS + [STATE, RUN]:
            if not path.exists():
                self.state.add("created", str(path))
        # The kubelet, kube-proxy and CNI plugins add iptables chains; teardown removes the new ones.
        self.state.set("chains_before", sorted(_chains()))
        try:
            self._link_add(HOST_LINK, "bridge")
            _sh("ip", "addr", "add", f"{NODE_IP}/32", "dev", HOST_LINK)
            _sh("ip", "link", "set", HOST_LINK, "up")
        except BaseException:
            teardown()
            raise
        return self

    def start(self, cp: ControlPlane, images: Mapping[str, Path]) -> RealNode:
        """containerd with `images` imported, then the kubelet and kube-proxy; returns once the Node is Ready."""
        assert self.state is not None, "prepare() first"
        if cp.node_ip != NODE_IP:
            raise ValueError(f"the control plane must serve on the node IP: ControlPlane(node_ip={NODE_IP!r})")
        self.cp = cp
        try:
            self._make_cgroups()
            self._write_cni_config()
            self._start_containerd()
            self.import_images(images)
            self._start_kubelet()
            self._start_kube_proxy()
            cp.kubectl("wait", "--for=condition=Ready", f"--timeout={int(self.startup_timeout)}s",
                       f"node/{NODE_NAME}", timeout=self.startup_timeout + 10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Undoes everything this node made (idempotent)."""
        teardown(self.bins)
        self.procs.clear()

    def import_images(self, images: Mapping[str, Path]) -> None:
        import_images(images)

    def ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return ctr(*args, timeout=timeout)

    def crictl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return _crictl(self.bins.get("crictl") or versions.bin_path("crictl"), *args, check=check, timeout=timeout)

    # ---- startup ----------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str | os.PathLike[str]]) -> Proc:
        proc = Proc(name, [str(a) for a in argv], self.logs / f"{name}.log", cwd=STATE,
                    die_with_parent=not self.detach)
        self.procs[name] = proc
        assert self.state is not None
        self.state.add("procs", {"name": name, "pid": proc.pid, "exe": proc.argv[0]})
        return proc

    def _link_add(self, name: str, kind: str) -> None:
        assert self.state is not None
        self.state.add("links", name)
        _sh("ip", "link", "add", name, "type", kind)

    def _make_cgroups(self) -> None:
        """The kubelet checks that its cgroupRoot exists in every hierarchy before it creates kubepods."""
        assert self.state is not None
        for hierarchy in _hierarchies():
            path = hierarchy / CGROUP_ROOT
            if not path.exists():
                self.state.add("cgroups", str(path))
                path.mkdir()

    def _write_cni_config(self) -> None:
        bin_dir = STATE / "cni" / "bin"  # the cached plugins live in per-version dirs: one dir of links
        bin_dir.mkdir(parents=True, exist_ok=True)
        for plugin in ("bridge", "host-local", "loopback", "portmap"):
            link = bin_dir / plugin
            link.unlink(missing_ok=True)
            link.symlink_to(self.bins[plugin])
        conf_dir = STATE / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        assert self.state is not None
        self.state.add("links", BRIDGE)  # made by the bridge plugin at the first pod
        (conf_dir / "10-latencytrace.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": "latencytrace",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "hairpinMode": True,
                 # Nothing leaves this machine: no masquerading to the outside.
                 "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(STATE / "cni" / "networks")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }, indent=2))

    def _start_containerd(self) -> None:
        config = STATE / "containerd.toml"
        STATE.mkdir(parents=True, exist_ok=True)
        RUN.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text("\n".join([
            "version = 2",
            f'root = "{STATE / "containerd"}"',
            f'state = "{RUN / "containerd"}"',
            "[grpc]",
            f'  address = "{self.containerd_socket}"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{STATE / "opt"}"',
            f"[{cri}]",
            f'  sandbox_image = "{SANDBOX_IMAGE}"',
            # No CAP_SYS_RESOURCE here: runc may not raise oom_score_adj above its own.
            "  restrict_oom_score_adj = true",
            "  enable_selinux = false",
            f"[{cri}.containerd]",
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = false",  # no systemd: the cgroupfs driver, like the kubelet's
            f"[{cri}.cni]",
            f'  bin_dir = "{STATE / "cni" / "bin"}"',
            f'  conf_dir = "{STATE / "cni" / "net.d"}"',
            "",
        ]))
        assert self.state is not None
        self.state.set("containerd", {"config": str(config), "socket": str(self.containerd_socket)})
        proc = self._spawn("containerd", [shutil.which("containerd") or "/usr/bin/containerd",
                                          "--config", config])
        wait_until("containerd", lambda: self.containerd_socket.exists() and self.ctr("version").returncode == 0,
                   60, [proc])

    def _start_kubelet(self) -> None:
        cp = self.cp
        assert cp is not None
        pki = cp.pki
        kdir = STATE / "kubelet-config"
        kdir.mkdir(parents=True, exist_ok=True)
        client = pki.client("kubelet-client", f"system:node:{NODE_NAME}", ("system:nodes",))
        kubeconfig = write_kubeconfig(kdir / "kubeconfig", cp.api_url, pki.ca, client, f"system:node:{NODE_NAME}")
        serving = pki.serving("kubelet-serving", dns=[NODE_NAME], ips=[NODE_IP])
        port, healthz = self.ports["kubelet"], self.ports["kubelet-healthz"] = free_port(), free_port()
        config = kdir / "config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz,
            "tlsCertFile": str(serving.cert), "tlsPrivateKeyFile": str(serving.key),
            # Only holders of a certificate from the cluster's CA (the API server) reach the kubelet's API.
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(pki.ca.cert)}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            # cgroup v1 hybrid, no systemd.
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}", "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDomain": "cluster.local",
            # Images come from imports, never a registry: image GC must never remove them.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "podCIDR": POD_CIDR,
        }, sort_keys=False))
        proc = self._spawn("kubelet", [
            self.bins["kubelet"], f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            f"--root-dir={STATE / 'kubelet'}", "--v=1",
        ])
        wait_until("kubelet /healthz", lambda: http_ok(f"http://127.0.0.1:{healthz}/healthz"), 60, [proc])

    def _start_kube_proxy(self) -> None:
        cp = self.cp
        assert cp is not None
        client = cp.pki.client("kube-proxy", "system:kube-proxy")
        kubeconfig = write_kubeconfig(STATE / "kube-proxy.kubeconfig", cp.api_url, cp.pki.ca, client,
                                      "system:kube-proxy")
        healthz = self.ports["kube-proxy-healthz"] = free_port()
        proc = self._spawn("kube-proxy", [
            self.bins["kube-proxy"], f"--kubeconfig={kubeconfig}", f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables", f"--cluster-cidr={POD_CIDR}",
            # Leave the host's conntrack table sizes and timeouts alone (and no CAP_SYS_RESOURCE anyway).
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            # NodePorts on the node IP only, never on the VM's own interfaces.
            f"--nodeport-addresses={NODE_IP}/32",
            f"--healthz-bind-address=127.0.0.1:{healthz}", f"--metrics-bind-address=127.0.0.1:{free_port()}",
        ])
        wait_until("kube-proxy /healthz", lambda: http_ok(f"http://127.0.0.1:{healthz}/healthz"), 60, [proc])


# ---- the running node's runtime (also from another process: `.ci/cluster up` leaves it running) ---------

def ctr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return _sh("ctr", "--address", str(RUN / "containerd.sock"), "--namespace", "k8s.io", *args, timeout=timeout)


def import_images(images: Mapping[str, Path]) -> None:
    """Puts OCI archives into containerd's store for the kubelet (nothing is ever pulled); an image
    already there under the same name and content is imported again at no cost."""
    for name, archive in images.items():
        ctr("images", "import", "--all-platforms", str(archive), timeout=600)
        listed = ctr("images", "list", "-q").stdout.split()
        if name not in listed:
            raise RuntimeError(f"importing {archive} did not give image {name} (containerd has: {listed})")


# ---- teardown (also from another process, by the state file) -----------------------------------------

def _crictl(crictl: Path, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return _sh(crictl, "--runtime-endpoint", f"unix://{RUN / 'containerd.sock'}", "--timeout", "60s", *args,
               check=check, timeout=timeout)


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers and the unified one)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2") and mountpoint.startswith(str(CGROUP_FS)):
            found.append(Path(mountpoint))
    return found


def _mounts_under(*roots: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mountpoint = line.split()[1].encode().decode("unicode_escape")
        if any(mountpoint == str(r) or mountpoint.startswith(f"{r}/") for r in roots):
            out.append(mountpoint)
    return sorted(set(out), key=len, reverse=True)


def _rmdir_tree(path: Path) -> None:
    """A cgroup tree: directories only (their files are the kernel's), deepest first."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            _rmdir_tree(child)
    for _ in range(50):  # a cgroup whose last process is still exiting is busy for a moment
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()


def _kill_tree(path: Path) -> None:
    for procs in path.rglob("cgroup.procs") if path.is_dir() else ():
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass


def _stop_recorded(procs: list[dict], name: str) -> None:
    for p in procs:
        if p["name"] == name and _alive(p["pid"], p["exe"]):
            stop_group(p["pid"], timeout=20)


def teardown(bins: Mapping[str, Path] | None = None) -> None:
    """Undoes what the state file records: pods through the runtime, the kubelet, kube-proxy and its
    iptables chains, containerd and its shims, mounts, links, cgroups and created directories."""
    path = state_file()
    if not path.exists():
        return
    state = NodeState(path).data
    bins = dict(bins or {})
    procs = state["procs"]
    _stop_recorded(procs, "kubelet")  # first, or it restarts the pods we remove
    ctrd = state.get("containerd")
    if ctrd:
        crictl = bins.get("crictl") or versions.bin_path("crictl")
        started: Proc | None = None
        if not any(p["name"] == "containerd" and _alive(p["pid"], p["exe"]) for p in procs) \
                and Path(ctrd["config"]).exists():
            # Crashed: the runtime comes back from its own state for long enough to remove the pods.
            started = Proc("containerd-teardown", ["containerd", "--config", ctrd["config"]],
                           Path(ctrd["config"]).parent / "containerd-teardown.log")
            try:
                wait_until("containerd", lambda: Path(ctrd["socket"]).exists(), 30, [started])
            except (TimeoutError, RuntimeError):
                pass
        if os.access(crictl, os.X_OK) and Path(ctrd["socket"]).exists():
            _crictl(crictl, "rmp", "--all", "--force", check=False, timeout=180)
        if started is not None:
            started.stop(timeout=20)
    _stop_recorded(procs, "kube-proxy")
    kube_proxy = bins.get("kube-proxy") or versions.bin_path("kube-proxy")
    if any(p["name"] == "kube-proxy" for p in procs) and os.access(kube_proxy, os.X_OK):
        _sh(kube_proxy, "--cleanup", "--proxy-mode=iptables", check=False)  # its KUBE-* chains
    _stop_recorded(procs, "containerd")
    if ctrd:
        _stop_shims(ctrd["socket"])
    for mountpoint in _mounts_under(STATE, RUN, *(Path(p) for p in state["created"])):
        subprocess.run(["umount", "--lazy", mountpoint], capture_output=True)
    for link in state["links"]:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    if state.get("chains_before") is not None:
        _remove_chains(_chains() - set(state["chains_before"]))
    for cgroup in state["cgroups"]:
        _kill_tree(Path(cgroup))  # anything the runtime could not stop
        _rmdir_tree(Path(cgroup))
    for created in sorted(state["created"], key=len, reverse=True):
        shutil.rmtree(created, ignore_errors=True)
    path.unlink(missing_ok=True)


IPTABLES = {"ipv4": "iptables", "ipv6": "ip6tables"}
TABLES = ("filter", "nat", "mangle", "raw")


def _rules(family: str, table: str) -> list[str]:
    out = subprocess.run([IPTABLES[family], "-w", "-t", table, "-S"], capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else []


def _chains() -> set[str]:
    """'family table chain' of every user-defined iptables chain there is now."""
    found = set()
    for family in IPTABLES:
        for table in TABLES:
            found |= {f"{family} {table} {line.split()[1]}" for line in _rules(family, table) if line.startswith("-N ")}
    return found


def _remove_chains(chains: set[str]) -> None:
    """Removes the given chains: first every rule that jumps to one, then their rules, then the chains."""
    by_table: dict[tuple[str, str], set[str]] = {}
    for entry in chains:
        family, table, chain = entry.split()
        by_table.setdefault((family, table), set()).add(chain)
    for (family, table), names in by_table.items():
        cmd = [IPTABLES[family], "-w", "-t", table]
        for line in _rules(family, table):
            words = shlex.split(line)
            if words[:1] == ["-A"] and words[1] not in names and any(
                    words[i] in ("-j", "-g") and words[i + 1] in names for i in range(len(words) - 1)):
                subprocess.run([*cmd, "-D", *words[1:]], capture_output=True)
        for chain in names:
            subprocess.run([*cmd, "-F", chain], capture_output=True)
        for chain in names:
            subprocess.run([*cmd, "-X", chain], capture_output=True)


def _stop_shims(socket: str) -> None:
    """containerd's runc shims outlive it: the ones serving our containerd (by its socket) go too."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv:
            try:
                os.kill(int(entry.name), 9)
            except ProcessLookupError:
                pass
