"""The agent's probes on the real kernel, with pods in real network namespaces on a bridge."""

from __future__ import annotations

import pytest

from latencytrace.node_agent import segments
from tests.agent.conftest import measure, segment_counts

N = 2000


def test_udp_reads_are_counted_for_the_traced_pod_only(agent, lab):
    a, b, client = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("client")

    def traffic():
        with a.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "20") as ra, \
             b.serve("udp-recv", "--port", "9000", "--count", str(N), "--timeout", "20") as rb:
            client.traffic("udp-send", "--to", a.ip, "--port", "9000", "--count", str(N), "--rate", "4000")
            client.traffic("udp-send", "--to", b.ip, "--port", "9000", "--count", str(N), "--rate", "4000")
        assert ra.result == {"received": N} and rb.result == {"received": N}

    report = measure(agent, [a], traffic)
    counts = segment_counts(report, a)
    for seg in ("rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert abs(counts.get(seg, 0) - N) <= N * 0.01, (seg, counts)
    # Every datagram crossed the bridge and the veth: host-side and interrupt segments too.
    for seg in ("rx_irq", "rx_driver", "rx_host_to_pod"):
        assert counts.get(seg, 0) >= N * 0.99, (seg, counts)
    assert segment_counts(report, b) == {}, "an untraced pod left a trace"
    assert len(report.targets) == 1


def test_tx_segments_for_a_sender_inside_a_pod(agent, lab):
    a, server = lab.add_pod("a"), lab.add_pod("server")

    def traffic():
        with server.serve("tcp-sink", "--port", "9100", "--timeout", "20"):
            a.traffic("tcp-send", "--to", server.ip, "--port", "9100", "--count", "300", "--size", "1000")
        with server.serve("udp-recv", "--port", "9001", "--count", "600", "--timeout", "20"):
            a.traffic("udp-send", "--to", server.ip, "--port", "9001", "--count", "300", "--rate", "2000")
            a.traffic("udp-send", "--to", server.ip, "--port", "9001", "--count", "300", "--rate", "2000", "--write")

    counts = segment_counts(measure(agent, [a], traffic), a)
    # 300 TCP segments with data, 300 datagrams sent with sendto(2) and 300 with write(2): each the
    # first skb of its send.
    assert counts.get("tx_app_to_dev", 0) >= 890, counts
    for seg in ("tx_pod_to_host", "tx_qdisc", "tx_driver", "tx_total"):
        assert counts.get(seg, 0) >= 900, (seg, counts)


def test_segments_are_positive_and_add_up_to_no_more_than_the_total(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")

    def traffic():
        with a.serve("udp-recv", "--port", "9002", "--count", "300", "--timeout", "20"):
            client.traffic("udp-send", "--to", a.ip, "--port", "9002", "--count", "300", "--rate", "1000")

    # Every packet becomes an event (sample 1 in 1), so each one can be checked on its own.
    report = measure(agent, [a], traffic, slow_ns=0, sample_one_in=1, events_per_sec=100_000)
    rx = [e for e in report.event_list if e.direction is segments.Direction.RX and e.kind != "drop"]
    assert len(rx) >= 295, len(rx)
    complete = 0
    for ev in rx:
        times = ev.segment_times()
        parts = [end - start for name, (start, end) in times.items() if name != "rx_total"]
        assert all(p > 0 for p in parts), times
        if "rx_total" in times:
            total = times["rx_total"][1] - times["rx_total"][0]
            assert sum(parts) <= total, times
            complete += set(times) >= {"rx_irq", "rx_driver", "rx_host_to_pod", "rx_pod_stack", "rx_socket_queue"}
    assert complete >= 295, complete
    # Each event names the packet: UDP from the client to the pod's port.
    ev = rx[0]
    assert (ev.protocol, ev.saddr, ev.daddr, ev.dport) == ("udp", client.ip, a.ip, 9002)


def test_targets_are_added_and_removed_without_reloading(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    ids_before = agent.tracer.program_ids()

    def burst(port: str) -> None:
        with a.serve("udp-recv", "--port", port, "--count", "200", "--timeout", "20"):
            client.traffic("udp-send", "--to", a.ip, "--port", port, "--count", "200", "--rate", "2000")

    traced = segment_counts(measure(agent, [a], lambda: burst("9003")), a)
    assert traced.get("rx_pod_stack") == 200
    # measure() removed the target on its way out: the same traffic now leaves nothing.
    agent.collect()
    burst("9004")
    after = agent.collect()
    assert after.targets == {} and not any(h.count for hs in after.histograms.values() for h in hs.values())
    assert agent.tracer.program_ids() == ids_before


def test_drop_to_a_closed_port_is_counted_with_its_reason(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    report = measure(agent, [a], lambda: client.traffic("udp-send", "--to", a.ip, "--port", "9999", "--count", "25"))
    drops = next(t["drops"] for t in report.as_json()["targets"] if t["netns_inode"] == a.inode)
    assert drops.get("receive/NO_SOCKET") == 25, drops


def test_probe_cost_is_read_back_from_the_kernel(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")

    def traffic():
        with a.serve("udp-recv", "--port", "9005", "--count", "100", "--timeout", "20"):
            client.traffic("udp-send", "--to", a.ip, "--port", "9005", "--count", "100")

    report = measure(agent, [a], traffic)
    probes = report.as_json()["probes"]
    assert probes["lt_netif_receive_skb"]["run_cnt"] >= 200  # host side and pod side of each datagram
    assert probes["lt_netif_receive_skb"]["run_time_ns"] > 0


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_pod_to_pod_both_traced(agent, lab, protocol):
    """The same skb is the sender's TX and the receiver's RX: both are measured."""
    a, b = lab.add_pod("a"), lab.add_pod("b")

    def traffic():
        if protocol == "tcp":
            with b.serve("tcp-sink", "--port", "9200", "--timeout", "20"):
                a.traffic("tcp-send", "--to", b.ip, "--port", "9200", "--count", "200", "--size", "500")
        else:
            with b.serve("udp-recv", "--port", "9200", "--count", "200", "--timeout", "20"):
                a.traffic("udp-send", "--to", b.ip, "--port", "9200", "--count", "200", "--rate", "2000")

    report = measure(agent, [a, b], traffic)
    ca, cb = segment_counts(report, a), segment_counts(report, b)
    # TCP may merge small writes into fewer segments; UDP sends each datagram on its own.
    least = 150 if protocol == "tcp" else 200
    assert ca.get("tx_total", 0) >= least, ca
    assert cb.get("rx_host_to_pod", 0) >= least and cb.get("rx_pod_stack", 0) >= least * 0.95, cb


def test_ipv6_pods_are_traced_from_the_host_side_on(agent):
    from tests.netlab import NetLab

    with NetLab(ipv6=True) as lab:
        a, client = lab.add_pod("a"), lab.add_pod("client")

        def traffic():
            with a.serve("udp-recv", "--bind", "::", "--port", "9500", "--count", "300", "--timeout", "20") as rx:
                client.traffic("udp-send", "--to", a.ip6, "--port", "9500", "--count", "300", "--rate", "2000")
            assert rx.result == {"received": 300}

        counts = segment_counts(measure(agent, [a], traffic), a)
    # The host side recognised the pod by its IPv6 address: the whole path is measured.
    for seg in ("rx_driver", "rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert counts.get(seg, 0) >= 300, (seg, counts)


def test_only_the_probes_the_segments_need_are_attached(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")

    def traffic():
        attached = {p.program for p in agent.tracer.status.attached}
        # Receive side, socket queue only: nothing on the transmit path, no syscall probe.
        assert {"lt_netif_receive_skb", "lt_sk_data_ready", "lt_sock_recv_length", "lt_kfree_skb"} <= attached
        assert not attached & {"lt_net_dev_queue", "lt_net_dev_xmit", "lt_consume_skb", "lt_sys_enter",
                               "lt_tcp_sendmsg_locked", "lt_softirq_raise", "lt_irq_handler_entry"}
        with a.serve("udp-recv", "--port", "9600", "--count", "100", "--timeout", "20"):
            client.traffic("udp-send", "--to", a.ip, "--port", "9600", "--count", "100", "--rate", "2000")

    counts = segment_counts(measure(agent, [a], traffic, seg_mask=segments.mask(["rx_socket_queue"]), dir_mask=0b01), a)
    assert counts == {"rx_socket_queue": 100}
    # No target left: nothing attached, nothing paid.
    assert agent.tracer.status.attached == []
