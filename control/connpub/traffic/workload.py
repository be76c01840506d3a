"""Seeded generator of realistic connection mixes as a numpy flow table (see docs/workloads.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.errors import ConnpubError

FIRST_N = 8  # packets of each flow whose sizes / inter-arrivals the datapath sketches
NS_PER_S = 1_000_000_000
MAX_DURATION_S = 6 * 3600.0
PROTO_TCP = 6
PROTO_UDP = 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# One row per generated flow (client -> VIP direction counts: what LB and server XDP see with DSR).
FLOW_DTYPE = np.dtype(
    [
        ("flow_id", "<u8"),
        ("session_id", "<u8"),
        ("app_id", "<u8"),  # one id per (client, application class): ground truth for level 2
        ("app_class", "u1"),  # index into APP_CLASSES
        ("start_ns", "<i8"),
        ("end_ns", "<i8"),
        ("client_addr", "u1", (16,)),  # IPv6, or IPv4-mapped ::ffff:a.b.c.d
        ("client_port", "<u2"),
        ("vip_addr", "u1", (16,)),
        ("vip_port", "<u2"),
        ("proto", "u1"),
        ("bytes", "<u8"),
        ("packets", "<u8"),
        ("first_n", "u1"),  # min(packets, FIRST_N): valid entries of the two arrays below
        ("first_sizes", "<u2", (FIRST_N,)),  # L3 length of the first packets
        ("first_iat_ns", "<u8", (FIRST_N,)),  # gap before each first packet (entry 0 is 0)
        ("first_tcp_flags", "u1"),  # OR of TCP flags in the first packets
        ("tcp_flags", "u1"),  # OR of TCP flags over the whole flow
    ]
)


@dataclass(frozen=True)
class AppClass:
    """One application class: its service, session shape and duration/packet laws."""

    name: str
    proto: int
    ports: tuple[int, ...]
    port_weights: tuple[float, ...]
    conns_min: int  # parallel connections per session, uniform integer in [min, max]
    conns_max: int
    duration: tuple  # ("lognormal", median_s, sigma) | ("pareto", xm_s, alpha) | ("bulk", ...)
    rtt_exponent: float  # duration *= (client_rtt / median_rtt) ** rtt_exponent
    pps: float  # client->VIP packets per second after the first packets
    mean_pkt: float  # mean L3 size of those packets
    sizes: tuple[int, ...]  # template of the first packets' sizes (IPv4 L3 bytes)
    rtt_mult: tuple[float, ...]  # gap before packet k = rtt_mult[k]*rtt + Exp(think_s[k])
    think_s: tuple[float, ...]
    first_packets: int = FIRST_N  # packets before the Poisson(pps * duration) rest


APP_CLASSES: tuple[AppClass, ...] = (
    AppClass("web", PROTO_TCP, (443, 80), (0.85, 0.15), 2, 6, ("lognormal", 2.0, 1.3), 0.7,
             12.0, 90.0, (60, 52, 517, 52, 110, 420, 52, 52),
             (0, 1, 0, 1, 0.1, 0, 1, 1), (0, 0, 0.0005, 0, 0.002, 0.05, 0, 0.3)),
    AppClass("api", PROTO_TCP, (8443,), (1.0,), 1, 1, ("lognormal", 0.25, 1.0), 1.0,
             8.0, 300.0, (60, 52, 517, 52, 110, 900, 52, 52),
             (0, 1, 0, 1, 0.1, 0, 1, 1), (0, 0, 0.0005, 0, 0.002, 0.01, 0, 0.05)),
    AppClass("keepalive", PROTO_TCP, (443,), (1.0,), 1, 1, ("pareto", 60.0, 1.1), 0.0,
             0.05, 70.0, (60, 52, 517, 52, 110, 300, 60, 60),
             (0, 1, 0, 1, 0.1, 0, 0, 0), (0, 0, 0.0005, 0, 0.002, 0.05, 15.0, 15.0)),
    AppClass("streaming", PROTO_TCP, (443,), (1.0,), 1, 2, ("lognormal", 150.0, 1.0), 0.0,
             40.0, 52.0, (60, 52, 517, 52, 110, 450, 52, 52),
             (0, 1, 0, 1, 0.1, 0, 0.05, 0.05), (0, 0, 0.0005, 0, 0.002, 0.05, 0.002, 0.002)),
    AppClass("bulk", PROTO_TCP, (443, 873), (0.6, 0.4), 1, 1, ("bulk", 1.0e6, 1.1, 2.5e6, 1.0), 0.0,
             0.0, 52.0, (60, 52, 517, 52, 110, 200, 52, 52),
             (0, 1, 0, 1, 0.1, 0, 0.02, 0.02), (0, 0, 0.0005, 0, 0.002, 0.02, 0.0005, 0.0005)),
    AppClass("dns", PROTO_UDP, (53,), (1.0,), 1, 1, ("lognormal", 0.02, 0.8), 1.0,
             0.0, 80.0, (74, 74, 74, 74, 74, 74, 74, 74),
             (0, 1, 1, 1, 1, 1, 1, 1), (0, 0, 0, 0, 0, 0, 0, 0)),
    AppClass("quic", PROTO_UDP, (443,), (1.0,), 1, 3, ("lognormal", 4.0, 1.4), 0.7,
             15.0, 80.0, (1250, 1250, 80, 60, 300, 60, 60, 60),
             (0, 0, 1, 0, 0.1, 1, 0.5, 0.5), (0, 0.0002, 0, 0.001, 0.002, 0.02, 0.05, 0.3)),
    AppClass("rtp", PROTO_UDP, (5004, 5006), (0.5, 0.5), 1, 2, ("lognormal", 180.0, 0.9), 0.0,
             50.0, 200.0, (200, 200, 200, 200, 200, 200, 200, 200),
             (0, 0, 0, 0, 0, 0, 0, 0), (0, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02)),
    # fitted to ../shared/traces (docs/workloads.md, "realfit"): connection attempts that get
    # no or one answer (scans, SYN retries, refused ports) and one-shot UDP to other services
    AppClass("probe", PROTO_TCP, (22, 23, 445, 3389, 8080), (0.3, 0.1, 0.2, 0.2, 0.2), 1, 1,
             ("lognormal", 0.05, 2.5), 0.0, 0.3, 60.0, (60, 60, 60, 52, 52, 52, 52, 52),
             (0, 0, 0, 0, 0, 0, 0, 0), (0, 1.0, 2.0, 0.5, 0.5, 0.5, 0.5, 0.5), 1),
    AppClass("udpmisc", PROTO_UDP, (123, 137, 1900, 3478, 5353), (0.2, 0.2, 0.2, 0.2, 0.2), 1, 1,
             ("lognormal", 0.05, 2.5), 0.0, 0.3, 120.0, (90, 90, 90, 90, 90, 90, 90, 90),
             (0, 1, 1, 1, 1, 1, 1, 1), (0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5), 1),
)
APP_INDEX = {app.name: i for i, app in enumerate(APP_CLASSES)}

# Share of *sessions* per application class in each named workload.
WORKLOADS: dict[str, dict[str, float]] = {
    "mixed": {"web": 0.42, "api": 0.15, "keepalive": 0.06, "streaming": 0.04, "bulk": 0.03,
              "dns": 0.22, "quic": 0.06, "rtp": 0.02},
    "web": {"web": 0.75, "api": 0.25},
    "longlived": {"keepalive": 0.4, "streaming": 0.3, "bulk": 0.1, "rtp": 0.2},
    "udp": {"dns": 0.7, "quic": 0.24, "rtp": 0.06},
    # shares fitted to the flows of ../shared/traces (ndpi + zeek + argus pooled)
    "realfit": {"web": 0.02, "api": 0.01, "keepalive": 0.005, "streaming": 0.005,
                "bulk": 0.005, "dns": 0.17, "quic": 0.015, "rtp": 0.005, "probe": 0.43,
                "udpmisc": 0.335},
}

MEDIAN_RTT_S = 0.030
RTT_SIGMA = 0.7
CLIENT_FACTOR_SIGMA = 0.5  # per-client duration multiplier (heavy vs light users)
IPV6_CLIENT_SHARE = 0.15
SESSION_GAP_MEAN_S = 0.03  # mean gap between the parallel connections of one session
CLIENT_SUBNET_BASE = bytes([198, 18])  # 198.18.0.0/15 (RFC 2544 benchmarking range)
CLIENT_V6_PREFIX = bytes.fromhex("20010db8")  # 2001:db8::/32 (documentation range)
VIP_V4 = ((203, 0, 113, 10), (203, 0, 113, 11), (203, 0, 113, 12), (203, 0, 113, 13))
VIP_V6_HOSTS = (0x10, 0x11, 0x12, 0x13)  # 2001:db8:ffff::10..13
RST_SHARE = 0.05


def ipv4_mapped(a: int, b: int, c: int, d: int) -> np.ndarray:
    """16-byte IPv4-mapped address ::ffff:a.b.c.d as a uint8 array."""
    out = np.zeros(16, np.uint8)
    out[10:12] = 0xFF
    out[12:] = (a, b, c, d)
    return out


def _duration_s(rng, spec: tuple, n: int) -> np.ndarray:
    kind = spec[0]
    if kind == "lognormal":
        _, median_s, sigma = spec
        return median_s * np.exp(sigma * rng.standard_normal(n))
    if kind == "pareto":
        _, xm_s, alpha = spec
        return xm_s * (1.0 + rng.pareto(alpha, n))
    if kind == "bulk":  # size Pareto(xm, alpha) bytes / rate lognormal(median, sigma) bytes/s
        _, xm_bytes, alpha, rate_median, rate_sigma = spec
        size = xm_bytes * (1.0 + rng.pareto(alpha, n))
        rate = rate_median * np.exp(rate_sigma * rng.standard_normal(n))
        return size / rate
    raise ConnpubError(f"unknown duration law {kind!r} in APP_CLASSES; use lognormal/pareto/bulk")


def session_shares(workload: str) -> np.ndarray:
    """Per-APP_CLASSES share of sessions in a named workload (sums to 1)."""
    if workload not in WORKLOADS:
        raise ConnpubError(
            f"unknown workload {workload!r}; choose one of {', '.join(sorted(WORKLOADS))}"
        )
    shares = np.zeros(len(APP_CLASSES))
    for name, share in WORKLOADS[workload].items():
        shares[APP_INDEX[name]] = share
    return shares / shares.sum()


def generate(
    workload: str = "mixed",
    flows: int = 100_000,
    seed: int = 0,
    window_s: float = 3600.0,
    clients: int | None = None,
    subnets: int = 48,
) -> np.ndarray:
    """Generate `flows` flows of a named workload whose sessions start over `window_s` seconds.

    Returns a FLOW_DTYPE array sorted by start_ns; the same (workload, flows, seed, ...) always
    gives the same table.
    """
    if flows <= 0:
        raise ConnpubError(f"flows must be positive, got {flows}")
    if window_s <= 0:
        raise ConnpubError(f"window_s must be positive, got {window_s}")
    shares = session_shares(workload)
    rng = np.random.default_rng(seed)
    napps = len(APP_CLASSES)
    conns_min = np.array([a.conns_min for a in APP_CLASSES])
    conns_max = np.array([a.conns_max for a in APP_CLASSES])
    mean_conns = float(shares @ ((conns_min + conns_max) / 2.0))
    n_sessions = int(np.ceil(flows / mean_conns * 1.05)) + 16

    # Sessions: application class, connection count, client, start time.
    sess_app = rng.choice(napps, size=n_sessions, p=shares)
    sess_conns = rng.integers(conns_min[sess_app], conns_max[sess_app] + 1)
    while sess_conns.sum() < flows:  # rare: top up with more sessions of the same law
        extra_app = rng.choice(napps, size=n_sessions, p=shares)
        sess_app = np.concatenate([sess_app, extra_app])
        sess_conns = np.concatenate(
            [sess_conns, rng.integers(conns_min[extra_app], conns_max[extra_app] + 1)]
        )
    last = int(np.searchsorted(np.cumsum(sess_conns), flows))
    sess_app, sess_conns = sess_app[: last + 1], sess_conns[: last + 1].copy()
    sess_conns[-1] -= int(sess_conns.sum() - flows)
    n_sessions = sess_app.size

    n_clients = clients or max(8, n_sessions // 20)
    # Client popularity is Zipf-like (a few heavy clients); clients sit in few /24 subnets.
    popularity = 1.0 / np.arange(1, n_clients + 1) ** 0.8
    sess_client = rng.choice(n_clients, size=n_sessions, p=popularity / popularity.sum())
    subnet_weight = 1.0 / np.arange(1, subnets + 1) ** 1.2
    client_subnet = rng.choice(subnets, size=n_clients, p=subnet_weight / subnet_weight.sum())
    client_v6 = rng.random(n_clients) < IPV6_CLIENT_SHARE
    client_host = rng.integers(1, 255, size=n_clients)
    client_iid = rng.integers(0, 2**63, size=n_clients, dtype=np.int64)
    client_rtt = MEDIAN_RTT_S * np.exp(RTT_SIGMA * rng.standard_normal(n_clients))
    client_factor = np.exp(CLIENT_FACTOR_SIGMA * rng.standard_normal(n_clients))
    sess_start_s = np.sort(rng.random(n_sessions)) * window_s
    sess_vip = rng.integers(0, len(VIP_V4), size=n_sessions)

    # Flows: expand sessions.
    flow_sess = np.repeat(np.arange(n_sessions), sess_conns)
    first_of_sess = np.concatenate([[0], np.cumsum(sess_conns)[:-1]])
    k_in_sess = np.arange(flows) - np.repeat(first_of_sess, sess_conns)
    gaps = rng.exponential(SESSION_GAP_MEAN_S, flows)
    gaps[k_in_sess == 0] = 0.0
    offset = np.cumsum(gaps)
    offset -= np.repeat(offset[first_of_sess], sess_conns)
    app = sess_app[flow_sess]
    client = sess_client[flow_sess]
    rtt = client_rtt[client] * np.exp(0.1 * rng.standard_normal(flows))

    out = np.zeros(flows, FLOW_DTYPE)
    out["flow_id"] = np.arange(1, flows + 1)
    out["session_id"] = flow_sess + 1
    out["app_id"] = client.astype(np.uint64) * napps + app + 1
    out["app_class"] = app
    protos = np.array([a.proto for a in APP_CLASSES], np.uint8)
    out["proto"] = protos[app]

    duration = np.empty(flows)
    vip_port = np.empty(flows, np.uint16)
    iat = np.empty((flows, FIRST_N))
    pps = np.empty(flows)
    mean_pkt = np.empty(flows)
    ipv6 = client_v6[client]
    # (n, FIRST_N) temporaries are GBs at 10M flows: each class's rows are finished and stored
    # at once and the arithmetic is in place (the same draws and values as whole columns)
    for index, spec in enumerate(APP_CLASSES):  # loop over the classes, vectorised inside
        sel = np.flatnonzero(app == index)
        if sel.size == 0:
            continue
        rtt_scale = (rtt[sel] / MEDIAN_RTT_S) ** spec.rtt_exponent
        duration[sel] = _duration_s(rng, spec.duration, sel.size) * client_factor[client[sel]]
        duration[sel] *= rtt_scale
        # every connection of one session uses the port drawn for its first connection
        port_pick = rng.choice(len(spec.ports), size=n_sessions, p=spec.port_weights)
        vip_port[sel] = np.asarray(spec.ports)[port_pick[flow_sess[sel]]]
        template = np.asarray(spec.sizes, float)
        noise = rng.standard_normal((sel.size, FIRST_N))
        noise *= 0.25
        np.exp(noise, out=noise)
        noise *= template
        sizes = np.where((template > 100) & (template < 1200), noise, template)
        del noise
        sizes += np.where(ipv6[sel], 20.0, 0.0)[:, None]
        np.clip(np.rint(sizes, out=sizes), 40, 1500, out=sizes)
        out["first_sizes"][sel] = sizes
        del sizes
        think = rng.exponential(1.0, (sel.size, FIRST_N))
        think *= np.asarray(spec.think_s)
        rtt_part = np.asarray(spec.rtt_mult) * rtt[sel, None]
        rtt_part += think
        iat[sel] = rtt_part
        del think, rtt_part
        pps[sel] = spec.pps
        mean_pkt[sel] = spec.mean_pkt
    iat[:, 0] = 0.0

    # Packets / bytes in the client->VIP direction.
    is_bulk = app == APP_INDEX["bulk"]
    extra = pps * duration
    extra[is_bulk] = duration[is_bulk] * 2.5e6 / 2896.0  # one ACK per two full segments
    first_packets = np.array([a.first_packets for a in APP_CLASSES])[app]
    base_packets = np.where(app == APP_INDEX["dns"], 1 + (rng.random(flows) < 0.05),
                            first_packets)
    packets = base_packets + rng.poisson(np.minimum(extra, 1e12))
    first_n = np.minimum(packets, FIRST_N)
    valid = np.arange(FIRST_N)[None, :] < first_n[:, None]
    out["first_n"] = first_n
    out["first_sizes"] = np.where(valid, out["first_sizes"], 0)
    iat[~valid] = 0.0
    del valid
    first_span = iat.sum(axis=1)
    iat *= NS_PER_S
    out["first_iat_ns"] = np.rint(iat, out=iat)
    del iat
    duration = np.clip(np.maximum(duration, first_span + 0.001), 0.001, MAX_DURATION_S)
    out["packets"] = packets
    first_bytes = out["first_sizes"].sum(axis=1, dtype=np.uint64)
    out["bytes"] = first_bytes + np.rint((packets - first_n) * mean_pkt).astype(np.uint64)

    start_s = sess_start_s[flow_sess] + offset
    out["start_ns"] = np.rint(start_s * NS_PER_S).astype(np.int64)
    out["end_ns"] = out["start_ns"] + np.rint(duration * NS_PER_S).astype(np.int64)

    tcp = out["proto"] == PROTO_TCP
    out["first_tcp_flags"] = np.where(tcp, TCP_SYN | TCP_ACK | TCP_PSH, 0)
    closing = np.where(rng.random(flows) < RST_SHARE, TCP_RST, TCP_FIN)
    out["tcp_flags"] = np.where(tcp, TCP_SYN | TCP_ACK | TCP_PSH | closing, 0)

    # Addresses and ports.
    addr = np.zeros((flows, 16), np.uint8)
    v4 = ~ipv6
    addr[v4, 10:12] = 0xFF
    addr[v4, 12] = CLIENT_SUBNET_BASE[0]
    addr[v4, 13] = CLIENT_SUBNET_BASE[1] + client_subnet[client[v4]] // 256
    addr[v4, 14] = client_subnet[client[v4]] % 256
    addr[v4, 15] = client_host[client[v4]]
    addr[ipv6, 0:4] = np.frombuffer(CLIENT_V6_PREFIX, np.uint8)
    addr[ipv6, 6] = client_subnet[client[ipv6]]  # the /56 prefix index
    iid = client_iid[client[ipv6]].astype(">u8").view(np.uint8).reshape(-1, 8)
    addr[ipv6, 8:16] = iid
    out["client_addr"] = addr
    del addr
    vip = np.zeros((flows, 16), np.uint8)
    vip_index = sess_vip[flow_sess]
    vip4 = np.stack([ipv4_mapped(*v) for v in VIP_V4])
    vip6 = np.zeros((len(VIP_V6_HOSTS), 16), np.uint8)
    vip6[:, 0:4] = np.frombuffer(CLIENT_V6_PREFIX, np.uint8)
    vip6[:, 4:6] = 0xFF
    vip6[:, 15] = VIP_V6_HOSTS
    vip[:] = np.where(ipv6[:, None], vip6[vip_index], vip4[vip_index])
    out["vip_addr"] = vip
    del vip
    out["vip_port"] = vip_port
    sess_port = rng.integers(32768, 61000 - 8, size=n_sessions)
    out["client_port"] = sess_port[flow_sess] + k_in_sess

    order = np.argsort(out["start_ns"], kind="stable")
    for name in out.dtype.names:  # = out[order], one column at a time (memory)
        out[name] = out[name][order]
    return out


def time_scaled(table: np.ndarray, factor: float) -> np.ndarray:
    """Copy of a flow table with every time (starts, ends, first-packet gaps) divided by factor.

    The lab replays a workload in compressed time: factor 60 turns an hour into a minute.
    """
    if not factor > 0:
        raise ConnpubError(f"time-scale factor must be positive, got {factor}")
    out = table.copy()
    out["start_ns"] = np.rint(table["start_ns"] / factor).astype(np.int64)
    out["end_ns"] = out["start_ns"] + np.maximum(
        np.rint((table["end_ns"] - table["start_ns"]) / factor).astype(np.int64), 1
    )
    out["first_iat_ns"] = np.rint(table["first_iat_ns"] / factor).astype(np.uint64)
    return out


def duration_s(table: np.ndarray) -> np.ndarray:
    """True duration of each flow of a FLOW_DTYPE table, in seconds."""
    return (table["end_ns"] - table["start_ns"]) / NS_PER_S


def summary(table: np.ndarray) -> dict:
    """Headline statistics of a flow table (used in docs, CLI output and the model metadata)."""
    dur = duration_s(table)
    per_class = {
        app.name: int(np.count_nonzero(table["app_class"] == i))
        for i, app in enumerate(APP_CLASSES)
    }
    conns = np.bincount(np.unique(table["session_id"], return_inverse=True)[1])
    addrs = table["client_addr"]
    ipv6 = addrs[:, :10].any(axis=1) | (addrs[:, 10] != 0xFF) | (addrs[:, 11] != 0xFF)
    return {
        "flows": int(table.size),
        "sessions": int(conns.size),
        "duration_p50_s": float(np.median(dur)),
        "duration_p90_s": float(np.quantile(dur, 0.9)),
        "duration_p99_s": float(np.quantile(dur, 0.99)),
        "share_over_60s": float(np.mean(dur > 60)),
        "share_over_600s": float(np.mean(dur > 600)),
        "udp_share": float(np.mean(table["proto"] == PROTO_UDP)),
        "ipv6_share": float(np.mean(ipv6)),
        "conns_per_session_mean": float(conns.mean()),
        "flows_per_class": per_class,
    }
