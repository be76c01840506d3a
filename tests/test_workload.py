"""Workload generator statistics vs docs/workloads.md, Parquet traces, pcap import."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.errors import ConnpubError
from connpub.traffic import workload as wl
from connpub.traffic.trace import (
    APP_UNKNOWN,
    HISTORY_DTYPE,
    HISTORY_SCHEMA,
    TRACE_SCHEMA,
    append_history,
    flows_from_pcap,
    history_from_flows,
    read_history,
    read_trace,
    write_history,
    write_trace,
)


@pytest.fixture(scope="module")
def mixed() -> np.ndarray:
    return wl.generate("mixed", 200_000, seed=0)


def _expected_median_s(app: wl.AppClass) -> float:
    kind = app.duration[0]
    if kind == "lognormal":
        return app.duration[1]
    if kind == "pareto":
        return app.duration[1] * 2 ** (1 / app.duration[2])
    return None


def test_same_seed_same_table_other_seed_differs():
    first = wl.generate("mixed", 5_000, seed=7)
    again = wl.generate("mixed", 5_000, seed=7)
    other = wl.generate("mixed", 5_000, seed=8)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert first.size == 5_000
    assert np.array_equal(np.sort(first["flow_id"]), np.arange(1, 5_001))


def test_class_duration_medians_match_documented_laws(mixed):
    durations = wl.duration_s(mixed)
    for index, app in enumerate(wl.APP_CLASSES):
        expected = _expected_median_s(app)
        if expected is None or wl.WORKLOADS["mixed"].get(app.name, 0) == 0:
            continue  # bulk has no median law; probe / udpmisc only in realfit (test below)
        median = np.median(durations[mixed["app_class"] == index])
        assert abs(np.log(median / expected)) < np.log(1.3), (app.name, median, expected)


def test_realfit_matches_the_real_captures():
    """docs/workloads.md, "realfit": the shares and quantiles the pooled real sources show."""
    table = wl.generate("realfit", 50_000, seed=1)
    duration = wl.duration_s(table)
    tcp, udp = table["proto"] == wl.PROTO_TCP, table["proto"] == wl.PROTO_UDP
    assert 0.45 < udp.mean() < 0.58
    assert 0.12 < (udp & (table["vip_port"] == 53)).mean() < 0.2
    assert 0.7 < (table["packets"] <= 1).mean() < 0.85
    assert np.median(duration[tcp]) < 0.3 and np.median(duration[udp]) < 0.1
    assert 2.0 < np.quantile(duration[tcp], 0.9) < 20 and 1.0 < np.quantile(duration[udp], 0.9) < 4
    for name in ("probe", "udpmisc"):
        rows = table["app_class"] == wl.APP_INDEX[name]
        assert abs(np.log(np.median(duration[rows]) / 0.05)) < np.log(1.3), name


def test_mixed_is_heavy_tailed(mixed):
    stats = wl.summary(mixed)
    assert 1.0 < stats["duration_p50_s"] < 3.0
    assert 0.04 < stats["share_over_60s"] < 0.09
    assert 0.003 < stats["share_over_600s"] < 0.015
    assert stats["duration_p99_s"] > 100 * stats["duration_p50_s"]
    assert 0.10 < stats["udp_share"] < 0.22
    assert 0.07 < stats["ipv6_share"] < 0.25
    assert wl.duration_s(mixed).max() <= wl.MAX_DURATION_S


def test_web_sessions_open_two_to_six_parallel_connections(mixed):
    web = mixed[mixed["app_class"] == wl.APP_INDEX["web"]]
    sessions, inverse, counts = np.unique(web["session_id"], return_inverse=True,
                                          return_counts=True)
    whole = counts[:-1]  # the last session may be cut at the flow count
    assert whole.min() >= 2 and whole.max() <= 6
    assert abs(whole.mean() - 4.0) < 0.1
    # one session = one client, one VIP, one VIP port, distinct client ports, starts close by
    for field in ("client_addr", "vip_addr"):
        column = web[field].reshape(web.size, -1)
        assert (column == column[np.unique(inverse, return_index=True)[1]][inverse]).all()
    ports = web["vip_port"]
    assert (ports == ports[np.unique(inverse, return_index=True)[1]][inverse]).all()
    keys = web["session_id"].astype(np.int64) * 65536 + web["client_port"]
    assert np.unique(keys).size == web.size
    spread = np.zeros(sessions.size)
    np.maximum.at(spread, inverse, web["start_ns"] / 1e9)
    first = np.full(sessions.size, np.inf)
    np.minimum.at(first, inverse, web["start_ns"] / 1e9)
    assert np.median(spread - first) < 0.5


def test_clients_sit_in_few_subnets(mixed):
    addrs = mixed["client_addr"]
    v4 = ~addrs[:, :10].any(axis=1) & (addrs[:, 10] == 0xFF)
    subnet = addrs[v4, 12].astype(np.int64) << 16 | addrs[v4, 13].astype(np.int64) << 8
    subnet |= addrs[v4, 14]
    _, counts = np.unique(subnet, return_counts=True)
    assert counts.size <= 48
    top5 = np.sort(counts)[::-1][:5].sum() / counts.sum()
    assert top5 > 0.35
    clients = np.unique(addrs.view(np.dtype((np.void, 16))))
    assert clients.size > 1000


def test_first_packet_sketch_is_consistent(mixed):
    valid = np.arange(wl.FIRST_N)[None, :] < mixed["first_n"][:, None]
    assert (mixed["first_n"] == np.minimum(mixed["packets"], wl.FIRST_N)).all()
    assert (mixed["first_sizes"][~valid] == 0).all()
    assert (mixed["first_sizes"][valid] >= 40).all()
    assert (mixed["first_iat_ns"][:, 0] == 0).all()
    span = mixed["first_iat_ns"].sum(axis=1).astype(np.int64)
    assert (mixed["end_ns"] - mixed["start_ns"] > span).all()
    tcp = mixed["proto"] == wl.PROTO_TCP
    assert (mixed["tcp_flags"][~tcp] == 0).all()
    assert ((mixed["tcp_flags"][tcp] & (wl.TCP_FIN | wl.TCP_RST)) != 0).all()


def test_named_workloads():
    udp = wl.generate("udp", 3_000, seed=1)
    assert (udp["proto"] == wl.PROTO_UDP).all()
    web = wl.generate("web", 3_000, seed=1)
    assert set(np.unique(web["vip_port"]).tolist()) <= {80, 443, 8443}
    longlived = wl.generate("longlived", 3_000, seed=1)
    assert np.median(wl.duration_s(longlived)) > 30
    with pytest.raises(ConnpubError, match="unknown workload"):
        wl.generate("nope", 10)
    with pytest.raises(ConnpubError, match="positive"):
        wl.generate("mixed", 0)


def test_time_scaled_compresses_every_time():
    table = wl.generate("mixed", 1_000, seed=6)
    fast = wl.time_scaled(table, 60.0)
    assert np.allclose(wl.duration_s(fast), np.maximum(wl.duration_s(table) / 60, 1e-9), atol=1e-9)
    assert (fast["start_ns"] == np.rint(table["start_ns"] / 60)).all()
    assert (fast["first_iat_ns"] <= table["first_iat_ns"]).all()
    assert (fast["bytes"] == table["bytes"]).all()
    with pytest.raises(ConnpubError, match="positive"):
        wl.time_scaled(table, 0)


def test_generator_scales():
    table = wl.generate("mixed", 300_000, seed=3)
    assert table.size == 300_000
    assert (table["end_ns"] >= table["start_ns"]).all()


def test_trace_round_trip(tmp_path):
    table = wl.generate("mixed", 2_000, seed=4)
    path = tmp_path / "trace.parquet"
    write_trace(table, path, {"workload": "mixed"})
    assert read_trace(path).tobytes() == table.tobytes()
    schema = pq.read_schema(path)
    assert schema.remove_metadata().equals(TRACE_SCHEMA.remove_metadata())
    assert schema.metadata[b"connpub.kind"] == b"trace"
    assert schema.metadata[b"workload"] == b"mixed"


def test_history_round_trip_and_append(tmp_path):
    table = wl.generate("mixed", 1_000, seed=5)
    history = history_from_flows(table, server_id=3)
    assert history.dtype == HISTORY_DTYPE
    assert (history["duration_ns"] == table["end_ns"] - table["start_ns"]).all()
    sizes = table["first_sizes"].astype(np.uint64)
    assert (history["first_size_sumsq"] == (sizes * sizes).sum(axis=1)).all()
    assert (history["server_id"] == 3).all()
    path = tmp_path / "hist.parquet"
    write_history(history, path)
    assert read_history(path).tobytes() == history.tobytes()
    assert pq.read_schema(path).remove_metadata().equals(HISTORY_SCHEMA.remove_metadata())
    folder = tmp_path / "hist"
    append_history(history[:400], folder)
    append_history(history[400:], folder)
    assert read_history(folder).tobytes() == history.tobytes()


def test_bad_trace_files_are_refused(tmp_path):
    with pytest.raises(ConnpubError, match="no such file"):
        read_trace(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ConnpubError, match="not a readable Parquet"):
        read_trace(junk)
    history = history_from_flows(wl.generate("mixed", 50, seed=1))
    write_history(history, tmp_path / "hist.parquet")
    with pytest.raises(ConnpubError, match="column 'app_class' missing; expected a connpub trace"):
        read_trace(tmp_path / "hist.parquet")


def _craft_pcap(path) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    client, vip = "198.18.0.5", "203.0.113.10"
    mac = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
    packets = []

    def add(packet, when):
        packet.time = when
        packets.append(packet)

    def up(flags, payload=b""):
        return Ether(**mac) / IP(src=client, dst=vip) / TCP(sport=40000, dport=443,
                                                              flags=flags) / Raw(payload)

    def down(flags):
        return Ether(**mac) / IP(src=vip, dst=client) / TCP(sport=443, dport=40000, flags=flags)

    add(up("S"), 1.0)
    add(down("SA"), 1.01)
    add(up("A"), 1.02)
    add(up("PA", b"x" * 100), 1.03)
    add(up("FA"), 3.0)
    add(down("FA"), 3.01)
    add(up("A"), 3.02)  # final ACK: absorbed by the closed flow
    add(Ether(**mac) / IPv6(src="2001:db8::5", dst="2001:db8:ffff::10")
        / UDP(sport=5000, dport=53) / Raw(b"q" * 30), 2.0)
    add(up("S"), 5.0)  # same tuple again after close: a new flow
    add(up("R"), 5.5)
    wrpcap(str(path), packets)


def test_flows_from_pcap(tmp_path):
    pcap = tmp_path / "capture.pcap"
    _craft_pcap(pcap)
    flows = flows_from_pcap(pcap)
    assert flows.size == 3
    first, dns, second = flows
    assert (first["start_ns"], first["end_ns"]) == (0, 2_010_000_000)
    assert first["packets"] == 5 and first["bytes"] == 40 + 40 + 140 + 40 + 40
    assert first["first_n"] == 5
    assert first["first_sizes"].tolist() == [40, 40, 140, 40, 40, 0, 0, 0]
    assert first["first_iat_ns"].tolist()[:5] == [0, 20_000_000, 10_000_000, 1_970_000_000,
                                                  20_000_000]
    assert first["client_addr"].tolist() == [0] * 10 + [255, 255, 198, 18, 0, 5]
    assert (first["client_port"], first["vip_port"], first["proto"]) == (40000, 443, 6)
    assert first["tcp_flags"] == 0x1B and first["app_class"] == APP_UNKNOWN
    assert (dns["proto"], dns["vip_port"], dns["packets"], dns["bytes"]) == (17, 53, 1, 78)
    assert bytes(dns["client_addr"]) == bytes.fromhex("20010db8000000000000000000000005")
    assert (second["start_ns"], second["end_ns"], second["packets"]) == (
        4_000_000_000, 4_500_000_000, 2)


def test_cli_trace_commands(tmp_path):
    runner = CliRunner()
    pcap = tmp_path / "capture.pcap"
    _craft_pcap(pcap)
    out = tmp_path / "pcap.parquet"
    result = runner.invoke(main, ["trace", "from-pcap", str(pcap), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert read_trace(out).size == 3
    gen = tmp_path / "gen.parquet"
    result = runner.invoke(main, ["trace", "generate", "--workload", "web", "--flows", "500",
                                  "--out", str(gen)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["trace", "show", str(gen), "--json"])
    assert result.exit_code == 0, result.output
    assert '"flows": 500' in result.output
    result = runner.invoke(main, ["trace", "show", str(tmp_path / "missing.parquet")])
    assert result.exit_code == 2
