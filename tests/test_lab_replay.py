"""`connpub lab replay` (connpub.lab.replay): the schedule a real capture becomes, and a replay
of real ndpi captures through the lab that agrees with the simulator within 10 %."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.datapath.masks import is_v4_mapped
from connpub.lab import replay
from connpub.lab import run as labrun
from connpub.sim import SimOptions, simulate
from connpub.traffic.trace import flows_from_pcap
from connpub.traffic.tracetools import merge, shift
from connpub.traffic.workload import NS_PER_S, TCP_FIN
from pcap_reference import NDPI

CAPTURES = ("pinterest.pcap", "tumblr.pcap", "iphone.pcap", "weibo.pcap")


@pytest.fixture(scope="module")
def capture_trace() -> np.ndarray:
    """163 flows of four real captures (web over TCP 443, DNS, QUIC), merged."""
    paths = [NDPI / name for name in CAPTURES]
    if not all(p.exists() for p in paths):
        pytest.skip("ndpi captures not present")
    return merge([flows_from_pcap(p) for p in paths])


def test_schedule_follows_the_flows(capture_trace):
    table = capture_trace
    fields = replay.schedule(table, speed=2.0, idle_timeout_s=3.0)
    chunks = fields["chunks"].astype(np.int64)
    packets = np.maximum(table["packets"].astype(np.int64), 1)
    assert np.all(chunks >= 1) and np.all(chunks <= packets)
    duration = (table["end_ns"] - table["start_ns"]) / NS_PER_S / 2.0
    assert np.allclose(fields["duration_s"], duration)
    # after the first packets at most one exchange per MIN_GAP_S
    assert np.all(chunks - fields["head_n"] <= np.floor(duration / replay.MIN_GAP_S) + 1)
    assert np.allclose(fields["head_gaps_s"][:, 1:] * 2.0 * NS_PER_S,
                       np.where(np.arange(1, 8) < fields["head_n"][:, None],
                                table["first_iat_ns"][:, 1:], 0).astype(np.float64), atol=1)
    silent_tcp = (table["proto"] == 6) & ((table["tcp_flags"] & (TCP_FIN | 0x04)) == 0)
    assert np.array_equal(fields["linger_s"] > 0, silent_tcp)
    small = table["bytes"] <= 16 * chunks  # bytes kept unless below the 16-byte floor
    sent = fields["chunks"].astype(np.float64) * fields["chunk_bytes"]
    big = ~small & (table["proto"] == 6) & (table["bytes"] < 16384 * chunks)
    assert np.all(np.abs(sent[big] - table["bytes"][big]) <= chunks[big])


def test_servers_are_dealt_onto_vips_by_flow_count(capture_trace):
    index = labrun.vip_index(capture_trace, 4)
    assert set(index.tolist()) == {0, 1, 2, 3}
    servers = np.ascontiguousarray(capture_trace["vip_addr"]).view("V16").ravel()
    v4 = is_v4_mapped(capture_trace["vip_addr"])
    for family in (v4, ~v4):  # per family, its busiest server gets the family's first VIP
        mine = servers[family]
        top = mine[np.argmax([np.count_nonzero(mine == s) for s in mine])]
        assert np.all(index[servers == top] == 0)
    for server in np.unique(servers):  # one VIP per server
        assert np.unique(index[servers == server]).size == 1


def test_prepare_cuts_idle_to_the_lab_drain_time(capture_trace):
    spec = labrun.RunSpec(time_scale=1.0, interval_s=0.5, replay=True)
    table, repaired, spec = replay.prepare(capture_trace, spec)
    cfg = replay.run_config(spec)
    drain_ns = (cfg.lease.idle_timeout_s + 2 * cfg.lease.k * spec.interval_s) * NS_PER_S
    alive_until = np.maximum.accumulate(table["end_ns"])
    assert np.all(table["start_ns"][1:] - alive_until[:-1] <= drain_ns + 3e6)
    assert spec.duration_s == pytest.approx(table["end_ns"].max() / NS_PER_S + replay.TAIL_S
                                            + cfg.lease.idle_timeout_s + 2 * spec.interval_s)


@pytest.mark.root
def test_replay_of_real_captures_agrees_with_the_simulator(capture_trace, unique_prefix):
    spec = labrun.RunSpec(mode="baseline", time_scale=1.0, interval_s=0.5, clients=2,
                          servers=3, prefix=unique_prefix, replay=True, vips=4,
                          config_overrides=replay.packet_liveness(3.0))
    table, _, spec = replay.prepare(capture_trace, spec)
    lab = labrun.run(spec)
    cfg = replay.run_config(spec)
    sim = simulate(shift(table, scale=spec.time_scale), ["baseline"], cfg,
                   options=SimOptions(servers=3, duration_s=spec.duration_s))["baseline"]
    lab_entries = lab["publish_entries_per_s"] * lab["wall_s"]
    sim_entries = sim["entries_per_s"] * sim["duration_s"]
    lab_bytes = lab["publish_bytes_per_s"] * lab["wall_s"]
    sim_bytes = sim["publish_bytes_per_s"] * sim["duration_s"]
    print(f"replay of {'+'.join(CAPTURES)}: entries lab {lab_entries:.0f} sim {sim_entries:.0f}"
          f", bytes lab {lab_bytes:.0f} sim {sim_bytes:.0f}, misses lab {lab['lease_misses']}"
          f" sim {sim['lease_miss_packets']}")
    assert lab["flows"] == table.size == 163 and lab["broken_connections"] == 0
    assert len(lab["servers"]) == 3
    assert abs(lab_entries - sim_entries) <= 0.10 * sim_entries
    assert abs(lab_bytes - sim_bytes) <= 0.10 * sim_bytes
    assert abs(lab["lease_misses"] - sim["lease_miss_packets"]) <= 2
