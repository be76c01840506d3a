"""The server-node program through BPF_PROG_TEST_RUN: a table of fixtures (description, packet,
expected outcome, expected tuple) with exact map contents, then aggregation levels."""

from __future__ import annotations

import numpy as np
import pytest
from connpub.datapath import loader, testrun
from connpub.datapath.abi import CLASS_KEY_DTYPE, CLASS_LEVEL_DTYPE, SERVER_OUTCOMES, SERVER_STATS
from datapath_fixtures import mapped, scratch
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

pytestmark = pytest.mark.root

C4, V4, LB4, S4 = "10.1.0.7", "10.200.0.1", "192.168.50.1", "192.168.60.2"
C6, V6, LB6, S6 = "2001:db8:0:1::7", "fd00:200::1", "fd00:50::1", "fd00:60::2"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
PAYLOAD = Raw(b"p" * 100)


def tcp(flags="S", sport=40001, dport=80):
    return TCP(sport=sport, dport=dport, flags=flags)


# description, packet, outcome, (client, vip, client port, vip port, proto), inner IP layer
TRACKED = [
    ("ipv4 tcp", ETH / IP(src=C4, dst=V4) / tcp() / PAYLOAD, (C4, V4, 40001, 80, 6)),
    (
        "ipv4 udp",
        ETH / IP(src=C4, dst=V4) / UDP(sport=5353, dport=53) / PAYLOAD,
        (C4, V4, 5353, 53, 17),
    ),
    ("ipv6 tcp", ETH / IPv6(src=C6, dst=V6) / tcp() / PAYLOAD, (C6, V6, 40001, 80, 6)),
    (
        "ipv6 udp",
        ETH / IPv6(src=C6, dst=V6) / UDP(sport=5353, dport=53) / PAYLOAD,
        (C6, V6, 5353, 53, 17),
    ),
    (
        "802.1Q vlan",
        ETH / Dot1Q(vlan=10) / IP(src=C4, dst=V4) / tcp() / PAYLOAD,
        (C4, V4, 40001, 80, 6),
    ),
    (
        "802.1ad QinQ",
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88A8)
        / Dot1AD(vlan=100)
        / Dot1Q(vlan=10)
        / IP(src=C4, dst=V4)
        / tcp()
        / PAYLOAD,
        (C4, V4, 40001, 80, 6),
    ),
    (
        "ipv4 with options",
        ETH / IP(src=C4, dst=V4, options=[IPOption(b"\x94\x04\x00\x00")] * 3) / tcp() / PAYLOAD,
        (C4, V4, 40001, 80, 6),
    ),
    (
        "ipv6 hop-by-hop + dst opts",
        ETH / IPv6(src=C6, dst=V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / tcp() / PAYLOAD,
        (C6, V6, 40001, 80, 6),
    ),
    (
        "ipip",
        ETH / IP(src=LB4, dst=S4) / IP(src=C4, dst=V4) / tcp() / PAYLOAD,
        (C4, V4, 40001, 80, 6),
    ),
    (
        "ip6ip6",
        ETH / IPv6(src=LB6, dst=S6) / IPv6(src=C6, dst=V6) / tcp() / PAYLOAD,
        (C6, V6, 40001, 80, 6),
    ),
    (
        "ipv4 in ipv6",
        ETH / IPv6(src=LB6, dst=S6) / IP(src=C4, dst=V4) / tcp() / PAYLOAD,
        (C4, V4, 40001, 80, 6),
    ),
    (
        "ipv6 in ipv4",
        ETH / IP(src=LB4, dst=S4) / IPv6(src=C6, dst=V6) / UDP(sport=7, dport=53) / PAYLOAD,
        (C6, V6, 7, 53, 17),
    ),
]

