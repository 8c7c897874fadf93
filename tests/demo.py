"""The demo: `python -m tests.demo` (run by `.ci/demo`).

On the local cluster (`python -m tests.cluster up`: a real control plane and a real node running
latencytrace's chart from the images built here, a collector, Prometheus and Jaeger), it runs two server pods and a client pod
from the workload image, a LatencyTrace that selects the servers, and traffic from the untraced client;
one server reads too slowly. Then it shows what a user would look at: the LatencyTrace status, the
per-pod per-segment quantiles from Prometheus' native histograms (the agents export through an
OpenTelemetry Collector), and the slowest packet, found through an exemplar in Prometheus, as a trace in
Jaeger with one span per stack segment. Nothing is faked: the pods are the kubelet's, their network
namespaces the CNI plugin's, and the agent runs in its DaemonSet pod.

Everything stays up afterwards to explore (KUBECONFIG and the backends' API addresses are printed);
`.ci/cluster down` removes it all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

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


HIST = "latencytrace_network_stack_duration_seconds"


def prom(url: str, path: str, **params) -> object:
    """GET <prometheus>/api/v1/<path>: its data."""
    full = f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    return json.loads(urllib.request.urlopen(full, timeout=10).read())["data"]


def by_pod_segment(url: str, promql: str) -> dict[tuple[str, str], float]:
    return {(r["metric"].get("k8s_pod_name", "?"), r["metric"]["latencytrace_segment"]): float(r["value"][1])
            for r in prom(url, "query", query=promql)["result"]}


def show_histograms(url: str) -> None:
    """Per-pod per-segment quantiles from the native histograms, since the trace began (the cumulative
    histograms: a dashboard would take rate() over a window instead)."""
    series = f'{HIST}{{k8s_namespace_name="{NS}"}}'
    queries = {"count": f"histogram_count({series})",
               "p50": f"histogram_quantile(0.5, {series})",
               "p99": f"histogram_quantile(0.99, {series})"}
    for name, q in queries.items():
        print(f"   {name}: {q}")
    results = {name: by_pod_segment(url, q) for name, q in queries.items()}
    order = [seg.name for seg in SEGMENTS]
    print(f"   {'pod':7} {'segment':16} {'count':>8} {'p50 µs':>9} {'p99 µs':>9}")
    for pod, seg in sorted(results["count"], key=lambda k: (k[0], order.index(k[1]))):
        count = results["count"][(pod, seg)]
        if count:
            print(f"   {pod:7} {seg:16} {int(count):8d} {results['p50'][(pod, seg)] * 1e6:9.1f} "
                  f"{results['p99'][(pod, seg)] * 1e6:9.1f}")
    print(f"   in Prometheus' API: {url}/api/v1/query?{urllib.parse.urlencode({'query': queries['p99']})}")


def slowest_exemplar(url: str, pod: str) -> dict:
    """The slowest packet of `pod` that Prometheus holds an exemplar of, on its total segments."""
    selector = f'{HIST}{{k8s_namespace_name="{NS}",k8s_pod_name="{pod}",latencytrace_segment=~"rx_total|tx_total"}}'
    now = time.time()
    print(f"   query_exemplars: {selector}")
    found = prom(url, "query_exemplars", query=selector, start=now - 3600, end=now) or []
    exemplars = [{**e, "series": s["seriesLabels"]} for s in found for e in s["exemplars"]]
    if not exemplars:
        raise RuntimeError("Prometheus holds no exemplar of the demo's pods")
    slowest = max(exemplars, key=lambda e: float(e["value"]))
    labels = slowest["series"]
    print(f"   slowest: {float(slowest['value']) * 1e6:.1f} µs, pod {labels.get('k8s_pod_name')} "
          f"{labels['latencytrace_segment']}, trace_id {slowest['labels']['trace_id']} "
          f"(of {len(exemplars)} exemplars)")
    return slowest


def jaeger_trace(query_url: str, trace_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = json.loads(urllib.request.urlopen(f"{query_url}/api/traces/{trace_id}", timeout=10).read())
            if data.get("data"):
                return data["data"][0]
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"trace {trace_id} is not in Jaeger")
        time.sleep(1)


def show_trace(query_url: str, trace: dict) -> None:
    order = {seg.name: seg.id for seg in SEGMENTS}  # segments that start in the same µs: in path order
    spans = sorted(trace["spans"], key=lambda s: (s["startTime"], order.get(s["operationName"], -1)))
    root = next(s for s in spans if not s.get("references"))
    tags = {t["key"]: t["value"] for t in root["tags"]}
    resource = {t["key"]: t["value"] for t in trace["processes"][root["processID"]]["tags"]}
    print(f"   {root['operationName']}: {root['duration']} µs, pod {resource.get('k8s.pod.name')}, "
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
    if state is not None and "prometheus" not in state:
        raise SystemExit("a local cluster made by an older checkout (no Prometheus) is up: .ci/cluster down first")
    if state is None:
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
    time.sleep(6)  # two agent intervals: the last histograms and spans reach the backends

    say("kubectl get lt,ltn")
    print(kubectl("get", "lt", "-n", NS), end="")
    print(kubectl("get", "ltn"), end="")

    prometheus = state["prometheus"]["url"]
    say("per-pod stack latency in Prometheus (native histograms through the collector)")
    show_histograms(prometheus)

    say("web-0's slowest packet: an exemplar in Prometheus, its trace in Jaeger (one span per stack segment)")
    exemplar = slowest_exemplar(prometheus, "web-0")
    show_trace(state["jaeger"]["query_url"], jaeger_trace(state["jaeger"]["query_url"],
                                                          exemplar["labels"]["trace_id"]))

    say("all of it is still running")
    print(f"   export KUBECONFIG={state['kubeconfig']}\n   Prometheus API: {prometheus}/api/v1/query\n"
          f"   Jaeger API: {state['jaeger']['query_url']}/api/traces\n   stop everything: .ci/cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
