"""LB-node XDP program (bpf/lb/): fixture packets through BPF_PROG_TEST_RUN, byte-exact outputs,
leases, aggregates, draining, and the numpy mirrors of its structs."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from connpub.datapath import lbctl, lbleases, loader, maglev, testrun
from connpub.datapath.abi import FLOW_KEY_DTYPE, LB_OUTCOME_NAMES, LB_STATS
from connpub.datapath.clock import datapath_clock
from connpub.errors import ConnpubError
from scapy.layers.inet import IP, TCP, UDP, Ether
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q
from scapy.packet import Raw

pytestmark = pytest.mark.root

MAGLEV_SIZE = 251  # small prime: fast rebuilds in tests
DEFINES = {"MAGLEV_SIZE": MAGLEV_SIZE, "MAX_CONNS": 4096, "MAX_SERVICES": 4, "MAX_BACKENDS": 16}
LB_MAC, GW_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe", "02:00:00:00:00:aa"
LB4, LB6 = "10.103.0.1", "fd00:103::1"
VIP4, VIP6, VIP_EMPTY = "10.200.0.1", "fd00:200::1", "10.200.0.9"
# backend id -> (address, next-hop MAC or None = gateway)
BACKENDS = {1: ("10.103.0.101", "02:00:00:00:01:01"), 2: ("fd00:103::66", "02:00:00:00:01:02"),
            3: ("10.102.3.2", None)}


@pytest.fixture(scope="module")
def lb():
    pin_dir = loader.scratch_pin_dir("lbtest")
    program = loader.compile_program("lb", pin_dir, DEFINES)
    try:
        lbctl.init_lb_maps(pin_dir, lb_addr4=LB4, lb_addr6=LB6, src_mac=LB_MAC,
                           gateway_mac=GW_MAC, mtu=1500, initial_lease_s=3.0)
        for backend_id, (address, mac) in BACKENDS.items():
            lbctl.add_backend(pin_dir, backend_id, address, services=(0,), mac=mac)
        for vip in (VIP4, VIP6):
            for port, proto in ((80, "tcp"), (53, "udp")):
                lbctl.add_vip(pin_dir, vip, port, proto, service=0)
        lbctl.add_vip(pin_dir, VIP_EMPTY, 80, "tcp", service=1)  # service 1 has no backends
        yield program
    finally:
        program.close()
        loader.remove_pins(pin_dir)


@pytest.fixture
def clean(lb):
    """Empty connection, held and aggregate tables before each test; no VIP holds flows or
    looks at earlier levels."""
    for name in ("conns", "held", "agg_leases"):
        with lbctl.open_map(lb.pin_dir, name) as table:
            table.clear()
    lbctl.retire_other_levels(lb.pin_dir, datapath_clock().now_ns())
    lbctl.retire_held(lb.pin_dir)
    return lb


def tcp4(src="10.100.1.2", dst=VIP4, sport=40000, dport=80, flags="S", payload=b"hello"):
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=dst) / \
        TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def tcp6(src="fd00:100:1::2", dst=VIP6, sport=40000, dport=80, flags="S", payload=b"hello"):
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=src, dst=dst) / \
        TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def vlan4(sport=40000, flags="S"):
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=7) / IP(src="10.100.1.2", dst=VIP4) / \
        TCP(sport=sport, dport=80, flags=flags) / Raw(b"tagged")


def udp4(src="10.100.1.2", dst=VIP4, sport=40000, dport=53, payload=b"q"):
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=dst) / \
        UDP(sport=sport, dport=dport) / Raw(payload)


def flow_key_of(packet) -> np.ndarray:
    """The FLOW_KEY_DTYPE key the program builds for a scapy packet."""
    ip = packet[IP] if IP in packet else packet[IPv6]
    key = np.zeros(1, FLOW_KEY_DTYPE)
    key["client_addr"] = lbctl.address_bytes(ip.src)[0]
    key["vip_addr"] = lbctl.address_bytes(ip.dst)[0]
    l4 = packet[TCP] if TCP in packet else packet[UDP]
    key["client_port"], key["vip_port"] = l4.sport, l4.dport
    key["proto"] = 6 if TCP in packet else 17
    return key


def maglev_backend(lb, packet) -> int:
    """The backend the active Maglev table of service 0 gives this packet's flow."""
    table = lbctl.maglev_table(lb.pin_dir, 0)
    return int(table[maglev.slots_of(flow_key_of(packet), MAGLEV_SIZE)[0]])


