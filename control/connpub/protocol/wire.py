"""The publishing wire protocol (docs/protocol.md): encode and verify PUBLISH, DIRECTIVE and
RESYNC-REQUEST packets, on numpy structured arrays of entries."""

from __future__ import annotations

import hmac
import os
import stat
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from connpub.datapath.masks import (
    DEFAULT_MASK_SPECS,
    LEVEL_COUNT,
    MaskSpec,
    keys_fit_masks,
    mask_byte_table,
)
from connpub.errors import ConnpubError
from connpub.protocol.batch import encode_batch
from connpub.protocol.layout import (
    CONFIDENCE_SCALE,
    ENTRY_DTYPES,
    FLAG_CLOSED,
    FLAG_RENEW,
    FLAG_RESYNC,
    HEADER_LEN,
    HEADER_STRUCT,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    KNOWN_FLAGS,
    MAGIC,
    MIN_KEY_LEN,
    TAG_LEN,
    UDP_HEADER_LEN,
    VERSION,
    PacketType,
    max_entries_per_packet,
)

_HEADER = HEADER_STRUCT

_PACKET_TYPES = {int(t): t for t in PacketType}


class Reject(StrEnum):
    """Why a packet was rejected. Checked in this order; the first failing check names it."""

    BAD_LENGTH = "bad_length"  # shorter than header+tag, or length != header+count*entry+tag
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_TYPE = "bad_type"  # unknown type, or a type this receiver does not accept
    BAD_PADDING = "bad_padding"  # a reserved/pad byte of the header or of an entry is not zero
    BAD_TAG = "bad_tag"
    BAD_LEVEL = "bad_level"  # entry level >= 4
    BAD_FLAGS = "bad_flags"  # unknown entry flag bits
    BAD_KEY = "bad_key"  # key has bits outside the mask of its level and family
    BAD_BACKEND = "bad_backend"  # PUBLISH entry names another backend than its sender
    LEASE_TOO_LONG = "lease_too_long"  # predicted_remaining_ms above the configured max lease
    REPLAY = "replay"  # sequence already seen or older than the replay window
    QUOTA = "quota"  # sender exceeded its entries-per-second quota


# Entry checks in priority order (lower index wins when one packet fails several).
_ENTRY_REASONS = (
    Reject.BAD_PADDING,
    Reject.BAD_LEVEL,
    Reject.BAD_FLAGS,
    Reject.BAD_KEY,
    Reject.BAD_BACKEND,
    Reject.LEASE_TOO_LONG,
)


# ------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------


def load_key(path: str | os.PathLike) -> bytes:
    """Read the shared HMAC key: a file of hex text (e.g. `openssl rand -hex 32`), >= 16 bytes,
    readable by its owner only."""
    key_path = Path(path)
    try:
        st = key_path.stat()
        text = key_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConnpubError(
            f"cannot read key file {key_path}: {err}; create it with "
            f"`(umask 077; openssl rand -hex 32 > {key_path})`"
        ) from None
    check_key_file_mode(key_path, st.st_mode)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConnpubError(
            f"key file {key_path} is not hex text; write it with `openssl rand -hex 32`"
        ) from None
    if len(key) < MIN_KEY_LEN:
        raise ConnpubError(
            f"key in {key_path} is {len(key)} bytes, need >= {MIN_KEY_LEN}; "
            "write it with `openssl rand -hex 32`"
        )
    return key