UNTRACKED = [
    ("arp", ETH / ARP(), "non_ip"),
    ("ipv4 icmp", ETH / IP(src=C4, dst=V4) / ICMP(), "unsupported"),
    (
        "ipip inside ipip",
        ETH / IP(src=LB4, dst=S4) / IP(src=LB4, dst=S4) / IP(src=C4, dst=V4) / tcp(),
        "unsupported",
    ),
    ("ipv4 first fragment", ETH / IP(src=C4, dst=V4, flags="MF") / tcp() / PAYLOAD, "fragment"),
    ("ipv4 later fragment", ETH / IP(src=C4, dst=V4, frag=20, proto=6) / PAYLOAD, "fragment"),
    (
        "ipv6 fragment",
        ETH / IPv6(src=C6, dst=V6) / IPv6ExtHdrFragment(nh=6) / tcp() / PAYLOAD,
        "fragment",
    ),
    (
        "inner ipv4 fragment",
        ETH / IP(src=LB4, dst=S4) / IP(src=C4, dst=V4, flags="MF") / tcp(),
        "fragment",
    ),
    ("ipv4 ihl 4", ETH / IP(src=C4, dst=V4, ihl=4) / tcp() / PAYLOAD, "malformed"),
    (
        "ipv4 version 6 under 0x0800",
        ETH / IP(src=C4, dst=V4, version=6) / tcp() / PAYLOAD,
        "malformed",
    ),
    (
        "ipv4 total length below header",
        ETH / IP(src=C4, dst=V4, len=12) / tcp() / PAYLOAD,
        "malformed",
    ),
    ("tcp data offset 4", ETH / IP(src=C4, dst=V4) / TCP(dataofs=4) / PAYLOAD, "malformed"),
    ("udp length 4", ETH / IP(src=C4, dst=V4) / UDP(len=4) / PAYLOAD, "malformed"),
]


def l3_len(packet) -> int:
    """Length of the innermost IP packet (what the program counts as bytes)."""
    layers = [layer for layer in packet.iterpayloads() if isinstance(layer, IP | IPv6)]
    return len(bytes(layers[-1]))


def headers_end(packet) -> int:
    """Offset where the L4 header ends (everything before must be there to track the flow)."""
    return len(bytes(packet)) - len(bytes(packet[Raw])) if Raw in packet else len(bytes(packet))


@pytest.fixture(scope="module")
def server():
    with scratch("server") as prog:
        loader.init_server_maps(prog.pin_dir)
        yield prog


@pytest.fixture
def fresh(server):
    server.clear("flows", "aggregates", "class_levels", "stats")
    loader.init_server_maps(server.pin_dir)
    return server


def run_ok(prog, packet) -> None:
    """Run one packet: the server program passes every packet, unchanged."""
    data = bytes(packet)
    result = testrun.run(prog.prog_fd, data)
    assert result.verdict_name == "XDP_PASS"
    assert result.data_out == data


def only(stats: dict[str, int], **expected: int) -> None:
    """Every counter is 0 except the ones named."""
    assert stats == {name: expected.get(name, 0) for name in SERVER_STATS}


@pytest.mark.parametrize("description,packet,tuple_", TRACKED, ids=[f[0] for f in TRACKED])
def test_tracked_packet(fresh, description, packet, tuple_):
    run_ok(fresh, packet)
    keys, values = fresh.entries("flows")
    assert len(keys) == 1, description
    client, vip, client_port, vip_port, proto = tuple_
    key = keys[0]
    assert bytes(key["client_addr"]) == mapped(client)
    assert bytes(key["vip_addr"]) == mapped(vip)
    assert (int(key["client_port"]), int(key["vip_port"]), int(key["proto"])) == (
        client_port,
        vip_port,
        proto,
    )
    value = values[0]
    size = l3_len(packet)
    assert (int(value["packets"]), int(value["bytes"]), int(value["level"])) == (1, size, 0)
    assert int(value["sketch_count"]) == 1 and int(value["sketch_size"][0]) == size
    assert int(value["tcp_flags"]) == (0x02 if proto == 6 else 0)
    assert int(value["first_seen_ns"]) == int(value["last_seen_ns"]) > 0
    assert len(fresh.entries("aggregates")[0]) == 0  # level 0: the flow table is the aggregate
    only(fresh.stats(), tracked=1, new_flow=1, bytes=size)


@pytest.mark.parametrize("description,packet,outcome", UNTRACKED, ids=[f[0] for f in UNTRACKED])
def test_untracked_packet(fresh, description, packet, outcome):
    run_ok(fresh, packet)
    assert len(fresh.entries("flows")[0]) == 0, description
    only(fresh.stats(), **{outcome: 1})


