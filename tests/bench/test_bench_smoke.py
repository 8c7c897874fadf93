"""The benchmark harness end to end, tiny: `--quick` runs every part for real (agent, bpftrace, iperf3,
sockperf, a control plane with kwok) for a second or so each, and writes all three result files."""

from __future__ import annotations

import json

import pytest

from tests.bench import cli
from tests.bench.results import SECTIONS

COLUMNS = {"section", "measurement", "baseline", "with_agent", "change", "target", "met", "note"}


@pytest.mark.timeout(1200)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # BCC warns about str sources, printing them whole
def test_quick_run_writes_results_table_json_and_plot(tmp_path):
    status = cli.main(["--quick", "--out", str(tmp_path)])

    doc = json.loads((tmp_path / "results.json").read_text())
    errors = {k: s["error"] for k, s in doc["sections"].items() if "error" in s}
    assert status == 0 and not errors, errors
    for key in ("kernel", "cpu_model", "cores", "memory_gib", "date"):
        assert doc["machine"][key], key
    assert "--quick" in doc["command"]
    by_section: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        assert set(row) == COLUMNS, row
        assert row["section"] in SECTIONS
        by_section.setdefault(row["section"], []).append(row)
    assert set(by_section) == set(SECTIONS), f"sections without rows: {set(SECTIONS) - set(by_section)}"
    assert any(r["met"] is not None for r in doc["rows"])
    # Figures the reader relies on are real numbers, not placeholders.
    assert doc["sections"]["overhead"]["summary"]["tcp_bulk/traced"]["gbit_s"]["median_off"] > 0
    assert doc["sections"]["probe_cost"]["agent"]["per_packet"]["udp_rate/traced"]["raw_ns"] > 0
    # An untraced pod's request-response traffic, each packet meeting the programs cold.
    assert doc["sections"]["probe_cost"]["agent"]["per_packet"]["pp_udp/untraced"]["raw_ns"] > 0
    assert doc["sections"]["probe_cost"]["agent"]["per_packet"]["unix_pp/untraced"]["raw_ns"] > 0
    # A drop storm: every datagram dropped in the pod, each one a run of the drop hook.
    for key in ("drop/untraced", "drop/traced"):
        w = doc["sections"]["probe_cost"]["agent"]["workloads"][key]
        assert w["result"]["sent"] > 0 and w["result"]["received"] == 0, w["result"]
        assert w["programs"]["lt_kfree_skb"]["run_cnt"] >= 0.99 * w["result"]["sent"], (key, w["programs"])
    # One program run's dispatch, statistics off: a second empty program always costs something.
    dispatch = doc["sections"]["probe_cost"]["dispatch"]
    assert dispatch["dispatch_ns"] > 0, dispatch
    # The arms with the agent timing 1 packet in 8.
    assert doc["sections"]["probe_cost"]["agent_time8"]["per_packet"]["udp_rate/traced"]["raw_ns"] > 0
    assert doc["sections"]["overhead"]["summary"]["pp_tcp/traced/time_one_in_8"]["p50_us"]["median_on"] > 0
    # The arms with the agent asking only for the lean segments: fewer program runs a packet into either pod.
    lean, full = (doc["sections"]["probe_cost"][t]["per_packet"] for t in ("agent_lean", "agent"))
    for key in ("udp_rate/traced", "pp_udp/untraced", "pp_tcp/untraced"):
        assert 0 < lean[key]["runs_per_packet"] < full[key]["runs_per_packet"], (key, lean[key], full[key])
    assert doc["sections"]["overhead"]["summary"]["pp_udp/untraced/lean_segments"]["p50_us"]["median_on"] > 0
    # The agent with raw tracepoints, alone and paired with the typed one on the same packets.
    assert doc["sections"]["probe_cost"]["agent_raw"]["per_packet"]["udp_rate/traced"]["raw_ns"] > 0
    pair = doc["sections"]["paired"]["workloads"]["udp_rate/traced"]
    assert pair["per_packet_ns"]["typed"] > 0 and pair["per_packet_ns"]["raw"] > 0, pair
    assert doc["sections"]["fidelity"]["accounting"]["server_segments"]["rx_pod_stack"]["count"] > 0
    # Both tools saw the host's own client's packets cross into the pod (they start at its queueing).
    from_host = doc["sections"]["fidelity"]["medians"]["combined"]["host"]["tcp"]["rx_host_to_pod"]
    assert from_host["agent_count"] > 0 and from_host["bpftrace_count"] > 0, from_host
    # The agent alone asking only for the compared segments measured them too.
    assert from_host["agent_alone_own_segments_p50_us"] > 0, from_host
    scale = next(iter(doc["sections"]["controlplane"]["scales"].values()))
    assert scale["published_nodes"] == scale["nodes"]
    floor = doc["sections"]["controlplane"]["floor"]  # the API server alone, the same applies
    assert floor["published_nodes"] == floor["nodes"] == scale["nodes"], floor

    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# latencytrace benchmark results")
    assert "| measurement | baseline | with agent | ratio/delta | target | met? |" in md
    for title in SECTIONS.values():
        assert f"## {title}" in md, title

    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