def check_key_file_mode(key_path: Path, mode: int) -> None:
    """Refuse a key file that its group or others can access at all."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConnpubError(
            f"key file {key_path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {key_path}`"
        )


def _tag(key: bytes, data) -> bytes:
    return hmac.digest(key, data, "sha256")[:TAG_LEN]


# ------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------


def _pack(ptype: int, sender_id: int, sequence: int, timestamp_ns: int, payload, count: int,
          key: bytes) -> bytes:
    header = _HEADER.pack(MAGIC, VERSION, ptype, 0, sender_id, sequence, timestamp_ns, count, 0)
    body = header + payload
    return body + _tag(key, body)


def _encode_entries(ptype: int, entries: np.ndarray, sender_id: int, first_sequence: int,
                    timestamp_ns: int, key: bytes, mtu: int, ip_version: int) -> list[bytes]:
    """The packets of protocol.batch.encode_batch (the one encoder), as bytes objects."""
    return encode_batch(ptype, entries, sender_id=sender_id, first_sequence=first_sequence,
                        timestamp_ns=timestamp_ns, key=key, mtu=mtu,
                        ip_version=ip_version).packets()


def encode_publish(entries: np.ndarray, *, sender_id: int, first_sequence: int,
                   timestamp_ns: int, key: bytes, mtu: int, ip_version: int = 6) -> list[bytes]:
    """One publish cycle -> as many PUBLISH packets as needed to stay within `mtu`.
    Packet i carries sequence first_sequence + i; no entries -> no packets."""
    return _encode_entries(PacketType.PUBLISH, entries, sender_id, first_sequence, timestamp_ns,
                           key, mtu, ip_version)


def encode_directive(entries: np.ndarray, *, sender_id: int, first_sequence: int,
                     timestamp_ns: int, key: bytes, mtu: int, ip_version: int = 6) -> list[bytes]:
    """Level decisions (DIRECTIVE_ENTRY_DTYPE) -> DIRECTIVE packets, split like encode_publish."""
    return _encode_entries(PacketType.DIRECTIVE, entries, sender_id, first_sequence, timestamp_ns,
                           key, mtu, ip_version)


def encode_resync_request(*, sender_id: int, sequence: int, timestamp_ns: int, key: bytes) -> bytes:
    """A RESYNC-REQUEST: header only (entry count 0) + tag."""
    return _pack(PacketType.RESYNC_REQUEST, sender_id, sequence, timestamp_ns, b"", 0, key)


class Encoder:
    """A sender: its id, key, path MTU and sequence counter. The counter starts at the wall clock
    in ns so a restarted sender is never taken for a replay of its previous life."""

    def __init__(self, sender_id: int, key: bytes, mtu: int, ip_version: int = 6,
                 first_sequence: int | None = None) -> None:
        self.sender_id = sender_id
        self.key = key
        self.mtu = mtu
        self.ip_version = ip_version
        self.next_sequence = time.time_ns() if first_sequence is None else first_sequence

    def publish(self, entries: np.ndarray, timestamp_ns: int) -> list[bytes]:
        return self._take(encode_publish(entries, sender_id=self.sender_id,
                                         first_sequence=self.next_sequence,
                                         timestamp_ns=timestamp_ns, key=self.key, mtu=self.mtu,
                                         ip_version=self.ip_version))

    def directive(self, entries: np.ndarray, timestamp_ns: int) -> list[bytes]:
        return self._take(encode_directive(entries, sender_id=self.sender_id,
                                           first_sequence=self.next_sequence,
                                           timestamp_ns=timestamp_ns, key=self.key, mtu=self.mtu,
                                           ip_version=self.ip_version))

    def resync_request(self, timestamp_ns: int) -> bytes:
        return self._take([encode_resync_request(sender_id=self.sender_id,
                                                 sequence=self.next_sequence,
                                                 timestamp_ns=timestamp_ns, key=self.key)])[0]

    def _take(self, packets: list[bytes]) -> list[bytes]:
        self.next_sequence += len(packets)
        return packets


# ------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------


class ReplayWindow:
    """Anti-replay for one sender, as IPsec (RFC 4303 §3.4.3): the highest accepted sequence and
    a bitmap of the `size` sequences below it (bit i = highest - i was accepted)."""

    __slots__ = ("size", "highest", "bitmap")

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.highest = -1
        self.bitmap = 0

    def is_fresh(self, sequence: int) -> bool:
        if sequence > self.highest:
            return True
        behind = self.highest - sequence
        return behind < self.size and not (self.bitmap >> behind) & 1

    def accept(self, sequence: int) -> None:
        if sequence > self.highest:
            shift = sequence - self.highest
            # a jump past the window forgets it (never build a shift-sized integer)
            self.bitmap = 1 if shift >= self.size else ((self.bitmap << shift) | 1) & (
                (1 << self.size) - 1)
            self.highest = sequence
        else:
            self.bitmap |= 1 << (self.highest - sequence)


class _Quota:
    """Token bucket per sender: `rate` entries per second, bursts up to one second's worth."""

    __slots__ = ("tokens", "last_ns")

    def __init__(self, rate: float, now_ns: int) -> None:
        self.tokens = rate
        self.last_ns = now_ns


@dataclass(frozen=True, slots=True)
class Decoded:
    """The outcome of one packet: reason is None iff accepted."""

    reason: Reject | None
    packet_type: PacketType | None = None
    sender_id: int = 0
    sequence: int = 0
    timestamp_ns: int = 0
    entries: np.ndarray | None = None  # PUBLISH_ENTRY_DTYPE / DIRECTIVE_ENTRY_DTYPE, read-only

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass(slots=True)
class _Candidate:
    index: int
    packet_type: int
    sender_id: int
    sequence: int
    timestamp_ns: int
    count: int
    payload: memoryview


