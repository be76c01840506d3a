"""Builders of valid random wire entries for the protocol tests and benchmarks."""

from __future__ import annotations

import numpy as np
from connpub.datapath.abi import (
    CLASS_KEY_DTYPE,
    DIRECTIVE_ENTRY_DTYPE,
    FLOW_KEY_DTYPE,
    PUBLISH_ENTRY_DTYPE,
)
from connpub.datapath.masks import V4_MAPPED_PREFIX, apply_masks
from connpub.protocol.wire import KNOWN_FLAGS


def random_flow_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random keys, about half IPv4 (IPv4-mapped) and half IPv6."""
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["client_addr"] = rng.integers(0, 256, (count, 16), dtype=np.uint8)
    keys["vip_addr"] = rng.integers(0, 256, (count, 16), dtype=np.uint8)
    is_v4 = rng.random(count) < 0.5
    keys["client_addr"][is_v4, :12] = V4_MAPPED_PREFIX
    keys["vip_addr"][is_v4, :12] = V4_MAPPED_PREFIX
    keys["client_addr"][~is_v4, 10] = 0  # never look IPv4-mapped
    keys["client_port"] = rng.integers(0, 65536, count)
    keys["vip_port"] = rng.integers(0, 65536, count)
    keys["proto"] = rng.choice([6, 17], count)
    return keys


def random_publish_entries(rng: np.random.Generator, count: int, backend_id: int,
                           max_lease_ms: int = 300_000) -> np.ndarray:
    entries = np.zeros(count, PUBLISH_ENTRY_DTYPE)
    levels = rng.integers(0, 4, count).astype(np.uint8)
    entries["level"] = levels
    entries["flags"] = rng.integers(0, KNOWN_FLAGS + 1, count)
    entries["confidence"] = rng.integers(0, 65536, count)
    entries["backend_id"] = backend_id
    entries["key"] = apply_masks(random_flow_keys(rng, count), levels)
    entries["flow_count"] = rng.integers(1, 2**32, count, dtype=np.uint64)
    entries["bytes"] = rng.integers(0, 2**63, count, dtype=np.uint64)
    entries["last_activity_age_ms"] = rng.integers(0, 2**32, count, dtype=np.uint64)
    entries["predicted_remaining_ms"] = rng.integers(0, max_lease_ms + 1, count)
    return entries


def random_directive_entries(rng: np.random.Generator, count: int) -> np.ndarray:
    entries = np.zeros(count, DIRECTIVE_ENTRY_DTYPE)
    classes = np.zeros(count, CLASS_KEY_DTYPE)
    classes["vip_addr"] = rng.integers(0, 256, (count, 16), dtype=np.uint8)
    classes["vip_port"] = rng.integers(0, 65536, count)
    classes["proto"] = rng.choice([6, 17], count)
    entries["class_key"] = classes
    entries["level"] = rng.integers(0, 4, count)
    return entries
