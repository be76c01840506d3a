"""`connpub bench sim`: the large trace it builds from real captures, and a small run."""

from __future__ import annotations

import numpy as np
from connpub.bench.sim import bench_sim, real_trace
from pcap_reference import NDPI


def test_real_trace_is_replicated_real_flows():
    trace = real_trace(20_000, NDPI, window_s=600)
    assert trace.size == 20_000
    assert np.all(np.diff(trace["start_ns"]) >= 0)
    keys = np.concatenate([np.ascontiguousarray(trace["client_addr"]),
                           trace["client_port"].astype(">u2").view(np.uint8).reshape(-1, 2),
                           np.ascontiguousarray(trace["vip_addr"]),
                           trace["vip_port"].astype(">u2").view(np.uint8).reshape(-1, 2),
                           trace["proto"].reshape(-1, 1)], axis=1)
    # replicas never share a tuple with each other (a capture may reuse one)
    assert np.unique(keys, axis=0).shape[0] > 0.9 * trace.size


def test_bench_sim_small_run():
    out = bench_sim(3000, ("baseline",), "real", NDPI, window_s=300, say=lambda _: None)
    assert out["flows"] == 3000 and out["peak_rss_mib"] > 0
    assert out["modes"]["baseline"]["flows_per_s"] > 0
    assert out["total_s"] >= out["simulate_s"] > 0
