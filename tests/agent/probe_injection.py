"""`latencytrace-agent` with a probe table altered as another kernel would alter it: the tests' one
injection point for probe failures.

The agent decides what it can attach from its probe table (node_agent/probes.py): each row's tracepoint
must exist in the kernel's BTF with the argument types the program reads (kernel/features.py), and the
kernel must then accept the attachment (tracer.py). This runner changes two rows and nothing else, so
that both failures are real ones on this kernel:

- irq:softirq_raise is declared with other argument types than it has: the BTF check finds its
  arguments changed and the probe is never loaded (as on a kernel whose tracepoint changed);
- lt_sock_recv_length, which reads three arguments, is added for tcp:tcp_destroy_sock, which has one:
  its BTF prototype starts as declared, so it is tried, and the kernel refuses it: as a raw tracepoint
  program at attachment (EINVAL), as a typed one (loaded for that tracepoint alone) at verification.

    python tests/agent/probe_injection.py trace --netns ... --format json
"""

from __future__ import annotations

import dataclasses
import functools
import sys

from latencytrace.node_agent import agent, cli
from latencytrace.node_agent.probes import PROBES, Probe
from latencytrace.node_agent.tracer import Tracer

CHANGED = "irq:softirq_raise"
REFUSED = "tcp:tcp_destroy_sock"


def table() -> tuple[Probe, ...]:
    rows = [dataclasses.replace(p, args=("sk_buff *",)) if p.tracepoint == CHANGED else p for p in PROBES]
    rows.append(Probe("lt_sock_recv_length", REFUSED, "rx", ("sock *",), always=True))
    return tuple(rows)


if __name__ == "__main__":
    agent.Tracer = functools.partial(Tracer, probes=table())  # what Agent builds its tracer with
    sys.exit(cli.main(sys.argv[1:]))