class Decoder:
    """A receiver: verifies packets and keeps one replay window and entry quota per sender.
    `decode` and `decode_batch` never raise on any bytes; rejections are counted in `counts`."""

    def __init__(self, key: bytes, *, max_lease_ms: int, replay_window: int = 64,
                 entry_quota_per_s: float | None = None,
                 accept_types: tuple[PacketType, ...] = tuple(PacketType),
                 mask_specs: tuple[MaskSpec, ...] = DEFAULT_MASK_SPECS,
                 require_backend_is_sender: bool = True) -> None:
        self.key = key
        self.max_lease_ms = int(max_lease_ms)
        self.replay_window = int(replay_window)
        self.entry_quota_per_s = entry_quota_per_s
        self.accept_types = frozenset(int(t) for t in accept_types)
        self.mask_byte_table = mask_byte_table(mask_specs)
        self.require_backend_is_sender = require_backend_is_sender
        self.windows: dict[int, ReplayWindow] = {}
        self._quotas: dict[int, _Quota] = {}
        self.counts: dict[str, int] = {"accepted": 0, **{r.value: 0 for r in Reject}}
        self.tag_checks = 0  # packets whose HMAC was computed (the costly check)

    @classmethod
    def from_config(cls, cfg, key: bytes, accept_types: tuple[PacketType, ...]) -> Decoder:
        """A decoder with the limits of a connpub.config.Config."""
        return cls(key, max_lease_ms=round(cfg.lease.max_s * 1000),
                   replay_window=cfg.security.replay_window,
                   entry_quota_per_s=cfg.security.per_sender_entry_quota,
                   accept_types=accept_types, mask_specs=cfg.masks.specs)

    def decode(self, packet: bytes, now_ns: int | None = None) -> Decoded:
        """Verify one packet; accepted entries come back as a numpy array."""
        return self.decode_batch([packet], now_ns)[0]

    def decode_batch(self, packets, now_ns: int | None = None) -> list[Decoded]:
        """Verify many packets at once (entry checks run vectorised over the whole batch).
        Packets are applied in order, so a duplicate inside one batch is a replay."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        results: list[Decoded | None] = [None] * len(packets)
        candidates: list[_Candidate] = []
        for index, packet in enumerate(packets):
            checked = self._check_header_and_tag(index, packet)
            if isinstance(checked, Reject):
                results[index] = Decoded(checked)
            else:
                candidates.append(checked)
        entry_reasons = self._check_entries(candidates)
        for candidate, reason in zip(candidates, entry_reasons, strict=True):
            results[candidate.index] = self._finish(candidate, reason, now_ns)
        for result in results:
            self.counts["accepted" if result.reason is None else result.reason.value] += 1
        return results  # type: ignore[return-value]

    def _check_header_and_tag(self, index: int, packet) -> _Candidate | Reject:
        if not isinstance(packet, bytes | bytearray | memoryview):
            return Reject.BAD_LENGTH
        packet = bytes(packet)
        length = len(packet)
        if length < HEADER_LEN + TAG_LEN:
            return Reject.BAD_LENGTH
        (magic, version, ptype, reserved, sender_id, sequence, timestamp_ns, count,
         reserved2) = _HEADER.unpack_from(packet)
        if magic != MAGIC:
            return Reject.BAD_MAGIC
        if version != VERSION:
            return Reject.BAD_VERSION
        if ptype not in ENTRY_DTYPES or ptype not in self.accept_types:
            return Reject.BAD_TYPE
        dtype = ENTRY_DTYPES[ptype]
        entry_size = 0 if dtype is None else dtype.itemsize
        if (dtype is None and count != 0) or length != HEADER_LEN + count * entry_size + TAG_LEN:
            return Reject.BAD_LENGTH
        if reserved or reserved2:
            return Reject.BAD_PADDING
        body = memoryview(packet)[:-TAG_LEN]  # no copies: the payload stays a view
        self.tag_checks += 1
        if not hmac.compare_digest(_tag(self.key, body), packet[-TAG_LEN:]):
            return Reject.BAD_TAG
        return _Candidate(index, ptype, sender_id, sequence, timestamp_ns, count,
                          body[HEADER_LEN:])

    def _check_entries(self, candidates: list[_Candidate]) -> list[Reject | None]:
        reasons: list[Reject | None] = [None] * len(candidates)
        for ptype, check in ((PacketType.PUBLISH, self._publish_entry_problems),
                             (PacketType.DIRECTIVE, _directive_entry_problems)):
            positions = [i for i, c in enumerate(candidates) if c.packet_type == ptype and c.count]
            if not positions:
                continue
            dtype = ENTRY_DTYPES[ptype]
            entries = np.frombuffer(b"".join(candidates[i].payload for i in positions), dtype=dtype)
            counts = np.fromiter((candidates[i].count for i in positions), dtype=np.int64,
                                 count=len(positions))
            if len(positions) == 1:
                senders: np.ndarray | int = candidates[positions[0]].sender_id
            else:
                senders = np.repeat(np.fromiter((candidates[i].sender_id for i in positions),
                                                dtype=np.int64, count=len(positions)), counts)
            problems = check(entries, senders)  # one bool array per _ENTRY_REASONS slot
            if not np.logical_or.reduce(problems).any():
                continue  # the common case: every entry is fine
            # code k = _ENTRY_REASONS[k-1]; the smallest code found in a packet names it.
            fine = len(_ENTRY_REASONS) + 1
            codes = np.select(problems, np.arange(1, len(problems) + 1), fine)
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            worst = np.minimum.reduceat(codes, starts)
            for position, code in zip(positions, worst.tolist(), strict=True):
                if code < fine:
                    reasons[position] = _ENTRY_REASONS[code - 1]
        return reasons

    def _publish_entry_problems(self, entries: np.ndarray, senders) -> list[np.ndarray]:
        levels = entries["level"]
        keys = np.ascontiguousarray(entries["key"])
        level_ok = levels < LEVEL_COUNT
        no_problem = np.zeros(len(entries), bool)
        return [
            (entries["reserved"] != 0) | keys["pad"].any(axis=1),
            ~level_ok,
            (entries["flags"] & (0xFF ^ KNOWN_FLAGS)) != 0,
            ~keys_fit_masks(keys, np.where(level_ok, levels, 0), self.mask_byte_table),
            (entries["backend_id"] != senders) if self.require_backend_is_sender else no_problem,
            entries["predicted_remaining_ms"] > self.max_lease_ms,
        ]

    def _finish(self, candidate: _Candidate, reason: Reject | None, now_ns: int) -> Decoded:
        if reason is not None:
            return Decoded(reason)
        window = self.windows.get(candidate.sender_id)
        if window is None:
            window = self.windows[candidate.sender_id] = ReplayWindow(self.replay_window)
        if not window.is_fresh(candidate.sequence):
            return Decoded(Reject.REPLAY)
        if self.entry_quota_per_s is not None and not self._take_quota(candidate, now_ns):
            return Decoded(Reject.QUOTA)
        window.accept(candidate.sequence)
        dtype = ENTRY_DTYPES[candidate.packet_type]
        entries = None if dtype is None else np.frombuffer(candidate.payload, dtype=dtype)
        return Decoded(None, _PACKET_TYPES[candidate.packet_type], candidate.sender_id,
                       candidate.sequence, candidate.timestamp_ns, entries)

    def _take_quota(self, candidate: _Candidate, now_ns: int) -> bool:
        rate = float(self.entry_quota_per_s)  # type: ignore[arg-type]
        quota = self._quotas.get(candidate.sender_id)
        if quota is None:
            quota = self._quotas[candidate.sender_id] = _Quota(rate, now_ns)
        elapsed_s = max(now_ns - quota.last_ns, 0) / 1e9
        quota.tokens = min(rate, quota.tokens + elapsed_s * rate)
        quota.last_ns = max(now_ns, quota.last_ns)
        if candidate.count > quota.tokens:
            return False
        quota.tokens -= candidate.count
        return True


def accepted_entries(results: list[Decoded], packet_type: PacketType) -> np.ndarray:
    """All entries of the accepted packets of one type, in order, as one wire-dtype array.
    (np.concatenate without dtype= would silently turn big-endian fields native.)"""
    dtype = ENTRY_DTYPES[packet_type]
    parts = [r.entries for r in results if r.reason is None and r.packet_type == packet_type]
    return np.concatenate(parts, dtype=dtype) if parts else np.zeros(0, dtype)


def _directive_entry_problems(entries: np.ndarray, senders) -> list[np.ndarray]:
    """Problems in _ENTRY_REASONS order: bad_padding, bad_level (the rest cannot happen)."""
    padding = entries["reserved"].any(axis=1) | (entries["class_key"]["pad"] != 0)
    return [padding, entries["level"] >= LEVEL_COUNT]


__all__ = [  # the codec, and the wire layout it is built on (protocol.layout)
    "CONFIDENCE_SCALE", "Decoded", "Decoder", "ENTRY_DTYPES", "Encoder", "FLAG_CLOSED",
    "FLAG_RENEW", "FLAG_RESYNC", "HEADER_LEN", "IPV4_HEADER_LEN", "IPV6_HEADER_LEN", "KNOWN_FLAGS",
    "MAGIC", "MIN_KEY_LEN", "PacketType", "Reject", "ReplayWindow", "TAG_LEN", "UDP_HEADER_LEN",
    "VERSION", "accepted_entries", "check_key_file_mode", "encode_directive", "encode_publish",
    "encode_resync_request", "load_key", "max_entries_per_packet",
]
