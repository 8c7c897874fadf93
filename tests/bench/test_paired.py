"""The paired part's table against another build, whose programs differ from this checkout's (the build before
the hot-path rewrite read UDP datagrams in skb_copy_datagram_iovec and had no TCP probe): each program either
build ran is a row, one the other build did not run is shown as not run; and the wait for another build's
programs, whose number this checkout cannot know. Pure functions, on figures as `paired.run` records them."""

from __future__ import annotations

import time

from tests.bench import paired, tracers


def _data() -> dict:
    return {"pair": {"this": [], "other": ["/old/latencytrace-agent"]}, "rounds": 4, "workloads": {
        "udp_rate/traced": {"label": "UDP 100,000 pkt/s into the traced pod", "packets": 1000,
                            "per_packet_ns": {"this": 1500.0, "other": 3300.0},
                            "programs": {
                                "this": {"lt_netif_receive_skb": {"run_cnt": 2000, "avg_ns": 120.0},
                                         "lt_tcp_probe": {"run_cnt": 500, "avg_ns": 90.0},
                                         "lt_kfree_skb": {"run_cnt": 3, "avg_ns": 4000.0}},
                                "other": {"lt_netif_receive_skb": {"run_cnt": 2000, "avg_ns": 330.0},
                                          "lt_skb_copy_datagram_iovec": {"run_cnt": 1000, "avg_ns": 240.0}}}}}}


def test_rows_show_every_busy_program_of_either_build_with_its_runs_per_packet():
    rows = {r.measurement.split(":")[0]: r for r in paired.rows(_data())}
    assert rows["lt_netif_receive_skb"].baseline == "330 ns × 2.0 (other)"
    assert rows["lt_netif_receive_skb"].with_agent == "120 ns × 2.0 (this)"
    assert rows["lt_netif_receive_skb"].change == "-210 ns"
    assert rows["lt_skb_copy_datagram_iovec"].with_agent == "not run (this)"
    assert rows["lt_skb_copy_datagram_iovec"].change == "—"
    assert rows["lt_tcp_probe"].baseline == "not run (other)"
    assert "lt_kfree_skb" not in rows  # 3 runs in 1000 packets: a drop now and then, not the packet path
    total = rows["all agent programs per packet, UDP 100,000 pkt/s into the traced pod (statistics' floor included)"]
    assert total.change == "-1800 ns"


def test_another_builds_programs_are_waited_for_until_their_number_holds(monkeypatch):
    monkeypatch.setattr(tracers, "SETTLE_S", 0.2)
    ready = tracers._settled()
    assert not ready(0)
    assert not ready(5)  # still loading
    time.sleep(0.25)
    assert not ready(0) and not ready(12)  # a change starts the wait again
    time.sleep(0.25)
    assert ready(12)
    assert tracers._at_least(16)(16) and not tracers._at_least(16)(15)
