"""Datapath fuzzing (docs/fuzzing.md): a scapy-built seed corpus, numpy mutations in bulk, a
reference parser written from the parsing contract, and a BPF_PROG_TEST_RUN loop that checks
verdicts, output bytes, outcome counters and the flow tables of the XDP programs per batch."""

from __future__ import annotations

import ctypes
import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from connpub.datapath import lbctl, libbpf, loader
from connpub.datapath.abi import (
    AGG_KEY_DTYPE,
    AGG_VALUE_DTYPE,
    CLASS_KEY_DTYPE,
    CLASS_LEVEL_DTYPE,
    FLOW_KEY_DTYPE,
    FLOW_VALUE_DTYPE,
    LB_OUTCOMES,
    LB_STATS,
    SERVER_OUTCOMES,
    SERVER_STATS,
)
from connpub.datapath.maps import PinnedMap
from connpub.datapath.masks import mask_byte_table
from connpub.datapath.pinned import stat_totals
from connpub.errors import ConnpubError

Progress = Callable[[int, int], None]  # (packets done, packets total)

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICT_NAMES = ("XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT")

STRIDE = 1600  # bytes per packet row; every generated packet is at most this long
OUT_STRIDE = STRIDE + 256  # room for a program that grows the packet (encapsulation)
MIN_FRAME = 14  # BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header

# ---------------------------------------------------------------------------------------------
# the parsing contract (bpf/include/parsing_helpers.h comments), restated for the reference
# ---------------------------------------------------------------------------------------------

VLAN_MAX_DEPTH = 2  # 802.1Q / 802.1ad tags removed before the ethertype is read
IPV6_EXT_MAX_CHAIN = 4  # IPv6 extension headers skipped before giving up (-> unsupported)
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, ETH_P_ARP = 0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806
IPPROTO_HOPOPTS, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_IPV6 = 0, 4, 6, 17, 41
IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS = 43, 44, 51, 60
IPV6_SKIPPED = frozenset((IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_AH))
V4_MAPPED = bytes(10) + b"\xff\xff"

# Mutable header fields the mutator aims at (kind ids index FIELD_SPECIALS).
(F_ETHERTYPE, F_VER_IHL, F_IPV4_TOTLEN, F_IPV4_FRAG, F_PROTO, F_IPV6_VER, F_IPV6_PLEN, F_EXT_LEN,
 F_TCP_DOFF, F_TCP_FLAGS, F_UDP_LEN, F_PORT) = range(12)
FIELD_WIDTH = (2, 1, 2, 2, 1, 1, 2, 1, 1, 1, 2, 2)
FIELD_SPECIALS = (
    (ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, ETH_P_ARP, 0x0000, 0xFFFF, 0x8847),
    (0x45, 0x44, 0x40, 0x4F, 0x46, 0x65, 0x05, 0x35, 0xF5),
    (0, 1, 19, 20, 21, 39, 40, 41, 0xFFFF, 0x8000),
    (0x0000, 0x4000, 0x2000, 0x0001, 0x1FFF, 0x6000, 0xFFFF),
    (0, 1, 4, 6, 17, 41, 43, 44, 51, 58, 59, 60, 255),
    (0x60, 0x40, 0x00, 0x6F, 0xF0, 0x70),
    (0, 1, 7, 8, 20, 0xFFD7, 0xFFD8, 0xFFFF, 0x8000),
    (0, 1, 2, 3, 0xFF),
    (0x50, 0x40, 0x00, 0x10, 0x60, 0xF0, 0x80),
    (0x02, 0x12, 0x10, 0x11, 0x04, 0x14, 0x01, 0x18, 0x00, 0xFF),
    (0, 1, 7, 8, 9, 0xFFFF, 0x8000),
    (0, 80, 53, 443, 0xFFFF),
)
SERVER_OUTCOME_NAMES = SERVER_STATS[:SERVER_OUTCOMES]
LB_OUTCOME_NAMES = LB_STATS[:LB_OUTCOMES]

# RFC facts the contract does not check; the datapath tracks such packets and the fuzz report
# counts them (docs/fuzzing.md "Findings").
FINDINGS = (
    "ip_length_beyond_frame",  # tot_len / payload_len claims more bytes than the frame has
    "l4_header_beyond_ip_length",  # the TCP/UDP header ends after the IP length's end
    "udp_length_beyond_ip",  # UDP length claims more than the IP payload
    "hopopts_not_first",  # hop-by-hop header not right after the IPv6 header (RFC 8200 §4.1)
    "inner_beyond_outer_length",  # tunnelled: the inner packet ends after the outer length
)


@dataclass(slots=True)
class Parsed:
    """What the contract says the datapath must make of one frame."""

    outcome: str  # a server outcome name: tracked, non_ip, truncated, malformed, ...
    key: bytes | None = None  # the 40-byte struct flow_key when tracked
    l3_offset: int = 0  # start of the outermost IP header
    l3_len: int = 0  # length the innermost IP header claims (never wrapped to 16 bits)
    encapsulated: bool = False
    is_v6: bool = False  # innermost header family
    tcp_flags: int = 0
    findings: tuple[str, ...] = ()
    frame_len: int = 0


def _field(fields: list | None, offset: int, kind: int) -> None:
    if fields is not None:
        fields.append((offset, kind))


def _parse_ip(frame: bytes, pos: int, is_v6: bool, fields: list | None, findings: list):
    """One IP header at pos -> (error outcome | None, next proto, end, src16, dst16, l3_len)."""
    size = len(frame)
    if is_v6:
        if pos + 40 > size:
            return "truncated", 0, 0, b"", b"", 0
        _field(fields, pos, F_IPV6_VER)
        _field(fields, pos + 4, F_IPV6_PLEN)
        _field(fields, pos + 6, F_PROTO)
        if frame[pos] >> 4 != 6:
            return "malformed", 0, 0, b"", b"", 0
        l3_len = (frame[pos + 4] << 8 | frame[pos + 5]) + 40
        if pos + l3_len > size:
            findings.append("ip_length_beyond_frame")
        src, dst = frame[pos + 8 : pos + 24], frame[pos + 24 : pos + 40]
        next_proto, cursor = frame[pos + 6], pos + 40
        for index in range(IPV6_EXT_MAX_CHAIN):
            if next_proto == IPPROTO_FRAGMENT:
                return "fragment", 0, 0, b"", b"", 0
            if next_proto not in IPV6_SKIPPED:
                break
            if cursor + 2 > size:
                return "truncated", 0, 0, b"", b"", 0
            if next_proto == IPPROTO_HOPOPTS and index > 0:
                findings.append("hopopts_not_first")
            _field(fields, cursor, F_PROTO)
            _field(fields, cursor + 1, F_EXT_LEN)
            if next_proto == IPPROTO_AH:  # RFC 4302: length in 4-byte units, minus 2
                ext_len = (frame[cursor + 1] + 2) * 4
            else:  # RFC 8200: length in 8-byte units, not counting the first 8
                ext_len = (frame[cursor + 1] + 1) * 8
            if cursor + ext_len > size:
                return "truncated", 0, 0, b"", b"", 0
            next_proto, cursor = frame[cursor], cursor + ext_len
        # RFC 4291 2.5.5.2: never on the wire; would share an IPv4 flow's key (checked after the
        # extension headers, as the C parser does)
        if src[:12] == V4_MAPPED or dst[:12] == V4_MAPPED:
            return "malformed", 0, 0, b"", b"", 0
        return None, next_proto, cursor, src, dst, l3_len
    if pos + 20 > size:
        return "truncated", 0, 0, b"", b"", 0
    _field(fields, pos, F_VER_IHL)
    _field(fields, pos + 2, F_IPV4_TOTLEN)
    _field(fields, pos + 6, F_IPV4_FRAG)
    _field(fields, pos + 9, F_PROTO)
    version_ihl = frame[pos]
    header_len = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header_len < 20:
        return "malformed", 0, 0, b"", b"", 0
    if pos + header_len > size:
        return "truncated", 0, 0, b"", b"", 0
    total_len = frame[pos + 2] << 8 | frame[pos + 3]
    if total_len < header_len:
        return "malformed", 0, 0, b"", b"", 0
    if frame[pos + 6] & 0x3F or frame[pos + 7]:  # MF or a fragment offset (DF is fine)
        return "fragment", 0, 0, b"", b"", 0
    if pos + total_len > size:
        findings.append("ip_length_beyond_frame")
    src = V4_MAPPED + frame[pos + 12 : pos + 16]
    dst = V4_MAPPED + frame[pos + 16 : pos + 20]
    return None, frame[pos + 9], pos + header_len, src, dst, total_len


