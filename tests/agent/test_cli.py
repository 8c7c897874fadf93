"""`latencytrace-agent trace` as a user runs it: JSON output, one-line errors, and no leftovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from latencytrace.node_agent.probes import PROBES, Probe
from latencytrace.node_agent.tracer import Tracer
from tests.agent.conftest import AGENT, running_agent, wait_ready
from tests.agent.kernel import prog_ids_of



def bpftool(kind: str) -> list[dict]:
    """`bpftool prog|link show` as JSON: every program or link on the machine (filter by id)."""
    out = subprocess.run([shutil.which("bpftool") or "/usr/sbin/bpftool", kind, "show", "-j"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def test_json_document(lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    started = time.monotonic()
    agent = subprocess.Popen([AGENT, "trace", "--netns", a.path, "--format", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = wait_ready(agent)
        until_ready = time.monotonic() - started
        assert "tracing 1 target(s)" in ready, ready
        with a.serve("udp-recv", "--port", "9400", "--count", "500", "--timeout", "20") as rx:
            client.traffic("udp-send", "--to", a.ip, "--port", "9400", "--count", "500", "--rate", "2000")
        assert rx.result == {"received": 500}
        agent.send_signal(signal.SIGTERM)  # the report covers the traffic, however long start-up took
        out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    doc = json.loads(out)
    (target,) = doc["targets"]
    assert target["netns_inode"] == a.inode and target["label"] == a.path
    seg = target["segments"]["rx_pod_stack"]
    assert seg["count"] == 500
    assert 0 < seg["p50_us"] <= seg["p90_us"] <= seg["p99_us"] <= seg["max_us"]
    assert doc["probes"]["lt_netif_receive_skb"]["run_cnt"] > 0
    assert doc["probe_stats"]["mode"] == "always" and doc["probe_stats"]["seconds_on"] > 0
    # Loading and attaching is part of start-up: measured, so within what the whole start-up took (not
    # bounded by a wall-clock figure, which a loaded machine can exceed).
    assert 0 < doc["attach_seconds"] < until_ready, (doc["attach_seconds"], until_ready)


def test_jsonl_one_document_per_interval(lab):
    a, client = lab.add_pod("a"), lab.add_pod("client")
    agent = subprocess.Popen([AGENT, "trace", "--netns", a.path, "--format", "jsonl", "--interval", "0.5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []  # (when it was read, the line): each must arrive as its interval ends
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in agent.stdout), daemon=True)
    try:
        wait_ready(agent)
        reader.start()
        with a.serve("udp-recv", "--port", "9401", "--count", "600", "--timeout", "30") as rx:
            client.traffic("udp-send", "--to", a.ip, "--port", "9401", "--count", "600", "--rate", "200")
            sent_at = time.monotonic()
        assert rx.result == {"received": 600}
        agent.send_signal(signal.SIGTERM)
        err = agent.stderr.read()
        agent.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    docs = [(t, json.loads(ln)) for t, ln in lines]  # every line is a whole JSON document
    counts = []
    for t, doc in docs:
        assert doc["interval_start_ns"] < doc["interval_end_ns"]
        assert doc["interval_start"].endswith("Z") and doc["probe_stats"]["mode"] == "always"
        (target,) = doc["targets"] or [{"netns_inode": a.inode, "segments": {}}]
        assert target["netns_inode"] == a.inode
        counts.append((t, target["segments"].get("rx_pod_stack", {}).get("count", 0)))
    for (_, one), (_, two) in zip(docs, docs[1:]):
        assert one["interval_end_ns"] == two["interval_start_ns"]  # the intervals tile the run
    # 600 packets at 200/s take 3 s: several 0.5 s intervals carry some, and were read while traffic flowed.
    assert sum(1 for t, n in counts if n and t <= sent_at) >= 2, counts
    assert sum(n for _, n in counts) == 600


@pytest.mark.parametrize("args, message", [
    (["--netns", "/run/netns/no-such-namespace"], "network namespace /run/netns/no-such-namespace does not exist"),
    (["--pid", "999999999"], "no process with PID 999999999"),
    (["--netns", "/proc/self/ns/net", "--btf", "/no/such/btf"], "/no/such/btf does not exist"),
    (["--netns", "/proc/self/ns/net", "--segments", "rx_bogus"], "unknown segment(s) rx_bogus"),
    ([], "nothing to trace"),
    (["--netns", "/tmp"], "/tmp is not a network namespace"),
    (["--netns", "/etc/hostname"], "/etc/hostname is not a network namespace"),
    (["--pid", "-1"], "no process with PID -1"),
    (["--netns", "/proc/self/ns/net", "--btf", "/tmp"], "cannot read /tmp"),
    (["--netns", "/proc/self/ns/net", "--otlp-endpoint", "http://127.0.0.1:abc"], "is not an OTLP endpoint"),
    (["--netns", "/proc/self/ns/net", "--otlp-endpoint", "http://127.0.0.1:99999"], "a port is 1-65535"),
    (["--netns", "/proc/self/ns/net", "--otlp-endpoint", "http://u:p@127.0.0.1:4317"], "no user name, password"),
])
def test_errors_are_one_clear_line(args, message):
    out = subprocess.run([AGENT, "trace", "--duration", "1", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_bad_export_setting_is_one_clear_line():
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    out = subprocess.run([AGENT, "trace", "--netns", "/proc/self/ns/net", "--duration", "1"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "OTEL_EXPORTER_OTLP_PROTOCOL" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1


def test_a_namespace_root_cannot_open_is_one_clear_line():
    # Root without CAP_SYS_PTRACE (dropped from the bounding and inheritable sets, so the command never
    # gets it) may not open PID 1's namespace: stat() itself fails with EACCES, as for any agent
    # running without that capability.
    out = subprocess.run(["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace",
                          AGENT, "trace", "--netns", "/proc/1/ns/net", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr == ("latencytrace-agent: no permission to open network namespace /proc/1/ns/net: run as root, "
                          "with CAP_SYS_PTRACE to open another process's namespace\n")


def test_not_root_is_one_clear_line():
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          AGENT, "trace", "--netns", "/proc/self/ns/net", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "must run as root" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_killed_agent_leaves_no_program_attached(lab):
    with running_agent(lab) as agent:  # SIGKILLed at the end of the block
        progs = prog_ids_of(agent.pid)
        links = {link["id"] for link in bpftool("link") if link.get("prog_id") in progs}
        assert len(progs) == len(PROBES) and links  # every program loaded, those it needs attached

    def left():
        return ({p["id"] for p in bpftool("prog")} & progs) | ({link["id"] for link in bpftool("link")} & links)

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:  # the kernel frees them once the fds are closed
        time.sleep(0.2)
    assert not left()


def test_missing_tracepoint_disables_only_its_probe():
    bogus = Probe("lt_softirq_exit", "irq:no_such_tracepoint", "irq", ("unsigned int",), feeds=("rx_irq",))
    tracer = Tracer(probes=PROBES + (bogus,))
    try:
        status = tracer.start()
        assert [(p.tracepoint, why) for p, why in status.unavailable] == [
            ("irq:no_such_tracepoint", "tracepoint not in this kernel")]
        assert len(status.attached) == len(PROBES)
        assert status.disabled_segments() == {"rx_irq"}
    finally:
        tracer.close()
