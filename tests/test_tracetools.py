"""trace replicate / merge / shift (connpub.traffic.tracetools) on a real capture and a
generated workload."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.errors import ConnpubError
from connpub.traffic.trace import flows_from_pcap, read_trace, write_trace
from connpub.traffic.tracetools import merge, replicate, shift
from connpub.traffic.workload import generate
from pcap_reference import NDPI


def _tuples(table: np.ndarray) -> np.ndarray:
    cols = [np.ascontiguousarray(table["client_addr"]), np.ascontiguousarray(table["vip_addr"]),
            table["client_port"].astype(">u2").view(np.uint8).reshape(-1, 2),
            table["vip_port"].astype(">u2").view(np.uint8).reshape(-1, 2),
            table["proto"].reshape(-1, 1)]
    return np.concatenate(cols, axis=1)


def _distinct(rows: np.ndarray) -> int:
    return int(np.unique(rows, axis=0).shape[0])


@pytest.fixture(scope="module")
def mixed() -> np.ndarray:
    return generate("mixed", 3000, seed=4, window_s=300)  # IPv4 and IPv6 clients, sessions


def test_replicate_keeps_flows_distinct_and_subnets(mixed):
    copies = 7
    out = replicate(mixed, copies, spread_s=60, seed=1)
    assert out.size == copies * mixed.size
    assert out["flow_id"].tolist() == list(range(1, out.size + 1))
    assert np.all(np.diff(out["start_ns"]) >= 0)
    assert _distinct(_tuples(out)) == copies * _distinct(_tuples(mixed))
    # clients and their subnets multiply; each subnet keeps its member clients
    clients = np.ascontiguousarray(mixed["client_addr"])
    assert _distinct(np.ascontiguousarray(out["client_addr"])) == copies * _distinct(clients)
    v4 = (clients[:, 10] == 0xFF)
    subnets = _distinct(clients[v4, 12:15]) + _distinct(clients[~v4, :7])
    out_clients = np.ascontiguousarray(out["client_addr"])
    out_v4 = out_clients[:, 10] == 0xFF
    assert _distinct(out_clients[out_v4, 12:15]) + _distinct(out_clients[~out_v4, :7]) == \
        copies * subnets
    assert np.all(out_clients[out_v4, 12] < 224) and np.all(out_clients[~out_v4, 0] == 0xFD)
    # durations, bytes and the first-packet sketch are the original's, copy by copy
    assert sorted((out["end_ns"] - out["start_ns"]).tolist()) == sorted(
        np.repeat(mixed["end_ns"] - mixed["start_ns"], copies).tolist())
    assert int(out["bytes"].sum()) == copies * int(mixed["bytes"].sum())
    sessions = mixed["session_id"][mixed["session_id"] > 0]
    assert np.unique(out["session_id"]).size == copies * np.unique(sessions).size


def test_replicate_real_capture_and_limits():
    capture = flows_from_pcap(NDPI / "synscan.pcap")
    out = replicate(capture, 50)
    assert out.size == 50 * capture.size
    assert _distinct(_tuples(out)) == 50 * _distinct(_tuples(capture))
    with pytest.raises(ConnpubError, match="do not fit below 224.0.0.0"):
        replicate(capture, 300 * 65536)
    with pytest.raises(ConnpubError, match="spread"):
        replicate(capture, 2, spread_s=float("nan"))


def test_merge_and_shift(mixed):
    capture = flows_from_pcap(NDPI / "iphone.pcap")
    merged = merge([mixed, capture])
    assert merged.size == mixed.size + capture.size
    assert np.all(np.diff(merged["start_ns"]) >= 0) and merged["start_ns"][0] == 0
    moved = shift(merged, by_s=2.5, scale=4)
    assert moved["start_ns"].min() == 2_500_000_000
    duration = merged["end_ns"] - merged["start_ns"]
    assert np.array_equal(np.sort(moved["end_ns"] - moved["start_ns"]),
                          np.sort(np.rint(duration / 4).astype(np.int64)))
    with pytest.raises(ConnpubError, match="before 0"):
        shift(merged, by_s=-1)
    with pytest.raises(ConnpubError, match="scale"):
        shift(merged, scale=float("inf"))


def test_trace_tool_commands(tmp_path, mixed):
    runner = CliRunner()
    source = tmp_path / "mixed.parquet"
    write_trace(mixed, source)
    big = tmp_path / "big.parquet"
    result = runner.invoke(main, ["trace", "replicate", str(source), "--copies", "3",
                                  "--out", str(big), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["flows"] == 3 * mixed.size
    merged = tmp_path / "merged.parquet"
    result = runner.invoke(main, ["trace", "merge", str(big), str(NDPI / "iphone.pcap"),
                                  "--out", str(merged)])
    assert result.exit_code == 0, result.output
    fast = tmp_path / "fast.parquet"
    result = runner.invoke(main, ["trace", "shift", str(merged), "--scale", "10",
                                  "--out", str(fast)])
    assert result.exit_code == 0, result.output
    assert read_trace(fast).size == read_trace(merged).size
    result = runner.invoke(main, ["trace", "shift", str(merged), "--by-s", "-5",
                                  "--out", str(tmp_path / "bad.parquet")])
    assert result.exit_code == 2 and "before 0" in result.output
