"""Differential conformance: the Python rules the agents, the lab metrics and the simulator use
against the C programs, on one fixture table each, through BPF_PROG_TEST_RUN.

1. Coverage (policy.coverage via agents.lb.aggregate_expiry_levels, docs/policy.md
   "Coverage") vs bpf/lb/lb.c leased_backend / aggregate_keeps_alive: for every lease situation
   the program's counters say whether the packet rode a lease (lease_hit), an aggregate
   (agg_hit) or missed (lease_miss, or syn_reuse for a SYN), and the level an aggregate hit
   writes into the connection; the Python rule must give the same verdict and level, and both
   must equal the table's expectation.
2. The server program's aggregation key (bpf/server/server.c) vs datapath.masks.apply_masks,
   with the default masks and with non-default ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from connpub.agents.lb_plan import aggregate_expiry_levels
from connpub.datapath import lbctl, loader, maglev, testrun
from connpub.datapath.abi import (
    CLASS_KEY_DTYPE,
    CLASS_LEVEL_DTYPE,
    FLOW_KEY_DTYPE,
    LB_AGG_LEASE_DTYPE,
    LB_CONN_DTYPE,
)
from connpub.datapath.clock import datapath_clock
from connpub.datapath.masks import DEFAULT_MASK_SPECS, MaskSpec, apply_masks, mask_byte_table
from connpub.datapath.masks import mask_table as mask_rows_of
from connpub.policy import coverage
from datapath_fixtures import mapped, scratch
from scapy.layers.inet import IP, TCP, UDP, Ether
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

pytestmark = pytest.mark.root

S = 1_000_000_000
MAGLEV_SIZE = 251
DEFINES = {"MAGLEV_SIZE": MAGLEV_SIZE, "MAX_CONNS": 4096, "MAX_SERVICES": 2, "MAX_BACKENDS": 8}
LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:aa"
VIP4 = "10.200.0.1"
BACKENDS = {1: "10.103.0.101", 2: "10.103.0.102", 3: "10.103.0.103"}
CONN_F_CLIENT_CLOSED = lbctl.CONN_F_CLIENT_CLOSED

# ---------------------------------------------------------------------------------------------
# 1. coverage


@dataclass(frozen=True)
class Agg:
    """One aggregate entry of the fixture: level, own entry (naming `backend`) or cover entry
    (for `backend`), backend "mine" (the connection's) or "other", expiry in s from now."""

    level: int
    entry: str  # "own" | "cover"
    backend: str  # "mine" | "other"
    expires_in_s: float


@dataclass(frozen=True)
class Situation:
    name: str
    own_lease_s: float  # the connection's lease, s from now (negative: expired)
    conn_level: int
    vip_level: int
    client_closed: bool
    aggregates: tuple[Agg, ...]
    syn: bool
    verdict: str  # lease_hit | agg_hit | lease_miss | syn_reuse
    covering_level: int = coverage.NO_LEVEL


# A miss at an aggregated VIP is followed by the flow joining its aggregate (aggregate affinity,
# docs/lb.md), which counts its own hit: the misses are set at VIP level 0 so that the counters
# show the coverage verdict alone.
SITUATIONS = (
    Situation("own lease valid", 10, 0, 0, False, (), False, "lease_hit"),
    Situation("own lease expired, nothing else", -1, 0, 0, False, (), False, "lease_miss"),
    Situation("expired, SYN reuses the tuple", -1, 0, 0, False, (), True, "syn_reuse"),
    Situation("own level aggregate (own entry)", -1, 2, 2, False,
              (Agg(2, "own", "mine", 10),), False, "agg_hit", 2),
    Situation("own level aggregate (cover entry)", -1, 1, 1, False,
              (Agg(1, "cover", "mine", 10),), False, "agg_hit", 1),
    Situation("class level changed once: VIP's level", -1, 0, 3, False,
              (Agg(3, "cover", "mine", 10),), False, "agg_hit", 3),
    Situation("class level changed twice: neither the flow's nor the VIP's", -1, 0, 2, False,
              (Agg(3, "cover", "mine", 10),), False, "agg_hit", 3),
    Situation("own level first when several cover", -1, 1, 3, False,
              (Agg(1, "cover", "mine", 10), Agg(3, "cover", "mine", 10)), False, "agg_hit", 1),
    Situation("VIP level before the others", -1, 0, 2, False,
              (Agg(1, "cover", "mine", 10), Agg(2, "cover", "mine", 10)), False, "agg_hit", 2),
    Situation("aggregate of another backend (own entry)", -1, 2, 0, False,
              (Agg(2, "own", "other", 10),), False, "lease_miss"),
    Situation("aggregate of another backend (cover entry)", -1, 2, 0, False,
              (Agg(2, "cover", "other", 10),), False, "lease_miss"),
    Situation("aggregate expired", -1, 2, 0, False,
              (Agg(2, "cover", "mine", -1),), False, "lease_miss"),
    Situation("client FIN: no aggregate cover", -1, 2, 0, True,
              (Agg(2, "cover", "mine", 10),), False, "lease_miss"),
    Situation("client FIN: linger lease still holds", 5, 2, 2, True,
              (Agg(2, "cover", "mine", 10),), False, "lease_hit"),
    Situation("SYN reuse covered by an aggregate", -1, 1, 1, False,
              (Agg(1, "own", "mine", 10),), True, "agg_hit", 1),
    Situation("expired own, valid and expired aggregates", -1, 1, 0, False,
              (Agg(1, "cover", "mine", -1), Agg(2, "own", "mine", 10)), False, "agg_hit", 2),
)


@pytest.fixture(scope="module")
def lb():
    pin_dir = loader.scratch_pin_dir("conformance-lb")
    program = loader.compile_program("lb", pin_dir, DEFINES)
    try:
        lbctl.init_lb_maps(pin_dir, lb_addr4="10.103.0.1", lb_addr6="fd00:103::1",
                           src_mac=LB_MAC, gateway_mac="02:00:00:00:00:fe", mtu=1500,
                           initial_lease_s=3.0)
        for backend_id, address in BACKENDS.items():
            lbctl.add_backend(pin_dir, backend_id, address, services=(0,),
                              mac=f"02:00:00:00:01:0{backend_id}")
        for port, proto in ((80, "tcp"), (53, "udp")):
            lbctl.add_vip(pin_dir, VIP4, port, proto, service=0)
        yield program
    finally:
        program.close()
        loader.remove_pins(pin_dir)


def _packet(index: int, syn: bool):
    flags = "S" if syn else "A"
    return (Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=f"10.100.{index}.7", dst=VIP4)
            / TCP(sport=41000 + index, dport=80, flags=flags) / Raw(b"x"))


