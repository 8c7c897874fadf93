"""Finding a pod's network namespace on the host, as the in-cluster agent does: by the pod UID in the
cgroup path of its processes (cgroupfs and systemd spellings), else by its pod IP."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from latencytrace.node_agent.contract import PodRef
from latencytrace.node_agent.targets import PodLocator, TargetError

CGROUP_ROOTS = [Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]


def cgroup_root() -> Path:
    for root in CGROUP_ROOTS:
        if (root / "cgroup.procs").exists():
            return root
    raise RuntimeError("no writable cgroup hierarchy found")


@pytest.fixture
def pod_process(lab):
    """A process inside a lab pod, moved into a kubelet-style pod cgroup; yields (pod, uid, style)."""
    made: list[Path] = []
    procs: list[subprocess.Popen] = []

    def start(style: str):
        pod = lab.add_pod(f"p{len(procs)}")
        uid = str(uuid.uuid4())
        if style == "cgroupfs":
            group = cgroup_root() / "lt-test-kubepods" / "burstable" / f"pod{uid}"
        else:
            group = cgroup_root() / "lt-test-kubepods.slice" / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        new = [d for d in (group, *group.parents) if not d.exists()]  # every level this test makes
        group.mkdir(parents=True)
        made.extend(new)
        proc = subprocess.Popen(pod.exec("sleep", "60"))
        procs.append(proc)
        (group / "cgroup.procs").write_text(str(proc.pid))
        return pod, uid

    yield start
    for p in procs:
        p.kill()
        p.wait()
    for group in made:
        if group.exists():
            group.rmdir()


@pytest.mark.parametrize("style", ["cgroupfs", "systemd"])
def test_pod_found_by_uid_in_its_cgroup(pod_process, style):
    pod, uid = pod_process(style)
    locator = PodLocator()
    locator.refresh()
    ns = locator.locate(PodRef(namespace="app", name="web", uid=uid, ips=["192.0.2.99"]))  # a wrong IP: UID wins
    assert ns.inode == os.stat(pod.path).st_ino
    assert pod.ip in ns.ips


def test_pod_found_by_ip_without_process(lab):
    pod = lab.add_pod("noproc")
    locator = PodLocator()
    locator.refresh()
    ns = locator.locate(PodRef(namespace="app", name="web", uid=str(uuid.uuid4()), ips=[pod.ip]))
    assert ns.inode == pod.inode and ns.path.endswith(pod.netns)


def test_unknown_and_host_network_pods_are_clear_errors(lab):
    locator = PodLocator()
    locator.refresh()
    with pytest.raises(TargetError, match="has no network namespace on this node"):
        locator.locate(PodRef(namespace="app", name="gone", uid=str(uuid.uuid4()), ips=["192.0.2.98"]))
    # A process of this test in the host namespace, in a pod cgroup: a hostNetwork pod.
    uid = str(uuid.uuid4())
    group = cgroup_root() / "lt-test-hostnet" / f"pod{uid}"
    group.mkdir(parents=True)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        (group / "cgroup.procs").write_text(str(proc.pid))
        locator.refresh()
        with pytest.raises(TargetError, match="hostNetwork"):
            locator.locate(PodRef(namespace="app", name="hostnet", uid=uid, ips=[]))
    finally:
        proc.kill()
        proc.wait()
        group.rmdir()
        group.parent.rmdir()


def test_namespace_addresses_listed_without_forking_or_moving_this_thread(lab):
    """Listing a namespace's addresses must not fork: a forked copy of the agent that gets SIGTERM runs
    the agent's shutdown handler and unwinds its stack a second time (it once deleted a test lab's
    namespaces from inside such a copy). Nor may the calling thread stay in the pod's namespace."""
    from latencytrace.node_agent.targets import namespace_ips

    pod = lab.add_pod("addrs")
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    here = os.stat("/proc/thread-self/ns/net").st_ino
    assert namespace_ips(pod.path) == (pod.ip,)
    assert os.stat("/proc/thread-self/ns/net").st_ino == here
    assert not forks
    with pytest.raises(TargetError, match="is not a network namespace"):
        namespace_ips("/proc/self/status")  # opens, but is no namespace
