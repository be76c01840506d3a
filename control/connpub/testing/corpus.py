"""The fuzzer's seed corpus (scapy, built once) and its numpy mutator (docs/fuzzing.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.errors import ConnpubError
from connpub.testing.reference import (
    C4,
    C6,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    FIELD_SPECIALS,
    FIELD_WIDTH,
    LB4,
    LB6,
    MIN_FRAME,
    S4,
    S6,
    STRIDE,
    V4,
    V4_NO_BACKEND,
    V6,
    reference_parse,
)


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


