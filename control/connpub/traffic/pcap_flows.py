"""Packets (PACKET_COLUMNS) -> flows (FLOW_DTYPE), vectorised; the rules are in docs/workloads.md.

Packets are put in time order first (captures from several taps or NICs are not), so a flow's
end is never before its start. A connection is the unordered pair of endpoints plus the
protocol; it splits into flows at a pure SYN after the flow closed (RST, or FIN both ways) for
TCP and at a gap longer than the idle timeout for UDP. Only the rare connections with several
pure SYNs need a per-segment Python step.
"""

from __future__ import annotations

import numpy as np

from connpub.traffic.workload import (
    FIRST_N,
    FLOW_DTYPE,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)

APP_UNKNOWN = 255  # app_class of flows whose application is not known (pcap, lab history)
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _address_bytes(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """(high, low) uint64 halves -> (n, 16) address bytes."""
    out = np.empty((hi.size, 2), ">u8")
    out[:, 0], out[:, 1] = hi, lo
    return out.view(np.uint8).reshape(-1, 16)


def _hash(columns: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(columns[0].size, np.uint64)
    with np.errstate(over="ignore"):
        for column in columns:
            out = (out ^ column.astype(np.uint64)) * _MIX
            out ^= out >> np.uint64(29)
    return out


def _within(values: np.ndarray, group: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Inclusive running sum of values inside each group (groups are contiguous)."""
    total = np.cumsum(values, dtype=np.int64)
    before = total[starts] - values[starts]
    return total - before[group]


def _connections(packets: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order grouping packets by connection (time order kept inside), the group starts mask,
    and whether each packet goes from the lower endpoint to the higher one."""
    src_hi, src_lo = packets["src_hi"], packets["src_lo"]
    dst_hi, dst_lo = packets["dst_hi"], packets["dst_lo"]
    sport = packets["sport"].astype(np.uint64)
    dport = packets["dport"].astype(np.uint64)
    a_low = (src_hi < dst_hi) | ((src_hi == dst_hi) & (
        (src_lo < dst_lo) | ((src_lo == dst_lo) & (sport <= dport))))
    lo = [np.where(a_low, s, d) for s, d in ((src_hi, dst_hi), (src_lo, dst_lo), (sport, dport))]
    hi = [np.where(a_low, d, s) for s, d in ((src_hi, dst_hi), (src_lo, dst_lo), (sport, dport))]
    key = [*lo, *hi, packets["proto"].astype(np.uint64)]
    digest = _hash(key)
    order = np.argsort(digest, kind="stable")
    sorted_digest = digest[order]
    same = sorted_digest[1:] == sorted_digest[:-1]
    for column in key:  # a 64-bit collision between two tuples: sort on the full key instead
        ordered = column[order]
        if np.any(same & (ordered[1:] != ordered[:-1])):
            order = np.lexsort([np.arange(digest.size), *reversed(key)])
            same = np.ones(digest.size - 1, bool)
            for col in key:
                ordered = col[order]
                same &= ordered[1:] == ordered[:-1]
            break
    new = np.ones(digest.size, bool)
    new[1:] = ~same
    return order, new, a_low[order]


def _tcp_flow_starts(conn_new: np.ndarray, tcp: np.ndarray, flags: np.ndarray,
                     a_low: np.ndarray) -> np.ndarray:
    """Mask of packets starting a flow for TCP: a connection's first packet, and a pure SYN
    once the flow so far is closed (RST seen, or FIN from both ends)."""
    pure_syn = tcp & ((flags & TCP_SYN) != 0) & ((flags & TCP_ACK) == 0)
    segment_new = conn_new | pure_syn
    starts = np.flatnonzero(segment_new)
    if starts.size == 0:
        return segment_new
    rst = np.logical_or.reduceat((flags & TCP_RST) != 0, starts)
    fin = (flags & TCP_FIN) != 0
    fin_a = np.logical_or.reduceat(fin & a_low, starts)
    fin_b = np.logical_or.reduceat(fin & ~a_low, starts)
    conn_first = conn_new[starts]
    flow_new = conn_first.copy()
    # Later segments of a connection (rare: SYN retransmits, reused tuples), in order.
    rst_l, fin_a_l, fin_b_l, first_l = rst.tolist(), fin_a.tolist(), fin_b.tolist(), \
        conn_first.tolist()
    closed_rst = closed_a = closed_b = False
    for seg in np.flatnonzero(~conn_first).tolist():
        if first_l[seg - 1]:  # the previous segment opened this connection
            closed_rst, closed_a, closed_b = rst_l[seg - 1], fin_a_l[seg - 1], fin_b_l[seg - 1]
        if closed_rst or (closed_a and closed_b):
            flow_new[seg] = True
            closed_rst, closed_a, closed_b = rst_l[seg], fin_a_l[seg], fin_b_l[seg]
        else:
            closed_rst |= rst_l[seg]
            closed_a |= fin_a_l[seg]
            closed_b |= fin_b_l[seg]
    out = np.zeros(conn_new.size, bool)
    out[starts[flow_new]] = True
    return out


def assemble_flows(packets: dict[str, np.ndarray], udp_idle_ns: int) -> np.ndarray:
    """Flows of packet columns; times relative to the first packet, flows in start order."""
    if packets["ts_ns"].size == 0:
        return np.zeros(0, FLOW_DTYPE)
    by_time = np.argsort(packets["ts_ns"], kind="stable")
    packets = {name: column[by_time] for name, column in packets.items()}
    order, conn_new, a_low = _connections(packets)
    pkt = {name: column[order] for name, column in packets.items()}
    ts = pkt["ts_ns"]
    flags = pkt["tcp_flags"].astype(np.int64)
    proto = pkt["proto"]
    tcp = proto == PROTO_TCP
    flow_new = _tcp_flow_starts(conn_new, tcp, np.where(tcp, flags, 0), a_low)
    gap = np.zeros(ts.size, bool)
    gap[1:] = (ts[1:] - ts[:-1]) > udp_idle_ns
    flow_new |= (proto == PROTO_UDP) & gap
    flow = np.cumsum(flow_new) - 1
    starts = np.flatnonzero(flow_new)
    nflows = starts.size

    synack = (flags[starts] & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK)
    synack &= tcp[starts]
    client_low = a_low[starts] ^ synack  # the client is the lower endpoint
    forward = a_low == client_low[flow]

    # End: the packet that closes the flow (RST, or FIN from both ends), else the last packet.
    tcp_flags = np.where(tcp, flags, 0)
    rst_seen = _within((tcp_flags & TCP_RST) != 0, flow, starts) > 0
    fin = (tcp_flags & TCP_FIN) != 0
    fin_fwd = _within(fin & forward, flow, starts) > 0
    fin_rev = _within(fin & ~forward, flow, starts) > 0
    closed = rst_seen | (fin_fwd & fin_rev)
    first_closed = closed.copy()
    first_closed[1:] &= ~(closed[:-1] & (flow[1:] == flow[:-1]))
    ends = np.append(starts[1:], ts.size) - 1
    end_ns = ts[ends].copy()
    end_ns[flow[first_closed]] = ts[first_closed]

    out = np.zeros(nflows, FLOW_DTYPE)
    first = {name: column[starts] for name, column in pkt.items()}
    src = _address_bytes(first["src_hi"], first["src_lo"])
    dst = _address_bytes(first["dst_hi"], first["dst_lo"])
    out["client_addr"] = np.where(synack[:, None], dst, src)
    out["vip_addr"] = np.where(synack[:, None], src, dst)
    out["client_port"] = np.where(synack, first["dport"], first["sport"])
    out["vip_port"] = np.where(synack, first["sport"], first["dport"])
    out["proto"] = first["proto"]
    out["start_ns"], out["end_ns"] = ts[starts], end_ns
    size = pkt["size"].astype(np.int64)
    out["packets"] = np.bincount(flow, weights=forward, minlength=nflows)
    out["bytes"] = np.bincount(flow[forward], weights=size[forward], minlength=nflows)
    out["tcp_flags"] = np.bitwise_or.reduceat(tcp_flags, starts)

    rank = _within(forward, flow, starts) - 1
    head = np.flatnonzero(forward & (rank < FIRST_N))
    hflow, hrank = flow[head], rank[head]
    out["first_sizes"][hflow, hrank] = size[head]
    iat = np.zeros(head.size, np.int64)
    iat[1:] = ts[head[1:]] - ts[head[:-1]]
    iat[hrank == 0] = 0
    out["first_iat_ns"][hflow, hrank] = iat
    out["first_n"] = np.minimum(out["packets"], FIRST_N)
    if head.size:
        group = np.flatnonzero(hrank == 0)
        out["first_tcp_flags"][hflow[group]] = np.bitwise_or.reduceat(tcp_flags[head], group)

    # Flows in order of their first packet (time, then file order); times from the first.
    out = out[np.argsort(order[starts], kind="stable")]
    origin = out["start_ns"][0]
    out["start_ns"] -= origin
    out["end_ns"] -= origin
    out["flow_id"] = np.arange(1, nflows + 1)
    out["app_class"] = APP_UNKNOWN
    return out
