"""`connpub bench sim`: simulator throughput and peak memory on a large trace built from real
captures (trace replicate) or generated (docs/simulator.md, "Scale")."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from connpub.config import Config
from connpub.traffic.workload import NS_PER_S

REAL_SOURCES = ("pinterest.pcap", "tumblr.pcap", "iphone.pcap", "weibo.pcap", "whatsapp.pcap",
                "instagram.pcap", "sites.pcapng", "teamspeak3.pcap", "synscan.pcap")


def real_trace(flows: int, sources: Path, window_s: float, seed: int = 0) -> np.ndarray:
    """About `flows` flows: the REAL_SOURCES captures merged (idle stretches cut), replicated
    with fresh clients per copy, copies spread over window_s."""
    from connpub.sim.condition import condition_trace
    from connpub.traffic.trace import flows_from_pcap
    from connpub.traffic.tracetools import merge, replicate

    base = merge([condition_trace(flows_from_pcap(sources / name), Config())[0]
                  for name in REAL_SOURCES if (sources / name).exists()])
    copies = max(1, math.ceil(flows / base.size))
    return replicate(base, copies, spread_s=window_s, seed=seed)[:flows]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_child_rss_mib() -> float:
    """Largest peak RSS of the worker processes that have ended (0 if none)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def bench_sim(flows: int, modes: tuple[str, ...], source: str, sources: Path | None,
              window_s: float, say: Callable[[str], None] = print, workers: int = 0) -> dict:
    """Build the trace, condition it, simulate every mode (sim.parallel over `workers`
    processes, 0: one per usable core; 1: prepare and run here); seconds, flows/s, peak RSS."""
    from connpub.sim import SimOptions, prepare, simulate_flows
    from connpub.sim.condition import condition_trace
    from connpub.sim.parallel import default_workers, simulate_parallel
    from connpub.traffic.workload import generate

    cfg = Config()
    workers = workers or default_workers()
    started = time.perf_counter()
    if source == "real":
        from connpub.bench.pcap import default_sources

        trace = real_trace(flows, sources or default_sources(), window_s)
    else:
        trace = generate(source, flows, seed=0, window_s=window_s)
    build_s = time.perf_counter() - started
    say(f"{trace.size} flows ({source}) in {build_s:.1f} s; conditioning")
    started = time.perf_counter()
    trace, conditioning = condition_trace(trace, cfg, copy=False)
    out: dict = {"flows": int(trace.size), "source": source, "window_s": window_s,
                 "span_s": float(trace["end_ns"].max() / NS_PER_S), "workers": workers,
                 "build_s": round(build_s, 2), "repaired": conditioning.repaired(),
                 "modes": {}}
    if workers > 1:
        say(f"simulating {','.join(modes)} on {workers} processes")
        results = simulate_parallel(trace, modes, cfg, SimOptions(), workers=workers)
        out["prepare_s"] = None  # in the workers, inside simulate_s
        out["simulate_s"] = round(time.perf_counter() - started, 2)
        out["shards"] = next(iter(results.values()))["parallel"]["shards"]
    else:
        sim_flows = prepare(trace, cfg)
        out["prepare_s"] = round(time.perf_counter() - started, 2)
        results = {}
        for mode in modes:
            say(f"simulating {mode}")
            results.update(simulate_flows(sim_flows, [mode], cfg, SimOptions()))
        out["simulate_s"] = round(time.perf_counter() - started, 2)
    for mode, result in results.items():
        # seconds: the mode's steps, summed over its shards (worker seconds when parallel)
        out["modes"][mode] = {"seconds": round(result["sim_seconds"], 2),
                              "flows_per_s": round(trace.size / result["sim_seconds"]),
                              "publish_bytes_per_s": round(result["publish_bytes_per_s"], 1),
                              "lease_miss_flows": result["lease_miss_flows"]}
    out["total_s"] = round(build_s + out["simulate_s"], 2)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)  # this process
    out["peak_worker_rss_mib"] = round(peak_child_rss_mib(), 1)
    return out