def reference_parse(frame: bytes, fields: list | None = None) -> Parsed:
    """The outcome the parsing contract gives `frame` (written from the header comments and the
    RFCs, not from the C). `fields` collects (offset, kind) of mutable header fields."""
    size = len(frame)
    if size < 14:
        return Parsed("truncated")
    findings: list[str] = []
    ethertype, pos = frame[12] << 8 | frame[13], 14
    _field(fields, 12, F_ETHERTYPE)
    for _ in range(VLAN_MAX_DEPTH):
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        if pos + 4 > size:
            return Parsed("truncated")
        _field(fields, pos + 2, F_ETHERTYPE)
        ethertype, pos = frame[pos + 2] << 8 | frame[pos + 3], pos + 4
    if ethertype not in (ETH_P_IP, ETH_P_IPV6):
        return Parsed("non_ip")
    l3_offset = pos
    is_v6 = ethertype == ETH_P_IPV6
    error, proto, pos, src, dst, l3_len = _parse_ip(frame, pos, is_v6, fields, findings)
    if error:
        return Parsed(error, l3_offset=l3_offset)
    ip_start, encapsulated = l3_offset, False
    if proto in (IPPROTO_IPIP, IPPROTO_IPV6):  # one level of tunnel is removed
        outer_end = l3_offset + l3_len
        encapsulated, is_v6, ip_start = True, proto == IPPROTO_IPV6, pos
        error, proto, pos, src, dst, l3_len = _parse_ip(frame, pos, is_v6, fields, findings)
        if error:
            return Parsed(error, l3_offset=l3_offset, encapsulated=True)
        if ip_start + l3_len > outer_end:
            findings.append("inner_beyond_outer_length")
    tcp_flags = 0
    if proto == IPPROTO_TCP:
        if pos + 20 > size:
            return Parsed("truncated", l3_offset=l3_offset)
        _field(fields, pos, F_PORT)
        _field(fields, pos + 2, F_PORT)
        _field(fields, pos + 12, F_TCP_DOFF)
        _field(fields, pos + 13, F_TCP_FLAGS)
        header_len = (frame[pos + 12] >> 4) * 4
        if header_len < 20:
            return Parsed("malformed", l3_offset=l3_offset)
        if pos + header_len > size:
            return Parsed("truncated", l3_offset=l3_offset)
        tcp_flags, l4_end = frame[pos + 13], pos + header_len
    elif proto == IPPROTO_UDP:
        if pos + 8 > size:
            return Parsed("truncated", l3_offset=l3_offset)
        _field(fields, pos, F_PORT)
        _field(fields, pos + 2, F_PORT)
        _field(fields, pos + 4, F_UDP_LEN)
        udp_len = frame[pos + 4] << 8 | frame[pos + 5]
        if udp_len < 8:
            return Parsed("malformed", l3_offset=l3_offset)
        if pos + udp_len > ip_start + l3_len:
            findings.append("udp_length_beyond_ip")
        l4_end = pos + 8
    else:
        return Parsed("unsupported", l3_offset=l3_offset)
    if l4_end > ip_start + l3_len:
        findings.append("l4_header_beyond_ip_length")
    key = src + dst + frame[pos : pos + 4] + bytes((proto, 0, 0, 0))
    return Parsed("tracked", key, l3_offset, l3_len, encapsulated, is_v6, tcp_flags,
                  tuple(findings), size)


# ---------------------------------------------------------------------------------------------
# seed corpus (scapy, built once)
# ---------------------------------------------------------------------------------------------

C4, V4, LB4, S4 = "10.1.0.7", "10.200.0.1", "192.168.50.1", "192.168.60.2"
C6, V6, LB6, S6 = "2001:db8:0:1::7", "fd00:200::1", "fd00:50::1", "fd00:60::2"
V4_NO_BACKEND = "10.200.0.9"  # a VIP whose service has no backend (LB: XDP_DROP)
VIP_SERVICES = ((V4, 80, 6), (V4, 53, 17), (V6, 80, 6), (V6, 53, 17), (V4_NO_BACKEND, 80, 6))


