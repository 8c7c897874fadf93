"""Loads tests/bpf/selftest.bpf.c with the product's header and macros, and runs programs on demand."""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

from latencytrace.node_agent.kernel import bpfsys
from latencytrace.node_agent.tracer import Tracer

BPF_PROG_TEST_RUN = 10

__test__ = False  # not a test module: pytest must not collect test_run_raw_tp


def load():
    from bcc import BPF

    # Appended to the product's source, as the product assembles its own: BCC rewrites map calls only
    # in the main text, not in included headers.
    # Raw tracepoint macros: these programs attach through BCC by name and run under BPF_PROG_TEST_RUN,
    # which typed tracepoint programs do not have (the product's typed reads are what every kernel
    # segment test exercises).
    src, cflags, _ = Tracer(tracepoints="raw").build_source()
    src += (Path(__file__).resolve().parents[1] / "bpf" / "selftest.bpf.c").read_text()
    return BPF(text=src.encode(), cflags=cflags)


def test_run_raw_tp(bpf, fn_name: str, args: list[int]) -> None:
    """Run a raw tracepoint program once with ctx->args = args (BPF_PROG_TEST_RUN)."""
    fn = bpf.load_func(fn_name.encode(), bpf.RAW_TRACEPOINT)
    ctx = (ct.c_uint64 * len(args))(*args)
    attr = (ct.c_uint8 * 80)()
    ct.c_uint32.from_buffer(attr, 0).value = fn.fd
    ct.c_uint32.from_buffer(attr, 40).value = ct.sizeof(ctx)
    ct.c_uint64.from_buffer(attr, 48).value = ct.addressof(ctx)
    bpfsys._bpf(BPF_PROG_TEST_RUN, attr)