def encapsulated(packet, backend_id: int) -> bytes:
    """The frame the program must send: Ethernet + outer IP to the backend + inner IP as is
    (VLAN tags are not carried over)."""
    address, mac = BACKENDS[backend_id]
    inner = bytes(packet[IP] if IP in packet else packet[IPv6])
    inner_proto = 41 if IPv6 in packet else 4
    if ":" in address:
        outer = Ether(dst=mac or GW_MAC, src=LB_MAC) / \
            IPv6(src=LB6, dst=address, nh=inner_proto, hlim=64, tc=0, fl=0, plen=len(inner))
    else:
        outer = Ether(dst=mac or GW_MAC, src=LB_MAC) / \
            IP(src=LB4, dst=address, proto=inner_proto, ttl=64, id=0, flags="DF", tos=0)
    return bytes(outer / Raw(inner))


@dataclass
class Outcome:
    verdict: int
    data: bytes
    stats: dict[str, int]  # global counters, delta


def run(lb, packet) -> Outcome:
    before = lbctl.read_stats(lb.pin_dir)
    result = testrun.run(lb.prog_fd, bytes(packet))
    after = lbctl.read_stats(lb.pin_dir)
    delta = {name: after[name] - before[name] for name in LB_STATS if after[name] != before[name]}
    return Outcome(result.verdict, result.data_out, delta)


def outcome_count(stats: dict[str, int]) -> int:
    return sum(stats.get(name, 0) for name in LB_OUTCOME_NAMES)


# ---------------------------------------------------------------------------------------------
# struct layouts against what bcc compiled


def _ctype_offsets(ctype, prefix="") -> dict[str, tuple[int, int]]:
    out = {}
    for name, field_type, *_ in getattr(ctype, "_fields_", []):
        field = getattr(ctype, name)
        out[prefix + name] = (field.offset, field.size)
        if hasattr(field_type, "_fields_"):
            for sub, (off, size) in _ctype_offsets(field_type, prefix + name + ".").items():
                out[sub] = (field.offset + off, size)
    return out


def _dtype_offsets(dtype: np.dtype, prefix="", base=0) -> dict[str, tuple[int, int]]:
    out = {}
    for name in dtype.names or ():
        sub, offset = dtype.fields[name][:2]
        out[prefix + name] = (base + offset, sub.itemsize)
        if sub.base.names:
            out.update(_dtype_offsets(sub.base, prefix + name + ".", base + offset))
    return out


def test_struct_dtypes_match_the_compiled_tables(lb):
    assert set(lbctl.LAYOUTS) == {p.name for p in lb.pin_dir.iterdir()}
    for name, (key_dtype, value_dtype) in lbctl.LAYOUTS.items():
        table = lb.bpf[name.encode()]
        leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: Leaf is an array of CPUs
        for ctype, dtype in ((table.Key, key_dtype), (leaf, value_dtype)):
            assert ctypes.sizeof(ctype) == dtype.itemsize, name
            if dtype.names:
                assert _dtype_offsets(dtype) == _ctype_offsets(ctype), name


# ---------------------------------------------------------------------------------------------
# fixture table: description, packet, expected verdict, expected bytes (None: as the input)


@dataclass
class Case:
    description: str
    packet: Callable[[], object]
    verdict: int
    outcome: str
    forwarded: bool


