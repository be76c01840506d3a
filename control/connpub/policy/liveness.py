"""When the server agent counts a flow as live (renewed) and as finished (removed), from what
the server knows: the kernel's socket state for TCP (connpub.datapath.tcpstate), idle horizons
for UDP and the rest ([liveness], [lease] idle_timeout_s). Pure: arrays and time in, masks out.
docs/agents.md, "Liveness"."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from connpub.config import Config
from connpub.datapath.masks import LEVEL_COUNT, apply_masks
from connpub.datapath.tcpstate import SOCKET_CLOSED, SOCKET_OPEN, FlowSockets

NS_PER_S = 1_000_000_000
PROTO_TCP = 6
PROTO_UDP = 17


@dataclass(frozen=True, eq=False)
class FlowTimes:
    """How long a flow may be quiet and how long a closed one stays (datapath ns)."""

    idle_timeout_ns: int  # TCP without kernel truth, other protocols: quiet longer = over
    linger_ns: int  # a closed flow (FIN/RST seen, or its socket left ESTABLISHED) stays in
    #                 the table this long after its last packet / the close, so late ACKs of
    #                 the closing handshake find it instead of starting a new flow; it is
    #                 never renewed meanwhile
    udp_idle_ns: int | None = None  # UDP flow with one packet (None: idle_timeout_ns)
    udp_stream_idle_ns: int | None = None  # UDP flow with more packets (None: udp_idle_ns)
    udp_ports: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted
    udp_port_idle_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tcp_kernel: bool = False  # [liveness] tcp = "kernel": sockets decide for TCP
    handshake_ns: int = 0  # a TCP flow this young without a socket record: packets decide

    @classmethod
    def from_config(cls, cfg: Config) -> FlowTimes:
        live = cfg.liveness
        ports, seconds = live.service_ports()
        linger_ns = round(cfg.lease.k * cfg.publish.interval_s * NS_PER_S)
        return cls(idle_timeout_ns=round(cfg.lease.idle_timeout_s * NS_PER_S),
                   linger_ns=linger_ns,
                   udp_idle_ns=round(live.udp_idle_s * NS_PER_S),
                   udp_stream_idle_ns=round(live.udp_stream_idle_s * NS_PER_S),
                   udp_ports=np.asarray(ports, np.int64),
                   udp_port_idle_ns=np.round(np.asarray(seconds, np.float64)
                                             * NS_PER_S).astype(np.int64),
                   tcp_kernel=live.tcp == "kernel", handshake_ns=linger_ns)

    @property
    def udp_single_ns(self) -> int:
        return self.idle_timeout_ns if self.udp_idle_ns is None else self.udp_idle_ns

    @property
    def udp_stream_ns(self) -> int:
        return self.udp_single_ns if self.udp_stream_idle_ns is None else self.udp_stream_idle_ns

    @property
    def udp_max_ns(self) -> int:
        """The longest UDP horizon (an aggregate of UDP flows lives as long as its longest)."""
        extra = int(self.udp_port_idle_ns.max()) if len(self.udp_port_idle_ns) else 0
        return max(self.udp_single_ns, self.udp_stream_ns, extra)


def idle_ns(last_seen_ns: np.ndarray, now_ns: int) -> np.ndarray:
    """now - last_seen, never negative (the datapath clock runs in jiffies)."""
    return np.maximum(np.int64(now_ns) - last_seen_ns.astype(np.int64), 0)


def idle_limit_ns(keys: np.ndarray, values: np.ndarray, times: FlowTimes) -> np.ndarray:
    """Per flow: how long it may be quiet before it is over. UDP: its service's horizon
    ([liveness] udp_service_idle_s, by VIP port), else udp_stream_idle_s once it has sent more
    than one packet, else udp_idle_s. Everything else: [lease] idle_timeout_s."""
    limit = np.full(len(keys), times.idle_timeout_ns, np.int64)
    udp = keys["proto"] == PROTO_UDP
    if not udp.any():
        return limit
    limit[udp] = np.where(values["packets"][udp] > 1, times.udp_stream_ns, times.udp_single_ns)
    if len(times.udp_ports):
        port = keys["vip_port"].astype(np.int64)
        slot = np.minimum(np.searchsorted(times.udp_ports, port), len(times.udp_ports) - 1)
        service = udp & (times.udp_ports[slot] == port)
        limit[service] = times.udp_port_idle_ns[slot[service]]
    return limit


def flow_states(keys: np.ndarray, values: np.ndarray, now_ns: int, times: FlowTimes,
                sockets: FlowSockets | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(live, finished) per flow. live -> renewed; finished -> removed from the table (into
    the history). By packets: live = no FIN/RST seen and quiet within its idle limit;
    finished = FIN/RST seen and quiet for the linger time, or quiet past the limit.
    With kernel truth (times.tcp_kernel and `sockets`), for TCP: an ESTABLISHED socket is live
    however long it is quiet; a socket that left ESTABLISHED is not, and is finished once
    the linger time has passed since max(close, last packet); a flow without a socket record
    is decided by packets while younger than the handshake time and, once the table is
    authoritative (seeded), counts as closed at its last packet after that."""
    idle = idle_ns(values["last_seen_ns"], now_ns)
    limit = idle_limit_ns(keys, values, times)
    fin = values["closed"] != 0
    live = ~fin & (idle <= limit)
    finished = (fin & (idle > times.linger_ns)) | (~fin & (idle > limit))
    if not times.tcp_kernel or sockets is None:
        return live, finished
    tcp = keys["proto"] == PROTO_TCP
    is_open = tcp & (sockets.state == SOCKET_OPEN)
    closed = tcp & (sockets.state == SOCKET_CLOSED)
    young = (np.int64(now_ns) - values["first_seen_ns"].astype(np.int64)) <= times.handshake_ns
    gone = tcp & ~is_open & ~closed & ~young & sockets.authoritative
    quiet_since_close = np.minimum(idle, np.maximum(
        np.int64(now_ns) - sockets.changed_ns, 0))
    live = np.where(is_open, True, np.where(closed | gone, False, live))
    finished = np.where(is_open, False,
                        np.where(closed, quiet_since_close > times.linger_ns,
                                 np.where(gone, idle > times.linger_ns, finished)))
    return live, finished


