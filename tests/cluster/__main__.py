"""python -m tests.cluster build|up|down|status

  build                 build every pinned tool that is missing (tests/cluster/build.sh)
  up [--kwok-nodes N]   start a detached local cluster: control plane, the real node (containerd,
                        kubelet, kube-proxy, CNI) running latencytrace's chart from the images built
                        here, a collector, Prometheus and Jaeger, and N kwok fake nodes (default none); prints `export KUBECONFIG=...`
  down                  stop it and remove everything it made
  status                show whether it runs, and its nodes

State (pids, kubeconfig, logs, etcd data) lives in
${LATENCYTRACE_STATE:-/var/run/latencytrace-cluster}; the node's in /var/lib/latencytrace-node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from . import local, versions
from .controlplane import load_state, process_matches, run_tool


def state_dir() -> Path:
    return Path(os.environ.get("LATENCYTRACE_STATE", "/var/run/latencytrace-cluster"))


def cmd_build(_: argparse.Namespace) -> int:
    versions.run_build(["all"])
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    workdir = state_dir()
    state = load_state(workdir)
    if state and any(process_matches(p["pid"], p["exe"]) for p in state["procs"]):
        print(f"already up; export KUBECONFIG={state['kubeconfig']}")
        return 0
    local.down(workdir)  # leftovers of a crashed run, as recorded
    shutil.rmtree(workdir, ignore_errors=True)
    cluster = local.LocalCluster(workdir, kwok_nodes=args.kwok_nodes, detach=True).start()
    try:
        print("[cluster] helm install latencytrace (the built images, on the real node)", file=sys.stderr)
        cluster.helm_install()
    except BaseException:
        cluster.stop()
        raise
    print(f"local cluster up at {cluster.cp.api_url}: node {cluster.node_name}"
          f"{f' and {args.kwok_nodes} kwok nodes' if args.kwok_nodes else ''}, latencytrace installed "
          f"(logs: {workdir / 'logs'}); stop with: .ci/cluster down", file=sys.stderr)
    print(f"export KUBECONFIG={cluster.cp.kubeconfig}")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    workdir = state_dir()
    stopped = local.down(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"stopped {stopped} processes and the node; removed {workdir}")
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
        nodes = run_tool([state["bins"]["kubectl"], "get", "nodes", "-o", "wide"], env, check=False)
        print(nodes.stdout or nodes.stderr, end="")
    return 0 if not missing else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build missing tools").set_defaults(func=cmd_build)
    up = sub.add_parser("up", help="start a detached local cluster")
    up.add_argument("--kwok-nodes", type=int, default=0, help="kwok fake nodes to add (default 0)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop it and remove its state").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show its state").set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