def build_corpus() -> list[tuple[str, bytes]]:
    """Seed frames: the fixture kinds of tests/test_server_xdp.py plus deep structures (VLAN
    stacks, IPv6 extension chains and loops, AH, nested tunnels, IPv4-mapped IPv6)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption  # noqa: PLC0415
    from scapy.layers.inet6 import (  # noqa: PLC0415
        ICMPv6EchoRequest,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        PadN,
    )
    from scapy.layers.ipsec import AH  # noqa: PLC0415
    from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether  # noqa: PLC0415
    from scapy.packet import Raw  # noqa: PLC0415

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pay = Raw(b"p" * 100)

    def tcp(flags="S", sport=40001, dport=80):
        return TCP(sport=sport, dport=dport, flags=flags)

    def v4(src=C4, dst=V4, **kw):
        return IP(src=src, dst=dst, **kw)

    def v6(src=C6, dst=V6, **kw):
        return IPv6(src=src, dst=dst, **kw)

    hbh, dst_opts = IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt
    seeds = [
        ("ipv4 tcp syn", eth / v4() / tcp("S") / pay),
        ("ipv4 tcp ack", eth / v4() / tcp("A") / pay),
        ("ipv4 tcp fin", eth / v4() / tcp("FA") / pay),
        ("ipv4 tcp rst", eth / v4() / tcp("R")),
        ("ipv4 tcp other client", eth / v4(src="10.1.0.200") / tcp("S", 40002) / pay),
        ("ipv4 udp", eth / v4() / UDP(sport=5353, dport=53) / pay),
        ("ipv6 tcp syn", eth / v6() / tcp("S") / pay),
        ("ipv6 tcp fin", eth / v6() / tcp("FA") / pay),
        ("ipv6 udp", eth / v6() / UDP(sport=5353, dport=53) / pay),
        ("802.1Q", eth / Dot1Q(vlan=10) / v4() / tcp() / pay),
        ("802.1ad QinQ", Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02",
                               type=ETH_P_8021AD) / Dot1AD(vlan=100) / Dot1Q(vlan=10) / v4()
         / tcp() / pay),
        ("3 vlan tags", eth / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / v4() / tcp() / pay),
        ("4 vlan tags ipv6", eth / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / Dot1Q(vlan=4)
         / v6() / tcp()),
        ("ipv4 options", eth / v4(options=[IPOption(b"\x94\x04\x00\x00")] * 3) / tcp() / pay),
        ("ipv4 ihl 15", eth / v4(options=[IPOption(b"\x01" * 40)]) / tcp() / pay),
        ("ipv6 hbh + dstopts", eth / v6() / hbh() / dst_opts() / tcp() / pay),
        ("ipv6 4 ext headers", eth / v6() / hbh() / dst_opts() / IPv6ExtHdrRouting()
         / dst_opts() / tcp() / pay),
        ("ipv6 5 ext headers", eth / v6() / hbh() / dst_opts() / dst_opts() / dst_opts()
         / dst_opts() / tcp()),
        ("ipv6 hbh loop", eth / v6() / hbh() / hbh() / hbh() / hbh() / hbh() / hbh() / tcp()),
        ("ipv6 hbh twice", eth / v6() / hbh() / hbh() / UDP(sport=5353, dport=53) / pay),
        ("ipv6 long hbh", eth / v6() / hbh(options=[PadN(optdata=b"\0" * 44)]) / tcp()),
        ("ipv6 ah", eth / v6() / AH(nh=6, payloadlen=4, spi=1, icv=b"\0" * 12) / tcp() / pay),
        ("ipv6 ah long", eth / v6() / AH(nh=60, payloadlen=10, spi=1, icv=b"\0" * 36)
         / dst_opts() / tcp()),
        ("ipv6 fragment", eth / v6() / IPv6ExtHdrFragment(nh=6) / tcp() / pay),
        ("ipv6 fragment after 4", eth / v6() / hbh() / dst_opts() / dst_opts() / dst_opts()
         / IPv6ExtHdrFragment(nh=6) / tcp()),
        ("ipip", eth / v4(LB4, S4) / v4() / tcp() / pay),
        ("ip6ip6", eth / v6(LB6, S6) / v6() / tcp() / pay),
        ("4in6", eth / v6(LB6, S6) / v4() / tcp() / pay),
        ("6in4", eth / v4(LB4, S4) / v6() / UDP(sport=7, dport=53) / pay),
        ("6in4 with ext", eth / v4(LB4, S4) / v6() / hbh() / tcp() / pay),
        ("ipip in ipip", eth / v4(LB4, S4) / v4(LB4, S4) / v4() / tcp()),
        ("4in6 in 6in4", eth / v4(LB4, S4) / v6(LB6, S6) / v4() / tcp()),
        ("vlan 6in4", eth / Dot1Q(vlan=7) / v4(LB4, S4) / v6() / tcp("A") / pay),
        ("ipv6 v4-mapped", eth / v6("::ffff:" + C4, "::ffff:" + V4) / tcp("S") / pay),
        ("ipv6 v4-mapped fin", eth / v6("::ffff:" + C4, "::ffff:" + V4) / tcp("FA")),
        ("ipv4 first fragment", eth / v4(flags="MF") / tcp() / pay),
        ("ipv4 later fragment", eth / v4(frag=20, proto=6) / pay),
        ("arp", eth / ARP()),
        ("ipv4 icmp", eth / v4() / ICMP()),
        ("ipv6 icmp", eth / v6() / ICMPv6EchoRequest()),
        ("no-backend vip", eth / v4(dst=V4_NO_BACKEND) / tcp("S") / pay),
        ("big ipv4", eth / v4() / tcp("A") / Raw(b"b" * 1460)),
        ("big ipv6", eth / v6() / UDP(sport=9, dport=53) / Raw(b"b" * 1452)),
    ]
    frames = [(name, bytes(packet)) for name, packet in seeds]
    too_long = [name for name, frame in frames if len(frame) > STRIDE]
    if too_long:
        raise ConnpubError(f"corpus frames longer than {STRIDE} bytes: {too_long}")
    return frames


@dataclass
class Corpus:
    """Seed frames as rows of one array, with the mutable fields of each seed."""

    names: list[str]
    rows: np.ndarray  # (seeds, STRIDE) uint8
    lengths: np.ndarray  # (seeds,) int64
    field_start: np.ndarray  # (seeds,) first index into field_offset/field_kind
    field_count: np.ndarray  # (seeds,)
    field_offset: np.ndarray  # (fields,)
    field_kind: np.ndarray  # (fields,)

    @classmethod
    def from_frames(cls, frames: list[tuple[str, bytes]]) -> Corpus:
        rows = np.zeros((len(frames), STRIDE), np.uint8)
        lengths = np.zeros(len(frames), np.int64)
        starts, counts, offsets, kinds = [], [], [], []
        for index, (_, frame) in enumerate(frames):
            rows[index, : len(frame)] = np.frombuffer(frame, np.uint8)
            lengths[index] = len(frame)
            fields: list = []
            reference_parse(frame, fields)
            starts.append(len(offsets))
            counts.append(len(fields))
            offsets += [offset for offset, _ in fields]
            kinds += [kind for _, kind in fields]
        return cls([name for name, _ in frames], rows, lengths, np.array(starts),
                   np.array(counts), np.array(offsets, np.int64), np.array(kinds, np.int64))


# ---------------------------------------------------------------------------------------------
# mutations (numpy, whole batches at once)
# ---------------------------------------------------------------------------------------------

_SPECIAL_COUNT = np.array([len(values) for values in FIELD_SPECIALS])
_SPECIALS = np.zeros((len(FIELD_SPECIALS), _SPECIAL_COUNT.max()), np.int64)
for _kind, _values in enumerate(FIELD_SPECIALS):
    _SPECIALS[_kind, : len(_values)] = _values
_WIDTHS = np.array(FIELD_WIDTH)


class Mutator:
    """Generates batches of frames: random frames, and seeds with header fields set to edge
    values, flipped bytes, truncations, extensions and randomised tails."""

    def __init__(self, corpus: Corpus, seed: int = 0) -> None:
        self.corpus = corpus
        self.rng = np.random.default_rng(seed)

    def batch(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(count, STRIDE) uint8 frames and their lengths (>= MIN_FRAME)."""
        rng, corpus = self.rng, self.corpus
        seeds = rng.integers(0, len(corpus.names), count)
        rows = corpus.rows[seeds].copy()
        lengths = corpus.lengths[seeds].copy()
        op = rng.random(count)
        self._random_frames(rows, lengths, np.flatnonzero(op < 0.05))
        mutated = np.flatnonzero(op >= 0.05)
        for _ in range(2):
            chosen = mutated[rng.random(len(mutated)) < 0.45]
            self._edit_fields(rows, lengths, seeds, chosen)
        self._flip_bytes(rows, lengths, mutated[rng.random(len(mutated)) < 0.35])
        self._random_tail(rows, lengths, mutated[rng.random(len(mutated)) < 0.05])
        cut = mutated[rng.random(len(mutated)) < 0.25]
        lengths[cut] = rng.integers(MIN_FRAME, lengths[cut] + 1)
        grow = mutated[rng.random(len(mutated)) < 0.04]
        self._extend(rows, lengths, grow)
        return rows, lengths

    def _random_frames(self, rows, lengths, index) -> None:
        rng = self.rng
        if not len(index):
            return
        rows[index] = rng.integers(0, 256, (len(index), STRIDE), dtype=np.uint8)
        lengths[index] = rng.integers(MIN_FRAME, STRIDE + 1, len(index))
        # most random frames get a plausible ethertype and IP version nibble to get deeper
        plausible = index[rng.random(len(index)) < 0.8]
        types = np.array([ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q])[rng.integers(0, 3, len(plausible))]
        rows[plausible, 12], rows[plausible, 13] = types >> 8, types & 0xFF
        v4 = plausible[types == ETH_P_IP]
        rows[v4, 14] = 0x45
        rows[v4, 20] = 0  # not a fragment
        rows[v4, 21] = 0
        rows[v4, 23] = np.array([6, 17, 4, 41])[rng.integers(0, 4, len(v4))]
        v6 = plausible[types == ETH_P_IPV6]
        rows[v6, 14] = 0x60
        rows[v6, 20] = np.array([6, 17, 0, 60, 51, 4, 41])[rng.integers(0, 7, len(v6))]

    def _edit_fields(self, rows, lengths, seeds, index) -> None:
        corpus, rng = self.corpus, self.rng
        index = index[corpus.field_count[seeds[index]] > 0]
        if not len(index):
            return
        seed = seeds[index]
        pick = corpus.field_start[seed] + (rng.random(len(index)) * corpus.field_count[seed]
                                           ).astype(np.int64)
        offset, kind = corpus.field_offset[pick], corpus.field_kind[pick]
        width = _WIDTHS[kind]
        current = rows[index, offset].astype(np.int64)
        two = width == 2
        current[two] = current[two] << 8 | rows[index[two], offset[two] + 1]
        special = _SPECIALS[kind, (rng.random(len(index)) * _SPECIAL_COUNT[kind]).astype(np.int64)]
        random_value = rng.integers(0, 1 << 16, len(index)) & ((1 << (8 * width)) - 1)
        nudged = (current + rng.integers(-8, 9, len(index))) & ((1 << (8 * width)) - 1)
        mode = rng.random(len(index))
        value = np.where(mode < 0.55, special, np.where(mode < 0.8, random_value, nudged))
        fits = offset + width <= lengths[index]
        one = fits & ~two
        rows[index[one], offset[one]] = value[one]
        both = fits & two
        rows[index[both], offset[both]] = value[both] >> 8
        rows[index[both], offset[both] + 1] = value[both] & 0xFF

    def _flip_bytes(self, rows, lengths, index) -> None:
        rng = self.rng
        for _ in range(3):
            if not len(index):
                return
            position = (rng.random(len(index)) * lengths[index]).astype(np.int64)
            rows[index, position] ^= rng.integers(1, 256, len(index), dtype=np.uint8)
            index = index[rng.random(len(index)) < 0.5]

    def _random_tail(self, rows, lengths, index) -> None:
        rng = self.rng
        for row in index.tolist():  # few rows: 5% of mutated ones
            start = int(rng.integers(MIN_FRAME, lengths[row] + 1))
            rows[row, start : lengths[row]] = rng.integers(0, 256, lengths[row] - start)

    def _extend(self, rows, lengths, index) -> None:
        rng = self.rng
        for row in index.tolist():
            end = min(STRIDE, int(lengths[row]) + int(rng.integers(1, 65)))
            rows[row, lengths[row] : end] = rng.integers(0, 256, end - lengths[row])
            lengths[row] = end


