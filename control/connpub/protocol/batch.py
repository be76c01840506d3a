"""The packet encoder (the only one: protocol.wire's encode_publish / encode_directive and
Encoder return its packets as bytes): every packet of a cycle is one row of a single numpy
buffer (headers built at once, entries copied in one go, one HMAC call per packet), so the
sender can hand runs of rows to the kernel without building a bytes object per packet."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from connpub.datapath.abi import WIRE_HEADER_DTYPE
from connpub.protocol.layout import (
    ENTRY_DTYPES,
    HEADER_LEN,
    MAGIC,
    TAG_LEN,
    VERSION,
    PacketType,
    max_entries_per_packet,
)

if TYPE_CHECKING:
    from connpub.protocol.wire import Encoder


@dataclass(frozen=True)
class PacketBatch:
    """`count` packets as rows of `buffer` (count, row_len); every row is row_len bytes long
    except the last, which is last_len bytes (the rest of its row is unused)."""

    buffer: np.ndarray
    row_len: int
    last_len: int

    @property
    def count(self) -> int:
        return self.buffer.shape[0]

    @property
    def wire_bytes(self) -> int:
        return 0 if self.count == 0 else (self.count - 1) * self.row_len + self.last_len

    def packet(self, index: int) -> bytes:
        length = self.last_len if index == self.count - 1 else self.row_len
        return self.buffer[index, :length].tobytes()

    def packets(self) -> list[bytes]:
        return [self.packet(i) for i in range(self.count)]

    def select(self, rows: np.ndarray) -> PacketBatch:
        """A batch of some of the packets (in order); the last packet keeps its length."""
        rows = np.asarray(rows, np.int64)
        if self.count and len(rows) and rows[-1] == self.count - 1:
            last_len = self.last_len
        else:
            last_len = self.row_len
        return PacketBatch(np.ascontiguousarray(self.buffer[rows]), self.row_len, last_len)


def hmac_sha256_pads(key: bytes) -> tuple:
    """HMAC-SHA256 (RFC 2104) split at the key: the inner and outer hash states after the
    padded key. tag = H(outer || H(inner || message)); copying the two states per message
    costs ~40 % less than a one-shot hmac.digest (measured: 55k 1.3 kB packets, 0.12 s vs
    0.19 s), which re-derives the pads every call."""
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)),
            hashlib.sha256(bytes(b ^ 0x5C for b in key)))


def encode_publish_batch(entries: np.ndarray, encoder: Encoder, timestamp_ns: int) -> PacketBatch:
    """Encode one publish cycle with the encoder's sender, key, MTU and sequence counter (the
    counter moves on by the packet count, as Encoder.publish)."""
    batch = encode_batch(PacketType.PUBLISH, entries, sender_id=encoder.sender_id,
                         first_sequence=encoder.next_sequence, timestamp_ns=timestamp_ns,
                         key=encoder.key, mtu=encoder.mtu, ip_version=encoder.ip_version)
    encoder.next_sequence += batch.count
    return batch


def encode_batch(ptype: int, entries: np.ndarray, *, sender_id: int, first_sequence: int,
                 timestamp_ns: int, key: bytes, mtu: int, ip_version: int = 6) -> PacketBatch:
    """Entries of packet type `ptype` (PUBLISH or DIRECTIVE records) -> as many packets as
    needed to stay within `mtu`; packet i carries sequence first_sequence + i; no entries ->
    no packets."""
    dtype = ENTRY_DTYPES[ptype]
    if entries.dtype != dtype:
        entries = entries.astype(dtype)
    size = dtype.itemsize
    per_packet = max_entries_per_packet(size, mtu, ip_version)
    total = len(entries)
    row_len = HEADER_LEN + per_packet * size + TAG_LEN
    if total == 0:
        return PacketBatch(np.zeros((0, row_len), np.uint8), row_len, row_len)
    count = -(-total // per_packet)
    full = total // per_packet
    remainder = total - full * per_packet
    headers = np.zeros(count, WIRE_HEADER_DTYPE)
    headers["magic"] = MAGIC
    headers["version"] = VERSION
    headers["type"] = ptype
    headers["sender_id"] = sender_id
    headers["sequence"] = first_sequence + np.arange(count, dtype=np.uint64)
    headers["timestamp_ns"] = timestamp_ns
    headers["entry_count"] = per_packet
    if remainder:
        headers["entry_count"][-1] = remainder
    buffer = np.empty((count, row_len), np.uint8)
    buffer[:, :HEADER_LEN] = headers.view(np.uint8).reshape(count, HEADER_LEN)
    raw = np.ascontiguousarray(entries).view(np.uint8).reshape(total, size)
    body_end = HEADER_LEN + per_packet * size
    if full:
        buffer[:full, HEADER_LEN:body_end] = raw[: full * per_packet].reshape(full, -1)
    last_body = body_end
    if remainder:
        last_body = HEADER_LEN + remainder * size
        buffer[-1, HEADER_LEN:last_body] = raw[full * per_packet :].reshape(-1)
    flat = memoryview(buffer).cast("B")
    inner_start, outer_start = hmac_sha256_pads(key)
    for index in range(count):
        start = index * row_len
        end = start + (last_body if index == count - 1 else body_end)
        inner = inner_start.copy()
        inner.update(flat[start:end])
        outer = outer_start.copy()
        outer.update(inner.digest())
        flat[end : end + TAG_LEN] = outer.digest()[:TAG_LEN]
    return PacketBatch(buffer, row_len, last_body + TAG_LEN)