def aggregate_idle_limit_ns(agg_keys: np.ndarray, times: FlowTimes) -> np.ndarray:
    """Per aggregate: UDP ones live as long as the longest UDP horizon, the others
    idle_timeout_s (an aggregate with a live member lives anyway: aggregates_with_live)."""
    udp = agg_keys["masked"]["proto"] == PROTO_UDP
    return np.where(udp, times.udp_max_ns, times.idle_timeout_ns).astype(np.int64)


def aggregates_with_live(agg_keys: np.ndarray, keys: np.ndarray, values: np.ndarray,
                         live: np.ndarray, byte_table: np.ndarray) -> np.ndarray:
    """True per aggregate (AGG_KEY_DTYPE) that has a live member flow in the table: one at
    its level whose masked key is the aggregate's (an idle open TCP connection keeps its
    aggregate published)."""
    level = values["level"].astype(np.int64)
    member = np.flatnonzero(live & (level >= 1) & (level < LEVEL_COUNT))
    found = np.zeros(len(agg_keys), bool)
    if member.size == 0 or len(agg_keys) == 0:
        return found
    from connpub.arrays import join  # noqa: PLC0415

    masked = apply_masks(np.ascontiguousarray(keys[member]), level[member], byte_table)
    member_keys = np.zeros(member.size, agg_keys.dtype)
    member_keys["masked"] = masked
    member_keys["level"] = level[member]
    agg = np.ascontiguousarray(agg_keys).copy()
    agg["pad"] = 0
    agg["masked"]["pad"] = 0
    hit, _ = join(member_keys, agg)
    return hit