@pytest.mark.parametrize("description,packet,tuple_", TRACKED, ids=[f[0] for f in TRACKED])
def test_every_truncation_is_counted_and_changes_nothing(fresh, description, packet, tuple_):
    data = bytes(packet)
    lengths = range(14, headers_end(packet))  # BPF_PROG_TEST_RUN needs a full Ethernet header
    for length in lengths:
        run_ok(fresh, data[:length])
    assert len(fresh.entries("flows")[0]) == 0, description
    only(fresh.stats(), truncated=len(lengths))


def test_truncating_each_header_by_one_byte(fresh):
    """The end of every header, minus one byte: Ethernet+VLAN, outer IP, inner IP, TCP."""
    packet = (
        ETH
        / Dot1Q(vlan=5)
        / IP(src=LB4, dst=S4)
        / IP(src=C4, dst=V4, options=[IPOption(b"\x01" * 4)])
        / tcp()
        / PAYLOAD
    )
    data = bytes(packet)
    ends = [18, 18 + 20, 18 + 20 + 24, 18 + 20 + 24 + 20]
    for end in ends:
        run_ok(fresh, data[: end - 1])
    only(fresh.stats(), truncated=len(ends))
    assert len(fresh.entries("flows")[0]) == 0


def set_class_level(prog, vip: str, vip_port: int, proto: int, level: int) -> None:
    key = np.zeros(1, dtype=CLASS_KEY_DTYPE)
    key["vip_addr"] = np.frombuffer(mapped(vip), dtype=np.uint8)
    key["vip_port"], key["proto"] = vip_port, proto
    with prog.open("class_levels") as classes:
        classes.update(key, np.array(level, dtype=CLASS_LEVEL_DTYPE))
    loader.init_server_maps(prog.pin_dir)  # bump levels_gen


def aggregates_by_client(prog) -> dict[tuple[str, int], dict]:
    import ipaddress

    keys, values = prog.entries("aggregates")
    out = {}
    for key, value in zip(keys, values, strict=True):
        addr = ipaddress.IPv6Address(bytes(key["masked"]["client_addr"]))
        text = str(addr.ipv4_mapped or addr)
        out[(text, int(key["level"]))] = {
            "packets": int(value["packets"]),
            "bytes": int(value["bytes"]),
            "active": int(value["active_flows"]),
            "total": int(value["total_flows"]),
            "client_port": int(key["masked"]["client_port"]),
            "vip_port": int(key["masked"]["vip_port"]),
        }
    return out


def test_subnet_level_aggregates_v4_by_25_and_v6_by_56(fresh):
    set_class_level(fresh, V4, 80, 6, 3)
    set_class_level(fresh, V6, 80, 6, 3)
    packets = [
        ETH / IP(src="10.1.0.1", dst=V4) / tcp(sport=1000) / PAYLOAD,
        ETH / IP(src="10.1.0.100", dst=V4) / tcp(sport=1001) / PAYLOAD,
        ETH / IP(src="10.1.0.200", dst=V4) / tcp(sport=1002) / PAYLOAD,  # the other /25
        ETH / IPv6(src="2001:db8:0:1::1", dst=V6) / tcp(sport=1003) / PAYLOAD,
        ETH / IPv6(src="2001:db8:0:ff::2", dst=V6) / tcp(sport=1004) / PAYLOAD,
        ETH / IPv6(src="2001:db8:0:100::3", dst=V6) / tcp(sport=1005) / PAYLOAD,
    ]
    for packet in packets:
        run_ok(fresh, packet)
    v4_size, v6_size = l3_len(packets[0]), l3_len(packets[3])
    assert aggregates_by_client(fresh) == {
        ("10.1.0.0", 3): {
            "packets": 2,
            "bytes": 2 * v4_size,
            "active": 2,
            "total": 2,
            "client_port": 0,
            "vip_port": 0,
        },
        ("10.1.0.128", 3): {
            "packets": 1,
            "bytes": v4_size,
            "active": 1,
            "total": 1,
            "client_port": 0,
            "vip_port": 0,
        },
        ("2001:db8::", 3): {
            "packets": 2,
            "bytes": 2 * v6_size,
            "active": 2,
            "total": 2,
            "client_port": 0,
            "vip_port": 0,
        },
        ("2001:db8:0:100::", 3): {
            "packets": 1,
            "bytes": v6_size,
            "active": 1,
            "total": 1,
            "client_port": 0,
            "vip_port": 0,
        },
    }
    _, flows = fresh.entries("flows")
    assert sorted(int(v) for v in flows["level"]) == [3] * 6


