"""The struct offsets the probes read come from BTF and are right on this kernel: the namespace inode
read in BPF through an skb, a socket and a task equals os.stat of the namespace; the kernel's
histogram bucket of a latency equals node_agent/histogram.py's."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from latencytrace.node_agent import histogram
from tests.agent import selftest


@pytest.fixture(scope="module")
def st():
    bpf = selftest.load()
    try:
        yield bpf
    finally:
        bpf.cleanup()


def test_netns_inode_read_in_bpf_equals_stat(st, lab):
    a, b = lab.add_pod("a"), lab.add_pod("b")
    st.attach_raw_tracepoint(tp=b"netif_receive_skb", fn_name=b"st_netif_receive_skb")
    st.attach_raw_tracepoint(tp=b"sk_data_ready", fn_name=b"st_sk_data_ready")
    st.attach_tracepoint(tp=b"syscalls:sys_enter_sendto", fn_name=b"st_sys_send")
    try:
        with a.serve("udp-recv", "--port", "9300", "--count", "20", "--timeout", "10") as rx:
            send = b.python("traffic.py", "udp-send", "--to", a.ip, "--port", "9300", "--count", "20")
            proc = subprocess.Popen(send, stdout=subprocess.PIPE, text=True)
            sender_pid = proc.pid
            proc.communicate(timeout=30)
        assert rx.result == {"received": 20}
    finally:
        st.detach_raw_tracepoint(tp=b"netif_receive_skb")
        st.detach_raw_tracepoint(tp=b"sk_data_ready")
        st.detach_tracepoint(tp=b"syscalls:sys_enter_sendto")
    dev = {k.value: v.value for k, v in st[b"st_dev_netns"].items()}
    sk = {k.value: v.value for k, v in st[b"st_sk_netns"].items()}
    assert dev.get(os.stat(a.path).st_ino, 0) >= 20, dev  # the datagrams arriving on a's eth0
    assert sk.get(os.stat(a.path).st_ino, 0) >= 20, sk    # the receiving socket in a
    # `ip netns exec` execs the sender in place: the PID is the sender's, inside b.
    tasks = {k.value: v.value for k, v in st[b"st_task_netns"].items()}
    assert tasks.get(sender_pid) == os.stat(b.path).st_ino, (sender_pid, tasks)
    assert os.stat(a.path).st_ino != os.stat("/proc/self/ns/net").st_ino


def test_kernel_bucket_equals_python_bucket(st):
    rng = random.Random(7)
    values = [1, 2, 7, 8, 9, 65, 1000, 1024, 65536, 999_999, 1_000_000, 500_000_000, 10**9, 2 * 10**9, 2**40, 2**64 - 1]
    values += [int(2 ** rng.uniform(0, 40)) for _ in range(300)]
    # Values right at the boundaries between buckets, where rounding would show.
    for i in range(-200, 30, 7):
        edge_ns = int(round(2 ** (i / 8) * 1e9))
        values += [edge_ns - 1, edge_ns, edge_ns + 1]
    for ns in values:
        if ns <= 0:
            continue
        selftest.test_run_raw_tp(st, "st_bucket", [ns])
        got = st[b"st_bucket_out"][0].value + histogram.INDEX_MIN
        assert got == histogram.bucket_index(ns), ns


def test_bucket_index_matches_the_opentelemetry_definition():
    """(2**(i/8), 2**((i+1)/8)] seconds, checked with exact arithmetic away from rounding edges."""
    import math

    rng = random.Random(3)
    for _ in range(5000):
        ns = int(2 ** rng.uniform(0, 36))
        exact = math.log2(ns / 1e9) * 8
        if abs(exact - round(exact)) < 1e-9:
            continue
        want = math.ceil(exact) - 1
        want = min(max(want, histogram.INDEX_MIN), histogram.INDEX_MAX)
        assert histogram.bucket_index(ns) == want, ns
    # Exact powers of two seconds sit at the top of the bucket below (upper-inclusive).
    assert histogram.bucket_index(1_000_000_000) == -1
    assert histogram.bucket_index(2_000_000_000) == 7