CASES = [
    Case("IPv4 TCP SYN to the v4 VIP is IPIP-encapsulated", lambda: tcp4(), testrun.XDP_TX,
         "forwarded", True),
    Case("IPv4 UDP to the v4 VIP", lambda: udp4(sport=1234), testrun.XDP_TX, "forwarded", True),
    Case("IPv6 TCP SYN to the v6 VIP", lambda: tcp6(), testrun.XDP_TX, "forwarded", True),
    Case("IPv6 TCP ACK to the v6 VIP", lambda: tcp6(sport=4242, flags="A"), testrun.XDP_TX,
         "forwarded", True),
    Case("VLAN-tagged SYN to the v4 VIP: tag not carried over", lambda: vlan4(),
         testrun.XDP_TX, "forwarded", True),
    Case("VIP address, other port: not a VIP", lambda: tcp4(dport=443), testrun.XDP_PASS,
         "not_vip", False),
    Case("other address: not a VIP", lambda: tcp4(dst="10.200.0.2"), testrun.XDP_PASS,
         "not_vip", False),
    Case("IPv6 not to a VIP", lambda: tcp6(dst="fd00:200::2"), testrun.XDP_PASS, "not_vip", False),
    Case("ARP: not IP", lambda: Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x0806) / Raw(bytes(28)),
         testrun.XDP_PASS, "non_ip", False),
    Case("ICMP to the VIP: unsupported", lambda: Ether() / IP(dst=VIP4, proto=1) / Raw(bytes(8)),
         testrun.XDP_PASS, "unsupported", False),
    Case("IPv4 fragment", lambda: Ether() / IP(dst=VIP4, flags="MF") / TCP(dport=80),
         testrun.XDP_PASS, "fragment", False),
    Case("already IPIP-encapsulated", lambda: Ether() / IP(dst=LB4) / IP(dst=VIP4) / TCP(dport=80),
         testrun.XDP_PASS, "tunnelled", False),
    Case("VIP without backends", lambda: tcp4(dst=VIP_EMPTY), testrun.XDP_DROP, "no_backend",
         False),
    Case("too big once encapsulated", lambda: tcp4(payload=bytes(1500 - 40 - 19)),
         testrun.XDP_DROP, "too_big", False),
    Case("fits exactly once encapsulated", lambda: tcp4(payload=bytes(1500 - 40 - 20)),
         testrun.XDP_TX, "forwarded", True),
    Case("IPv4 header with IHL 4: malformed", lambda: Ether() / IP(dst=VIP4, ihl=4) / TCP(),
         testrun.XDP_PASS, "malformed", False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_fixture_packets(clean, case: Case):
    packet = case.packet()
    expected_backend = maglev_backend(clean, packet) if case.forwarded else None
    got = run(clean, packet)
    assert got.verdict == case.verdict, got.stats
    assert got.stats.get(case.outcome) == 1
    assert outcome_count(got.stats) == 1
    if case.forwarded:
        assert got.data == encapsulated(packet, expected_backend)
        assert got.stats["new_flow"] == 1
    elif case.verdict == testrun.XDP_PASS:
        assert got.data == bytes(packet)


@pytest.mark.parametrize("backend_id", sorted(BACKENDS))
@pytest.mark.parametrize("make", [tcp4, tcp6], ids=["vip4", "vip6"])
def test_every_inner_outer_family_is_byte_exact(clean, backend_id, make):
    """4in4, 6in4 (backend 1, 3) and 4in6, 6in6 (backend 2), with per-backend or gateway MAC:
    a flow leased on the backend is forwarded to it, outer checksum right, inner untouched."""
    packet = make(sport=50000 + backend_id, flags="A")
    now = datapath_clock().now_ns()
    lbctl.apply_flow_leases(clean.pin_dir, flow_key_of(packet), backend_id, now + 10**10)
    got = run(clean, packet)
    assert got.verdict == testrun.XDP_TX
    assert got.data == encapsulated(packet, backend_id)
    assert got.stats["lease_hit"] == 1 and got.stats["forwarded"] == 1
    out = Ether(got.data)
    if IP in out and out[IP].proto in (4, 41):
        recomputed = IP(bytes(out[IP]))
        del recomputed.chksum
        assert IP(bytes(recomputed)).chksum == out[IP].chksum


def _headers(packet) -> list[int]:
    """Byte offsets where each header of the packet ends."""
    ends, offset, layer = [], 0, packet
    while layer and not isinstance(layer, Raw):
        offset += len(bytes(layer)) - len(bytes(layer.payload))
        ends.append(offset)
        layer = layer.payload
    return ends


@pytest.mark.parametrize("make", [tcp4, tcp6, udp4, vlan4], ids=["tcp4", "tcp6", "udp4", "vlan"])
def test_every_header_truncated_by_one_byte_passes(clean, make):
    packet = make()
    raw = bytes(packet)
    # Ethernet itself cannot be cut: BPF_PROG_TEST_RUN refuses frames under 14 bytes (EINVAL)
    for end in _headers(packet)[1:] + [len(raw)]:
        cut = raw[: end - 1]
        got = run(clean, cut)
        assert got.verdict == testrun.XDP_PASS, end
        assert got.data == cut
        assert got.stats == {"truncated": 1}, end


def test_known_flow_stays_on_its_backend_while_leased(clean):
    packet = tcp4(sport=41000)
    first = run(clean, packet)
    backend = maglev_backend(clean, packet)
    assert first.stats["new_flow"] == 1
    again = run(clean, tcp4(sport=41000, flags="A"))
    assert again.stats == {"forwarded": 1, "lease_hit": 1, "bytes": len(packet[IP])}
    assert again.data == encapsulated(tcp4(sport=41000, flags="A"), backend)
    keys, values = lbctl.read_conns(clean.pin_dir)
    assert len(keys) == 1 and int(values["backend_id"][0]) == backend
    lease = int(values["lease_expiry_ns"][0]) - int(values["created_ns"][0])
    assert lease == 3 * 10**9


def _other_backend(lb, packet) -> int:
    """A backend that is not the Maglev pick of this flow (so a re-pick is visible)."""
    picked = maglev_backend(lb, packet)
    return next(b for b in (1, 3) if b != picked)


def test_expired_lease_non_syn_counts_a_miss_and_repicks(clean):
    packet = tcp4(sport=42000, flags="A")
    held_by = _other_backend(clean, packet)
    lbctl.apply_flow_leases(clean.pin_dir, flow_key_of(packet), held_by, 1)  # long expired
    vip_before = lbctl.list_vips(clean.pin_dir)[0]["lease_misses"]
    got = run(clean, packet)
    assert got.stats["lease_miss"] == 1 and got.stats["new_flow"] == 1
    assert got.data == encapsulated(packet, maglev_backend(clean, packet))
    assert lbctl.list_vips(clean.pin_dir)[0]["lease_misses"] == vip_before + 1
    assert lbctl.lease_misses(clean.pin_dir) >= 1


def test_expired_lease_syn_is_a_new_flow_without_miss(clean):
    packet = tcp4(sport=42001, flags="S")
    lbctl.apply_flow_leases(clean.pin_dir, flow_key_of(packet), _other_backend(clean, packet), 1)
    got = run(clean, packet)
    assert "lease_miss" not in got.stats
    assert got.stats["syn_reuse"] == 1 and got.stats["new_flow"] == 1
    assert got.data == encapsulated(packet, maglev_backend(clean, packet))


def test_aggregate_lease_of_the_flows_backend_keeps_it_alive(clean):
    packet = tcp4(src="10.100.1.77", sport=43000, flags="A")
    key = flow_key_of(packet)
    held_by = _other_backend(clean, packet)
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, 1, levels=2)
    masked = lbctl.masks.apply_masks(key, 2)
    now = datapath_clock().now_ns()
    lbctl.apply_aggregate_leases(clean.pin_dir, lbctl.agg_lease_keys(2, masked, held_by),
                                 now + 10**10)
    got = run(clean, packet)
    assert got.stats == {"forwarded": 1, "agg_hit": 1, "bytes": len(packet[IP])}
    assert got.data == encapsulated(packet, held_by)
    # another flow of the same client and VIP (same level-2 aggregate) is kept alive too
    sibling = tcp4(src="10.100.1.77", sport=43001, flags="A")
    lbctl.apply_flow_leases(clean.pin_dir, flow_key_of(sibling), held_by, 1, levels=2)
    assert run(clean, sibling).stats["agg_hit"] == 1


