"""python -m tests.cluster build|up|down|status

  build            build every pinned tool that is missing (tests/cluster/build.sh)
  up [--nodes N]   start a detached control plane (controllers + kwok) with N fake
                   nodes, Jaeger, and latencytrace installed from its chart (operator
                   and one agent per node running here); prints `export KUBECONFIG=...`
  down             stop it and remove its state dir
  status           show whether it runs, and its nodes

State (pids, kubeconfig, logs, etcd data) lives in
${LATENCYTRACE_STATE:-/var/run/latencytrace-cluster}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import install, versions
from .jaeger import Jaeger
from .controlplane import ControlPlane, load_state, process_matches, run_tool, stop_from_state


def state_dir() -> Path:
    return Path(os.environ.get("LATENCYTRACE_STATE", "/var/run/latencytrace-cluster"))


# The local cluster's chart values: quick intervals for a demo; spans to Jaeger, metrics to the
# Prometheus endpoint of the same collector, which takes explicit-bucket histograms only.
LOCAL_VALUES = {
    "operator": {"statusIntervalSeconds": 2},
    "agent": {"intervalSeconds": 2, "statusSeconds": 10, "statusMinGapSeconds": 1, "retrySeconds": 2,
              "extraEnv": [{"name": "LATENCYTRACE_EXPORT_HISTOGRAM", "value": "explicit"}]},
    "otlp": {"insecure": True},
}


def post_start(cp: ControlPlane, nodes: list[str]) -> None:
    """Run by `up` once the control plane and its nodes are ready: Jaeger as the OpenTelemetry backend,
    then latencytrace installed from its chart, its operator and agents running on this machine."""
    jaeger = Jaeger(cp.workdir / "jaeger", detach=True, prometheus=True).start()
    install.record(cp, [jaeger.proc], jaeger={"ports": jaeger.ports, "query_url": jaeger.query_url,
                                              "metrics_url": jaeger.metrics_url})
    values = {**LOCAL_VALUES, "otlp": {**LOCAL_VALUES["otlp"], "endpoint": f"http://{jaeger.otlp_grpc_endpoint}"}}
    install.record(cp, install.install(cp, nodes, values))


def cmd_build(_: argparse.Namespace) -> int:
    versions.run_build(["all"])
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    workdir = state_dir()
    state = load_state(workdir)
    if state and any(process_matches(p["pid"], p["exe"]) for p in state["procs"]):
        print(f"already up; export KUBECONFIG={state['kubeconfig']}")
        return 0
    shutil.rmtree(workdir, ignore_errors=True)  # leftovers of a crashed run
    cp = ControlPlane(workdir, with_controllers=True, with_kwok=True, detach=True)
    cp.start()
    try:
        nodes = cp.create_fake_nodes(args.nodes)
        post_start(cp, nodes)
    except BaseException:
        stop_from_state(workdir)  # what post_start recorded (Jaeger, operator, agents)
        cp.stop()
        raise
    print(f"control plane up at {cp.api_url} with {args.nodes} fake nodes and latencytrace installed "
          f"(logs: {workdir / 'logs'}); stop with: .ci/cluster down", file=sys.stderr)
    print(f"export KUBECONFIG={cp.kubeconfig}")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    workdir = state_dir()
    state = load_state(workdir) or {}
    stopped = stop_from_state(workdir)
    for name in state.get("netns", []):  # pod namespaces a demo left for you to explore
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for link in state.get("links", []):
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"stopped {stopped} processes; removed {workdir}")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    state = load_state(state_dir())
    if state is None:
        print("down")
        return 1
    running = [p["name"] for p in state["procs"] if process_matches(p["pid"], p["exe"])]
    missing = [p["name"] for p in state["procs"] if p["name"] not in running]
    print(f"api: {state['api_url']}\nkubeconfig: {state['kubeconfig']}\n"
          f"running: {', '.join(running) or '-'}\nnot running: {', '.join(missing) or '-'}")
    if running:
        env = {**os.environ, "KUBECONFIG": state["kubeconfig"]}
        nodes = run_tool([state["bins"]["kubectl"], "get", "nodes"], env, check=False)
        print(nodes.stdout or nodes.stderr, end="")
    return 0 if not missing else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build missing tools").set_defaults(func=cmd_build)
    up = sub.add_parser("up", help="start a detached control plane")
    up.add_argument("--nodes", type=int, default=2, help="fake nodes to create (default 2)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop it and remove its state").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show its state").set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
