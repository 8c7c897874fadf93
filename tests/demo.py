"""The demo: `python -m tests.demo` (run by `.ci/demo`).

On the local cluster (`python -m tests.cluster up`: a real control plane and a real node running
latencytrace's chart from the images built here, and Jaeger), it runs two server pods and a client pod
from the workload image, a LatencyTrace that selects the servers, and traffic from the untraced client;
one server reads too slowly. Then it shows what a user would look at: the LatencyTrace status, the
per-pod latency histograms as Prometheus scrapes them from the collector, and the slowest packet as a
trace in Jaeger, one span per stack segment. Nothing is faked: the pods are the kubelet's, their network
namespaces the CNI plugin's, and the agent runs in its DaemonSet pod.

Everything stays up afterwards to explore (KUBECONFIG and Jaeger's address are printed);
`.ci/cluster down` removes it all.
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

from .cluster import __main__ as cluster, images, node
from .cluster.controlplane import load_state
from .cluster.images import WORKLOAD_IMAGE
from .cluster.procs import wait_until

NS = "demo"
PORT = 7000
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

    def __call__(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
        out = subprocess.run([self.bin, *args], input=input, capture_output=True, text=True, env=self.env,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json"))


def pod(name: str, labels: dict[str, str], args: list[str], restart: str = "Always") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": WORKLOAD_IMAGE, "imagePullPolicy": "Never",
                                     "args": args}]}}


def make_servers(kubectl: Kubectl) -> dict[str, str]:
    """web-0 reads in bursts and pauses (datagrams wait in its socket: rx_socket_queue); web-1 keeps up.
    Returns pod name -> pod IP."""
    kubectl("create", "namespace", NS, check=False)
    kubectl("delete", "pods", "-n", NS, "--all", "--wait=true", "--timeout=60s", check=False)
    slow = ["serve", "-listen", f":{PORT}", "-pause-every", "200", "-pause-ms", "20"]
    for name, args in (("web-0", slow), ("web-1", ["serve", "-listen", f":{PORT}"])):
        kubectl("apply", "-f", "-", input=json.dumps(pod(name, {"app": "web"}, args)))
    kubectl("wait", "-n", NS, "--for=condition=Ready", "pod/web-0", "pod/web-1", "--timeout=120s", timeout=130)
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in kubectl.json("get", "pods", "-n", NS)["items"]}


def traffic(kubectl: Kubectl, ips: dict[str, str], seconds: int) -> None:
    """From client pods the trace does not select: UDP to web-0, TCP to web-1, at the same time."""
    runs = {"client-udp": ("udp", ips["web-0"], 2000), "client-tcp": ("tcp", ips["web-1"], 400)}
    for name, (proto, ip, rate) in runs.items():
        args = ["client", "-to", f"{ip}:{PORT}", "-proto", proto, "-n", str(rate * seconds), "-rate", str(rate)]
        kubectl("apply", "-f", "-", input=json.dumps(pod(name, {"app": "client"}, args, restart="Never")))
    for name in runs:
        kubectl("wait", "-n", NS, "--for=jsonpath={.status.phase}=Succeeded", f"pod/{name}",
                f"--timeout={seconds + 90}s", timeout=seconds + 100)
        summary = json.loads(kubectl("logs", "-n", NS, name).strip().splitlines()[-1])
        print(f"   {name}: {summary}")


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
    # The Jaeger built here has no UI assets (they ship only as release downloads): the API link works.
    print(f"   in Jaeger's API: {query_url}/api/traces/{trace['traceID']}")


def main() -> int:
    state = load_state(cluster.state_dir())
    if state is None or "jaeger" not in state:
        say("starting the local cluster (python -m tests.cluster up)")
        if cluster.main(["up"]) != 0:
            return 1
        state = load_state(cluster.state_dir())
    kubectl = Kubectl(state)
    built = images.ensure_all()  # the workload as this checkout has it, in the node's store
    node.import_images({WORKLOAD_IMAGE: built[WORKLOAD_IMAGE]})
    print(kubectl("get", "nodes", "-o", "wide"), end="")
    print(kubectl("get", "pods", "-n", "latencytrace", "-o", "wide"), end="")

    say("two server pods from the workload image, placed by the scheduler, on the CNI bridge")
    ips = make_servers(kubectl)
    print(kubectl("get", "pods", "-n", NS, "-o", "wide"), end="")

    say("kubectl apply -f trace.yaml  (LatencyTrace web: pods app=web, slow above 500 µs)")
    kubectl("apply", "-f", "-", input=json.dumps(TRACE))
    wait_until("the trace to be Tracing on both pods", lambda: kubectl.json("get", "lt", "-n", NS, "web")
               .get("status", {}).get("tracedPods") == 2, 120)

    say("traffic for 15 s from untraced client pods: UDP to web-0 (a slow reader), TCP to web-1")
    traffic(kubectl, ips, 15)
    time.sleep(6)  # two agent intervals: the last histograms and spans reach the collector

    say("kubectl get lt,ltn")
    print(kubectl("get", "lt", "-n", NS), end="")
    print(kubectl("get", "ltn"), end="")

    say(f"per-pod stack latency, as Prometheus scrapes it from the collector ({state['jaeger']['metrics_url']})")
    show_histograms(state["jaeger"]["metrics_url"])

    say("the slowest packet, as a trace in Jaeger (one span per stack segment)")
    show_trace(state["jaeger"]["query_url"], slowest_trace(state["jaeger"]["query_url"]))

    say("all of it is still running")
    print(f"   export KUBECONFIG={state['kubeconfig']}\n   Jaeger API: {state['jaeger']['query_url']}/api/traces\n"
          f"   stop everything: .ci/cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
