"""Pure parts of the agents, without root: what the server publishes from table snapshots,
directive application logic, how the LB turns entries into leases, metrics, the UDP socket."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from connpub.agents import lb as lbagent
from connpub.agents import server as srv
from connpub.agents.common import AgentSocket, StopFlag, run_loop, write_status
from connpub.agents.metrics import AgentMetrics
from connpub.config import Config, GranularityConfig, LeaseConfig, PublishConfig
from connpub.datapath import lbctl
from connpub.datapath.abi import (
    AGG_KEY_DTYPE,
    AGG_VALUE_DTYPE,
    CLASS_KEY_DTYPE,
    DIRECTIVE_ENTRY_DTYPE,
    FLOW_KEY_DTYPE,
    FLOW_VALUE_DTYPE,
    LB_AGG_LEASE_DTYPE,
    LB_BACKEND_DTYPE,
    LB_CONN_DTYPE,
    PUBLISH_ENTRY_DTYPE,
)
from connpub.datapath.masks import apply_masks
from connpub.protocol.wire import (
    FLAG_CLOSED,
    FLAG_RENEW,
    FLAG_RESYNC,
    Decoder,
    Encoder,
    PacketType,
    accepted_entries,
)
from prometheus_client import generate_latest

KEY = bytes(range(32))
NOW = 1_000 * srv.NS_PER_S
MS = srv.NS_PER_MS
TIMES = srv.FlowTimes(idle_timeout_ns=60_000 * MS, linger_ns=3_000 * MS)
VIP = lbctl.address_bytes("10.200.0.1")[0]


def flow_keys(count: int, vip_port: int = 80, proto: int = 6) -> np.ndarray:
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["client_addr"] = lbctl.address_bytes("10.100.1.2")[0]
    keys["vip_addr"] = VIP
    keys["client_port"] = 40000 + np.arange(count)
    keys["vip_port"] = vip_port
    keys["proto"] = proto
    return keys


def flow_values(count: int) -> np.ndarray:
    values = np.zeros(count, FLOW_VALUE_DTYPE)
    values["packets"] = 10
    values["bytes"] = 1000 + np.arange(count)
    values["first_seen_ns"] = NOW - 10_000 * MS
    values["last_seen_ns"] = NOW - 100 * MS
    return values


# --------------------------------------------------------------------------------------------
# server: what to publish


def test_flow_states_live_closed_lingering_idle():
    values = flow_values(5)
    values["closed"] = [0, 1, 1, 0, 0]
    values["last_seen_ns"] = [NOW - 100 * MS, NOW - 100 * MS, NOW - 3_001 * MS,
                              NOW - 60_001 * MS, NOW + 4 * MS]  # the last: jiffy clock ahead
    live, finished = srv.flow_states(flow_keys(5), values, NOW, TIMES)
    assert live.tolist() == [True, False, False, False, True]
    assert finished.tolist() == [False, False, True, True, False]


def test_flows_to_publish_baseline_every_live_flow_adaptive_level0_only():
    values = flow_values(4)
    values["level"] = [0, 1, 0, 3]
    live = np.array([True, True, False, True])
    assert srv.flows_to_publish(values, live, "baseline").tolist() == [0, 1, 3]
    assert srv.flows_to_publish(values, live, "predictive").tolist() == [0, 1, 3]
    assert srv.flows_to_publish(values, live, "adaptive").tolist() == [0]
    assert srv.flows_to_publish(values, live, "full").tolist() == [0]


def test_own_udp_traffic_is_never_published():
    keys = np.concatenate([flow_keys(2), flow_keys(1, vip_port=7390, proto=17),
                           flow_keys(1, vip_port=7390, proto=6)], dtype=FLOW_KEY_DTYPE)
    assert srv.own_traffic(keys, 7390).tolist() == [False, False, True, False]


def test_flow_entries_fields_flags_and_decoder_accepts_them():
    keys, values = flow_keys(3), flow_values(3)
    values["first_seen_ns"][2] = NOW - 50 * MS  # new since the previous cycle: no RENEW
    entries = srv.flow_entries(keys, values, np.arange(3), 7, NOW, srv.no_prediction,
                               previous_cycle_ns=NOW - 200 * MS)
    assert entries.dtype == PUBLISH_ENTRY_DTYPE
    assert entries["key"].tobytes() == keys.tobytes()
    assert entries["level"].tolist() == [0, 0, 0]
    assert entries["backend_id"].tolist() == [7, 7, 7]
    assert entries["flow_count"].tolist() == [1, 1, 1]
    assert entries["bytes"].tolist() == [1000, 1001, 1002]
    assert entries["last_activity_age_ms"].tolist() == [100, 100, 100]
    assert entries["predicted_remaining_ms"].tolist() == [0, 0, 0]
    assert entries["flags"].tolist() == [FLAG_RENEW, FLAG_RENEW, 0]
    resync = srv.flow_entries(keys, values, np.arange(3), 7, NOW, srv.no_prediction, None,
                              FLAG_RESYNC)
    assert resync["flags"].tolist() == [FLAG_RESYNC] * 3
    packets = Encoder(7, KEY, 1400, first_sequence=1).publish(entries, NOW)
    decoded = Decoder(KEY, max_lease_ms=300_000).decode_batch(packets)
    assert [d.reason for d in decoded] == [None]
    assert accepted_entries(decoded, PacketType.PUBLISH).tobytes() == entries.tobytes()


def test_lease_hook_output_goes_on_the_wire():
    def hook(keys, values, now_ns):
        return np.full(len(keys), 4500, np.uint32), np.full(len(keys), 52428, np.uint16)

    entries = srv.flow_entries(flow_keys(2), flow_values(2), np.arange(2), 1, NOW, hook, None)
    assert entries["predicted_remaining_ms"].tolist() == [4500, 4500]
    assert entries["confidence"].tolist() == [52428, 52428]


def aggregates(count: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(count, AGG_KEY_DTYPE)
    keys["masked"] = apply_masks(flow_keys(count), 1)
    keys["masked"]["client_addr"][:, 15] = np.arange(count)  # distinct clients
    keys["level"] = 1
    values = np.zeros(count, AGG_VALUE_DTYPE)
    values["bytes"] = 5000
    values["last_seen_ns"] = NOW - 100 * MS
    values["active_flows"] = 4
    return keys, values


def test_aggregates_published_and_stale_ones_deleted():
    keys, values = aggregates(5)
    values["active_flows"] = [4, 0, 0, 2, 3]
    values["last_seen_ns"] = [NOW - 100 * MS, NOW - 100 * MS, NOW - 3_001 * MS,
                              NOW - 60_001 * MS, NOW - 100 * MS]
    keys["level"][4] = 0  # the datapath never aggregates at level 0
    assert srv.aggregates_to_publish(keys, values, NOW, TIMES, 7390).tolist() == [0]
    assert srv.stale_aggregates(keys, values, NOW, TIMES).tolist() == [2, 3]
    entries = srv.aggregate_entries(keys, values, np.array([0]), 9, NOW)
    assert entries["level"].tolist() == [1] and entries["flow_count"].tolist() == [4]
    assert entries["key"].tobytes() == np.ascontiguousarray(keys["masked"][:1]).tobytes()
    assert entries["bytes"].tolist() == [5000] and entries["backend_id"].tolist() == [9]
    packets = Encoder(9, KEY, 1400, first_sequence=1).publish(entries, NOW)
    assert Decoder(KEY, max_lease_ms=1000).decode_batch(packets)[0].accepted


def test_history_records_from_the_sketch():
    keys, values = flow_keys(2), flow_values(2)
    values["sketch_count"] = [3, 8]
    values["sketch_size"][0, :4] = [60, 52, 1000, 77]  # the 4th is outside the sketch count
    values["sketch_gap_us"][0, :4] = [0, 10, 30, 99]
    values["sketch_size"][1] = 100
    values["sketch_gap_us"][1] = 5
    values["closed"] = [1, 0]
    values["tcp_flags"] = [0x1B, 0x18]
    records = srv.history_records(keys, values, clock_offset_ns=500, server_id=3)
    assert records["first_n"].tolist() == [3, 8]
    assert records["first_size_sum"].tolist() == [1112, 800]
    assert records["first_size_sumsq"].tolist() == [60**2 + 52**2 + 1000**2, 8 * 100**2]
    assert records["first_size_max"].tolist() == [1000, 100]
    assert records["first_iat_sum_ns"].tolist() == [40_000, 35_000]
    assert records["first_iat_max_ns"].tolist() == [30_000, 5_000]
    assert records["duration_ns"].tolist() == [9_900 * MS] * 2
    assert records["first_seen_ns"].tolist() == [NOW - 10_000 * MS + 500] * 2
    assert records["client_port"].tolist() == [40000, 40001]
    assert records["vip_port"].tolist() == [80, 80]
    assert records["closed"].tolist() == [True, False]
    assert records["server_id"].tolist() == [3, 3]


# --------------------------------------------------------------------------------------------
# server: directives


def class_keys(count: int) -> np.ndarray:
    keys = np.zeros(count, CLASS_KEY_DTYPE)
    keys["vip_addr"] = VIP
    keys["vip_port"] = 80 + np.arange(count)
    keys["proto"] = 6
    return keys


def test_directive_levels_last_entry_per_class_wins():
    entries = np.zeros(4, DIRECTIVE_ENTRY_DTYPE)
    classes = class_keys(3)
    entries["class_key"] = classes[[0, 1, 0, 2]]
    entries["level"] = [1, 2, 3, 0]
    keys, levels = srv.directive_levels(entries)
    assert keys.tobytes() == classes[[1, 0, 2]].tobytes()
    assert levels.tolist() == [2, 3, 0]


def test_level_changes_against_the_class_map_and_default():
    current_keys = class_keys(2)
    current_levels = np.array([1, 0], np.uint8)
    wanted = class_keys(4)
    # class 0: 1 -> 1 same; class 1: 0 -> 2 changed; class 2: absent (default 0) -> 0 same;
    # class 3: absent -> 3 changed
    changed = srv.level_changes(current_keys, current_levels, wanted,
                                np.array([1, 2, 0, 3], np.uint8))
    assert changed.tolist() == [False, True, False, True]
    changed = srv.level_changes(current_keys, current_levels, wanted,
                                np.array([1, 2, 0, 3], np.uint8), default_level=2)
    assert changed.tolist() == [False, True, True, True]
    assert srv.level_changes(current_keys[:0], current_levels[:0], wanted[:1],
                             np.array([0], np.uint8)).tolist() == [False]


# --------------------------------------------------------------------------------------------
# LB: leases from entries


def config(**lease) -> Config:
    return Config(publish=PublishConfig(interval_s=0.2),
                  lease=LeaseConfig(k=3.0, min_s=0.5, max_s=300.0, initial_s=1.0, **lease))


def publish_entries(keys: np.ndarray, levels, backend_id: int, flags=0, lease_ms=0):
    entries = np.zeros(len(keys), PUBLISH_ENTRY_DTYPE)
    entries["level"] = levels
    entries["key"] = apply_masks(keys, np.asarray(levels))
    entries["backend_id"] = backend_id
    entries["flags"] = flags
    entries["flow_count"] = 1
    entries["predicted_remaining_ms"] = lease_ms
    return entries


def test_plan_leases_splits_levels_closed_and_not_vip():
    vips = class_keys(1)
    keys = flow_keys(6)
    keys["vip_port"][5] = 8080  # not a VIP at level 0
    entries = publish_entries(keys, [0, 0, 1, 3, 2, 0], 4,
                              flags=[0, FLAG_CLOSED, 0, FLAG_CLOSED, 0, 0],
                              lease_ms=[0, 0, 0, 0, 200, 0])
    batch = lbagent.plan_leases(entries, vips, NOW, config())
    assert batch.not_vip == 1
    assert batch.flow_keys.tobytes() == keys[:1].tobytes()
    assert batch.flow_expiry_ns.tolist() == [NOW + 600 * MS]  # baseline k*T
    assert batch.closed_flow_keys.tobytes() == keys[1:2].tobytes()
    assert batch.agg_keys["agg"]["level"].tolist() == [1, 2]
    assert batch.agg_keys["backend_id"].tolist() == [4, 4]
    assert batch.agg_expiry_ns.tolist() == [NOW + 600 * MS, NOW + 500 * MS]  # 200 ms -> min_s
    assert batch.closed_agg_keys["agg"]["level"].tolist() == [3]
    masked = apply_masks(keys[2:3], 1)
    assert batch.agg_keys["agg"]["masked"][:1].tobytes() == masked.tobytes()


def test_aggregates_of_a_vip_match_even_when_the_port_is_masked():
    vips = class_keys(1)
    other = flow_keys(1)
    other["vip_addr"] = lbctl.address_bytes("10.200.0.9")[0]
    keys = np.concatenate([flow_keys(1), other], dtype=FLOW_KEY_DTYPE)
    entries = publish_entries(keys, [2, 2], 1)  # level 2 drops the VIP port
    assert lbagent.entries_for_vips(entries, vips).tolist() == [True, False]


def test_valid_leases_flow_or_aggregate_of_the_same_backend():
    keys = flow_keys(5)
    keys["client_addr"][1] = lbctl.address_bytes("10.100.9.9")[0]  # in no aggregate
    conns = np.zeros(5, LB_CONN_DTYPE)
    conns["lease_expiry_ns"] = [NOW + 1, NOW - 1, NOW - 1, NOW - 1, NOW - 1]
    conns["level"] = [0, 0, 1, 1, 3]
    conns["backend_id"] = [1, 1, 1, 2, 1]
    conns["created_ns"] = NOW - 4 * srv.NS_PER_S
    agg_keys = lbctl.agg_lease_keys(1, apply_masks(keys[2:3], 1))  # the aggregate's own entry
    agg_expiry = np.zeros(1, LB_AGG_LEASE_DTYPE)
    agg_expiry["lease_expiry_ns"], agg_expiry["backend_id"] = NOW + 100, 1
    valid = lbagent.valid_leases(keys, conns, agg_keys, agg_expiry, NOW)
    # conn 3 is another backend's; conn 4 says level 3 but the server may still hold it at
    # level 1 (two level changes before its next packet): every level counts, as in the datapath
    assert valid.tolist() == [True, False, True, False, True]
    conns["flags"][4] = lbctl.CONN_F_CLIENT_CLOSED  # the client's FIN/RST ends aggregate cover
    assert lbagent.valid_leases(keys, conns, agg_keys, agg_expiry, NOW).tolist()[4] is False
    active, mean_age = lbagent.class_statistics(keys, valid, conns["created_ns"],
                                                class_keys(2), NOW)
    assert active.tolist() == [3, 0]
    assert mean_age[0] == 4.0 and np.isnan(mean_age[1])
    # backend 2's cover entry of the same aggregate (its flows from before a level change)
    cover_keys = np.concatenate([agg_keys, lbctl.agg_lease_keys(1, apply_masks(keys[3:4], 1),
                                                                 2)], dtype=agg_keys.dtype)
    cover = np.concatenate([agg_expiry, agg_expiry])
    cover["backend_id"][1] = 2
    conns["flags"][4] = 0
    assert lbagent.valid_leases(keys, conns, cover_keys, cover, NOW).tolist() == [
        True, False, True, True, True]
    cover["lease_expiry_ns"][1] = NOW  # expired
    assert lbagent.valid_leases(keys, conns, cover_keys, cover, NOW).tolist()[3] is False


def test_aggregate_members_count_as_active_connections_of_their_vip():
    keys = lbctl.agg_lease_keys([2, 2, 2], flow_keys(3), [0, 0, 3])  # two own entries, a cover
    values = np.zeros(3, LB_AGG_LEASE_DTYPE)
    values["lease_expiry_ns"] = [NOW + 1, NOW - 1, NOW + 1]  # the second expired
    values["flow_count"] = [5, 7, 9]
    values["vip_index"] = [4, 4, 4]
    values["created_ns"] = NOW - 2 * srv.NS_PER_S
    members = lbagent.aggregate_members_per_vip(keys, values, np.array([9, 4]), NOW)
    assert members[0].tolist() == [0, 5] and members[1].tolist() == [0.0, 10.0]
    conns = np.zeros(0, LB_CONN_DTYPE)
    active, mean_age = lbagent.class_statistics(flow_keys(0), np.zeros(0, bool),
                                                conns["created_ns"], class_keys(2), NOW, members)
    assert active.tolist() == [0, 5] and mean_age[1] == 2.0


def test_directive_plan_goes_to_the_servers_of_each_vip():
    vips = class_keys(3)
    services = np.array([0, 1, 0])
    levels = np.array([1, 2, 3], np.uint8)
    backends = np.zeros(4, LB_BACKEND_DTYPE)
    backends["flags"] = [0, 1, 1, 0]
    backends["services"] = [0, 0b01, 0b10, 0b11]  # backend 3 absent
    plan = lbagent.directive_plan(vips, services, levels, backends)
    assert sorted(plan) == [1, 2]
    assert plan[1]["class_key"].tobytes() == vips[[0, 2]].tobytes()
    assert plan[1]["level"].tolist() == [1, 3]
    assert plan[2]["level"].tolist() == [2]


# --------------------------------------------------------------------------------------------
# metrics, status, socket, loop


def test_metrics_totals_and_exposition(tmp_path):
    metrics = AgentMetrics("lb")
    metrics.inc("rejected", 2, reason="bad_tag")
    metrics.inc("rejected", 1, reason="replay")
    metrics.inc("publish_entries", 5, direction="received", level="0")
    metrics.inc("map_writes", 0, map="conns")  # zero: not recorded
    metrics.inc("lease_misses", 7)
    metrics.observe("tick_seconds", 0.01, job="evaluate")
    assert metrics.total("rejected") == 3 and metrics.total("rejected", reason="replay") == 1
    assert metrics.totals["publish_entries{direction=received,level=0}"] == 5
    text = generate_latest(metrics.registry).decode()
    assert 'connpub_lb_rejected_total{reason="bad_tag"} 2.0' in text
    assert "connpub_lb_lease_misses_total 7.0" in text
    assert 'connpub_lb_tick_seconds_count{job="evaluate"} 1.0' in text
    path = tmp_path / "agents" / "lb.json"
    write_status(path, {"totals": metrics.totals})
    assert path.read_text().count("bad_tag") == 1


def test_socket_sends_equal_packets_as_separate_datagrams():
    receiver = AgentSocket("127.0.0.1", 0)
    sender = AgentSocket("127.0.0.1", 0)
    port = receiver.sock.getsockname()[1]
    try:
        packets = [bytes([i % 256]) * 1344 for i in range(150)] + [b"tail" * 10]
        assert sender.send(packets, ("127.0.0.1", port)) == 151
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 151 and time.monotonic() < deadline:
            got += [data for data, _ in receiver.drain()]
        assert got == packets
        assert sender.packets_sent == 151 and sender.bytes_sent == sum(map(len, packets))
    finally:
        receiver.close()
        sender.close()


def test_dual_stack_socket_reaches_ipv4_peers():
    agent_socket = AgentSocket("0.0.0.0", 0)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    try:
        assert agent_socket.dual_stack
        target = agent_socket.destination("127.0.0.1", peer.getsockname()[1])
        assert agent_socket.send([b"hello"], target) == 1
        assert peer.recvfrom(100)[0] == b"hello"
    finally:
        agent_socket.close()
        peer.close()


def test_run_loop_ticks_drains_and_stops():
    agent_socket = AgentSocket("127.0.0.1", 0)
    port = agent_socket.sock.getsockname()[1]
    stop = StopFlag()
    ticks, batches = [], []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 5:
            stop.set()

    def send_some():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(3):
                sock.sendto(bytes([i]), ("127.0.0.1", port))

    threading.Timer(0.05, send_some).start()
    try:
        run_loop(agent_socket, batches.append, [(0.05, tick)], stop)
    finally:
        agent_socket.close()
    assert len(ticks) == 5
    assert [data for batch in batches for data, _ in batch] == [b"\0", b"\1", b"\2"]
    assert min(np.diff(ticks)) > 0.04


@pytest.mark.parametrize("mode", ["baseline", "adaptive"])
def test_build_cycle_selection(mode):
    """ServerAgent.build_cycle on snapshots, without maps: the agent object is built around
    the pure parts only."""
    agent = object.__new__(srv.ServerAgent)
    agent.cfg = Config(publish=PublishConfig(mode=mode))
    agent.mode, agent.server_id, agent.times = mode, 5, TIMES
    agent.lease_hook, agent.previous_cycle_ns = srv.no_prediction, None
    agent.closed_repeats = srv.ClosedRepeats(0)
    keys, values = flow_keys(4), flow_values(4)
    values["level"] = [0, 1, 1, 0]
    values["closed"] = [0, 0, 0, 1]
    agg_keys, agg_values = aggregates(1)
    entries, finished, stale = agent.build_cycle(keys, values, agg_keys, agg_values, NOW)
    if mode == "baseline":
        assert entries["level"].tolist() == [0, 0, 0]
    else:
        assert entries["level"].tolist() == [0, 1]
        assert entries["flow_count"].tolist() == [1, 4]
    assert finished.tolist() == [] and stale.tolist() == []


@pytest.mark.parametrize("mode", ["baseline", "adaptive"])
def test_adaptive_closes_finished_aggregated_flows_and_repeats_the_closed(mode):
    """Adaptive mode (no planner): a flow the datapath had aggregated that finished by going
    idle gets a CLOSED entry (its aggregate, renewed every cycle, would keep it alive at the
    LB), sent again in the next k-1 = 2 cycles; one that ended with the client's FIN/RST needs
    none (the LB saw the FIN: no aggregate covers it, its lease ends k*T later); a finished
    level-0 flow needs none (its baseline lease runs out); the baseline sends no CLOSED."""
    agent = object.__new__(srv.ServerAgent)
    agent.cfg = Config(publish=PublishConfig(mode=mode))
    agent.mode, agent.server_id, agent.times = mode, 5, TIMES
    agent.lease_hook, agent.previous_cycle_ns = srv.no_prediction, None
    agent.closed_repeats = srv.ClosedRepeats(2)
    keys, values = flow_keys(5), flow_values(5)
    values["level"] = [0, 1, 1, 0, 1]
    values["closed"] = [0, 1, 0, 1, 0]  # FIN seen on flows 1 (aggregated) and 3 (level 0)
    values["last_seen_ns"] = NOW - 4_000 * MS  # past the linger: 1 and 3 finished now
    values["last_seen_ns"][4] = NOW - 61_000 * MS  # aggregated, idle past the timeout
    agg_keys, agg_values = aggregates(1)
    entries, finished, _ = agent.build_cycle(keys, values, agg_keys, agg_values, NOW)
    assert finished.tolist() == [1, 3, 4]
    closed = entries[entries["flags"] == srv.FLAG_CLOSED]
    expected = [keys["client_port"][4]] if mode == "adaptive" else []
    assert closed["key"]["client_port"].tolist() == expected
    assert (closed["level"] == 0).all() and (closed["predicted_remaining_ms"] == 0).all()
    rest = np.array([0, 2])  # the agent deleted the finished flows
    for cycle in (1, 2, 3):
        entries, _, _ = agent.build_cycle(keys[rest], values[rest], agg_keys, agg_values,
                                          NOW + cycle * srv.NS_PER_S)
        closed = entries[entries["flags"] == srv.FLAG_CLOSED]
        assert closed["key"]["client_port"].tolist() == (expected if cycle < 3 else [])
    # a reused tuple (the same flow key live again, first seen anew) cancels the repeats
    entries, _, _ = agent.build_cycle(keys, values, agg_keys, agg_values, NOW)
    values["last_seen_ns"][4] = NOW + 5 * srv.NS_PER_S
    values["first_seen_ns"][4] = NOW + 4 * srv.NS_PER_S
    entries, _, _ = agent.build_cycle(keys, values, agg_keys, agg_values,
                                      NOW + 5 * srv.NS_PER_S)
    assert not (entries["flags"] == srv.FLAG_CLOSED).any()


@pytest.mark.parametrize(("count", "mtu", "ip_version"), [(0, 1400, 6), (1, 1400, 6),
                                                          (18, 1400, 6), (19, 1400, 6),
                                                          (1000, 1500, 4), (37, 576, 6)])
@pytest.mark.parametrize("key", [KEY, bytes(range(16)), bytes(range(100))])  # > 64: hashed
def test_batch_encoder_bytes_equal_the_protocol_encoder(count, mtu, ip_version, key):
    from connpub.protocol.batch import encode_publish_batch
    from wire_helpers import random_publish_entries

    entries = random_publish_entries(np.random.default_rng(count), count, backend_id=3)
    reference = Encoder(3, key, mtu, ip_version, first_sequence=77).publish(entries, NOW)
    encoder = Encoder(3, key, mtu, ip_version, first_sequence=77)
    batch = encode_publish_batch(entries, encoder, NOW)
    assert batch.packets() == reference
    assert encoder.next_sequence == 77 + len(reference)
    assert batch.wire_bytes == sum(map(len, reference))
    if batch.count > 2:
        assert batch.select(np.array([1, batch.count - 1])).packets() == [reference[1],
                                                                           reference[-1]]


def test_send_batch_delivers_every_packet_in_order():
    from connpub.protocol.batch import encode_publish_batch
    from wire_helpers import random_publish_entries

    entries = random_publish_entries(np.random.default_rng(1), 2000, backend_id=3)
    batch = encode_publish_batch(entries, Encoder(3, KEY, 1400, first_sequence=1), NOW)
    receiver, sender = AgentSocket("127.0.0.1", 0), AgentSocket("127.0.0.1", 0)
    try:
        assert sender.send_batch(batch, ("127.0.0.1", receiver.sock.getsockname()[1])) == 112
        got = []
        deadline = time.monotonic() + 5
        while len(got) < batch.count and time.monotonic() < deadline:
            got += [data for data, _ in receiver.drain()]
        assert got == batch.packets()
        decoded = Decoder(KEY, max_lease_ms=300_000).decode_batch(got)
        assert accepted_entries(decoded, PacketType.PUBLISH).tobytes() == entries.tobytes()
    finally:
        receiver.close()
        sender.close()


@pytest.mark.parametrize("mode", ["adaptive", "full"])
def test_full_mode_closes_an_ended_aggregate(mode):
    """full (the planner's leases): an aggregate the agent deletes as stale (no active member,
    quiet past the linger) gets one CLOSED entry at its level, so its model lease, up to
    max_s, does not outlive its members at the LB (docs/lb.md "Aggregates"); adaptive leases
    are k*T: none."""
    from connpub.model.planner import PredictivePlanner  # noqa: PLC0415

    class NoModel:
        def predict(self, features):
            raise AssertionError("no flow to predict")

    cfg = Config(publish=PublishConfig(mode=mode))
    agent = object.__new__(srv.ServerAgent)
    agent.cfg, agent.mode, agent.server_id, agent.times = cfg, mode, 5, TIMES
    agent.planner = PredictivePlanner(cfg, NoModel()) if mode == "full" else None
    agent.lease_hook = agent.planner or srv.no_prediction
    agent.previous_cycle_ns, agent.closed_repeats = None, srv.ClosedRepeats(2)
    agent.byte_table = None
    agg_keys, agg_values = aggregates(3)
    agg_values["active_flows"] = [4, 0, 0]
    agg_values["last_seen_ns"] = [NOW - 100 * MS, NOW - 100 * MS, NOW - 3_001 * MS]
    keys, values = flow_keys(0), flow_values(0)
    entries, _, stale = agent.build_cycle(keys, values, agg_keys, agg_values, NOW)
    assert stale.tolist() == [2]
    closed = entries[entries["flags"] == srv.FLAG_CLOSED]
    if mode == "full":
        assert len(closed) == 1 and int(closed["level"][0]) == 1
        assert closed["key"][0].tobytes() == agg_keys["masked"][2].tobytes()
    else:
        assert len(closed) == 0


def test_members_leave_their_aggregate_when_their_class_leaves_its_level():
    """full: three live TCP members of one level-1 aggregate. While their class is at level 1
    the agent renews the aggregate (one entry, no flow entries); once the class has been at
    level 2 for retire_after_s (2 s here; policy.granularity.leaves_aggregate) each member is
    published as a flow of its own
    (level 0, its full key, a model lease) and the aggregate gets one CLOSED entry, sent once
    and not deleted from the map (the datapath still counts the members' packets there)."""
    from connpub.model.planner import PredictivePlanner  # noqa: PLC0415

    class SixtySeconds:
        def predict(self, features):
            n = len(features)
            return np.full(n, 30.0), np.full(n, 60.0), np.full(n, 90.0)

    cfg = Config(publish=PublishConfig(mode="full"),
                 granularity=GranularityConfig(retire_after_s=2.0))
    agent = object.__new__(srv.ServerAgent)
    agent.cfg, agent.mode, agent.server_id, agent.times = cfg, "full", 5, TIMES
    agent.planner = PredictivePlanner(cfg, SixtySeconds())
    agent.lease_hook = agent.planner
    agent.previous_cycle_ns, agent.closed_repeats = None, srv.ClosedRepeats(2)
    agent.byte_table = None
    keys, values = flow_keys(3), flow_values(3)
    values["level"] = 1
    agg_keys, agg_values = aggregates(1)
    agg_keys["masked"] = apply_masks(keys[:1], 1)
    agg_values["active_flows"] = 3
    class_key = lbctl.class_keys_of(keys[:1])

    changed_ns = NOW + srv.NS_PER_S  # when the class went to level 2

    def cycle(level: int, at_ns: int) -> tuple[np.ndarray, np.ndarray]:
        entries, finished, stale = agent.build_cycle(
            keys, values, agg_keys, agg_values, at_ns,
            class_levels=(class_key, np.array([level], np.uint8), 0,
                          np.array([changed_ns if level == 2 else 0], np.int64)))
        assert finished.tolist() == [] and stale.tolist() == []
        return entries[entries["flags"] != srv.FLAG_CLOSED], \
            entries[entries["flags"] == srv.FLAG_CLOSED]

    renewed, closed = cycle(1, NOW)
    assert renewed["level"].tolist() == [1] and len(closed) == 0
    renewed, closed = cycle(2, changed_ns + srv.NS_PER_S)  # 1 s at level 2: still members
    assert set(renewed["level"].tolist()) <= {1} and len(closed) == 0
    renewed, closed = cycle(2, changed_ns + 2 * srv.NS_PER_S)
    assert renewed["level"].tolist() == [0, 0, 0]
    assert sorted(renewed["key"]["client_port"].tolist()) == \
        sorted(keys["client_port"].tolist())
    assert (renewed["predicted_remaining_ms"] > 0).all()
    assert closed["level"].tolist() == [1]
    assert closed["key"][0].tobytes() == agg_keys["masked"][0].tobytes()
    _, closed = cycle(2, changed_ns + 3 * srv.NS_PER_S)
    assert len(closed) == 0


# --------------------------------------------------------------------------------------------
# LB: the spread input of the level pipeline (agents.lb_plan.lb_what_if_loads)

def test_lb_what_if_loads_from_connections_and_aggregates():
    from connpub.agents.lb_plan import lb_what_if_loads, service_backends
    from connpub.datapath import maglev
    keys = flow_keys(3)
    keys["proto"][2] = 17  # two TCP connections, one UDP
    conns = np.zeros(3, LB_CONN_DTYPE)
    conns["lease_expiry_ns"] = NOW + 5 * srv.NS_PER_S
    conns["backend_id"] = [1, 2, 1]
    valid = np.array([True, True, True])
    agg_keys = lbctl.agg_lease_keys(2, apply_masks(flow_keys(1, vip_port=443), 2))
    aggs = np.zeros(1, LB_AGG_LEASE_DTYPE)
    aggs["lease_expiry_ns"], aggs["backend_id"], aggs["flow_count"] = NOW + 1, 3, 5
    aggs["vip_index"] = 7
    vip_keys = np.zeros(1, CLASS_KEY_DTYPE)
    vip_keys["vip_addr"], vip_keys["vip_port"], vip_keys["proto"] = VIP, 80, 6
    table = np.array([1, 2, 3, 4, 1, 2, 3], np.uint32)  # backend id per Maglev slot
    loads = lb_what_if_loads(keys, conns, valid, agg_keys, aggs, NOW, vip_keys,
                             np.array([0]), np.array([7]), np.array([0]), np.array([0]),
                             {0: table}, classes=1, backends=5)
    # level 0: the connections' own backends + the aggregate's 5 members spread evenly
    assert loads[0, 0].tolist() == [1.0, 2.0, 2.0, 1.0, 1.0]
    for level in (1, 2, 3):
        picks = table[maglev.slots_of(apply_masks(keys[:2], level), len(table))]
        expected = np.bincount(picks, minlength=5).astype(float)
        if level == 1:
            expected += 1.0  # the level-2 aggregate's members, unknown at level 1
        elif level == 2:
            expected[3] += 5  # its own entry's backend
        else:
            masked = apply_masks(agg_keys["agg"]["masked"].astype(FLOW_KEY_DTYPE), 3)
            expected[table[maglev.slots_of(masked, len(table))][0]] += 5
        assert loads[0, level].tolist() == expected.tolist()
    backends = np.zeros(4, LB_BACKEND_DTYPE)
    backends["flags"] = [0, 1, 1, 1]
    backends["services"] = [1, 1, 3, 2]
    assert service_backends(backends, 2).tolist() == [[False, True, True, False],
                                                      [False, False, True, True]]
