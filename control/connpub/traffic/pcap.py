"""Vectorised pcap/pcapng reader: record walk, then numpy over the headers (docs/workloads.md).

Only the record chain (each record's offset depends on the previous length) is a Python loop;
link, IP, IPv6 extension and TCP/UDP headers are decoded for all packets at once with numpy
gathers from the memory-mapped file. The result is one row per TCP/UDP packet (PACKET_DTYPE)
plus counts of everything skipped, so nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from connpub.errors import ConnpubError
from connpub.traffic.workload import PROTO_TCP, PROTO_UDP

MAX_CAPLEN = 1 << 18  # larger record lengths mean a corrupt file, not a packet
PCAP_MAGICS = {  # magic as read little-endian -> (byte order, ns per timestamp fraction unit)
    0xA1B2C3D4: ("<", 1000), 0xA1B23C4D: ("<", 1),
    0xD4C3B2A1: (">", 1000), 0x4D3CB2A1: (">", 1),
}
PCAP_SUFFIXES = (".pcap", ".pcapng", ".cap")  # names taken for captures by the CLI
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER = 0x1A2B3C4D
IPV6_EXT_HOPS = 8  # extension headers followed before giving up on a packet
IPV6_EXTENSIONS = (0, 43, 44, 51, 60)  # hop-by-hop, routing, fragment, AH, destination options

# Link types (tcpdump.org/linktypes.html) -> how the L3 header is found.
DLT_NULL, DLT_EN10MB, DLT_RAW_BSD, DLT_RAW_OBSD, DLT_RAW = 0, 1, 12, 14, 101
DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2 = 108, 113, 228, 229, 276
ETH_VLAN = (0x8100, 0x88A8, 0x9100)
ETH_IPV4, ETH_IPV6, ETH_PPPOE = 0x0800, 0x86DD, 0x8864

# Columns of read_packets' result (one entry per TCP/UDP packet, file order).
PACKET_COLUMNS = {
    "ts_ns": "int64 capture time, ns since the epoch",
    "src_hi": "uint64 high half of the source IPv6 address (IPv4: ::ffff:a.b.c.d)",
    "src_lo": "uint64 low half", "dst_hi": "uint64 destination, high half",
    "dst_lo": "uint64 destination, low half", "sport": "uint16", "dport": "uint16",
    "proto": "uint8 6 or 17", "tcp_flags": "uint8 (0 for UDP)",
    "size": "uint32 L3 bytes (IP total length; the frame's length when that is 0)",
}
DECODE_CHUNK = 1 << 16  # records decoded per pass (their headers stay in cache)
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


@dataclass
class PcapStats:
    """What the reader saw and skipped (every record lands in exactly one bucket)."""

    records: int = 0  # complete packet records in the file
    packets: int = 0  # TCP/UDP packets kept
    truncated_bytes: int = 0  # bytes after the last complete record (file cut mid-record)
    unsupported_link: int = 0  # link type not decoded (counts per link type in link_types)
    not_ip: int = 0  # ARP, LLDP, ... (not IPv4/IPv6)
    not_tcp_udp: int = 0  # ICMP, tunnels, ESP, ...
    fragments: int = 0  # non-first IP fragments (no L4 header)
    short: int = 0  # captured too short for the headers (snap length)
    multicast: int = 0  # to a broadcast/multicast address: an L4 balancer never sees them
    multicast_flows: int = 0  # distinct 5-tuples among those
    length_from_capture: int = 0  # IP length 0 (TSO/jumbo): size taken from the frame
    reordered: int = 0  # packets stamped earlier than the one before them in the file
    link_types: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["link_types"] = {str(k): v for k, v in self.link_types.items()}
        return out


@dataclass
class _Records:
    data_off: np.ndarray  # int64 offset of each packet's first byte
    caplen: np.ndarray  # int64 captured bytes
    origlen: np.ndarray  # int64 bytes on the wire
    ts_ns: np.ndarray  # int64
    link: np.ndarray  # int32 link type of each record
    truncated_bytes: int

    def slice(self, start: int, stop: int) -> _Records:
        return _Records(self.data_off[start:stop], self.caplen[start:stop],
                        self.origlen[start:stop], self.ts_ns[start:stop], self.link[start:stop],
                        self.truncated_bytes)


class _Loads:
    """Unaligned loads of any width at arbitrary byte positions of a buffer, vectorised: one
    strided view per dtype (element i = the value starting at byte i)."""

    def __init__(self, buf, size: int):
        self.buf, self.size = buf, size
        self.views: dict[str, np.ndarray] = {}

    def __call__(self, pos: np.ndarray, dtype: str) -> np.ndarray:
        view = self.views.get(dtype)
        if view is None:
            kind = np.dtype(dtype)
            view = np.ndarray((max(self.size - kind.itemsize + 1, 0),), kind, buffer=self.buf,
                              strides=(1,))
            self.views[dtype] = view
        return view[np.clip(pos, 0, view.size - 1)].astype(np.int64 if dtype[-1] != "8"
                                                           else np.uint64)

    def close(self) -> None:
        self.views.clear()


def _pcap_records(buf, size: int, path: str, load: _Loads) -> _Records:
    (magic,) = struct.unpack_from("<I", buf, 0)
    order, frac_ns = PCAP_MAGICS[magic]
    if size < 24:
        raise ConnpubError(f"{path}: pcap global header cut short ({size} of 24 bytes)")
    (link,) = struct.unpack_from(order + "I", buf, 20)
    caplen_at = struct.Struct(order + "I").unpack_from
    offsets = array("q")
    append = offsets.append
    off, last = 24, size - 16
    while off <= last:  # the only per-record Python: follow the chain of lengths
        append(off)
        off += 16 + caplen_at(buf, off + 8)[0]
    starts = np.frombuffer(offsets, np.int64)
    u32 = order + "u4"
    caplen = load(starts + 8, u32)
    corrupt = np.flatnonzero(caplen > MAX_CAPLEN)
    if corrupt.size:
        raise ConnpubError(f"{path}: record at byte {int(starts[corrupt[0]])} claims "
                           f"{int(caplen[corrupt[0]])} bytes; the file is corrupt")
    whole = starts + 16 + caplen <= size
    if starts.size and not whole[-1]:  # cut inside the last record's data
        off = int(starts[-1])
        starts, caplen = starts[:-1], caplen[:-1]
    seconds, fraction = _u32_pair(load(starts, order + "u8"), order)
    origlen = _u32_pair(load(starts + 8, order + "u8"), order)[1]
    ts_ns = seconds * 1_000_000_000 + fraction * frac_ns
    return _Records(starts + 16, caplen, origlen, ts_ns,
                    np.full(starts.size, link & 0xFFFF, np.int32), size - off)


def _u32_pair(word: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """The two 32-bit fields packed in a 64-bit load, in file order."""
    low = (word & np.uint64(0xFFFFFFFF)).astype(np.int64)
    high = (word >> np.uint64(32)).astype(np.int64)
    return (low, high) if order == "<" else (high, low)


def _tsresol_ns(option: int) -> tuple[int, int]:
    """pcapng if_tsresol -> (multiplier, right shift) turning units into ns."""
    if option & 0x80:
        return 1_000_000_000, option & 0x7F
    exponent = option & 0x7F
    if exponent <= 9:
        return 10 ** (9 - exponent), 0
    return 1, 0  # finer than ns: handled by the divisor below


def _pcapng_records(buf, size: int, path: str) -> _Records:
    offs, ifaces, caps, origs, units = array("q"), array("q"), array("q"), array("q"), array("Q")
    interfaces: list[tuple[int, int, int, int]] = []  # (link, mult, shift, divisor), all sections
    order, base, off = "<", 0, 0  # interface ids count from `base` in each section
    while off + 12 <= size:
        (btype,) = struct.unpack_from(order + "I", buf, off)
        if btype == PCAPNG_SHB:
            (bom,) = struct.unpack_from("<I", buf, off + 8)
            order = "<" if bom == PCAPNG_BYTE_ORDER else ">"
            base = len(interfaces)
        (blen,) = struct.unpack_from(order + "I", buf, off + 4)
        if blen < 12 or blen % 4 or blen > MAX_CAPLEN + 64:
            raise ConnpubError(f"{path}: pcapng block at byte {off} has length {blen}; "
                               "the file is corrupt")
        if off + blen > size:
            break
        if btype == 6:  # enhanced packet block
            iface, hi, lo, cap, orig = struct.unpack_from(order + "IIIII", buf, off + 8)
            offs.append(off + 28)
            ifaces.append(base + iface)
            caps.append(min(cap, blen - 32))
            origs.append(orig)
            units.append((hi << 32) | lo)
        elif btype == 3:  # simple packet block: no timestamp, no interface (0)
            (orig,) = struct.unpack_from(order + "I", buf, off + 8)
            offs.append(off + 12)
            ifaces.append(base)
            caps.append(min(orig, blen - 16))
            origs.append(orig)
            units.append(units[-1] if units else 0)
        elif btype == 2:  # obsolete packet block
            iface, _, hi, lo, cap, orig = struct.unpack_from(order + "HHIIII", buf, off + 8)
            offs.append(off + 28)
            ifaces.append(base + iface)
            caps.append(min(cap, blen - 32))
            origs.append(orig)
            units.append((hi << 32) | lo)
        elif btype == 1:  # interface description block
            interfaces.append(_pcapng_interface(buf, off, blen, order))
        off += blen
    iface = np.frombuffer(ifaces, np.int64)
    if interfaces and iface.size and iface.max() >= len(interfaces):
        raise ConnpubError(f"{path}: packet names interface {int(iface.max())} but the file "
                           f"describes {len(interfaces)}")
    if not interfaces:
        interfaces = [(DLT_EN10MB, 1000, 0, 1)]
    table = np.asarray(interfaces, np.int64)
    raw = np.frombuffer(units, np.uint64)
    mult, shift, div = table[iface, 1].astype(np.uint64), table[iface, 2], table[iface, 3]
    whole = (raw >> shift.astype(np.uint64)) * mult
    part = ((raw & ((np.uint64(1) << shift.astype(np.uint64)) - np.uint64(1))) * mult
            ) >> shift.astype(np.uint64)
    ts_ns = ((whole + part) // div.astype(np.uint64)).astype(np.int64)
    return _Records(np.frombuffer(offs, np.int64), np.frombuffer(caps, np.int64),
                    np.frombuffer(origs, np.int64), ts_ns,
                    table[iface, 0].astype(np.int32), size - off)


def _pcapng_interface(buf, off: int, blen: int, order: str) -> tuple[int, int, int, int]:
    (link,) = struct.unpack_from(order + "H", buf, off + 8)
    mult, shift, div = 1000, 0, 1
    pos, end = off + 16, off + blen - 4
    while pos + 4 <= end:
        code, length = struct.unpack_from(order + "HH", buf, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:  # if_tsresol
            value = buf[pos + 4]
            mult, shift = _tsresol_ns(value)
            if not value & 0x80 and value & 0x7F > 9:
                div = 10 ** ((value & 0x7F) - 9)
        pos += 4 + ((length + 3) & ~3)
    return link, mult, shift, div


def _link_layer(load: _Loads, rec: _Records, stats: PcapStats
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per packet: L3 offset, ethertype-like protocol (0 = unknown, -1 = link type not
    decoded) and whether the frame went to the L2 broadcast address."""
    n = rec.data_off.size
    l3 = rec.data_off.copy()
    ether = np.zeros(n, np.int64)
    l2_broadcast = np.zeros(n, bool)
    for link in np.unique(rec.link):
        rows = np.flatnonzero(rec.link == link)
        stats.link_types[int(link)] = int(rows.size)
        pos = rec.data_off[rows]
        if link == DLT_EN10MB:
            kind = load(pos + 12, ">u2")
            hdr = np.full(rows.size, 14, np.int64)
            for _ in range(3):  # 802.1Q / QinQ tags
                tagged = np.flatnonzero(np.isin(kind, ETH_VLAN))
                if not tagged.size:
                    break
                hdr[tagged] += 4
                kind[tagged] = load(pos[tagged] + hdr[tagged] - 2, ">u2")
            pppoe = np.flatnonzero(kind == ETH_PPPOE)  # session: PPP 0x21 IPv4, 0x57 IPv6
            if pppoe.size:
                ppp = load(pos[pppoe] + hdr[pppoe] + 6, ">u2")
                kind[pppoe] = np.select([ppp == 0x21, ppp == 0x57], [ETH_IPV4, ETH_IPV6], 0)
                hdr[pppoe] += 8
            # Broadcast MAC (directed broadcasts); multicast MACs may carry unicast IP (NLB).
            l2_broadcast[rows] = (load(pos, ">u8") >> np.uint64(16)) == 0xFFFFFFFFFFFF
        elif link in (DLT_LINUX_SLL, DLT_LINUX_SLL2):
            sll2 = link == DLT_LINUX_SLL2
            kind = load(pos + (0 if sll2 else 14), ">u2")
            pkttype = load(pos + 10, "u1") if sll2 else load(pos, ">u2")
            l2_broadcast[rows] = pkttype == 1  # sent to the broadcast address
            hdr = np.full(rows.size, 20 if sll2 else 16, np.int64)
        elif link in (DLT_RAW, DLT_RAW_BSD, DLT_RAW_OBSD, DLT_IPV4, DLT_IPV6):
            version = load(pos, "u1") >> 4
            kind = np.select([version == 4, version == 6], [ETH_IPV4, ETH_IPV6], 0)
            hdr = np.zeros(rows.size, np.int64)
        elif link in (DLT_NULL, DLT_LOOP):
            family = load(pos, "<u4")
            family = np.where(family > 0xFFFF, family >> 24, family)  # either byte order
            kind = np.select([family == 2, np.isin(family, (10, 24, 28, 30))],
                             [ETH_IPV4, ETH_IPV6], 0)
            hdr = np.full(rows.size, 4, np.int64)
        else:
            stats.unsupported_link += int(rows.size)
            ether[rows] = -1
            continue
        ether[rows] = kind
        l3[rows] = pos + hdr
    return l3, ether, l2_broadcast


