"""The traffic the benchmarks measure: iperf3 (TCP bulk, UDP at a fixed packet rate, and that rate dropped
by the server pod's netfilter) and sockperf ping-pong (TCP and UDP request/response), from a client pod into
a server pod of the lab; and, with no packets at all, the time of one system call in a pod (a raw_syscalls
hook costs every syscall of the node, not only the network's).

Client and server are pinned to different CPUs so that each run places the work the same way; every
run also reports the packets that crossed the server pod's veth and the CPU time the whole machine
spent meanwhile, from which the per-packet figures are made.

`background` keeps a traced pod busy while another pod is measured: UDP datagrams at a modest rate, sent
in bursts every 10 ms by a sender that sleeps between them (traffic.py's paced sender spins, which on 2
cores would take a whole CPU from the measurement) and read by the traced pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tests.netlab import Pod

from .system import busy_cpu_ns, link_packets

IPERF_PORT = 5201
SOCKPERF_PORT = 11111
UDP_PAYLOAD = 64  # bytes: small packets, where the per-packet cost of tracing shows most
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# getppid(2) in batches for a while: the median time per call of the batches (the interpreter's loop is in
# every batch alike, off and on).
_SYSCALL_LOOP = """
import os, statistics, sys, time
end, per, call = time.monotonic() + float(sys.argv[1]), [], os.getppid
while time.monotonic() < end or len(per) < 5:
    t = time.perf_counter_ns()
    for _ in range(50_000):
        call()
    per.append((time.perf_counter_ns() - t) / 50_000)
print(statistics.median(per), len(per) * 50_000)
"""


# Unix-socket messages back and forth over a socketpair (no packets: the node's runtime, its agents'
# gRPC and its logs talk so), for `seconds`: the messages sent.
_UNIX_PINGPONG = """
import socket, sys, time
a, b = socket.socketpair()
end, n = time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    for _ in range(10_000):
        a.send(b"x")
        b.recv(16)
    n += 10_000