def test_session_level_active_count_follows_fin_rst_and_reopen(fresh):
    set_class_level(fresh, V4, 80, 6, 1)
    a, b = 2000, 2001
    for packet in (ETH / IP(src=C4, dst=V4) / tcp("S", a), ETH / IP(src=C4, dst=V4) / tcp("S", b)):
        run_ok(fresh, packet)
    assert aggregates_by_client(fresh)[(C4, 1)]["active"] == 2
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("FA", a))
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("FA", a))  # a second FIN: no second decrement
    assert aggregates_by_client(fresh)[(C4, 1)]["active"] == 1
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("R", b))
    agg = aggregates_by_client(fresh)[(C4, 1)]
    assert (agg["active"], agg["total"], agg["packets"], agg["vip_port"]) == (0, 2, 5, 80)
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("S", a))  # port reuse after close
    agg = aggregates_by_client(fresh)[(C4, 1)]
    assert (agg["active"], agg["total"]) == (1, 3)
    stats = fresh.stats()
    assert (stats["new_flow"], stats["flow_closed"], stats["flow_reopened"], stats["tracked"]) == (
        2,
        2,
        1,
        6,
    )


def test_directive_moves_a_live_flow_to_its_new_level(fresh):
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("S") / PAYLOAD)
    assert aggregates_by_client(fresh) == {}
    set_class_level(fresh, V4, 80, 6, 2)
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("A") / PAYLOAD)
    agg = aggregates_by_client(fresh)
    assert list(agg) == [(C4, 2)]
    assert (agg[(C4, 2)]["active"], agg[(C4, 2)]["total"], agg[(C4, 2)]["packets"]) == (1, 1, 1)
    _, flows = fresh.entries("flows")
    assert (int(flows[0]["level"]), int(flows[0]["packets"])) == (2, 2)
    assert fresh.stats()["level_changed"] == 1


def test_directive_leaves_an_aggregate_member_in_its_aggregate(fresh):
    """A member of a level-2 aggregate stays there when its class goes to 3 or 0 (the LB has
    no entry for it: only that aggregate keeps it on its backend); new flows take the new
    level."""
    set_class_level(fresh, V4, 80, 6, 2)
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("S") / PAYLOAD)
    for level in (3, 0):
        set_class_level(fresh, V4, 80, 6, level)
        run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("A") / PAYLOAD)
        _, flows = fresh.entries("flows")
        assert int(flows[0]["level"]) == 2
        agg = aggregates_by_client(fresh)
        assert list(agg) == [(C4, 2)] and agg[(C4, 2)]["active"] == 1
    assert fresh.stats()["level_changed"] == 0
    run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("S", 2002) / PAYLOAD)  # a new flow: level 0
    _, flows = fresh.entries("flows")
    assert sorted(int(level) for level in flows["level"]) == [0, 2]


def test_sketch_keeps_the_first_eight_packets(fresh):
    sizes = [40 + 10 * i for i in range(10)]
    for size in sizes:
        run_ok(fresh, ETH / IP(src=C4, dst=V4) / tcp("A") / Raw(b"x" * (size - 40)))
    _, flows = fresh.entries("flows")
    assert flows[0]["sketch_size"].tolist() == sizes[:8]
    assert int(flows[0]["sketch_count"]) == 8
    assert (int(flows[0]["packets"]), int(flows[0]["bytes"])) == (10, sum(sizes))


def test_outcomes_add_up_to_packets(fresh):
    packets = [f[1] for f in TRACKED] + [f[1] for f in UNTRACKED]
    for packet in packets:
        run_ok(fresh, packet)
    stats = fresh.stats()
    assert sum(stats[name] for name in SERVER_STATS[:SERVER_OUTCOMES]) == len(packets)
