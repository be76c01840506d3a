"""Aggregation masks (docs/policy.md, "Masks"): one byte mask over struct flow_key per (level,
address family)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.datapath.abi import (  # noqa: F401 - the levels, re-exported
    FLOW_KEY_DTYPE,
    LEVEL_APPLICATION,
    LEVEL_COUNT,
    LEVEL_FLOW,
    LEVEL_SESSION,
    LEVEL_SUBNET,
)

LEVEL_NAMES = ("flow", "session", "application", "subnet")
MASK_SLOTS = LEVEL_COUNT * 2  # index = level * 2 + is_ipv6, as MASK_INDEX() in flow.h

# IPv4 addresses live in the key IPv4-mapped: ::ffff:a.b.c.d (bytes 0..11 are this prefix).
V4_MAPPED_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)
KEY_BYTES = FLOW_KEY_DTYPE.itemsize
_CLIENT = slice(0, 16)
_VIP = slice(16, 32)
_CLIENT_PORT = slice(32, 34)
_VIP_PORT = slice(34, 36)
_PROTO = 36


@dataclass(frozen=True)
class MaskSpec:
    """What one level keeps of the flow tuple. The protocol number is always kept."""

    keep_client_port: bool
    keep_vip_port: bool
    client_prefix_v4: int  # 0..32 bits of the client IPv4 address
    client_prefix_v6: int  # 0..128 bits of the client IPv6 address
    keep_vip: bool


DEFAULT_MASK_SPECS: tuple[MaskSpec, ...] = (
    MaskSpec(True, True, 32, 128, True),  # 0 flow: the full 5-tuple
    MaskSpec(False, True, 32, 128, True),  # 1 session: client ip -> one service
    MaskSpec(False, False, 32, 128, True),  # 2 application: client ip -> one vip, any port
    MaskSpec(False, False, 25, 56, True),  # 3 subnet: client /25 (v6 /56) -> one vip
)


def _prefix_bytes(prefix_bits: int, width_bytes: int) -> np.ndarray:
    bits = np.zeros(width_bytes * 8, dtype=np.uint8)
    bits[:prefix_bits] = 1
    return np.packbits(bits)


def mask_bytes(spec: MaskSpec, is_ipv6: bool) -> np.ndarray:
    """The 40-byte mask of one level and family as uint8. An IPv4 mask keeps the ::ffff: prefix,
    so a masked key still tells its family."""
    mask = np.zeros(KEY_BYTES, dtype=np.uint8)
    if is_ipv6:
        mask[_CLIENT] = _prefix_bytes(spec.client_prefix_v6, 16)
    else:
        mask[0:12] = 0xFF
        mask[12:16] = _prefix_bytes(spec.client_prefix_v4, 4)
    if spec.keep_vip:
        mask[_VIP] = 0xFF
    if spec.keep_client_port:
        mask[_CLIENT_PORT] = 0xFF
    if spec.keep_vip_port:
        mask[_VIP_PORT] = 0xFF
    mask[_PROTO] = 0xFF
    return mask


def mask_byte_table(specs: tuple[MaskSpec, ...] = DEFAULT_MASK_SPECS) -> np.ndarray:
    """(8, 40) uint8: row level*2 + is_ipv6 is that slot's mask."""
    if len(specs) != LEVEL_COUNT:
        raise ValueError(f"need {LEVEL_COUNT} mask specs, got {len(specs)}")
    return np.stack([mask_bytes(spec, bool(v6)) for spec in specs for v6 in (0, 1)])


def mask_table(specs: tuple[MaskSpec, ...] = DEFAULT_MASK_SPECS) -> np.ndarray:
    """The masks as 8 FLOW_KEY_DTYPE records, ready to write into the BPF masks array."""
    return mask_byte_table(specs).view(FLOW_KEY_DTYPE).reshape(MASK_SLOTS)


def _as_key_bytes(keys: np.ndarray) -> np.ndarray:
    keys = np.ascontiguousarray(keys)
    if keys.dtype != FLOW_KEY_DTYPE:
        raise TypeError(f"expected FLOW_KEY_DTYPE keys, got {keys.dtype}")
    return keys.view(np.uint8).reshape(-1, KEY_BYTES)


# The first 16 bytes of a v4-mapped address, and which of them to compare, as two u64 words.
_PREFIX_VALUE = np.concatenate([V4_MAPPED_PREFIX, np.zeros(4, np.uint8)]).view(np.uint64)
_PREFIX_MASK = np.concatenate([np.full(12, 0xFF, np.uint8), np.zeros(4, np.uint8)]).view(np.uint64)


def _v4_mapped_words(words: np.ndarray) -> np.ndarray:
    """Per row of u64 words whose first two are a 16-byte address: True where it is mapped."""
    return ((words[:, 0:2] & _PREFIX_MASK) == _PREFIX_VALUE).all(axis=1)


def is_v4_mapped(addr: np.ndarray) -> np.ndarray:
    """Per 16-byte address (rows of an (n, 16) uint8 array, or a U16 field), True where it is
    IPv4-mapped (::ffff:a.b.c.d)."""
    addr = np.ascontiguousarray(addr, np.uint8).reshape(-1, 16)
    return _v4_mapped_words(addr.view(np.uint64))


def is_ipv6_key(keys: np.ndarray) -> np.ndarray:
    """True where the client address is not IPv4-mapped."""
    return ~_v4_mapped_words(_as_key_bytes(keys).view(np.uint64))  # (n, 5): 40 bytes = 5 words


def mask_slots(keys: np.ndarray, levels: np.ndarray | int) -> np.ndarray:
    """Mask index (level*2 + is_ipv6) of every key. Levels must be in 0..3."""
    return np.asarray(levels, dtype=np.int64) * 2 + is_ipv6_key(keys)


def apply_masks(
    keys: np.ndarray, levels: np.ndarray | int, byte_table: np.ndarray | None = None
) -> np.ndarray:
    """Aggregation keys: every key ANDed with the mask of its level and family (vectorised)."""
    table = mask_byte_table() if byte_table is None else byte_table
    words = _as_key_bytes(keys).view(np.uint64)
    table_words = np.ascontiguousarray(table).view(np.uint64)
    masked = words & table_words[mask_slots(keys, levels)]
    return masked.view(FLOW_KEY_DTYPE).reshape(-1)


def keys_fit_masks(
    keys: np.ndarray, levels: np.ndarray | int, byte_table: np.ndarray | None = None
) -> np.ndarray:
    """True where the key has no bit set outside the mask of its level (levels must be 0..3)."""
    table = mask_byte_table() if byte_table is None else byte_table
    words = _as_key_bytes(keys).view(np.uint64)
    table_words = np.ascontiguousarray(table).view(np.uint64)
    outside = words & ~table_words[mask_slots(keys, levels)]
    return ~outside.any(axis=1)


def mask_is_coarser(finer: MaskSpec, coarser: MaskSpec) -> bool:
    """True if `coarser` keeps nothing that `finer` drops (levels must nest)."""
    return (
        (finer.keep_client_port or not coarser.keep_client_port)
        and (finer.keep_vip_port or not coarser.keep_vip_port)
        and (finer.keep_vip or not coarser.keep_vip)
        and coarser.client_prefix_v4 <= finer.client_prefix_v4
        and coarser.client_prefix_v6 <= finer.client_prefix_v6
    )