def _key(packet) -> np.ndarray:
    key = np.zeros(1, FLOW_KEY_DTYPE)
    key["client_addr"] = np.frombuffer(mapped(packet[IP].src), np.uint8)
    key["vip_addr"] = np.frombuffer(mapped(packet[IP].dst), np.uint8)
    key["client_port"], key["vip_port"], key["proto"] = packet[TCP].sport, packet[TCP].dport, 6
    return key


def _set_up(lb, situation: Situation, key: np.ndarray, now_ns: int) -> None:
    """Write the situation's connection, aggregate entries and VIP level straight to the maps."""
    pin_dir = lb.pin_dir
    for name in ("conns", "agg_leases"):
        with lbctl.open_map(pin_dir, name) as table:
            table.clear()
    # the connection is on a backend that is not the Maglev pick, so a re-pick is visible
    picked = int(lbctl.maglev_table(pin_dir, 0)[maglev.slots_of(key, MAGLEV_SIZE)[0]])
    mine = next(b for b in BACKENDS if b != picked)
    other = next(b for b in BACKENDS if b not in (mine, picked))
    conn = np.zeros(1, LB_CONN_DTYPE)
    conn["lease_expiry_ns"] = max(now_ns + round(situation.own_lease_s * S), 1)
    conn["created_ns"] = now_ns - 30 * S
    conn["backend_id"], conn["level"] = mine, situation.conn_level
    conn["flags"] = CONN_F_CLIENT_CLOSED if situation.client_closed else 0
    conn["vip_index"] = lbctl.list_vips(pin_dir)[0].get("vip_index", 0)
    with lbctl.open_map(pin_dir, "conns") as conns:
        conns.update(key, conn)
    for agg in situation.aggregates:
        backend = mine if agg.backend == "mine" else other
        masked = apply_masks(key, agg.level)
        value = np.zeros(1, LB_AGG_LEASE_DTYPE)
        value["lease_expiry_ns"] = max(now_ns + round(agg.expires_in_s * S), 1)
        value["created_ns"], value["flow_count"] = now_ns - 30 * S, 1
        if agg.entry == "own":
            lk = lbctl.agg_lease_keys(agg.level, masked)
            value["backend_id"] = backend
        else:
            lk = lbctl.agg_lease_keys(agg.level, masked, backend)
        with lbctl.open_map(pin_dir, "agg_leases") as leases:
            leases.update(lk, value)
    lbctl.set_vip_levels(pin_dir, lbctl.vip_key(VIP4, 80, "tcp"), situation.vip_level)