print(n)
"""


# The background's sender and reader (run with `python3 -c`): bursts of 64-byte datagrams every 10 ms.
_BACKGROUND_SEND = """
import socket, sys, time
to, port, pps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in to else socket.AF_INET, socket.SOCK_DGRAM)
burst, payload, t = max(1, pps // 100), b"x" * 64, time.monotonic()
while True:
    for _ in range(burst):
        try:
            s.sendto(payload, (to, port))
        except OSError:
            pass
    t += burst / pps
    time.sleep(max(0.0, t - time.monotonic()))
"""
_BACKGROUND_RECV = """
import signal, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
got = 0
def done(*_):
    print(got, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    s.recv(65535)
    got += 1
"""
BACKGROUND_PORT = 9400


class WorkloadError(RuntimeError):
    pass


@dataclass
class Window:
    """Machine-wide counters around one run."""

    packets: int  # packets in and out of the server pod
    busy_cpu_ns: float
    seconds: float


class Traffic:
    def __init__(self, client_cpu: int = 0, server_cpu: int | None = None):
        ncpu = os.cpu_count() or 1
        self.client_cpu = client_cpu
        self.server_cpu = ncpu - 1 if server_cpu is None else server_cpu

    # -- plumbing ------------------------------------------------------------------------------
    def _pinned(self, pod: Pod, cpu: int, *cmd: str) -> list[str]:
        return pod.exec("taskset", "-c", str(cpu), *cmd)

    @contextlib.contextmanager
    def _server(self, pod: Pod, port: int, udp: bool, *cmd: str) -> Iterator[subprocess.Popen]:
        proc = subprocess.Popen(self._pinned(pod, self.server_cpu, *cmd), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            _wait_listening(pod, port, udp, proc)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()

    def _client(self, client: Pod, timeout: float, *cmd: str) -> str:
        out = subprocess.run(self._pinned(client, self.client_cpu, *cmd), capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise WorkloadError(f"{' '.join(cmd[:2])} failed in pod {client.name}: "
                                f"{(out.stderr or out.stdout).strip()[-400:]}")
        return out.stdout

    @contextlib.contextmanager
    def _window(self, server: Pod) -> Iterator[Window]:
        w = Window(0, 0.0, 0.0)
        p0, c0, t0 = link_packets(server.host_veth), busy_cpu_ns(), time.monotonic()
        yield w
        w.packets = link_packets(server.host_veth) - p0
        w.busy_cpu_ns = busy_cpu_ns() - c0
        w.seconds = time.monotonic() - t0

    def counted(self, server: Pod, run: Callable[[], dict]) -> dict:
        """What `run` returns, with the packets into and out of `server` meanwhile, counted as the other
        workloads count them; `run`'s failure is reported in "error", with what crossed until then."""
        with self._window(server) as w:
            try:
                r = run()
            except Exception as e:  # a service out of reach: this workload's figures only are lost
                r = {"error": f"{type(e).__name__}: {e}"}
        return {**r, "packets": w.packets, "seconds": w.seconds, "busy_cpu_ns_per_packet":
                w.busy_cpu_ns / max(w.packets, 1)}

    @contextlib.contextmanager
    def background(self, client: Pod, server: Pod, pps: int) -> Iterator[dict]:
        """`pps` UDP datagrams a second from `client` into `server`, read there, for as long as the block
        runs (0: none). The dict it gives is filled at the end with the rate `server` read; fewer than
        half of them is an error (the background did not run as said)."""
        out: dict = {}
        if not pps:
            yield out
            return
        recv = subprocess.Popen(server.exec("python3", "-c", _BACKGROUND_RECV, server.ip, str(BACKGROUND_PORT)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        send = None
        try:
            if recv.stdout.readline().strip() != "ready":
                raise WorkloadError(f"the background reader did not start in pod {server.name}")
            send = subprocess.Popen(client.exec("python3", "-c", _BACKGROUND_SEND, server.ip, str(BACKGROUND_PORT),
                                                str(pps)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = time.monotonic()
            yield out
            seconds = time.monotonic() - started
            send.kill()
            send.wait()
            recv.terminate()
            got = recv.communicate(timeout=10)[0].split()
            out["background_pps"] = int(got[-1]) / seconds if got and got[-1].isdigit() else 0.0
            if out["background_pps"] < pps / 2:
                raise WorkloadError(f"the background traffic into pod {server.name} ran at "
                                    f"{out['background_pps']:.0f} datagrams/s, not {pps}")
        finally:
            for proc in (send, recv):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            recv.stdout.close()

    # -- workloads -----------------------------------------------------------------------------
    def tcp_bulk(self, client: Pod, server: Pod, seconds: float) -> dict:
        """iperf3 TCP bulk transfer client -> server: delivered throughput."""
        with self._server(server, IPERF_PORT, False, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)), \
                self._window(server) as w:
            out = self._client(client, seconds + 30, "iperf3", "-c", server.ip, "-p", str(IPERF_PORT),
                               "-t", str(seconds), "-J")
        end = json.loads(out)["end"]
        return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": end["sum_sent"].get("retransmits", 0),
                "packets": w.packets, "busy_cpu_ns_per_packet": w.busy_cpu_ns / max(w.packets, 1),
                "seconds": w.seconds}

    def udp_rate(self, client: Pod, server: Pod, pps: int, seconds: float) -> dict:
        """iperf3 UDP at a fixed offered rate of small datagrams: what arrives and what it costs."""
        # 4 MiB socket buffers on both ends (iperf3 passes -w to the server): iperf3 paces in 1 ms
        # bursts, which would overflow default buffers even without tracing.
        with self._server(server, IPERF_PORT, False, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)), \
                self._window(server) as w:
            out = self._client(client, seconds + 30, "iperf3", "-c", server.ip, "-p", str(IPERF_PORT), "-u",
                               "-b", str(pps * UDP_PAYLOAD * 8), "-l", str(UDP_PAYLOAD), "-w", "4M",
                               "-t", str(seconds), "-J")
        end = json.loads(out)["end"]
        sent = end["sum_sent"]["packets"]
        rcv = end["sum_received"]
        read = rcv["packets"] - rcv["lost_packets"]  # datagrams the receiving application got
        return {"offered_pps": pps, "sent": sent, "received": read,
                "sent_pps": sent / end["sum_sent"]["seconds"],
                "delivered_pps": read / rcv["seconds"] if rcv["seconds"] else 0.0,
                "loss_pct": 100.0 * (sent - read) / sent if sent else 0.0,
                "packets": w.packets, "busy_cpu_ns_per_packet": w.busy_cpu_ns / max(w.packets, 1),
                "seconds": w.seconds}

    def udp_dropped(self, client: Pod, server: Pod, pps: int, seconds: float) -> dict:
        """`udp_rate` with every data datagram dropped as it arrives in `server`, by a netfilter rule in its
        namespace (as a NetworkPolicy's deny or a firewall drops a flood): what a drop storm costs. The rule
        matches the data datagrams' length only, so iperf3's own small datagrams (its UDP handshake) pass."""
        rule = ("INPUT", "-p", "udp", "--dport", str(IPERF_PORT), "-m", "length", "--length", str(20 + 8 + UDP_PAYLOAD),
                "-j", "DROP")
        subprocess.run(server.exec("iptables", "-I", *rule), check=True, capture_output=True)
        try:
            r = self.udp_rate(client, server, pps, seconds)
        finally:
            subprocess.run(server.exec("iptables", "-D", *rule), check=False, capture_output=True)
        if r["received"]:
            raise WorkloadError(f"{r['received']} datagrams of the drop storm reached the server in pod {server.name}")
        return r

    def pingpong(self, client: Pod, server: Pod, proto: str, seconds: float) -> dict:
        """sockperf ping-pong (one request in flight): round-trip time percentiles in microseconds."""
        tcp = ["--tcp"] if proto == "tcp" else []
        with self._server(server, SOCKPERF_PORT, proto == "udp", "sockperf", "sr", "-i", server.ip,
                          "-p", str(SOCKPERF_PORT), *tcp), self._window(server) as w:
            out = self._client(client, seconds + 30, "sockperf", "pp", "-i", server.ip, "-p", str(SOCKPERF_PORT),
                               *tcp, "-t", str(seconds), "-m", str(UDP_PAYLOAD), "--full-rtt")
        res = parse_sockperf(out)
        res.update(packets=w.packets, seconds=w.seconds)
        return res

    def syscalls(self, pod: Pod, seconds: float) -> dict:
        """getppid(2) in a loop inside `pod` (no packets): nanoseconds per call."""
        out = self._client(pod, seconds + 30, "python3", "-c", _SYSCALL_LOOP, str(seconds))
        ns, calls = out.split()
        return {"ns_per_call": float(ns), "calls": int(calls), "seconds": seconds}

    def unix_pingpong(self, pod: Pod, seconds: float) -> dict:
        """Messages over a unix socketpair inside `pod`, one at a time: the socket hooks' cost for sockets
        that are not the network's (sk_data_ready and sock_recv_length run for them too)."""
        n = int(self._client(pod, seconds + 30, "python3", "-c", _UNIX_PINGPONG, str(seconds)).strip())
        return {"packets": n, "messages": n, "seconds": seconds}


def parse_sockperf(text: str) -> dict:
    text = _ANSI.sub("", text)
    pct = {float(p): float(v) for p, v in re.findall(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)", text)}
    avg = re.search(r"avg-(?:rtt|lat)=([\d.]+)", text)
    obs = re.search(r"Total (\d+) observations", text)
    if 50.0 not in pct or 99.0 not in pct or not obs:
        raise WorkloadError(f"cannot read sockperf's result from: {text.strip()[-400:]}")
    return {"p50_us": pct[50.0], "p90_us": pct.get(90.0), "p99_us": pct[99.0], "p999_us": pct.get(99.9),
            "avg_us": float(avg.group(1)) if avg else None, "round_trips": int(obs.group(1))}


def _wait_listening(pod: Pod, port: int, udp: bool, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    flag = "-u" if udp else "-t"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkloadError(f"server in pod {pod.name} exited: {proc.stdout.read()[-400:]}")
        out = subprocess.run(pod.exec("ss", "-Hln", flag, f"sport = :{port}"), capture_output=True, text=True)
        if out.stdout.strip():
            return
        time.sleep(0.05)
    raise WorkloadError(f"nothing listens on port {port} in pod {pod.name} after {timeout:.0f} s")
