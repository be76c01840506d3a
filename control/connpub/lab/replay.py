"""`connpub lab replay`: a real trace or capture re-enacted through the lab (docs/lab.md).

Each flow becomes one real TCP connection or UDP socket through the XDP LB with the flow's
start, duration, first-packet gaps, packet count (as echo exchanges, at most one per
MIN_GAP_S) and bytes (split over the exchanges). Clients are mapped into the lab's client
namespaces and their source addresses by subnet and host (lab.run.build_plans); the trace's
server addresses are ranked by flows and dealt onto the lab's VIPs (`--vips N`,
lab.run.vip_index); ports the lab serves are kept, others become the lab's main TCP/UDP port.
A TCP flow the capture saw close (FIN/RST) closes at its end; one that went silent stays open
until the server idles it out (idle_timeout_s), as the simulator publishes such a flow until
then. The runs are lab.run's.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from connpub.config import Config, parse_config
from connpub.errors import ConnpubError
from connpub.lab import run as labrun
from connpub.lab import topology as labmod
from connpub.traffic.workload import FIRST_N, NS_PER_S, PROTO_TCP, TCP_FIN, TCP_RST

MIN_GAP_S = 0.2  # at most one exchange per flow per this many wall seconds (after the first 8)
MAX_CHUNK_TCP = 16384  # bytes per exchange (the echo doubles them)
MAX_CHUNK_UDP = 1200  # one datagram, fits the MTU after IPIP/IP6IP6
TAIL_S = 1.0  # wall seconds after the last flow's end


def load_trace(path: str | Path) -> np.ndarray:
    """A Parquet trace, or the flows of a pcap/pcapng capture (by its magic number)."""
    from connpub.traffic.pcap import PCAP_MAGICS, PCAPNG_SHB
    from connpub.traffic.trace import flows_from_pcap, read_trace

    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such file") from err
    magic = int.from_bytes(head.ljust(4, b"\0"), "little")
    if magic in PCAP_MAGICS or magic == PCAPNG_SHB:
        return flows_from_pcap(path)
    return read_trace(path)


def packet_liveness(idle_timeout_s: float) -> dict[str, dict]:
    """Config overrides for the liveness the simulator models: a flow lives while packets
    come (TCP and UDP idle out after idle_timeout_s), not while the kernel's socket is open."""
    return {"liveness": {"tcp": "packets", "udp_idle_s": idle_timeout_s,
                         "udp_stream_idle_s": idle_timeout_s},
            "lease": {"idle_timeout_s": idle_timeout_s}}


def run_config(spec: labrun.RunSpec) -> Config:
    problems: list[str] = []
    cfg = parse_config(labrun.config_sections(spec), problems)
    if problems:
        raise ConnpubError(f"lab config: {problems[0]}")
    return cfg


def prepare(table: np.ndarray, spec: labrun.RunSpec) -> tuple[np.ndarray, dict, labrun.RunSpec]:
    """The conditioned trace (sim.condition: repairs, idle cut to the lab's drain time, which
    is in trace seconds: keep_idle_s x speed), its report, and the spec with the run's wall
    duration."""
    from connpub.sim.condition import condition_trace

    if table.size == 0:
        raise ConnpubError("the trace holds no flows")
    cfg = run_config(spec)
    # silence kept: the server's idle timeout + two baseline leases, in trace seconds (a lab
    # run is not the place for 300 s of nothing; no lease is needed while no flow lives)
    drain_s = cfg.lease.idle_timeout_s + 2 * cfg.lease.k * spec.interval_s
    scaled = replace(cfg, lease=replace(cfg.lease, idle_timeout_s=drain_s * spec.time_scale,
                                        max_s=1e-3),
                     publish=replace(cfg.publish, interval_s=1e-3))
    conditioned, report = condition_trace(table, scaled)
    wall_s = float(conditioned["end_ns"].max()) / NS_PER_S / spec.time_scale + TAIL_S
    linger = cfg.lease.idle_timeout_s + 2 * spec.interval_s
    return conditioned, report.repaired(), replace(spec, duration_s=wall_s + linger,
                                                   trace=conditioned)