def test_client_fin_ends_aggregate_cover_and_leaves_a_linger_lease(clean):
    """DSR: the LB sees the client's FIN/RST. From then on only the flow's own lease counts, set
    to now + close_linger, so a closed flow is not kept alive by its aggregate."""
    packet = tcp4(src="10.100.1.80", sport=43300, flags="A")
    key = flow_key_of(packet)
    held_by = _other_backend(clean, packet)
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, 1, levels=2)
    masked = lbctl.masks.apply_masks(key, 2)
    now = datapath_clock().now_ns()
    lbctl.apply_aggregate_leases(clean.pin_dir, lbctl.agg_lease_keys(2, masked, held_by),
                                 now + 10**11)
    linger_s = lbctl.config_dict(lbctl.read_config(clean.pin_dir))["close_linger_s"]
    fin = tcp4(src="10.100.1.80", sport=43300, flags="FA")
    got = run(clean, fin)
    assert got.stats == {"forwarded": 1, "agg_hit": 1, "client_closed": 1,
                         "bytes": len(fin[IP])}
    _, conns = lbctl.read_conns(clean.pin_dir)
    closed_flag = lbctl.CONN_F_CLIENT_CLOSED
    (conn,) = [c for c in conns
               if int(c["backend_id"]) == held_by and int(c["flags"]) == closed_flag]
    after = datapath_clock().now_ns()
    assert now + linger_s * 1e9 - 2e7 <= int(conn["lease_expiry_ns"]) <= after + linger_s * 1e9
    # the last ACK rides the linger lease; a second FIN does not count again
    assert run(clean, tcp4(src="10.100.1.80", sport=43300, flags="A")).stats["lease_hit"] == 1
    assert "client_closed" not in run(clean, fin).stats
    # a renewal does not stretch the closed flow's linger lease
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, now + 10**12)
    _, conns = lbctl.read_conns(clean.pin_dir)
    closed = conns["flags"] == closed_flag
    assert int(conns[closed]["lease_expiry_ns"][0]) == int(conn["lease_expiry_ns"])
    # once the linger lease is over, the (still valid) aggregate does not keep it alive
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, 1, allow_shorten=True)
    got = run(clean, tcp4(src="10.100.1.80", sport=43300, flags="A"))
    assert got.stats["lease_miss"] == 1 and "agg_hit" not in got.stats


