"""The node agent.

gRPC's fork support is turned off here, before anything imports grpc: the agent starts its BPF compiler
child (kernel/loader.py) with fork and exec while its OTLP exporters' gRPC channels are live, and with
fork support on, grpcio (1.80 and later) restarts its poller thread in the forked child, where closing
the inherited descriptors before exec makes it abort on epoll_wait EBADF: the child dies before it
runs. The agent never uses gRPC in a forked child, so the handlers buy nothing. An operator can still
set GRPC_ENABLE_FORK_SUPPORT in the environment.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
