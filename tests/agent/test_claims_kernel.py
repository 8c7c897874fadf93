"""What the README promises about events, limits and failures, on the real kernel: the slow threshold
and 1-in-N sampling, the per-pod event rate cap, a full target table, TCP's socket-queue read, and a
tracepoint that changed or refused its program while the other probes go on measuring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from latencytrace.node_agent import histogram
from latencytrace.node_agent.agent import Agent
from latencytrace.node_agent.program import Sizes
from latencytrace.node_agent.segments import Direction
from tests.agent import kernel, probe_injection
from tests.agent.conftest import AGENT, desired, measure, wait_ready
from tests.agent.test_segments_kernel import udp_burst

SLOW_NS = 2_000_000


def total_ns(ev) -> int:
    return ev.ts[5] - next(t for t in ev.ts if t)


def above(stat: kernel.SegStat, threshold_ns: int) -> tuple[int, int]:
    """(fewest, most) values >= threshold_ns that the kernel's buckets allow."""
    lo = hi = 0
    for pos, n in enumerate(stat.buckets):
        b_lo, b_hi = histogram.bucket_bounds_s(pos + histogram.INDEX_MIN)
        lo += n if b_lo * 1e9 >= threshold_ns else 0
        hi += n if b_hi * 1e9 >= threshold_ns else 0
    return lo, hi