def test_syn_reusing_a_closed_tuple_within_the_linger_is_covered_again(clean):
    packet = tcp4(src="10.100.1.81", sport=43400, flags="A")
    key = flow_key_of(packet)
    held_by = _other_backend(clean, packet)
    now = datapath_clock().now_ns()
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, now + 10**10, levels=2)
    run(clean, tcp4(src="10.100.1.81", sport=43400, flags="R"))
    _, conns = lbctl.read_conns(clean.pin_dir)
    assert int(conns[conns["backend_id"] == held_by]["flags"].max()) == lbctl.CONN_F_CLIENT_CLOSED
    got = run(clean, tcp4(src="10.100.1.81", sport=43400, flags="S"))
    assert got.stats["lease_hit"] == 1 and got.data == encapsulated(
        tcp4(src="10.100.1.81", sport=43400, flags="S"), held_by)
    keys, conns = lbctl.read_conns(clean.pin_dir)
    mine = conns[(keys["client_port"] == 43400)]
    assert int(mine["flags"][0]) == 0


def test_aggregate_lease_of_another_backend_does_not(clean):
    packet = tcp4(src="10.100.1.78", sport=43100, flags="A")
    key = flow_key_of(packet)
    held_by = _other_backend(clean, packet)
    other = next(b for b in (1, 2, 3) if b != held_by)
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, 1, levels=2)
    now = datapath_clock().now_ns()
    masked = lbctl.masks.apply_masks(key, 2)
    lbctl.apply_aggregate_leases(clean.pin_dir, lbctl.agg_lease_keys(2, masked, other),
                                 now + 10**10)
    got = run(clean, packet)
    assert got.stats["lease_miss"] == 1 and "agg_hit" not in got.stats


def test_aggregate_lease_at_the_vips_current_level(clean):
    """A flow created at level 0 is kept alive by an aggregate at its class's new level."""
    packet = tcp4(src="10.100.1.79", sport=43200, flags="A")
    key = flow_key_of(packet)
    held_by = _other_backend(clean, packet)
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, 1)
    masked = lbctl.masks.apply_masks(key, 3)
    now = datapath_clock().now_ns()
    lbctl.apply_aggregate_leases(clean.pin_dir, lbctl.agg_lease_keys(3, masked, held_by),
                                 now + 10**10)
    vip = lbctl.vip_key(VIP4, 80, "tcp")
    try:
        assert lbctl.set_vip_levels(clean.pin_dir, vip, 3) == 1
        got = run(clean, packet)
        assert got.stats["agg_hit"] == 1
        assert int(lbctl.read_conns(clean.pin_dir)[1]["level"][0]) == 3
    finally:
        lbctl.set_vip_levels(clean.pin_dir, vip, 0)


def test_aggregate_lease_at_a_level_neither_the_flows_nor_the_vips(clean):
    """Two class-level changes before the flow's next packet (0 -> 3 -> 2): the entry says 0,
    the VIP 2, and the server still holds the flow in its level-3 aggregate (it moves a flow
    only at its next packet): that aggregate keeps it alive and becomes the entry's level."""
    packet = udp4(src="10.100.1.82", sport=43500)
    key = flow_key_of(packet)
    held_by = _other_backend(clean, packet)
    lbctl.apply_flow_leases(clean.pin_dir, key, held_by, 1)
    now = datapath_clock().now_ns()
    lbctl.apply_aggregate_leases(
        clean.pin_dir, lbctl.agg_lease_keys(3, lbctl.masks.apply_masks(key, 3), held_by),
        now + 10**10)
    vip = lbctl.vip_key(VIP4, 53, "udp")
    try:
        assert lbctl.set_vip_levels(clean.pin_dir, vip, 2) == 1
        got = run(clean, packet)
        assert got.stats["agg_hit"] == 1 and "lease_miss" not in got.stats
        assert got.data == encapsulated(packet, held_by)
        keys, conns = lbctl.read_conns(clean.pin_dir)
        assert int(conns[keys["client_port"] == 43500]["level"][0]) == 3
    finally:
        lbctl.set_vip_levels(clean.pin_dir, vip, 0)


