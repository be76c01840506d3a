"""The datapath parsing contract restated in Python (docs/fuzzing.md): the reference parser the
fuzzer checks the XDP programs against, written from the comments of
bpf/include/parsing_helpers.h, docs/datapath.md and the RFCs, not from the C; and the
addresses the corpus and the targets share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from connpub.datapath.abi import (  # noqa: F401
    AGG_KEY_DTYPE,
    AGG_VALUE_DTYPE,
    CLASS_KEY_DTYPE,
    CLASS_LEVEL_DTYPE,
    FLOW_KEY_DTYPE,
    FLOW_VALUE_DTYPE,
    LB_OUTCOME_NAMES,
    LB_OUTCOMES,
    LB_STATS,
    SERVER_OUTCOME_NAMES,
    SERVER_OUTCOMES,
    SERVER_STATS,
)

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


C4, V4, LB4, S4 = "10.1.0.7", "10.200.0.1", "192.168.50.1", "192.168.60.2"
C6, V6, LB6, S6 = "2001:db8:0:1::7", "fd00:200::1", "fd00:50::1", "fd00:60::2"
V4_NO_BACKEND = "10.200.0.9"  # a VIP whose service has no backend (LB: XDP_DROP)
VIP_SERVICES = ((V4, 80, 6), (V4, 53, 17), (V6, 80, 6), (V6, 53, 17), (V4_NO_BACKEND, 80, 6))
