"""A traced namespace whose addresses change while it is traced (a pod's namespace exists before the
CNI gives it an IP): the host-side probes, which recognise a pod's packets by its IP, follow them."""

from __future__ import annotations

from latencytrace.node_agent import lookup, targets
from latencytrace.node_agent.agent import Desired
from latencytrace.node_agent.report import Report
from latencytrace.node_agent.tracer import TargetSettings
from tests.agent.conftest import segment_counts

N = 500


def desired(pod) -> Desired:
    """Found afresh at each reconcile, as the in-cluster loop's PodLocator does."""
    return Desired(f"netns:{pod.inode}", pod.name, lambda: targets.from_path(pod.path), TargetSettings())


def host_side_counts(agent, lab, pod, client, port: str) -> dict[str, int]:
    agent.collect()  # start from a clean interval
    with pod.serve("udp-recv", "--port", port, "--count", str(N), "--timeout", "20") as rx:
        client.traffic("udp-send", "--to", pod.ip, "--port", port, "--count", str(N), "--rate", "2000")
    assert rx.result == {"received": N}
    report = Report()
    report.consume(agent.collect())
    return segment_counts(report, pod)


def ip4_keys(agent) -> set[int]:
    return {v.key for v in agent.tracer.table("lt_ip4").values() if v.key}


def test_a_pod_addressed_after_tracing_started_is_recognised_on_the_host_side(agent, lab):
    late, client = lab.add_pod("late", addressed=False), lab.add_pod("client")
    d = desired(late)
    try:
        [st] = agent.reconcile([d]).values()
        assert st.state == "Tracing" and st.target.ns.ips == ()
        lab.assign_address(late)
        agent.reconcile([d])  # what the in-cluster loop does when the pod's IP reaches its spec
        counts = host_side_counts(agent, lab, late, client, "9700")
        # Each datagram was seen on the bridge port before the veth crossing: host_rx needs the pod IP.
        assert counts.get("rx_host_to_pod", 0) >= N * 0.99, counts
        assert counts.get("rx_pod_stack", 0) >= N * 0.99, counts
    finally:
        agent.reconcile([])


def test_addresses_are_followed_between_reconciles_and_forgotten_when_removed(agent, lab):
    late, client = lab.add_pod("late", addressed=False), lab.add_pod("client")
    d = desired(late)
    [word] = lookup.ip_words(late.ip)
    try:
        agent.reconcile([d])
        lab.assign_address(late)
        agent.refresh_addresses()  # the periodic look the loops take, with no spec change
        assert word in ip4_keys(agent)
        counts = host_side_counts(agent, lab, late, client, "9701")
        assert counts.get("rx_host_to_pod", 0) >= N * 0.99, counts
        lab.remove_address(late)
        agent.refresh_addresses()
        assert word not in ip4_keys(agent), "a removed address still maps to the pod's slot"
        assert agent.registry.by_inode[late.inode].ns.ips == ()
    finally:
        agent.reconcile([])