def schedule(table: np.ndarray, speed: float, idle_timeout_s: float) -> dict[str, np.ndarray]:
    """Per flow (table order) the driver's replay fields, in wall seconds."""
    duration = (table["end_ns"] - table["start_ns"]).astype(np.float64) / NS_PER_S / speed
    packets = table["packets"].astype(np.int64)
    head_n = np.minimum(table["first_n"].astype(np.int64), np.maximum(packets, 1))
    gaps = table["first_iat_ns"].astype(np.float64) / NS_PER_S / speed
    gaps = np.where(np.arange(FIRST_N)[None, :] < head_n[:, None], gaps, 0.0)
    gaps[:, 0] = 0.0
    head_end = np.minimum(gaps.sum(axis=1), duration)
    regular = np.maximum(packets - head_n, 0)
    room = np.floor(np.maximum(duration - head_end, 0.0) / MIN_GAP_S).astype(np.int64)
    regular = np.minimum(regular, np.maximum(room, (regular > 0).astype(np.int64)))
    chunks = np.maximum(head_n + regular, 1)
    head_n = np.maximum(head_n, 1)
    cap = np.where(table["proto"] == PROTO_TCP, MAX_CHUNK_TCP, MAX_CHUNK_UDP)
    chunk = np.clip(table["bytes"].astype(np.float64) / chunks, 16, cap).astype(np.uint32)
    closed = (table["proto"] == PROTO_TCP) & ((table["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0)
    silent_tcp = (table["proto"] == PROTO_TCP) & ~closed
    # closed when the server idles it out: published as long as the simulator publishes a
    # flow that went silent (to end + idle timeout), and the FIN still finds the lease the
    # last publish gave (k*T), where a later FIN would be a lease miss of the replay's own
    linger = np.where(silent_tcp, idle_timeout_s, 0.0)
    return {"chunks": chunks.astype(np.uint32), "head_n": head_n.astype(np.uint8),
            "head_gaps_s": gaps, "chunk_bytes": chunk, "linger_s": linger,
            "duration_s": duration}


def replay_plans(table: np.ndarray, lab: labmod.Lab, spec: labrun.RunSpec
                 ) -> dict[str, np.ndarray]:
    """lab.run.build_plans (clients, VIPs, ports), then each flow's replay schedule."""
    plans = labrun.build_plans(table, lab, spec)
    cfg = run_config(spec)
    fields = schedule(table, spec.time_scale, cfg.lease.idle_timeout_s)
    order = np.argsort(table["flow_id"])
    for plan in plans.values():
        rows = order[np.searchsorted(table["flow_id"], plan["flow_id"], sorter=order)]
        for name in ("chunks", "head_n", "head_gaps_s", "chunk_bytes", "linger_s"):
            plan[name] = fields[name][rows]
        plan["duration_s"] = fields["duration_s"][rows]
    return plans


def summary(table: np.ndarray, spec: labrun.RunSpec) -> dict:
    """What the replay will do (printed before it starts)."""
    fields = schedule(table, spec.time_scale, run_config(spec).lease.idle_timeout_s)
    replayed = fields["chunks"].astype(np.float64) * fields["chunk_bytes"]
    return {"flows": int(table.size), "wall_s": round(spec.duration_s, 1),
            "tcp_share": float(np.mean(table["proto"] == PROTO_TCP)),
            "exchanges": int(fields["chunks"].sum()),
            "trace_bytes": int(table["bytes"].sum()), "replayed_bytes": int(replayed.sum()),
            "vips": spec.vips}


def check_speed(speed: float) -> None:
    if not (math.isfinite(speed) and speed > 0):
        raise ConnpubError(f"--speed {speed:g} must be a finite number > 0")


labrun.PLAN_BUILDERS[True] = replay_plans  # RunSpec(replay=True) runs re-enact the trace
