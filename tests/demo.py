"""The demo: `python -m tests.demo` (run by `.ci/demo`).

On the local cluster (`python -m tests.cluster up`: real control plane, kwok nodes, Jaeger, latencytrace
installed from its chart with its operator and agents running here), it creates two pods whose network
namespaces are real ones on this machine (as a CNI bridge plugin would wire them), a LatencyTrace that
selects them, and traffic from an untraced client; one pod reads too slowly. Then it shows what a user
would look at: the LatencyTrace status, the per-pod latency histograms as Prometheus scrapes them from
the collector, and the slowest packet as a trace in Jaeger, one span per stack segment.

Everything stays up afterwards to explore (KUBECONFIG and Jaeger's address are printed);
`.ci/cluster down` removes it all, the demo's namespaces included.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict

from latencytrace.node_agent.segments import SEGMENTS

from . import netlab
from .cluster import __main__ as cluster
from .cluster.controlplane import load_state
from .cluster.procs import wait_until

NS = "demo"
TRACE = {
    "apiVersion": "latencytrace.io/v1alpha1", "kind": "LatencyTrace",
    "metadata": {"name": "web", "namespace": NS},
    "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "slowThresholdMicroseconds": 500,
             "spansPerSecond": 20, "duration": "1h"},
}


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


class Kubectl:
    def __init__(self, state: dict):
        self.bin, self.env = state["bins"]["kubectl"], {**os.environ, "KUBECONFIG": state["kubeconfig"]}

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        out = subprocess.run([self.bin, *args], input=input, capture_output=True, text=True, env=self.env)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json"))


def make_pods(kubectl: Kubectl, lab: netlab.NetLab, nodes: list[str]) -> dict[str, netlab.Pod]:
    kubectl("create", "namespace", NS, check=False)
    pods = {}
    for i, node in enumerate(nodes[:2]):
        name = f"web-{i}"
        pod = lab.add_pod(name)
        manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS,
                                                                   "labels": {"app": "web"}},
                    "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example.invalid/web:1"}]}}
        kubectl("apply", "-f", "-", input=json.dumps(manifest))
        kubectl("wait", "-n", NS, "--for=jsonpath={.status.phase}=Running", f"pod/{name}", "--timeout=60s")
        # kwok invents pod IPs; point this one at the real namespace, as a CNI would have.
        kubectl("patch", "-n", NS, "pod", name, "--subresource=status", "--type=merge", "-p",
                json.dumps({"status": {"podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}}))
        pods[name] = pod
    return pods


def traffic(client: netlab.Pod, pods: dict[str, netlab.Pod], seconds: int) -> None:
    slow, fast = pods["web-0"], pods["web-1"]
    n = 2000 * seconds
    # web-0 reads in bursts and pauses: datagrams wait in its socket (rx_socket_queue); web-1 keeps up.
    with slow.serve("udp-recv", "--port", "7000", "--count", str(n), "--timeout", str(seconds + 10),
                    "--pause-every", "200", "--pause-ms", "20") as r0, \
         fast.serve("tcp-sink", "--port", "7001", "--timeout", str(seconds + 10)) as r1:
        sender = subprocess.Popen(client.python("traffic.py", "udp-send", "--to", slow.ip, "--port", "7000",
                                                "--count", str(n), "--rate", "2000"), stdout=subprocess.DEVNULL)
        client.traffic("tcp-send", "--to", fast.ip, "--port", "7001", "--count", str(400 * seconds),
                       "--size", "512", "--timeout", str(seconds + 10), timeout=seconds + 30)
        sender.wait(timeout=seconds + 30)
    print(f"   web-0 read {r0.result['received']} datagrams, web-1 received {r1.result['received_bytes']} bytes")


def scrape(url: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(pod, segment) -> cumulative (le, count) buckets of latencytrace.network.stack.duration."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    hist: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for line in text.splitlines():
        if not line.startswith("latencytrace_network_stack_duration_seconds_bucket{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.rindex("}")]))
        le = math.inf if labels["le"] == "+Inf" else float(labels["le"])
        hist[(labels.get("k8s_pod_name", "?"), labels["latencytrace_segment"])].append((le, float(line.split()[-1])))
    return hist


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1)
        prev_le, prev_n = le, n
    return prev_le


def show_histograms(url: str) -> None:
    order = [seg.name for seg in SEGMENTS]
    hist = scrape(url)
    print(f"   {'pod':7} {'segment':16} {'count':>8} {'p50 µs':>9} {'p99 µs':>9}")
    for (pod, seg), buckets in sorted(hist.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        count = max(n for _, n in buckets)
        if count:
            print(f"   {pod:7} {seg:16} {int(count):8d} {quantile(buckets, 0.5) * 1e6:9.1f} "
                  f"{quantile(buckets, 0.99) * 1e6:9.1f}")


def slowest_trace(query_url: str) -> dict:
    url = f"{query_url}/api/traces?service=latencytrace-agent&limit=200&lookback=1h"
    traces = json.loads(urllib.request.urlopen(url, timeout=10).read())["data"] or []
    if not traces:
        raise RuntimeError("no trace reached Jaeger")

    def root_duration(t: dict) -> int:
        return max(s["duration"] for s in t["spans"])

    return max(traces, key=root_duration)


def show_trace(query_url: str, trace: dict) -> None:
    order = {seg.name: seg.id for seg in SEGMENTS}  # segments that start in the same µs: in path order
    spans = sorted(trace["spans"], key=lambda s: (s["startTime"], order.get(s["operationName"], -1)))
    root = max(spans, key=lambda s: s["duration"])
    tags = {t["key"]: t["value"] for t in root["tags"]}
    print(f"   {root['operationName']}: {root['duration']} µs, pod {tags.get('k8s.pod.name')}, "
          f"{tags.get('network.transport', '?')} {tags.get('source.address')}:{tags.get('source.port')} -> "
          f"{tags.get('destination.address')}:{tags.get('destination.port')}, {tags.get('latencytrace.packet.length')} bytes")
    for s in spans:
        if s is root:
            continue
        offset = s["startTime"] - root["startTime"]
        bar = "#" * max(1, round(40 * s["duration"] / max(root["duration"], 1)))
        print(f"     {s['operationName']:16} +{offset:7d} µs {s['duration']:8d} µs  {bar}")
    print(f"   in Jaeger: {query_url}/trace/{trace['traceID']}  (API: {query_url}/api/traces/{trace['traceID']})")


def main() -> int:
    state = load_state(cluster.state_dir())
    if state is None or "jaeger" not in state:
        say("starting the local cluster (python -m tests.cluster up)")
        if cluster.main(["up", "--nodes", "2"]) != 0:
            return 1
        state = load_state(cluster.state_dir())
    kubectl = Kubectl(state)
    nodes = [n["metadata"]["name"] for n in kubectl.json("get", "nodes")["items"]]

    say("pods in real network namespaces, on a bridge as a CNI would wire them")
    lab = netlab.NetLab()
    state["netns"] = state.get("netns", [])
    state["links"] = state.get("links", []) + [lab.bridge]
    pods = make_pods(kubectl, lab, nodes)
    client = lab.add_pod("client")  # not selected by the trace: its packets cost one lookup and leave no trace
    state["netns"] += [p.netns for p in lab.pods.values()]
    (cluster.state_dir() / "state.json").write_text(json.dumps(state, indent=2))
    print(kubectl("get", "pods", "-n", NS, "-o", "wide"), end="")

    say("kubectl apply -f trace.yaml  (LatencyTrace web: pods app=web, slow above 500 µs)")
    kubectl("apply", "-f", "-", input=json.dumps(TRACE))
    wait_until("the trace to be Tracing on both pods", lambda: kubectl.json("get", "lt", "-n", NS, "web")
               .get("status", {}).get("tracedPods") == 2, 90)

    say("traffic for 15 s from an untraced client: UDP to web-0 (a slow reader), TCP to web-1")
    traffic(client, pods, 15)
    time.sleep(6)  # two agent intervals: the last histograms and spans reach the collector

    say("kubectl get lt,ltn")
    print(kubectl("get", "lt", "-n", NS), end="")
    print(kubectl("get", "ltn"), end="")

    say(f"per-pod stack latency, as Prometheus scrapes it from the collector ({state['jaeger']['metrics_url']})")
    show_histograms(state["jaeger"]["metrics_url"])

    say("the slowest packet, as a trace in Jaeger (one span per stack segment)")
    show_trace(state["jaeger"]["query_url"], slowest_trace(state["jaeger"]["query_url"]))

    say("all of it is still running")
    print(f"   export KUBECONFIG={state['kubeconfig']}\n   Jaeger: {state['jaeger']['query_url']}\n"
          f"   stop everything: .ci/cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
