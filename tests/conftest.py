"""Shared pytest setup: the real control plane and Jaeger fixtures (tests/cluster) for every test.

gRPC's fork support is off in the test process (set before anything imports grpc): the tests start
servers with fork and exec (tests/cluster/procs.py) while their own OTLP receiver serves gRPC, and with
fork support on, grpcio restarts its poller thread in the forked child, which can abort on epoll_wait
EBADF once the child closes its inherited descriptors: an operator started that way died with signal 6
before it ran (seen in a CI run). The agent sets the same for the same reason (node_agent/__init__.py).
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

pytest_plugins = ["tests.cluster.fixtures"]