def _python_verdict(lb, key: np.ndarray, situation: Situation, now_ns: int) -> tuple[str, int]:
    """The verdict of the Python rule on what the maps hold now."""
    conn_keys, conns = lbctl.read_conns(lb.pin_dir)
    agg_keys, agg_values = lbctl.read_agg_leases(lb.pin_dir)
    agg = aggregate_expiry_levels(conn_keys, conns, agg_keys, agg_values)
    own = conns["lease_expiry_ns"].astype(np.int64)
    closed = (conns["flags"] & CONN_F_CLIENT_CLOSED) != 0
    level = coverage.covering_level(conns["level"], np.full(1, situation.vip_level), closed,
                                    agg, now_ns)
    if own[0] > now_ns:
        verdict = "lease_hit"
    elif coverage.covered(own, closed, agg, now_ns)[0]:
        verdict = "agg_hit"
    else:
        verdict = "syn_reuse" if situation.syn else "lease_miss"
    return verdict, int(level[0])


@pytest.mark.parametrize("situation", SITUATIONS, ids=[s.name for s in SITUATIONS])
def test_coverage_rule_equals_the_lb_datapath(lb, situation: Situation):
    index = SITUATIONS.index(situation)
    packet = _packet(index, situation.syn)
    key = _key(packet)
    now_ns = datapath_clock().now_ns()
    _set_up(lb, situation, key, now_ns)
    # the leases are seconds away from now: the few ms until the packet runs change nothing
    python_verdict, python_level = _python_verdict(lb, key, situation, now_ns)
    before = lbctl.read_stats(lb.pin_dir)
    try:
        testrun.run(lb.prog_fd, bytes(packet))
        after = lbctl.read_stats(lb.pin_dir)
        hits = {name for name in ("lease_hit", "agg_hit", "lease_miss", "syn_reuse")
                if after[name] != before[name]}
        assert hits == {situation.verdict}
        assert python_verdict == situation.verdict
        if situation.verdict == "agg_hit":
            _, conns = lbctl.read_conns(lb.pin_dir)
            assert int(conns["level"][0]) == python_level == situation.covering_level
        elif situation.verdict != "lease_hit":
            assert python_level == coverage.NO_LEVEL
    finally:
        lbctl.set_vip_levels(lb.pin_dir, lbctl.vip_key(VIP4, 80, "tcp"), 0)


def test_covering_level_search_order_without_root():
    """The pure rule's search order on its own: own level, VIP level, then 1, 2, 3."""
    agg = np.zeros((5, 4), np.int64)
    agg[0, [1, 3]] = 10  # own 3 -> 3
    agg[1, [1, 2]] = 10  # own 0, vip 2 -> 2
    agg[2, [1, 3]] = 10  # own 0, vip 2 (expired) -> 1
    agg[3, 2] = 10  # client closed -> none
    agg[4, 2] = 5  # expired at now 5 -> none
    own_level = np.array([3, 0, 0, 2, 2])
    vip_level = np.array([1, 2, 2, 2, 2])
    closed = np.array([False, False, False, True, False])
    level = coverage.covering_level(own_level, vip_level, closed, agg, 5)
    assert level.tolist() == [3, 2, 1, coverage.NO_LEVEL, coverage.NO_LEVEL]
    held = coverage.held_until(np.array([7, 0, 0, 9, 0]), closed, agg)
    assert held.tolist() == [10, 10, 10, 9, 5]
    assert coverage.covered(np.array([7, 0, 0, 9, 0]), closed, agg, 5).tolist() == [
        True, True, True, True, False]