def test_slow_packets_and_one_in_n_of_the_others_become_events(agent, lab):
    """Every packet at least as slow as the threshold is an event of kind slow (as many as the kernel's
    histogram of totals allows), and about 1 in N of the others one of kind sampled."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    n = 2000

    def traffic():  # a reader that stops for 20 ms every 100 datagrams: some wait, most do not
        with a.serve("udp-recv", "--port", "9700", "--count", str(n), "--timeout", "30",
                     "--pause-every", "100", "--pause-ms", "20") as rx:
            client.traffic("udp-send", "--to", a.ip, "--port", "9700", "--count", str(n), "--rate", "2000")
        assert rx.result == {"received": n}

    m = measure(agent, [a], traffic, read_kernel=True, slow_ns=SLOW_NS, sample_one_in=10, events_per_sec=1_000_000)
    read = [e for e in m.event_list if e.direction is Direction.RX and e.ts[5]]
    slow = [e for e in read if e.kind == "slow"]
    sampled = [e for e in read if e.kind == "sampled"]
    assert len(slow) + len(sampled) == len(read)
    assert all(total_ns(e) >= SLOW_NS for e in slow) and all(total_ns(e) < SLOW_NS for e in sampled)
    fewest, most = above(m.kernel["a"]["rx_total"], SLOW_NS)
    assert 0 < fewest <= len(slow) <= most < n, (fewest, len(slow), most)
    # 1 in 10 of the fast ones, at random: within five standard deviations of the binomial mean.
    fast = n - len(slow)
    mean, sd = fast / 10, (fast * 0.1 * 0.9) ** 0.5
    assert abs(len(sampled) - mean) <= 5 * sd, (len(sampled), mean, sd)
    assert m.kernel_counters["rate_limited"] == 0 and m.kernel_counters["events_lost"] == 0


def test_events_are_capped_per_pod_and_cpu_and_the_rest_counted(agent, lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    n, cap = 600, 5
    m = measure(agent, [a], lambda: udp_burst(a, client, 9701, n), slow_ns=1, events_per_sec=cap)
    # The kernel's window is 2**30 ns of its own clock, per CPU: no window has more than `cap` events.
    windows: dict[tuple[int, int], int] = {}
    for e in m.event_list:
        key = (e.cpu_last, e.last_ns >> 30)
        windows[key] = windows.get(key, 0) + 1
    assert m.event_list and max(windows.values()) <= cap, windows
    # Every datagram was slow: each is an event or counted as rate limited (the bridge's own multicast,
    # dropped in the pod, may add one or two more of either).
    read = [e for e in m.event_list if e.ts[5]]
    assert len(read) <= cap * len(windows)
    assert 0 <= len(m.event_list) + m.kernel_counters["rate_limited"] - n <= 3, (len(m.event_list), m.kernel_counters)


def test_a_full_target_table_refuses_the_next_pod_and_says_so(lab):
    a, b, c, client = lab.add_pod("a"), lab.add_pod("b"), lab.add_pod("c"), lab.add_pod("client")
    small = Agent(sizes=Sizes(max_targets=2))
    small.start()
    try:
        states = small.reconcile([desired(p) for p in (a, b, c)])
        assert [s.state for s in states.values()] == ["Tracing", "Tracing", "Failed"]
        assert "all 2 target slots of this agent are in use" in states[desired(c).key].message
        slots = {p.name: states[desired(p).key].target.slot for p in (a, b)}
        before = {p: kernel.slot_stats(small.tracer, s, buckets=False) for p, s in slots.items()}
        for pod, port in ((a, 9702), (b, 9703), (c, 9704)):
            udp_burst(pod, client, port, 200)
        after = {p: kernel.slot_stats(small.tracer, s, buckets=False) for p, s in slots.items()}
        # Each traced pod's slot holds its own 200 datagrams; c's are nowhere.
        assert {p: (after[p]["rx_pod_stack"] - before[p]["rx_pod_stack"]).count for p in slots} == {"a": 200, "b": 200}
        assert small.collect().overflow_targets == 1
    finally:
        small.close()


def test_a_full_target_table_is_one_clear_line_from_the_command(lab):
    a, b = lab.add_pod("a"), lab.add_pod("b")
    out = subprocess.run([AGENT, "trace", "--netns", a.path, "--netns", b.path, "--max-targets", "1",
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "all 1 target slots of this agent are in use" in out.stderr and "Traceback" not in out.stderr


# (asked, used): asked for typed, the refused program is refused at verification and reported, the others
# are typed; asked for nothing (auto), a typed program refused sends every program back to raw, where
# the refused one fails at attachment.
@pytest.mark.parametrize("tracepoints,used", [("typed", "typed"), ("auto", "raw")])
def test_a_changed_tracepoint_and_a_refused_attach_disable_only_their_probes(lab, tracepoints, used):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    script = Path(probe_injection.__file__)
    proc = subprocess.Popen([sys.executable, str(script), "trace", "--netns", a.path, "--format", "json",
                             "--tracepoints", tracepoints],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = wait_ready(proc)
        assert f"unavailable: {probe_injection.CHANGED}, {probe_injection.REFUSED}" in ready, ready
        udp_burst(a, client, 9706, 300)
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["tracepoints"] == used, doc["tracepoints"]
    assert ("typed tracepoint programs refused" in ready + err) == (tracepoints == "auto"), ready + err
    unavailable = doc["unavailable_probes"]
    assert set(unavailable) == {probe_injection.CHANGED, probe_injection.REFUSED}, unavailable
    assert unavailable[probe_injection.CHANGED] == "arguments changed: (unsigned int)"
    assert unavailable[probe_injection.REFUSED].startswith("attach failed"), unavailable
    if used == "typed":  # the verifier's own words
        assert "invalid bpf_context access" in unavailable[probe_injection.REFUSED], unavailable
    # Without softirq_raise a veth's packets have no irq boundary: rx_irq is not measured; everything
    # else is, for every datagram.
    [target] = doc["targets"]
    counts = {seg: s["count"] for seg, s in target["segments"].items()}
    assert "rx_irq" not in counts, counts
    for seg in ("rx_driver", "rx_host_to_pod", "rx_pod_stack", "rx_socket_queue", "rx_total"):
        assert counts.get(seg, 0) >= 300, (seg, counts)
    assert counts["rx_socket_queue"] == counts["rx_total"] == 300



def test_in_flight_state_is_bounded_by_its_arrays(lab, tmp_path):
    """Packets whose journey does not end (queued on a socket nobody reads yet) cannot grow the agent's
    in-flight state past its configured size: a socket's ring holds its latest packets, the older ones
    are measured up to where they were followed (their entries taken, counted as collisions), and
    tracing goes on."""
    a, client = lab.add_pod("a"), lab.add_pod("client")
    size, n = 64, 1000
    small = Agent(sizes=Sizes(max_targets=2, rx_inflight=size, tx_inflight=size, send_inflight=size))
    small.start()
    go = tmp_path / "read-now"
    try:
        states = small.reconcile([desired(a)])
        slot = states[desired(a).key].target.slot
        before = kernel.slot_stats(small.tracer, slot, buckets=False)
        with a.serve("udp-recv", "--port", "9720", "--count", str(n), "--timeout", "30",
                     "--hold-until", str(go)) as rx:
            client.traffic("udp-send", "--to", a.ip, "--port", "9720", "--count", str(n), "--rate", "4000")
            # All n wait in the socket: the kernel holds no more of them than the maps' size.
            held = {"lt_sockq": sum(1 for e in small.tracer.table("lt_sockq").values() if e.sk),
                    "rx flights": sum(1 for f in kernel.flights(small.tracer, small.sizes, Direction.RX) if f.skb)}
            go.touch()
        assert rx.result == {"received": n}
        got = {seg: st - before[seg] for seg, st in kernel.slot_stats(small.tracer, slot, buckets=False).items()}
        assert 0 < held["lt_sockq"] <= size and held["rx flights"] <= size, held  # UDP: queued, not in flight
        assert kernel.counters(small.tracer)["collisions"] >= n - size  # the ring's older packets, counted
        # Every packet was followed into the socket; only the reads of those still in the map were
        # matched to their packets (the evicted ones' reads find nothing, and are not misattributed).
        assert got["rx_pod_stack"].count == n
        assert 0 < got["rx_socket_queue"].count <= size, got["rx_socket_queue"].count
        assert got["rx_total"].count == got["rx_socket_queue"].count
        # And the next burst, read as it comes, is measured whole.
        mid = kernel.slot_stats(small.tracer, slot, buckets=False)
        udp_burst(a, client, 9721, 200)
        after = kernel.slot_stats(small.tracer, slot, buckets=False)
        assert (after["rx_socket_queue"] - mid["rx_socket_queue"]).count == 200
        assert (after["rx_total"] - mid["rx_total"]).count == 200
    finally:
        small.close()
