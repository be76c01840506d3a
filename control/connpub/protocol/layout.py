"""The publishing wire layout (docs/protocol.md): header constants, entry flags, packet types,
entry record types per packet type and how many entries fit an MTU. Shared by the codec
(protocol.wire) and the batch encoder (protocol.batch)."""

from __future__ import annotations

import struct
from enum import IntEnum

import numpy as np

from connpub.datapath.abi import DIRECTIVE_ENTRY_DTYPE, PUBLISH_ENTRY_DTYPE, WIRE_HEADER_DTYPE
from connpub.errors import ConnpubError

MAGIC = 0x43505542  # b"CPUB"
VERSION = 1
HEADER_LEN = WIRE_HEADER_DTYPE.itemsize  # 32
TAG_LEN = 16  # HMAC-SHA256 truncated to its first 16 bytes
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
MIN_KEY_LEN = 16

FLAG_CLOSED = 0x01  # the flow/aggregate is over: the LB may drop it now
FLAG_RENEW = 0x02  # a renewal of a lease the server published before
FLAG_RESYNC = 0x04  # sent in answer to a RESYNC-REQUEST
KNOWN_FLAGS = FLAG_CLOSED | FLAG_RENEW | FLAG_RESYNC

CONFIDENCE_SCALE = 65535  # confidence on the wire is Q0.16: value / 65535

HEADER_STRUCT = struct.Struct(">IBBHIQQHH")
assert HEADER_STRUCT.size == HEADER_LEN


class PacketType(IntEnum):
    PUBLISH = 1  # server -> LB
    DIRECTIVE = 2  # LB -> server
    RESYNC_REQUEST = 3  # LB -> server: "send me one full flow-level publish"


ENTRY_DTYPES: dict[int, np.dtype | None] = {
    PacketType.PUBLISH: PUBLISH_ENTRY_DTYPE,
    PacketType.DIRECTIVE: DIRECTIVE_ENTRY_DTYPE,
    PacketType.RESYNC_REQUEST: None,
}



def max_entries_per_packet(entry_size: int, mtu: int, ip_version: int = 6) -> int:
    """How many entries fit so that IP + UDP + header + entries + tag <= mtu."""
    ip_len = IPV6_HEADER_LEN if ip_version == 6 else IPV4_HEADER_LEN
    room = mtu - ip_len - UDP_HEADER_LEN - HEADER_LEN - TAG_LEN
    count = min(room // entry_size, 0xFFFF)
    if count < 1:
        raise ConnpubError(f"MTU {mtu} is too small for one {entry_size}-byte entry; use >= 576")
    return count