# ---------------------------------------------------------------------------------------------
# BPF_PROG_TEST_RUN over a batch
# ---------------------------------------------------------------------------------------------


class BatchRunner:
    """Runs a program once per frame of a batch; one opts struct, buffers are numpy rows."""

    def __init__(self, prog_fd: int) -> None:
        self.prog_fd = prog_fd
        self.opts = libbpf.BpfTestRunOpts(sz=ctypes.sizeof(libbpf.BpfTestRunOpts), repeat=1)
        self.run_seconds = 0.0

    def run(self, rows: np.ndarray, lengths: np.ndarray):
        """-> (verdicts, output rows (n, OUT_STRIDE), output lengths)."""
        count = len(lengths)
        rows = np.ascontiguousarray(rows)
        out = np.zeros((count, OUT_STRIDE), np.uint8)
        verdicts = np.zeros(count, np.int64)
        out_lengths = np.zeros(count, np.int64)
        opts, prog_fd = self.opts, self.prog_fd
        opts_ref = ctypes.byref(opts)
        test_run = libbpf.LIB.bpf_prog_test_run_opts
        in_base, out_base = rows.ctypes.data, out.ctypes.data
        lengths_list = lengths.tolist()
        results = [(0, 0)] * count
        started = time.perf_counter()
        for index in range(count):
            opts.data_in = in_base + index * STRIDE
            opts.data_out = out_base + index * OUT_STRIDE
            opts.data_size_in = lengths_list[index]
            opts.data_size_out = OUT_STRIDE
            ret = test_run(prog_fd, opts_ref)
            if ret < 0:
                libbpf.check(ret, f"BPF_PROG_TEST_RUN of a {lengths_list[index]}-byte frame")
            results[index] = (opts.retval, opts.data_size_out)
        self.run_seconds += time.perf_counter() - started
        verdicts[:], out_lengths[:] = np.array(results, np.int64).T if count else ((), ())
        return verdicts, out, out_lengths


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

MAX_EXAMPLES = 5  # failing / finding packets kept per kind


@dataclass
class FuzzReport:
    role: str
    packets: int = 0
    batches: int = 0
    skipped: int = 0  # generated frames not run (skip_findings)
    seconds: float = 0.0
    run_seconds: float = 0.0  # inside BPF_PROG_TEST_RUN calls (incl. the ctypes call)
    outcomes: Counter = field(default_factory=Counter)  # datapath counters
    expected_outcomes: Counter = field(default_factory=Counter)  # reference parser
    verdicts: Counter = field(default_factory=Counter)
    findings: Counter = field(default_factory=Counter)
    finding_examples: dict = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)
    failure_examples: dict = field(default_factory=dict)
    flows_checked: int = 0
    aggregates_checked: int = 0

    def fail(self, kind: str, detail: str, frame: bytes | None = None) -> None:
        self.failures[kind] += 1
        examples = self.failure_examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"detail": detail, "frame": frame.hex() if frame else None})

    def fail_many(self, kind: str, count: int) -> None:
        """Count `count` more failures of `kind` without examples."""
        if count > 0:
            self.failures[kind] += count

    def found(self, kind: str, frame: bytes) -> None:
        self.findings[kind] += 1
        examples = self.finding_examples.setdefault(kind, [])
        if len(examples) < 2:
            examples.append(frame.hex())

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {
            "role": self.role,
            "packets": self.packets,
            "batches": self.batches,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "packets_per_s": round(self.packets / self.seconds) if self.seconds else 0,
            "test_run_packets_per_s": (round(self.packets / self.run_seconds)
                                       if self.run_seconds else 0),
            "outcomes": dict(self.outcomes),
            "expected_outcomes": dict(self.expected_outcomes),
            "verdicts": dict(self.verdicts),
            "flows_checked": self.flows_checked,
            "aggregates_checked": self.aggregates_checked,
            "failures": dict(self.failures),
            "failure_examples": self.failure_examples,
            "findings": dict(self.findings),
            "finding_examples": self.finding_examples,
        }