def _l3_size(length_field: np.ndarray, size: np.ndarray, frame_l3_len: np.ndarray,
             stats: PcapStats) -> np.ndarray:
    """L3 bytes from the IP header's length, or from the frame when that field is 0 (TSO)."""
    zero = length_field == 0
    stats.length_from_capture += int(np.count_nonzero(zero))
    return np.where(zero, frame_l3_len, size)


def _decode(load: _Loads, rec: _Records, stats: PcapStats) -> tuple[dict, np.ndarray]:
    """TCP/UDP packet columns of some records, and the 5-tuples of those dropped as multicast."""
    l3, ether, multicast = _link_layer(load, rec, stats)
    end = rec.data_off + rec.caplen
    frame_l3_len = rec.origlen - (l3 - rec.data_off)  # bytes from L3 on, on the wire
    first = load(l3, ">u8")  # v4: ver/ihl tos len id frag; v6: ver/class/label plen nh hop
    version = (first >> np.uint64(60)).astype(np.int64)
    v4 = (ether == ETH_IPV4) & (version == 4)
    v6 = (ether == ETH_IPV6) & (version == 6)
    stats.not_ip += int(np.count_nonzero(~(v4 | v6) & (ether >= 0)))
    short = (v4 & (l3 + 20 > end)) | (v6 & (l3 + 40 > end))
    v4 &= ~short
    v6 &= ~short
    n = l3.size
    proto, l4, size = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    fragment = np.zeros(n, bool)
    words = np.zeros((4, n), np.uint64)  # src_hi, src_lo, dst_hi, dst_lo

    rows = np.flatnonzero(v4)
    if rows.size:
        pos, head = l3[rows], first[rows]
        total = ((head >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64)
        size[rows] = _l3_size(total, total, frame_l3_len[rows], stats)
        fragment[rows] = (head & np.uint64(0x1FFF)) != 0
        l4[rows] = pos + ((head >> np.uint64(56)) & np.uint64(15)).astype(np.int64) * 4
        second = load(pos + 8, ">u8")  # ttl proto checksum src
        proto[rows] = ((second >> np.uint64(48)) & np.uint64(0xFF)).astype(np.int64)
        mapped = np.uint64(0xFFFF << 32)
        words[1, rows] = (second & np.uint64(0xFFFFFFFF)) | mapped
        dst = load(pos + 16, ">u4")
        words[3, rows] = dst.astype(np.uint64) | mapped
        multicast[rows] |= ((dst >> 28) == 14) | (dst == 0xFFFFFFFF)

    rows = np.flatnonzero(v6)
    if rows.size:
        pos, head = l3[rows], first[rows]
        payload = ((head >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.int64)
        size[rows] = _l3_size(payload, payload + 40, frame_l3_len[rows], stats)
        for i, at in enumerate((8, 16, 24, 32)):
            words[i, rows] = load(pos + at, ">u8")
        multicast[rows] |= (words[2, rows] >> np.uint64(56)) == 0xFF
        next_header = ((head >> np.uint64(8)) & np.uint64(0xFF)).astype(np.int64)
        nh, at, frag = _ipv6_extensions(load, next_header, pos + 40, end[rows])
        proto[rows], l4[rows] = nh, at
        fragment[rows] = frag

    ip = v4 | v6
    stats.short += int(np.count_nonzero(short))
    stats.fragments += int(np.count_nonzero(ip & fragment))
    ip &= ~fragment
    l4_kind = ip & ((proto == PROTO_TCP) | (proto == PROTO_UDP))
    stats.not_tcp_udp += int(np.count_nonzero(ip & ~l4_kind))
    l4_short = l4_kind & (l4 + np.where(proto == PROTO_TCP, 14, 4) > end)
    stats.short += int(np.count_nonzero(l4_short))
    keep = l4_kind & ~l4_short
    dropped = np.flatnonzero(keep & multicast)
    stats.multicast += int(dropped.size)
    rows = np.flatnonzero(keep & ~multicast)
    ports = load(l4[rows], ">u4")
    kept_proto = proto[rows]
    flags = np.zeros(rows.size, np.int64)
    tcp = np.flatnonzero(kept_proto == PROTO_TCP)
    flags[tcp] = load(l4[rows[tcp]] + 13, "u1")
    columns = {
        "ts_ns": rec.ts_ns[rows], "src_hi": words[0, rows], "src_lo": words[1, rows],
        "dst_hi": words[2, rows], "dst_lo": words[3, rows],
        "sport": (ports >> 16).astype(np.uint16), "dport": (ports & 0xFFFF).astype(np.uint16),
        "proto": kept_proto.astype(np.uint8), "tcp_flags": flags.astype(np.uint8),
        "size": size[rows].astype(np.uint32),
    }
    dropped_keys = np.stack([*words[:, dropped].view(np.int64), load(l4[dropped], ">u4"),
                             proto[dropped]], axis=1)
    return columns, dropped_keys


def _ipv6_extensions(load: _Loads, nh: np.ndarray, pos: np.ndarray, end: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Follow hop-by-hop (0), routing (43), fragment (44), destination options (60) and AH (51)
    headers: (upper-layer protocol, its offset, non-first fragment) per packet."""
    fragment = np.zeros(nh.size, bool)
    for _ in range(IPV6_EXT_HOPS):
        ext = np.flatnonzero(np.isin(nh, IPV6_EXTENSIONS) & (pos + 8 <= end))
        if not ext.size:
            break
        at = pos[ext]
        head = load(at, ">u4")  # next header, length, (fragment: offset << 3 | flags)
        kind, hdr_len = nh[ext], (head >> 16) & 0xFF
        length = np.select([kind == 44, kind == 51], [8, (hdr_len + 2) * 4], (hdr_len + 1) * 8)
        fragment[ext] |= (kind == 44) & (((head & 0xFFFF) >> 3) != 0)
        nh[ext] = head >> 24
        pos[ext] = at + length
    nh = np.where(np.isin(nh, IPV6_EXTENSIONS), -1, nh)  # chain longer than we follow
    return nh, pos, fragment


def read_packets(path: str | Path) -> tuple[dict[str, np.ndarray], PcapStats]:
    """TCP/UDP packets of a pcap or pcapng file (PACKET_COLUMNS, file order) and what was
    skipped.

    A file cut mid-record is read up to its last complete record; stats.truncated_bytes says
    how much was left over (callers decide whether that is an error).
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, mmap outlives the with
    except FileNotFoundError as err:
        raise ConnpubError(f"{path}: no such file") from err
    except OSError as err:
        raise ConnpubError(f"{path}: cannot read ({err.strerror})") from err
    with handle:
        size = Path(path).stat().st_size
        if size < 4:
            raise ConnpubError(f"{path}: not a pcap/pcapng file ({size} bytes)")
        buf = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | MAP_POPULATE,
                        prot=mmap.PROT_READ)
    load = _Loads(buf, size)
    try:
        (magic,) = struct.unpack_from("<I", buf, 0)
        if magic in PCAP_MAGICS:
            rec = _pcap_records(buf, size, str(path), load)
        elif magic == PCAPNG_SHB:
            rec = _pcapng_records(buf, size, str(path))
        else:
            raise ConnpubError(f"{path}: not a pcap/pcapng file (magic {magic:#010x})")
        stats = PcapStats(records=int(rec.data_off.size), truncated_bytes=int(rec.truncated_bytes))
        parts, dropped = [], []
        for start in range(0, max(stats.records, 1), DECODE_CHUNK):  # chunks stay in cache
            columns, keys = _decode(load, rec.slice(start, start + DECODE_CHUNK), stats)
            parts.append(columns)
            dropped.append(keys)
    finally:
        load.close()
        with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
            buf.close()
    packets = {name: np.concatenate([part[name] for part in parts]) for name in PACKET_COLUMNS}
    stats.packets = int(packets["ts_ns"].size)
    stats.multicast_flows = int(np.unique(np.concatenate(dropped), axis=0).shape[0])
    stats.reordered = int(np.count_nonzero(np.diff(packets["ts_ns"]) < 0))
    return packets, stats
