"""The vectorised pcap/pcapng reader (connpub.traffic.pcap, pcap_flows): real captures against
an independent dpkt reader, and one crafted input per bug it fixes."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.errors import ConnpubError
from connpub.traffic.pcap import read_packets
from connpub.traffic.trace import import_pcap, read_trace
from pcap_reference import NDPI
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap, wrpcapng

MAC = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def _rows(flows: np.ndarray) -> list[tuple]:
    return sorted(
        (str(ipaddress.ip_address(bytes(r["client_addr"]))), int(r["client_port"]),
         str(ipaddress.ip_address(bytes(r["vip_addr"]))), int(r["vip_port"]), int(r["proto"]),
         int(r["packets"]), int(r["bytes"]), int(r["start_ns"]) // 1000, int(r["end_ns"]) // 1000)
        for r in flows)


@pytest.mark.parametrize("name", [
    "ipsec_isakmp_esp.pcap",  # UDP, out-of-order timestamps
    "whatsapp.pcap",  # TCP, out-of-order timestamps
    "synscan.pcap",  # ~2000 TCP flows, reused tuples
    "KakaoTalk_chat.pcap",  # Linux cooked capture (SLL)
    "iphone.pcap",  # multicast and broadcast among unicast
    "quic_frags_ch_out_of_order_same_packet_craziness.pcapng",  # pcapng
])
def test_real_capture_matches_independent_reader(name):
    dpkt = pytest.importorskip("dpkt")
    del dpkt
    from pcap_reference import reference_flows

    path = NDPI / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    flows, stats = import_pcap(path)
    expected = reference_flows(str(path))
    assert flows.size == len(expected)
    assert _rows(flows) == expected
    assert stats.truncated_bytes == 0
    assert stats.packets + stats.not_ip + stats.not_tcp_udp + stats.fragments + stats.short + \
        stats.multicast + stats.unsupported_link == stats.records


def _write(path: Path, packets: list, times: list[float]) -> Path:
    for packet, t in zip(packets, times, strict=True):
        packet.time = t
    wrpcap(str(path), packets)
    return path


def _tcp(src: str, dst: str, sport: int, dport: int, flags: str, payload: bytes = b""):
    return Ether(**MAC) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) \
        / Raw(payload)


def test_reordered_timestamps_give_nonnegative_durations(tmp_path):
    up = [_tcp("10.0.0.1", "10.0.0.2", 4000, 80, f) for f in ("S", "A", "PA", "FA")]
    down = [_tcp("10.0.0.2", "10.0.0.1", 80, 4000, f) for f in ("SA", "FA")]
    # file order: SYN(1.0) SYN-ACK(1.1) FIN(3.0) ACK(1.2) data(1.5) FIN back(3.1)
    pcap = _write(tmp_path / "reorder.pcap", [up[0], down[0], up[3], up[1], up[2], down[1]],
                  [1.0, 1.1, 3.0, 1.2, 1.5, 3.1])
    flows, stats = import_pcap(pcap)
    assert stats.reordered == 1
    assert flows.size == 1
    flow = flows[0]
    assert (flow["start_ns"], flow["end_ns"]) == (0, 2_100_000_000)
    assert flow["packets"] == 4 and flow["first_iat_ns"][:4].tolist() == [
        0, 200_000_000, 300_000_000, 1_500_000_000]


def test_ipv6_extension_headers(tmp_path):
    base = {"src": "2001:db8::1", "dst": "2001:db8::2"}
    packets = [
        Ether(**MAC) / IPv6(**base) / IPv6ExtHdrHopByHop() / TCP(sport=1000, dport=443, flags="S"),
        Ether(**MAC) / IPv6(**base) / IPv6ExtHdrRouting() / UDP(sport=1001, dport=53),
        Ether(**MAC) / IPv6(**base) / IPv6ExtHdrFragment(offset=0, m=1) / UDP(sport=1002, dport=53)
        / Raw(b"a" * 16),
        Ether(**MAC) / IPv6(**base) / IPv6ExtHdrFragment(offset=3, m=0) / Raw(b"b" * 16),
        Ether(**MAC) / IPv6(**base) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop()
        / UDP(sport=1003, dport=5004),
    ]
    flows, stats = import_pcap(_write(tmp_path / "ext.pcap", packets, [1, 2, 3, 4, 5]))
    assert sorted(zip(flows["client_port"].tolist(), flows["proto"].tolist(), strict=True)) == [
        (1000, 6), (1001, 17), (1002, 17), (1003, 17)]
    assert stats.fragments == 1 and stats.packets == 4
    syn = flows[flows["client_port"] == 1000][0]
    assert syn["tcp_flags"] == 0x02 and syn["bytes"] == 40 + 8 + 20


def test_ip_total_length_zero_uses_the_frame(tmp_path):
    tso = Ether(**MAC) / IP(src="10.0.0.1", dst="10.0.0.2", len=0) / TCP(
        sport=5000, dport=80, flags="PA") / Raw(b"x" * 3000)
    flows, stats = import_pcap(_write(tmp_path / "tso.pcap", [tso], [1.0]))
    assert stats.length_from_capture == 1
    assert flows[0]["bytes"] == 20 + 20 + 3000 and flows[0]["first_sizes"][0] == 3040


def test_broadcast_and_multicast_are_dropped_and_counted(tmp_path):
    packets = [
        Ether(src=MAC["src"], dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.0.1", dst="10.0.0.255")
        / UDP(sport=137, dport=137),
        Ether(**MAC) / IP(src="10.0.0.1", dst="255.255.255.255") / UDP(sport=68, dport=67),
        Ether(**MAC) / IP(src="10.0.0.1", dst="239.255.255.250") / UDP(sport=5000, dport=1900),
        Ether(**MAC) / IP(src="10.0.0.1", dst="239.255.255.250") / UDP(sport=5000, dport=1900),
        Ether(**MAC) / IPv6(src="fe80::1", dst="ff02::1") / UDP(sport=546, dport=547),
        Ether(**MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5000, dport=53),
        # a multicast MAC carrying a unicast IP (NLB clusters) is unicast to an L4 balancer
        Ether(src=MAC["src"], dst="03:bf:0a:00:00:02") / IP(src="10.0.0.1", dst="10.0.0.3")
        / UDP(sport=5001, dport=53),
    ]
    flows, stats = import_pcap(_write(tmp_path / "mcast.pcap", packets, list(range(7))))
    assert (stats.multicast, stats.multicast_flows, stats.packets) == (5, 4, 2)
    assert flows["vip_port"].tolist() == [53, 53]


def test_truncated_capture_is_reported(tmp_path):
    packets = [_tcp("10.0.0.1", "10.0.0.2", 4000 + i, 80, "S") for i in range(3)]
    pcap = _write(tmp_path / "whole.pcap", packets, [1, 2, 3])
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(pcap.read_bytes()[:-10])
    with pytest.raises(ConnpubError, match="cut mid-record"):
        import_pcap(cut)
    flows, stats = import_pcap(cut, allow_truncated=True)
    assert flows.size == 2 and stats.records == 2 and stats.truncated_bytes == 16 + 54 - 10
    runner = CliRunner()
    out = tmp_path / "t.parquet"
    result = runner.invoke(main, ["trace", "from-pcap", str(cut), "--out", str(out)])
    assert result.exit_code == 2 and "cut mid-record" in result.output
    assert not out.exists()
    result = runner.invoke(main, ["trace", "from-pcap", str(cut), "--out", str(out),
                                  "--allow-truncated", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pcap_truncated_bytes"] == 60
    assert read_trace(out).size == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_udp_idle_must_be_finite_and_positive(tmp_path, value):
    pcap = _write(tmp_path / "one.pcap", [_tcp("10.0.0.1", "10.0.0.2", 1, 2, "S")], [1.0])
    result = CliRunner().invoke(main, ["trace", "from-pcap", str(pcap), "--out",
                                       str(tmp_path / "x.parquet"), f"--udp-idle-s={value}"])
    assert result.exit_code == 2
    assert "UDP idle timeout" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_pcapng_and_nanosecond_pcap_read_like_pcap(tmp_path):
    packets = [_tcp("10.0.0.1", "10.0.0.2", 4000, 80, f) for f in ("S", "PA", "R")]
    times = [1.000000001, 1.25, 2.5]
    for packet, t in zip(packets, times, strict=True):
        packet.time = t
    wrpcap(str(tmp_path / "us.pcap"), packets)
    wrpcap(str(tmp_path / "ns.pcap"), packets, nano=True)
    wrpcapng(str(tmp_path / "a.pcapng"), packets)
    tables = {name: import_pcap(tmp_path / name)[0] for name in ("us.pcap", "ns.pcap",
                                                                 "a.pcapng")}
    assert tables["ns.pcap"][0]["end_ns"] == 1_499_999_999
    assert tables["us.pcap"][0]["end_ns"] == 1_500_000_000
    assert tables["a.pcapng"][0]["packets"] == 3
    assert _rows(tables["us.pcap"]) == _rows(tables["a.pcapng"])


def test_not_a_capture_is_one_line_error(tmp_path):
    bogus = tmp_path / "bogus.pcap"
    bogus.write_bytes(b"hello world, not a capture")
    with pytest.raises(ConnpubError, match="not a pcap/pcapng file"):
        read_packets(bogus)
    with pytest.raises(ConnpubError, match="no such file"):
        read_packets(tmp_path / "missing.pcap")