# ---------------------------------------------------------------------------------------------
# 2. the server program's aggregation key vs datapath.masks

CUSTOM_SPECS = (
    DEFAULT_MASK_SPECS[0],
    MaskSpec(True, False, 32, 128, True),  # keeps the client port, drops the VIP port
    MaskSpec(False, False, 20, 44, True),
    MaskSpec(False, False, 8, 32, False),  # drops the VIP address too
)
CLIENTS = [("10.1.2.3", 40001, "v4"), ("10.1.200.77", 5353, "v4"),
           ("2001:db8:0:1234::7", 40002, "v6"), ("2001:db8:ff00:1::9", 5354, "v6")]


def _server_packet(client: str, sport: int, family: str, proto: str):
    vip = "10.200.0.1" if family == "v4" else "fd00:200::1"
    l3 = IP(src=client, dst=vip) if family == "v4" else IPv6(src=client, dst=vip)
    l4 = TCP(sport=sport, dport=80, flags="S") if proto == "tcp" else UDP(sport=sport, dport=53)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4 / Raw(b"p" * 40)


@pytest.mark.parametrize("specs", [DEFAULT_MASK_SPECS, CUSTOM_SPECS], ids=["default", "custom"])
def test_server_aggregation_key_equals_apply_masks(specs):
    byte_table = mask_byte_table(specs)
    with scratch("server") as prog:
        loader.init_server_maps(prog.pin_dir, mask_rows_of(specs))
        expected = set()
        for level in (1, 2, 3):
            prog.clear("flows", "aggregates", "class_levels")
            with prog.open("class_levels") as classes:
                for vip, port, proto in (("10.200.0.1", 80, 6), ("fd00:200::1", 80, 6),
                                         ("10.200.0.1", 53, 17), ("fd00:200::1", 53, 17)):
                    ck = np.zeros(1, CLASS_KEY_DTYPE)
                    ck["vip_addr"] = np.frombuffer(mapped(vip), np.uint8)
                    ck["vip_port"], ck["proto"] = port, proto
                    classes.update(ck, np.array(level, CLASS_LEVEL_DTYPE))
            loader.init_server_maps(prog.pin_dir, mask_rows_of(specs))  # bump levels_gen
            keys = []
            for client, sport, family in CLIENTS:
                for proto in ("tcp", "udp"):
                    packet = _server_packet(client, sport, family, proto)
                    assert testrun.run(prog.prog_fd, bytes(packet)).verdict_name == "XDP_PASS"
                    key = np.zeros(1, FLOW_KEY_DTYPE)
                    l3 = packet[IP] if IP in packet else packet[IPv6]
                    l4 = packet[TCP] if TCP in packet else packet[UDP]
                    key["client_addr"] = np.frombuffer(mapped(l3.src), np.uint8)
                    key["vip_addr"] = np.frombuffer(mapped(l3.dst), np.uint8)
                    key["client_port"], key["vip_port"] = l4.sport, l4.dport
                    key["proto"] = 6 if TCP in packet else 17
                    keys.append(key[0])
            keys = np.array(keys, FLOW_KEY_DTYPE)
            masked = apply_masks(keys, np.full(len(keys), level, np.uint8), byte_table)
            want = {(level, m.tobytes()) for m in masked}
            agg_keys, _ = prog.entries("aggregates")
            got = set()
            for row in agg_keys:
                m = np.array(row["masked"], FLOW_KEY_DTYPE).copy()
                m["pad"] = 0
                got.add((int(row["level"]), m.tobytes()))
            assert got == want
            expected |= want
        # levels differ in what they keep: 3 levels x distinct keys, no collisions between them
        assert len(expected) == sum(len({m for lv, m in expected if lv == level})
                                    for level in (1, 2, 3))