def _key_set(keys: np.ndarray) -> set[bytes]:
    raw = np.ascontiguousarray(keys).tobytes()
    size = FLOW_KEY_DTYPE.itemsize
    return {raw[i : i + size] for i in range(0, len(raw), size)}


def _stat_totals(pin_dir, names: tuple[str, ...]) -> np.ndarray:
    role = "lb" if names is LB_STATS else "server"
    return stat_totals(pin_dir, role)[: len(names)]


def _frame(rows: np.ndarray, lengths: np.ndarray, index: int) -> bytes:
    return rows[index, : lengths[index]].tobytes()


def _unchanged(rows, lengths, out, out_lengths) -> np.ndarray:
    """Per frame: the program's output is the input, byte for byte."""
    inside = np.arange(STRIDE)[None, :] < lengths[:, None]
    return ~((out[:, :STRIDE] != rows) & inside).any(axis=1) & (out_lengths == lengths)


# ---------------------------------------------------------------------------------------------
# targets: one per XDP program
# ---------------------------------------------------------------------------------------------


class ServerTarget:
    """The server program: every frame XDP_PASS and unchanged; a flow entry exactly for the
    frames the reference tracks; aggregates' active counts never negative and equal to the
    open flows at levels 1-3; outcome counters equal to the reference's outcomes."""

    role = "server"
    outcome_names = SERVER_OUTCOME_NAMES
    defines = {"MAX_FLOWS": 262144, "MAX_AGGREGATES": 262144}

    def __init__(self, pin_dir, rng: np.random.Generator) -> None:
        self.pin_dir = pin_dir
        self.rng = rng
        loader.init_server_maps(pin_dir)
        self.flows = PinnedMap(pin_dir / "flows", FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE)
        self.aggregates = PinnedMap(pin_dir / "aggregates", AGG_KEY_DTYPE, AGG_VALUE_DTYPE)
        self.classes = PinnedMap(pin_dir / "class_levels", CLASS_KEY_DTYPE, CLASS_LEVEL_DTYPE)
        self.known: set[bytes] = set()
        self.families: dict[bytes, int] = {}  # flow key -> 1 seen from IPv4, 2 IPv6, 3 both
        self.reported: set[bytes] = set()

    def collided_reported(self, keys: np.ndarray) -> np.ndarray:
        """Per key: already reported as an IPv4/IPv6 collision (then marked reported)."""
        rows = _rows_bytes(keys)
        seen = np.array([row in self.reported for row in rows], bool)
        self.reported.update(row for row, family in zip(rows, keys, strict=True)
                             if self.families.get(row, 1) == 3)
        return seen

    def close(self) -> None:
        for pinned in (self.flows, self.aggregates, self.classes):
            pinned.close()

    def before_batch(self, batch_index: int, epoch_batches: int) -> None:
        """New class levels every batch (live flows move between aggregates); both tables
        emptied together every epoch (keeps them far from full)."""
        if batch_index % epoch_batches == 0:
            self.flows.clear()
            self.aggregates.clear()
            self.known = set()
            self.families = {}
            self.reported = set()
        keys = np.zeros(len(VIP_SERVICES), CLASS_KEY_DTYPE)
        for index, (vip, port, proto) in enumerate(VIP_SERVICES):
            keys[index]["vip_addr"] = np.frombuffer(_mapped(vip), np.uint8)
            keys[index]["vip_port"], keys[index]["proto"] = port, proto
        levels = self.rng.integers(0, 4, len(keys)).astype(np.uint8)
        self.classes.update_batch(keys, levels)
        loader.init_server_maps(self.pin_dir, default_level=int(self.rng.integers(0, 4)))

    def check(self, report: FuzzReport, parsed: list[Parsed], outcomes: list[str], rows, lengths,
              verdicts, out, out_lengths) -> None:
        bad_verdict = np.flatnonzero(verdicts != XDP_PASS)
        for index in bad_verdict[:MAX_EXAMPLES].tolist():
            report.fail("verdict", f"{VERDICT_NAMES[verdicts[index]]} instead of XDP_PASS",
                        _frame(rows, lengths, index))
        report.fail_many("verdict", len(bad_verdict) - MAX_EXAMPLES)
        changed = np.flatnonzero(~_unchanged(rows, lengths, out, out_lengths))
        for index in changed[:MAX_EXAMPLES].tolist():
            report.fail("packet_changed", "output differs from input", _frame(rows, lengths, index))
        report.fail_many("packet_changed", len(changed) - MAX_EXAMPLES)

        keys, values = self.flows.items()
        table = _key_set(keys)
        expected = {p.key for p in parsed if p.outcome == "tracked"}
        for key in expected - table:
            report.fail("tracked_flow_missing", f"no flow entry for key {key.hex()}")
        for key in table - self.known - expected:
            report.fail("unexpected_flow", f"flow entry {key.hex()} for no tracked frame")
        self.known = table
        report.flows_checked += len(table)

        agg_keys, agg_values = self.aggregates.items()
        active = agg_values["active_flows"].sum(axis=1)
        for index in np.flatnonzero(active < 0)[:MAX_EXAMPLES].tolist():
            report.fail("active_flows_negative",
                        f"aggregate {agg_keys[index].tobytes().hex()} active {int(active[index])}")
        is_open = (values["level"] != 0) & (values["closed"] == 0)
        if int(active.sum()) != int(is_open.sum()):
            report.fail("active_flows_total_mismatch",
                        f"aggregates count {int(active.sum())} active flows, the flow table "
                        f"has {int(is_open.sum())} open flows at levels 1-3")
        for item in parsed:
            if item.outcome == "tracked":
                self.families[item.key] = self.families.get(item.key, 0) | (1 << item.is_v6)
        family = np.array([self.families.get(key, 1) for key in _rows_bytes(keys)], np.int64)
        collided = family == 3
        for index in np.flatnonzero(collided & ~self.collided_reported(keys))[:MAX_EXAMPLES]:
            report.fail("ipv4_ipv6_same_flow_key",
                        f"flow {keys[index].tobytes().hex()} was tracked from IPv4 and IPv6 "
                        "frames (IPv4-mapped IPv6 addresses): its aggregates use both masks")
        # exact count per aggregate, leaving out the aggregates a collided flow touches
        expected_active = _open_flows_per_aggregate(keys[is_open & ~collided],
                                                     values["level"][is_open & ~collided],
                                                     family[is_open & ~collided] == 2)
        skip: set[bytes] = set()  # every aggregate a collided flow may have moved through
        for level in (1, 2, 3):
            for v6 in (False, True):
                count = int(collided.sum())
                skip |= set(_open_flows_per_aggregate(keys[collided], np.full(count, level),
                                                      np.full(count, v6)))
        counted = dict(zip(_rows_bytes(agg_keys), active.tolist(), strict=True))
        for agg_key in (set(expected_active) | set(counted)) - skip:
            want, got = expected_active.get(agg_key, 0), counted.get(agg_key, 0)
            if want != got:
                report.fail("active_flows_per_aggregate_mismatch",
                            f"aggregate {agg_key.hex()}: active {got}, open flows {want}")
        report.aggregates_checked += len(agg_keys)

    def classify(self, parsed: Parsed) -> str:
        return parsed.outcome

    def classify_batch(self, parsed: list[Parsed]) -> list[str]:
        return [item.outcome for item in parsed]


