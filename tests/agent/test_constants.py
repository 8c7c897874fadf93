"""The constants the probes share with user space come from one Python table each, never by hand.

Counter positions (LT_C_*) from collectors.COUNTERS, event kinds (LT_EV_*) from events.KINDS, segment and
boundary ids from segments.py, histogram thresholds from histogram.py: every such name the C uses is a
generated macro, none is defined in the C, and the kernel counts each counter where user space reads it
(tests/agent/test_claims_kernel.py and test_segments_kernel.py read them back by name).
"""

from __future__ import annotations

import re

from latencytrace.node_agent import collectors, events, histogram, program
from latencytrace.node_agent.kernel.offsets import MEMBERS as OFFSETS

def _macros() -> dict:
    offsets = dict.fromkeys(OFFSETS, 0) | {"LT_SKB_WIN_START": 0, "LT_SKB_WIN_LEN": 8}
    return program.macros(offsets, program.Sizes(), 2)


def test_every_generated_constant_the_c_uses_is_generated_and_none_is_defined_by_hand():
    src = program.source()
    used = set(re.findall(r"\b(LT_(?:C|EV|TAIL)_[A-Z_]+)\b", src))
    macros = _macros()
    assert used and used <= set(macros), sorted(used - set(macros))
    defined = set(re.findall(r"#define\s+(LT_[A-Z0-9_]+)", src))
    assert not defined & set(macros), sorted(defined & set(macros))
    # Counters: one per position, named as user space reports them.
    assert [macros[f"LT_C_{c.macro}"] for c in collectors.COUNTERS] == list(range(len(collectors.COUNTERS)))
    assert len(collectors.COUNTERS) <= macros["LT_NCOUNTERS"]
    assert collectors.COUNTER_NAMES[:5] == ("events_lost", "rate_limited", "stale_flights", "clamped", "negative")
    # Event kinds: what the kernel writes is what events.decode() names.
    assert {macros[f"LT_EV_{n.upper()}"]: n for n in events.KINDS.values()} == events.KINDS
    # Tail calls: each slot the C calls is the one the loader fills with that program, inside the array.
    for t in program.TAIL_CALLS:
        assert macros[f"LT_TAIL_{t.macro}"] == t.index < macros["LT_TAIL_SLOTS"]
        assert re.search(rf"BPF_PROG_ARRAY\({t.array}, LT_TAIL_SLOTS\)", src), t.array
        assert re.search(rf"int {t.program}\(", src) and f"LT_TAIL_{t.macro}" in src, t


def test_histogram_thresholds_reach_the_c_as_generated():
    macros = _macros()
    assert [macros[f"LT_M{j}"] for j in range(8)] == [f"{t}ULL" for t in histogram.MANTISSA_THRESHOLDS]
    assert macros["LT_OCTAVE_BASE"] == histogram.OCTAVE_BASE


def test_in_flight_tables_are_powers_of_two_at_least_as_large_as_configured():
    m = program.macros(dict.fromkeys(OFFSETS, 0), program.Sizes(rx_inflight=1000, tx_inflight=64, send_inflight=1), None)
    assert (m["LT_RX_BITS"], m["LT_TX_BITS"], m["LT_SOCK_BITS"], m["LT_SOCKQ_BITS"]) == (10, 6, 2, 10)
