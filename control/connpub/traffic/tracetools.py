"""Build large traces from real ones: replicate, merge, shift (docs/workloads.md, "Trace tools").

All functions take and return FLOW_DTYPE tables, vectorised, flows sorted by start with
flow_id renumbered 1..n.
"""

from __future__ import annotations

import math

import numpy as np

from connpub.errors import ConnpubError
from connpub.traffic.workload import FLOW_DTYPE, NS_PER_S

V4_SUBNETS_FIRST = 1 << 16  # /24 number of 1.0.0.0: replicated IPv4 clients start there
V4_SUBNETS_END = 224 << 16  # ... and stay below 224.0.0.0 (multicast)
V6_REPLICA_PREFIX = 0xFD  # fd00::/8 (unique local): replicated IPv6 clients
V6_SUBNETS_MAX = 1 << 16  # distinct /56 client subnets a replicated IPv6 trace may hold
V6_COPIES_MAX = 1 << 32


def _finish(table: np.ndarray) -> np.ndarray:
    out = table[np.argsort(table["start_ns"], kind="stable")]
    out["flow_id"] = np.arange(1, out.size + 1, dtype=np.uint64)
    return out


def _is_v4(addr: np.ndarray) -> np.ndarray:
    return (addr[:, :10] == 0).all(axis=1) & (addr[:, 10] == 0xFF) & (addr[:, 11] == 0xFF)


def _offset_ids(column: np.ndarray, copy: np.ndarray, span: int) -> np.ndarray:
    """Ground-truth ids made distinct per copy (0 = unknown stays 0)."""
    shifted = column + copy.astype(np.uint64) * np.uint64(span)
    return np.where(column == 0, 0, shifted).astype(np.uint64)


def replicate(table: np.ndarray, copies: int, spread_s: float = 0.0, seed: int = 0
              ) -> np.ndarray:
    """`copies` copies of a trace with distinct clients: copy k's clients live in fresh
    subnets (IPv4: the /24 of each original client subnet renumbered from 1.0.0.0 up, host
    byte kept; IPv6: fd<k:32 bits><subnet:16 bits>::/56 + the original 72 host bits), so the
    client -> subnet structure (levels 1-3) of the original holds in every copy and no two
    copies share a 5-tuple. Each copy starts at a seeded offset in [0, spread_s)."""
    if copies < 1:
        raise ConnpubError(f"copies must be >= 1, got {copies}")
    if not (math.isfinite(spread_s) and spread_s >= 0):
        raise ConnpubError(f"spread {spread_s:g} s must be a finite number >= 0")
    n = table.size
    client = table["client_addr"]
    v4 = _is_v4(client)
    v4_subnets, v4_index = np.unique(client[v4, 12:15], axis=0, return_inverse=True)
    v6_subnets, v6_index = np.unique(client[~v4, :7], axis=0, return_inverse=True)
    s4, s6 = len(v4_subnets), len(v6_subnets)
    if V4_SUBNETS_FIRST + copies * s4 > V4_SUBNETS_END:
        raise ConnpubError(
            f"{copies} copies of {s4} IPv4 client /24s do not fit below 224.0.0.0; "
            f"use at most {(V4_SUBNETS_END - V4_SUBNETS_FIRST) // max(s4, 1)} copies")
    if s6 > V6_SUBNETS_MAX or copies > V6_COPIES_MAX:
        raise ConnpubError(f"{s6} IPv6 client /56s x {copies} copies is over the "
                           f"{V6_SUBNETS_MAX} x {V6_COPIES_MAX} a replica prefix holds")
    out = np.tile(table, copies)
    copy = np.repeat(np.arange(copies, dtype=np.int64), n)
    addr = out["client_addr"]
    rows4 = np.flatnonzero(np.tile(v4, copies))
    if rows4.size:
        subnet = V4_SUBNETS_FIRST + copy[rows4] * s4 + np.tile(v4_index.ravel(), copies)
        addr[rows4, 12] = subnet >> 16
        addr[rows4, 13] = (subnet >> 8) & 0xFF
        addr[rows4, 14] = subnet & 0xFF
    rows6 = np.flatnonzero(np.tile(~v4, copies))
    if rows6.size:
        k, s = copy[rows6], np.tile(v6_index.ravel(), copies)
        addr[rows6, 0] = V6_REPLICA_PREFIX
        for byte in range(4):
            addr[rows6, 1 + byte] = (k >> (24 - 8 * byte)) & 0xFF
        addr[rows6, 5] = s >> 8
        addr[rows6, 6] = s & 0xFF
    for name in ("session_id", "app_id"):
        span = int(table[name].max(initial=0)) + 1
        out[name] = _offset_ids(out[name], copy, span)
    if spread_s > 0:
        offsets = np.random.default_rng(seed).uniform(0, spread_s * NS_PER_S, copies)
        offsets = np.rint(offsets).astype(np.int64)
        offsets[0] = 0
        out["start_ns"] += offsets[copy]
        out["end_ns"] += offsets[copy]
    return _finish(out)


def merge(tables: list[np.ndarray]) -> np.ndarray:
    """One trace of several, each keeping its own times (all start at 0) and addresses;
    session and application ids stay distinct per input."""
    if not tables:
        raise ConnpubError("merge needs at least one trace")
    parts, base_session, base_app = [], 0, 0
    for table in tables:
        part = table.copy()
        for name, base in (("session_id", base_session), ("app_id", base_app)):
            part[name] = np.where(part[name] == 0, 0, part[name] + np.uint64(base))
        base_session = int(part["session_id"].max(initial=base_session))
        base_app = int(part["app_id"].max(initial=base_app))
        parts.append(part)
    return _finish(np.concatenate(parts).astype(FLOW_DTYPE))


def shift(table: np.ndarray, by_s: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Times divided by `scale` (2: twice as fast), then moved by `by_s` seconds; sizes and
    counts unchanged. A shift that would start a flow before 0 is refused."""
    if not (math.isfinite(scale) and scale > 0):
        raise ConnpubError(f"scale {scale:g} must be a finite number > 0")
    if not math.isfinite(by_s):
        raise ConnpubError(f"shift {by_s:g} s must be a finite number")
    out = table.copy()
    if scale != 1.0:
        duration = table["end_ns"] - table["start_ns"]
        out["start_ns"] = np.rint(table["start_ns"] / scale).astype(np.int64)
        out["end_ns"] = out["start_ns"] + np.rint(duration / scale).astype(np.int64)
        out["first_iat_ns"] = np.rint(table["first_iat_ns"] / scale).astype(np.uint64)
    by_ns = round(by_s * NS_PER_S)
    if out.size and int(out["start_ns"].min()) + by_ns < 0:
        raise ConnpubError(f"shifting by {by_s:g} s starts a flow before 0 (the first starts at "
                           f"{out['start_ns'].min() / NS_PER_S:g} s)")
    out["start_ns"] += by_ns
    out["end_ns"] += by_ns
    return _finish(out)