def _rows_bytes(records: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(records).tobytes()
    size = records.dtype.itemsize
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _open_flows_per_aggregate(keys: np.ndarray, levels: np.ndarray, is_v6: np.ndarray) -> Counter:
    """agg_key bytes -> open flows it must count: the flow key ANDed with the default mask of
    (level, family of the frames that made the flow)."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), FLOW_KEY_DTYPE.itemsize)
    is_v6 = is_v6.astype(np.int64)
    masked = raw & mask_byte_table()[levels.astype(np.int64) * 2 + is_v6]
    agg = np.zeros((len(keys), AGG_KEY_DTYPE.itemsize), np.uint8)
    agg[:, : FLOW_KEY_DTYPE.itemsize] = masked
    agg[:, FLOW_KEY_DTYPE.itemsize] = levels
    return Counter(_rows_bytes(agg.view(AGG_KEY_DTYPE).reshape(-1)))


def _mapped(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return ip.packed if ip.version == 6 else V4_MAPPED + ip.packed


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def diagnose_outcomes(prog_fd: int, pin_dir, target, parsed: list[Parsed], rows, lengths,
                      report: FuzzReport) -> None:
    """After a batch whose counters disagree with the reference: rerun its frames one by one,
    reading the counters after each, and report the frames whose outcome differs (outcomes do
    not depend on earlier frames: same config, tables far from full)."""
    names = target.outcome_names
    runner = BatchRunner(prog_fd)
    before = _stat_totals(pin_dir, names)
    for index, item in enumerate(parsed):
        runner.run(rows[index : index + 1], lengths[index : index + 1])
        after = _stat_totals(pin_dir, names)
        moved = np.flatnonzero(after - before)
        before = after
        got = names[int(moved[0])] if len(moved) == 1 else f"{len(moved)} outcomes"
        want = target.classify(item)
        if got != want:
            report.fail("outcome_mismatch", f"datapath {got}, reference {want}",
                        _frame(rows, lengths, index))


@contextmanager
def scratch_target(role: str, seed: int = 1):
    """A scratch-loaded program of `role` (maps pinned in a scratch folder, removed after) and
    its fuzz target, set up with the fuzz VIPs/backends/classes."""
    targets = {"server": ServerTarget, "lb": LbTarget}
    if role not in targets:
        raise ConnpubError(f"unknown role {role!r}: expected server or lb")
    target_cls = targets[role]
    pin_dir = loader.scratch_pin_dir(f"fuzz-{role}")
    program = loader.compile_program(role, pin_dir, target_cls.defines)
    target = None
    try:
        target = target_cls(pin_dir, np.random.default_rng(seed))
        yield program, target
    finally:
        if target is not None:
            target.close()
        program.close()
        loader.remove_pins(pin_dir)


def fuzz_datapath(role: str = "server", packets: int = 20_000, batch: int = 10_000,
                  seed: int = 1, epoch_batches: int = 5, skip_findings: tuple[str, ...] = (),
                  progress: Progress | None = None) -> FuzzReport:
    """Fuzz one XDP program (scratch-loaded, not attached) with `packets` generated frames.
    skip_findings: frames with one of these FINDINGS are generated but not run (to keep a
    known, reported bug from masking others)."""
    loader.check_privileges()
    if role not in ("server", "lb"):
        raise ConnpubError(f"unknown role {role!r}: expected server or lb")
    if packets < 1 or batch < 1:
        raise ConnpubError("--packets and --batch must be >= 1")
    unknown = set(skip_findings) - set(FINDINGS)
    if unknown:
        raise ConnpubError(f"unknown findings {sorted(unknown)}: expected some of {FINDINGS}")
    skip = frozenset(skip_findings)
    corpus = Corpus.from_frames(build_corpus())
    mutator = Mutator(corpus, seed)
    report = FuzzReport(role)
    started = time.perf_counter()
    with scratch_target(role, seed + 1) as (program, target):
        pin_dir = program.pin_dir
        runner = BatchRunner(program.prog_fd)
        names = target.outcome_names
        done = 0
        while done < packets:
            count = min(batch, packets - done)
            target.before_batch(report.batches, epoch_batches)
            rows, lengths = mutator.batch(count)
            parsed = [reference_parse(rows[i, : lengths[i]].tobytes()) for i in range(count)]
            if skip:
                keep = [i for i, p in enumerate(parsed) if not skip.intersection(p.findings)]
                report.skipped += count - len(keep)
                rows, lengths = rows[keep], lengths[keep]
                parsed = [parsed[i] for i in keep]
                count = len(keep)
            before = _stat_totals(pin_dir, names)
            verdicts, out, out_lengths = runner.run(rows, lengths)
            moved = _stat_totals(pin_dir, names) - before
            outcomes = target.classify_batch(parsed)
            expected = Counter(outcomes)
            for name, value in zip(names, moved.tolist(), strict=True):
                if value:
                    report.outcomes[name] += value
            report.expected_outcomes.update(expected)
            report.verdicts.update(VERDICT_NAMES[v] if 0 <= v < 5 else str(v)
                                   for v in verdicts.tolist())
            if int(moved.sum()) != count:
                report.fail("outcomes_do_not_add_up",
                            f"{int(moved.sum())} outcomes counted for {count} frames")
            if any(moved[i] != expected.get(name, 0) for i, name in enumerate(names)):
                if report.failures["outcome_mismatch"] < MAX_EXAMPLES:
                    diagnose_outcomes(program.prog_fd, pin_dir, target, parsed, rows, lengths,
                                      report)
                else:  # enough examples: count the frames the histograms disagree on
                    differ = sum(abs(int(moved[i]) - expected.get(name, 0))
                                 for i, name in enumerate(names))
                    report.fail_many("outcome_mismatch", differ // 2)
            for index, item in enumerate(parsed):
                if item.findings and item.outcome == "tracked":
                    for finding in item.findings:
                        report.found(finding, _frame(rows, lengths, index))
            target.check(report, parsed, outcomes, rows, lengths, verdicts, out, out_lengths)
            done += count
            report.packets = done
            report.batches += 1
            if progress:
                progress(done, packets)
    report.seconds = time.perf_counter() - started
    report.run_seconds = runner.run_seconds
    return report


LB_MAC, LB_GATEWAY_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
LB_ADDR4, LB_ADDR6 = "10.103.0.1", "fd00:103::1"
LB_MTU = 1500
# backend id -> (address, next-hop MAC, service); service 1 (V4_NO_BACKEND) has no backend
LB_BACKENDS = {1: ("10.103.0.101", "02:00:00:00:01:01", 0), 2: ("fd00:103::66", None, 2)}
LB_VIPS = ((V4, 80, "tcp", 0), (V4, 53, "udp", 0), (V6, 80, "tcp", 2), (V6, 53, "udp", 2),
           (V4_NO_BACKEND, 80, "tcp", 1))
LB_DROP_OUTCOMES = ("no_backend", "too_big", "encap_failed")


class LbTarget:
    """The LB program: XDP_TX exactly for the frames the reference forwards (VIP, not
    tunnelled, whole inner packet present, a backend, fits the MTU) with a byte-exact
    encapsulation; XDP_DROP for no backend / too big; XDP_PASS with the frame unchanged for
    everything else; a connection entry for every forwarded tuple and none for other frames."""

    role = "lb"
    outcome_names = LB_OUTCOME_NAMES
    defines = {"MAGLEV_SIZE": 251, "MAX_CONNS": 262144, "MAX_SERVICES": 4, "MAX_BACKENDS": 16}

    def __init__(self, pin_dir, rng: np.random.Generator) -> None:
        self.pin_dir, self.rng, self.lbctl = pin_dir, rng, lbctl
        lbctl.init_lb_maps(pin_dir, lb_addr4=LB_ADDR4, lb_addr6=LB_ADDR6, src_mac=LB_MAC,
                           gateway_mac=LB_GATEWAY_MAC, mtu=LB_MTU, initial_lease_s=3600.0)
        for backend_id, (address, mac, service) in LB_BACKENDS.items():
            lbctl.add_backend(pin_dir, backend_id, address, services=(service,), mac=mac)
        service_backend = {service: backend_id
                           for backend_id, (_, _, service) in LB_BACKENDS.items()}
        self.vips: dict[bytes, int | None] = {}  # class key bytes -> backend id or None
        for vip, port, proto, service in LB_VIPS:
            lbctl.add_vip(pin_dir, vip, port, proto, service=service)
            key = _mapped(vip) + port.to_bytes(2, "big") + bytes((lbctl.PROTOCOLS[proto],))
            self.vips[key] = service_backend.get(service)
        with lbctl.open_map(pin_dir, "vip_filter") as vip_filter:
            _, counts = vip_filter.items()
            self.filter_bits = vip_filter.max_entries.bit_length() - 1
        self.filter_counts = np.asarray(counts).reshape(-1)
        self.backend_addr = {backend_id: lbctl.address_bytes(address)[0].tobytes()
                             for backend_id, (address, _, _) in LB_BACKENDS.items()}
        self.backend_mac = {backend_id: bytes.fromhex((mac or LB_GATEWAY_MAC).replace(":", ""))
                            for backend_id, (_, mac, _) in LB_BACKENDS.items()}
        self.known: set[bytes] = set()

    def close(self) -> None:
        pass

    def before_batch(self, batch_index: int, epoch_batches: int) -> None:
        """Every epoch: empty the connection table; odd epochs use a 1 ms initial lease (flows
        are re-picked on their next packet: lease-miss and SYN-reuse paths), even ones 1 h."""
        if batch_index % epoch_batches:
            return
        with self.lbctl.open_map(self.pin_dir, "conns") as conns:
            conns.clear()
        self.known = set()
        odd = (batch_index // epoch_batches) % 2
        self.lbctl.set_config(self.pin_dir, initial_lease_s=0.001 if odd else 3600.0)

    def _maybe_vip(self, class_keys: list[bytes]) -> np.ndarray:
        """The VIP pre-filter's answer (vip_filter slot holds a VIP) for each class key."""
        if not class_keys:
            return np.zeros(0, bool)
        keys = np.frombuffer(b"".join(key + b"\0" for key in class_keys), CLASS_KEY_DTYPE)
        return self.filter_counts[self.lbctl.vip_filter_slots(keys, self.filter_bits)] > 0

    def classify(self, parsed: Parsed) -> str:
        return self.classify_batch([parsed])[0]

    def classify_batch(self, parsed: list[Parsed]) -> list[str]:
        """The LB outcome of every frame: its parse outcome, then (in the program's order)
        tunnelled, not_vip (pre-filter), truncated (inner packet incomplete), not_vip (VIP
        table), no_backend, too_big, forwarded."""
        candidates = [i for i, p in enumerate(parsed) if p.outcome == "tracked"
                      and not p.encapsulated]
        maybe = self._maybe_vip([parsed[i].key[16:32] + parsed[i].key[34:37]
                                 for i in candidates])
        outcomes = [p.outcome if p.outcome != "tracked" else "tunnelled" for p in parsed]
        for index, is_maybe in zip(candidates, maybe.tolist(), strict=True):
            outcomes[index] = self._vip_outcome(parsed[index]) if is_maybe else "not_vip"
        return outcomes

    def _vip_outcome(self, parsed: Parsed) -> str:
        class_key = parsed.key[16:32] + parsed.key[34:37]
        if parsed.l3_offset + parsed.l3_len > parsed.frame_len:
            return "truncated"
        if class_key not in self.vips:
            return "not_vip"
        backend_id = self.vips[class_key]
        if backend_id is None:
            return "no_backend"
        outer_len = 40 if ":" in LB_BACKENDS[backend_id][0] else 20
        if parsed.l3_len + outer_len > LB_MTU:
            return "too_big"
        return "forwarded"

    def expected_verdict(self, outcome: str) -> int:
        if outcome == "forwarded":
            return XDP_TX
        return XDP_DROP if outcome in LB_DROP_OUTCOMES else XDP_PASS

    def check(self, report: FuzzReport, parsed: list[Parsed], outcomes: list[str], rows, lengths,
              verdicts, out, out_lengths) -> None:
        expected = np.array([self.expected_verdict(o) for o in outcomes], np.int64)
        wrong = np.flatnonzero(verdicts != expected)
        for index in wrong[:MAX_EXAMPLES].tolist():
            got = int(verdicts[index])
            report.fail("verdict", f"{VERDICT_NAMES[got] if 0 <= got < 5 else got}, reference "
                        f"{outcomes[index]} ({VERDICT_NAMES[expected[index]]})",
                        _frame(rows, lengths, index))
        report.fail_many("verdict", len(wrong) - MAX_EXAMPLES)
        passed = np.flatnonzero((verdicts == XDP_PASS) & (expected == XDP_PASS))
        same = _unchanged(rows[passed], lengths[passed], out[passed], out_lengths[passed])
        for index in passed[~same][:MAX_EXAMPLES].tolist():
            report.fail("packet_changed", "XDP_PASS frame changed", _frame(rows, lengths, index))
        report.fail_many("packet_changed", int((~same).sum()) - MAX_EXAMPLES)
        for index in np.flatnonzero((verdicts == XDP_TX) & (expected == XDP_TX)).tolist():
            problem = self._encapsulation_problem(parsed[index], rows[index], int(lengths[index]),
                                                  out[index], int(out_lengths[index]))
            if problem:
                report.fail("bad_encapsulation", problem, _frame(rows, lengths, index))

        with self.lbctl.open_map(self.pin_dir, "conns") as conns:
            table = _key_set(conns.keys())
        forwarded = {p.key for p, o in zip(parsed, outcomes, strict=True) if o == "forwarded"}
        allowed = forwarded | {p.key for p, o in zip(parsed, outcomes, strict=True)
                               if o == "too_big"}  # picked before the MTU check: documented
        for key in forwarded - table:
            report.fail("forwarded_flow_missing", f"no connection entry for {key.hex()}")
        for key in table - self.known - allowed:
            report.fail("unexpected_connection", f"connection entry {key.hex()} for no VIP frame")
        self.known = table
        report.flows_checked += len(table)

    def _encapsulation_problem(self, parsed: Parsed, row, length: int, out_row,
                               out_length: int) -> str | None:
        class_key = parsed.key[16:32] + parsed.key[34:37]
        backend_id = self.vips[class_key]
        outer_v6 = ":" in LB_BACKENDS[backend_id][0]
        outer_len = 40 if outer_v6 else 20
        want_len = length - parsed.l3_offset + 14 + outer_len
        if out_length != want_len:
            return f"output {out_length} bytes, expected {want_len}"
        frame = out_row[:out_length].tobytes()
        inner = row[parsed.l3_offset : length].tobytes()
        if frame[14 + outer_len :] != inner:
            return "inner packet changed"
        if frame[:6] != self.backend_mac[backend_id] or frame[6:12] != bytes.fromhex(
                LB_MAC.replace(":", "")):
            return "wrong Ethernet addresses"
        inner_proto = IPPROTO_IPV6 if parsed.is_v6 else IPPROTO_IPIP
        outer = frame[14 : 14 + outer_len]
        if outer_v6:
            fields = (frame[12:14] == b"\x86\xdd", outer[0] >> 4 == 6,
                      int.from_bytes(outer[4:6], "big") == parsed.l3_len,
                      outer[6] == inner_proto, outer[24:40] == self.backend_addr[backend_id])
        else:
            fields = (frame[12:14] == b"\x08\x00", outer[0] == 0x45,
                      int.from_bytes(outer[2:4], "big") == parsed.l3_len + 20,
                      outer[9] == inner_proto, outer[16:20] == self.backend_addr[backend_id][12:],
                      _ipv4_checksum(outer) == 0)
        names = ("ethertype", "version", "length", "protocol", "destination", "checksum")
        bad = [name for name, ok in zip(names, fields, strict=False) if not ok]
        return f"outer header wrong: {', '.join(bad)}" if bad else None


def _ipv4_checksum(header: bytes) -> int:
    words = np.frombuffer(header, ">u2").astype(np.int64)
    total = int(words.sum())
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


# ---------------------------------------------------------------------------------------------
# receive path: mutations of publishing-protocol datagrams (tests/test_fuzz_receive.py)
# ---------------------------------------------------------------------------------------------

WIRE_MUTATIONS = ("random", "random_body", "bit_flips", "resize", "splice", "header_field",
                  "replay")
# (offset, width) of the header fields of docs/protocol.md: magic, version, type, reserved,
# sender, sequence, timestamp, entry count, reserved2
_WIRE_HEADER_FIELDS = ((0, 4), (4, 1), (5, 1), (6, 2), (8, 4), (12, 8), (20, 8), (28, 2), (30, 2))
_WIRE_EDGE_VALUES = np.array([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0xFFFF, 0x43505542, 2**32 - 1,
                              2**63, 2**64 - 1], np.uint64)
MAX_DATAGRAM = 2048


def mutate_wire(rng: np.random.Generator, valid: list[bytes], count: int
                ) -> tuple[list[bytes], np.ndarray]:
    """`count` datagrams derived from `valid` ones (random bytes, random bodies behind a valid
    header, bit flips, truncation/extension, splices of two packets, header fields set to edge
    values, exact replays) and the index into WIRE_MUTATIONS of each. Built with numpy."""
    if not valid:
        raise ConnpubError("mutate_wire needs at least one valid packet")
    rows = np.zeros((len(valid), MAX_DATAGRAM), np.uint8)
    sizes = np.array([len(packet) for packet in valid], np.int64)
    if sizes.max() > MAX_DATAGRAM:
        raise ConnpubError(f"valid packets must be <= {MAX_DATAGRAM} bytes")
    for index, packet in enumerate(valid):
        rows[index, : len(packet)] = np.frombuffer(packet, np.uint8)
    base = rng.integers(0, len(valid), count)
    out, lengths = rows[base].copy(), sizes[base].copy()
    kind = rng.integers(0, len(WIRE_MUTATIONS), count)
    noise = rng.integers(0, 256, (count, MAX_DATAGRAM), dtype=np.uint8)

    pick = kind == 0  # random bytes, random length
    out[pick] = noise[pick]
    lengths[pick] = rng.integers(0, 1500, int(pick.sum()))
    pick = np.flatnonzero(kind == 1)  # a valid header, random rest of random length
    out[pick, 32:] = noise[pick, 32:]
    lengths[pick] = rng.integers(32, 1500, len(pick))
    pick = np.flatnonzero(kind == 2)  # 1-8 bit flips
    for round_index in range(8):
        chosen = pick[rng.random(len(pick)) < (1.0 if round_index == 0 else 0.5)]
        position = (rng.random(len(chosen)) * lengths[chosen] * 8).astype(np.int64)
        out[chosen, position // 8] ^= (1 << (position % 8)).astype(np.uint8)
    pick = np.flatnonzero(kind == 3)  # cut or grow
    lengths[pick] = np.minimum(rng.integers(0, lengths[pick] + 100), MAX_DATAGRAM)
    pick = np.flatnonzero(kind == 4)  # head of this packet + tail of another
    other = rng.integers(0, len(valid), len(pick))
    for row, donor in zip(pick.tolist(), other.tolist(), strict=True):
        cut = int(rng.integers(0, lengths[row] + 1))
        tail = rows[donor, cut : sizes[donor]]
        end = min(MAX_DATAGRAM, cut + len(tail))
        out[row, cut:end] = tail[: end - cut]
        lengths[row] = end
    pick = np.flatnonzero(kind == 5)  # one header field set to an edge value
    field_index = rng.integers(0, len(_WIRE_HEADER_FIELDS), len(pick))
    values = _WIRE_EDGE_VALUES[rng.integers(0, len(_WIRE_EDGE_VALUES), len(pick))]
    for row, which, value in zip(pick.tolist(), field_index.tolist(), values.tolist(),
                                 strict=True):
        offset, width = _WIRE_HEADER_FIELDS[which]
        masked = value & ((1 << (8 * width)) - 1)
        out[row, offset : offset + width] = np.frombuffer(masked.to_bytes(width, "big"), np.uint8)
    # kind 6: exact replay, nothing to do
    return [out[i, : lengths[i]].tobytes() for i in range(count)], kind