def test_draining_backend_keeps_leased_flows_gets_no_new_ones(clean):
    pin_dir = clean.pin_dir
    table_before = lbctl.maglev_table(pin_dir, 0)
    # a flow that Maglev sends to backend 1, and one leased on it
    sports = np.arange(44000, 44200)
    keys = np.concatenate([flow_key_of(tcp4(sport=int(p))) for p in sports])
    picks = table_before[maglev.slots_of(keys, MAGLEV_SIZE)]
    new_sport = int(sports[np.flatnonzero(picks == 1)[0]])
    leased = tcp4(sport=44999, flags="A")
    now = datapath_clock().now_ns()
    lbctl.apply_flow_leases(pin_dir, flow_key_of(leased), 1, now + 10**10)
    lbctl.drain_backend(pin_dir, 1)
    try:
        table = lbctl.maglev_table(pin_dir, 0)
        assert not (table == 1).any()
        got = run(clean, leased)
        assert got.data == encapsulated(leased, 1) and got.stats["lease_hit"] == 1
        fresh = tcp4(sport=new_sport)
        got = run(clean, fresh)
        assert got.stats["new_flow"] == 1
        assert got.data == encapsulated(fresh, int(table[maglev.slots_of(flow_key_of(fresh),
                                                                         MAGLEV_SIZE)[0]]))
        assert int(table[maglev.slots_of(flow_key_of(fresh), MAGLEV_SIZE)[0]]) != 1
        assert next(b for b in lbctl.list_backends(pin_dir) if b["id"] == 1)["draining"]
    finally:
        lbctl.drain_backend(pin_dir, 1, draining=False)
    assert (lbctl.maglev_table(pin_dir, 0) == table_before).all()


def test_removed_backend_flows_are_repicked(clean):
    pin_dir = clean.pin_dir
    packet = tcp4(sport=45000, flags="A")
    now = datapath_clock().now_ns()
    lbctl.apply_flow_leases(pin_dir, flow_key_of(packet), 3, now + 10**10)
    lbctl.del_backend(pin_dir, 3)
    try:
        got = run(clean, packet)
        assert got.stats["backend_gone"] == 1 and got.stats["new_flow"] == 1
        assert got.data == encapsulated(packet, maglev_backend(clean, packet))
        assert maglev_backend(clean, packet) != 3
    finally:
        lbctl.add_backend(pin_dir, 3, BACKENDS[3][0], services=(0,))


def test_per_vip_and_per_backend_stats(clean):
    vip_before = {v["vip_index"]: v for v in lbctl.list_vips(clean.pin_dir)}
    be_before = {b["id"]: b for b in lbctl.list_backends(clean.pin_dir)}
    packet = udp4(sport=46000)
    backend = maglev_backend(clean, packet)
    run(clean, packet)
    run(clean, packet)
    vip = next(v for v in lbctl.list_vips(clean.pin_dir) if v["port"] == 53 and v["vip"] == VIP4)
    before = vip_before[vip["vip_index"]]
    assert vip["packets"] - before["packets"] == 2
    assert vip["bytes"] - before["bytes"] == 2 * len(packet[IP])
    assert vip["new_flows"] - before["new_flows"] == 1
    assert vip["lease_hits"] - before["lease_hits"] == 1
    be = next(b for b in lbctl.list_backends(clean.pin_dir) if b["id"] == backend)
    assert be["packets"] - be_before[backend]["packets"] == 2


def test_apply_flow_leases_only_extends_and_refuses_other_backends(clean):
    pin_dir = clean.pin_dir
    key = flow_key_of(tcp4(sport=47000))
    first = lbctl.apply_flow_leases(pin_dir, key, 1, 5_000, now_ns=7)
    assert first["created"] == 1
    assert lbctl.apply_flow_leases(pin_dir, key, 1, 4_000)["unchanged"] == 1
    assert lbctl.apply_flow_leases(pin_dir, key, 2, 9_000)["refused_backend"] == 1
    assert lbctl.apply_flow_leases(pin_dir, key, 1, 6_000)["extended"] == 1
    _, values = lbctl.read_conns(pin_dir)
    assert int(values["lease_expiry_ns"][0]) == 6_000 and int(values["created_ns"][0]) == 7
    lbctl.apply_flow_leases(pin_dir, key, 1, 2_000, allow_shorten=True)
    assert int(lbctl.read_conns(pin_dir)[1]["lease_expiry_ns"][0]) == 2_000


