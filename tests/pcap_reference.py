"""An independent pcap flow reader for the tests: dpkt decodes each packet, a dict per 5-tuple
applies the flow rules of docs/workloads.md one packet at a time (the rules the vectorised
connpub.traffic.pcap / pcap_flows must reproduce exactly)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

# The real captures: ../shared/traces/ndpi beside the repository (CI lays shared/ there).
NDPI = Path(__file__).resolve().parents[2] / "shared" / "traces" / "ndpi"
if not NDPI.is_dir():
    NDPI = Path("/work/shared/traces/ndpi")

MAPPED = bytes(10) + b"\xff\xff"


def _multicast(dst: bytes) -> bool:
    if len(dst) == 4:
        return dst[0] >> 4 == 14 or dst == b"\xff" * 4
    return dst[0] == 0xFF


def _l3(link: int, frame: bytes):
    import dpkt

    """(IP or IP6 packet, L2 broadcast) of a frame, or (None, False)."""
    if link == dpkt.pcap.DLT_EN10MB:
        eth = dpkt.ethernet.Ethernet(frame)
        return eth.data, eth.dst == b"\xff" * 6
    if link == dpkt.pcap.DLT_LINUX_SLL:
        sll = dpkt.sll.SLL(frame)
        return sll.data, sll.type == 1
    raise AssertionError(f"reference reader: link type {link} not handled")


def reference_flows(path: str, udp_idle_s: float = 30.0) -> list[tuple]:
    """(client, cport, vip, vport, proto, packets, bytes, start_us, end_us) per flow."""
    import dpkt

    packets = []
    with open(path, "rb") as handle:
        reader = dpkt.pcap.UniversalReader(handle)
        link = reader.datalink()
        for index, (ts, frame) in enumerate(reader):
            try:
                ip, l2_broadcast = _l3(link, frame)
            except (dpkt.UnpackError, IndexError):
                continue
            if isinstance(ip, dpkt.ip.IP):
                if ip.offset:
                    continue
                size = ip.len or len(frame) - (len(frame) - len(bytes(ip)))
                src, dst = MAPPED + ip.src, MAPPED + ip.dst
                dst4 = ip.dst
            elif isinstance(ip, dpkt.ip6.IP6):
                frag = ip.extension_hdrs.get(44)
                if frag is not None and frag.frag_off > 0:
                    continue
                size = ip.plen + 40 if ip.plen else len(bytes(ip))
                src, dst, dst4 = ip.src, ip.dst, ip.dst
            else:
                continue
            l4 = ip.data
            if not isinstance(l4, dpkt.tcp.TCP | dpkt.udp.UDP):
                continue
            if l2_broadcast or _multicast(dst4):
                continue
            proto = 6 if isinstance(l4, dpkt.tcp.TCP) else 17
            flags = l4.flags if proto == 6 else 0
            packets.append((round(ts * 1e6), index, src, l4.sport, dst, l4.dport, proto, flags,
                            size))
    packets.sort(key=lambda p: (p[0], p[1]))
    idle_us = udp_idle_s * 1e6
    flows: list[dict] = []
    live: dict[tuple, int] = {}
    for t_us, _, src, sport, dst, dport, proto, flags, size in packets:
        fwd, rev = (src, sport, dst, dport, proto), (dst, dport, src, sport, proto)
        pure_syn = flags & 0x02 and not flags & 0x10
        index, forward = live.get(fwd), True
        if index is None and rev in live:
            index, forward = live[rev], False
        if index is not None:
            flow = flows[index]
            if (flow["closed"] and pure_syn) or (proto == 17 and t_us - flow["last"] > idle_us):
                del live[fwd if forward else rev]
                index = None
        if index is None:
            forward = not (flags & 0x02 and flags & 0x10)
            key = fwd if forward else rev
            flows.append({"key": key, "start": t_us, "end": t_us, "last": t_us, "bytes": 0,
                          "packets": 0, "fin": set(), "closed": False})
            index = live[key] = len(flows) - 1
        flow = flows[index]
        flow["last"] = t_us
        if not flow["closed"]:
            flow["end"] = t_us
        if forward:
            flow["bytes"] += size
            flow["packets"] += 1
        if flags & 0x04:
            flow["closed"] = True
        elif flags & 0x01:
            flow["fin"].add(forward)
            flow["closed"] = flow["closed"] or len(flow["fin"]) == 2
    origin = min((f["start"] for f in flows), default=0)
    return sorted(
        (str(ipaddress.ip_address(f["key"][0])), f["key"][1], str(ipaddress.ip_address(
            f["key"][2])), f["key"][3], f["key"][4], f["packets"], f["bytes"],
         f["start"] - origin, f["end"] - origin)
        for f in flows)