def test_apply_leases_in_bulk_take_the_table_path(clean, monkeypatch):
    pin_dir = clean.pin_dir
    count = 1000
    monkeypatch.setattr(lbleases, "_LOOKUP_ONE_BY_ONE", 100)  # read the whole table instead
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["client_addr"][:, 10:12] = 0xFF
    keys["client_addr"][:, 12:16] = np.arange(count, dtype=">u4").view(np.uint8).reshape(-1, 4)
    keys["proto"] = 6
    not_vip = lbctl.apply_flow_leases(pin_dir, keys, 1, 100, now_ns=1)
    assert not_vip["refused_not_vip"] == count and not_vip["written"] == 0
    keys["vip_addr"] = lbctl.address_bytes(VIP4)[0]
    keys["vip_port"] = 80
    assert lbctl.apply_flow_leases(pin_dir, keys, 1, 100, now_ns=1)["created"] == count
    result = lbctl.apply_flow_leases(pin_dir, keys, 1, np.where(np.arange(count) % 2, 50, 200))
    assert result["extended"] == count // 2 and result["unchanged"] == count // 2
    agg = lbctl.agg_lease_keys(1, lbctl.masks.apply_masks(keys, 1), 1)
    assert lbctl.apply_aggregate_leases(pin_dir, agg, 300)["written"] == count
    assert lbctl.apply_aggregate_leases(pin_dir, agg, 200)["unchanged"] == count
    assert lbctl.purge_expired_aggregates(pin_dir, 301) == count


def test_bad_control_input_is_refused(clean):
    pin_dir = clean.pin_dir
    with pytest.raises(ConnpubError, match="exists"):
        lbctl.add_vip(pin_dir, VIP4, 80, "tcp")
    with pytest.raises(ConnpubError, match="bad protocol"):
        lbctl.add_vip(pin_dir, VIP4, 81, "sctp")
    with pytest.raises(ConnpubError, match="bad service"):
        lbctl.add_vip(pin_dir, VIP4, 81, "tcp", service=9)
    with pytest.raises(ConnpubError, match="exists"):
        lbctl.add_backend(pin_dir, 1, "10.9.9.9")
    with pytest.raises(ConnpubError, match="one backend per address"):
        lbctl.add_backend(pin_dir, 5, BACKENDS[1][0])
    with pytest.raises(ConnpubError, match="bad backend id"):
        lbctl.add_backend(pin_dir, 0, "10.9.9.9")
    with pytest.raises(ConnpubError, match="no backend"):
        lbctl.drain_backend(pin_dir, 7)
    with pytest.raises(ConnpubError, match="levels 1..3"):
        lbctl.apply_aggregate_leases(pin_dir, lbctl.agg_lease_keys(0, np.zeros(1, FLOW_KEY_DTYPE),
                                                                   1), 5)
    assert len(lbctl.list_vips(pin_dir)) == 5


def test_cli_operates_on_the_pinned_maps(lb):
    """`connpub lb ...` on the scratch pins (pin_dir(iface=<tag>, netns='scratch') is them)."""
    import json

    from click.testing import CliRunner
    from connpub.cli import main

    where = ["--iface", lb.pin_dir.name, "--netns", lb.pin_dir.parent.name]
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(main, list(args) + where)
        assert result.exit_code == 0, result.output
        return result.stdout

    invoke("lb", "vip", "add", "10.200.0.50", "8080", "tcp", "--service", "2")
    invoke("lb", "backend", "add", "9", "10.103.0.109", "--service", "2")
    try:
        vips = json.loads(invoke("lb", "vip", "list", "--json"))
        assert {"vip": "10.200.0.50", "port": 8080, "proto": "tcp", "service": 2} .items() <= \
            next(v for v in vips if v["port"] == 8080).items()
        backends = json.loads(invoke("lb", "backend", "list", "--json"))
        assert next(b for b in backends if b["id"] == 9)["maglev_share"] == {"2": 1.0}
        assert (lbctl.maglev_table(lb.pin_dir, 2) == 9).all()
        invoke("lb", "backend", "drain", "9")
        assert (lbctl.maglev_table(lb.pin_dir, 2) == 0).all()
        invoke("lb", "backend", "drain", "9", "--undo")
        assert json.loads(invoke("lb", "config", "show", "--json"))["lb_addr4"] == LB4
        assert json.loads(invoke("lb", "stats", "--json"))["forwarded"] >= 1
        bad = runner.invoke(main, ["lb", "vip", "add", "10.200.0.50", "8080", "tcp"] + where)
        assert bad.exit_code == 2 and "exists" in bad.output
    finally:
        invoke("lb", "backend", "del", "9")
        invoke("lb", "vip", "del", "10.200.0.50", "8080", "tcp")
    assert (lbctl.maglev_table(lb.pin_dir, 2) == 0).all()
    assert not any(v["port"] == 8080 for v in lbctl.list_vips(lb.pin_dir))


@pytest.mark.parametrize("forward", ["redirect", "tx"])
def test_lb_program_on_the_lab_spreads_real_tcp_over_servers(unique_prefix, forward):
    """The real program on lab lb1/eth0: TCP over IPv4 and IPv6 VIPs reaches both servers,
    each connection whole on one server, every flow in the connection table, no lease miss."""
    import json
    import sys

    from connpub import paths
    from connpub.lab import topology as labmod

    try:
        lab = labmod.up(unique_prefix, clients=1, lbs=1, servers=2)
        ingress = lab.lb_ingress("lb1")
        loader.attach("lb", ingress.name, ingress.netns, "native")
        pin_dir = paths.pin_dir(ingress.name, ingress.netns)
        cfg = lbctl.init_lb_maps(pin_dir)  # as `connpub attach` does: iface from the pin folder
        assert (cfg["lb_addr4"], cfg["src_mac"]) == (ingress.ip4, ingress.mac)
        if forward == "redirect":
            lbctl.set_config(pin_dir, redirect_iface=lab.lb_fabric("lb1").name,
                             netns=ingress.netns)
        else:
            lbctl.set_config(pin_dir, gateway_mac=lab.lb_gateway_mac("lb1"))
        for backend_id, backend in enumerate(lab.backends(), start=1):
            if forward == "redirect":
                lbctl.add_backend(pin_dir, backend_id, backend["ipv4"], mac=backend["mac"])
            else:
                lbctl.add_backend(pin_dir, backend_id, backend["routed_ipv6"])  # 4in6 / 6in6
        for vip in (lab.vip4, lab.vip6):
            lbctl.add_vip(pin_dir, vip, lab.tcp_port, "tcp")
        for vip in (lab.vip4, lab.vip6):
            result = labmod.run_in_netns(
                lab.clients[0].netns,
                [sys.executable, "-m", "connpub.traffic.services", "load", "--vip", vip, "--port",
                 str(lab.tcp_port), "--connections", "24", "--bytes", "20000", "--json",
                 "--timeout", "5"], timeout_s=60)
            report = json.loads(result.stdout)
            assert report["ok"] == 24, report["results"]
            assert set(report["servers"]) == {"srv1", "srv2"}, report["servers"]
        counters = lbctl.read_stats(pin_dir)
        assert counters["lease_miss"] == 0 and counters["no_backend"] == 0
        assert counters["forwarded"] > 0 and counters["new_flow"] == 48
        keys, values = lbctl.read_conns(pin_dir)
        assert len(keys) == 48
        assert set(values["backend_id"].tolist()) == {1, 2}
    finally:
        with contextlib.suppress(Exception):
            loader.detach("eth0", f"{unique_prefix}-lb1")
        labmod.down(unique_prefix)


def test_bench_lb_restores_the_packet_every_iteration():
    """A short bench_lb run: it raises unless every iteration was forwarded (and hit, or was a
    new flow / member / aggregate as the case says), so finishing at all checks the wrappers."""
    from connpub.bench.lb import bench_lb

    figures = bench_lb(repeat=20_000, prefill=20_000, rounds=2)
    for name in ("empty_ns", "wrapper_ns", "hit_ns", "hit_cold_ns", "hit_cold_inserted_order_ns",
                 "new_flow_ns", "not_vip_ns", "hit_minus_floor_ns", "new_flow_minus_floor_ns",
                 "agg_hit_ns", "agg_new_member_ns", "agg_new_aggregate_ns",
                 "agg_new_member_vs_hit_cold"):
        assert figures[name] > 0, name
    assert figures["new_flow_ns"] > figures["hit_ns"]
    assert figures["agg_new_aggregate_ns"] > figures["agg_new_member_ns"]
    assert figures["agg_new_member_vs_hit_cold_min"] <= figures["agg_new_member_vs_hit_cold_max"]
    assert figures["prefill"] == 20_000 and figures["repeat"] == 20_000
    assert figures["rounds"] == 2


def test_bench_lb_rejects_a_prefill_without_cold_flows():
    from connpub.bench.lb import bench_lb

    with pytest.raises(ConnpubError, match="prefill >= 2"):
        bench_lb(repeat=1000, prefill=1)
