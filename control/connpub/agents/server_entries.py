"""PUBLISH entries and history records of the server agent, built from the flow and aggregate
tables (vectorised). docs/agents.md."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from connpub.datapath.abi import FLOW_KEY_DTYPE, PUBLISH_ENTRY_DTYPE
from connpub.policy.liveness import idle_ns
from connpub.protocol.wire import FLAG_RENEW

NS_PER_MS = 1_000_000
U32_MAX = 2**32 - 1
_KEY_SLICE = slice(8, 48)  # bytes of the flow key inside a PUBLISH entry

# A lease hook gives, per published flow, (predicted_remaining_ms uint32, confidence uint16 Q0.16).
# 0 ms = "no prediction": the LB applies its baseline lease k*T. Arguments: flow keys
# (FLOW_KEY_DTYPE), flow values (FLOW_VALUE_DTYPE) and now (datapath ns).
LeaseHook = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def no_prediction(keys: np.ndarray, values: np.ndarray, now_ns: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """The baseline/adaptive lease hook: no prediction for any flow (the LB leases k*T)."""
    return np.zeros(len(keys), np.uint32), np.zeros(len(keys), np.uint16)



def build_entries(count: int, *, levels, keys_raw: np.ndarray, backend_id: int, flow_count,
                  byte_count, last_seen_ns: np.ndarray, now_ns: int, lease_ms=0, confidence=0,
                  flags=0) -> np.ndarray:
    """PUBLISH_ENTRY_DTYPE entries. keys_raw: (count, 40) uint8 flow keys (already masked)."""
    entries = np.zeros(count, PUBLISH_ENTRY_DTYPE)
    if count == 0:
        return entries
    entries.view(np.uint8).reshape(count, PUBLISH_ENTRY_DTYPE.itemsize)[:, _KEY_SLICE] = keys_raw
    entries["key"]["pad"] = 0
    entries["level"] = levels
    entries["flags"] = flags
    entries["confidence"] = confidence
    entries["backend_id"] = backend_id
    entries["flow_count"] = np.clip(flow_count, 0, U32_MAX)
    entries["bytes"] = byte_count
    entries["last_activity_age_ms"] = np.minimum(idle_ns(last_seen_ns, now_ns) // NS_PER_MS,
                                                 U32_MAX)
    entries["predicted_remaining_ms"] = lease_ms
    return entries


def key_bytes(keys: np.ndarray) -> np.ndarray:
    """(n, 40) uint8 view of FLOW_KEY_DTYPE keys."""
    keys = np.ascontiguousarray(keys)
    return keys.view(np.uint8).reshape(len(keys), FLOW_KEY_DTYPE.itemsize)


def flow_entries(keys: np.ndarray, values: np.ndarray, index: np.ndarray, backend_id: int,
                 now_ns: int, lease_hook: LeaseHook, previous_cycle_ns: int | None,
                 extra_flags: int = 0) -> np.ndarray:
    """Level-0 entries of the flows at `index`. RENEW marks flows seen by an earlier cycle.
    When every flow is published (baseline) the columns are used without gathering."""
    every = len(index) == len(keys)

    def pick(column: np.ndarray) -> np.ndarray:
        return column if every else column[index]

    if lease_hook is no_prediction:
        lease_ms, confidence = 0, 0
    else:
        lease_ms, confidence = lease_hook(keys[index], values[index], now_ns)
    flags: np.ndarray | int = extra_flags
    if previous_cycle_ns is not None:
        seen_before = pick(values["first_seen_ns"]).astype(np.int64) < previous_cycle_ns
        flags = np.where(seen_before, extra_flags | FLAG_RENEW, extra_flags).astype(np.uint8)
    raw = key_bytes(keys)
    return build_entries(len(index), levels=0, keys_raw=raw if every else raw[index],
                         backend_id=backend_id, flow_count=1, byte_count=pick(values["bytes"]),
                         last_seen_ns=pick(values["last_seen_ns"]), now_ns=now_ns,
                         lease_ms=lease_ms, confidence=confidence, flags=flags)


def aggregate_entries(agg_keys: np.ndarray, agg_values: np.ndarray, index: np.ndarray,
                      backend_id: int, now_ns: int, lease_ms=0, confidence=0,
                      flags: int = FLAG_RENEW) -> np.ndarray:
    """Entries of the aggregates at `index` (flags FLAG_CLOSED: the aggregate has ended)."""
    sel_keys, sel_values = agg_keys[index], agg_values[index]
    return build_entries(len(index), levels=sel_keys["level"],
                         keys_raw=key_bytes(sel_keys["masked"]), backend_id=backend_id,
                         flow_count=sel_values["active_flows"], byte_count=sel_values["bytes"],
                         last_seen_ns=sel_values["last_seen_ns"], now_ns=now_ns,
                         lease_ms=lease_ms, confidence=confidence, flags=flags)


def history_records(keys: np.ndarray, values: np.ndarray, clock_offset_ns: int,
                    server_id: int) -> np.ndarray:
    """HISTORY_DTYPE records (connpub.traffic.trace) of finished flows; times on CLOCK_MONOTONIC.
    first_tcp_flags is the OR over the whole flow: the datapath keeps no separate
    first-packets OR."""
    from connpub.traffic.trace import HISTORY_DTYPE  # noqa: PLC0415 - pyarrow only when recording

    n = len(keys)
    out = np.zeros(n, HISTORY_DTYPE)
    if n == 0:
        return out
    out["client_addr"] = keys["client_addr"]
    out["vip_addr"] = keys["vip_addr"]
    out["client_port"] = keys["client_port"]
    out["vip_port"] = keys["vip_port"]
    out["proto"] = keys["proto"]
    first = values["first_seen_ns"].astype(np.int64) + clock_offset_ns
    last = values["last_seen_ns"].astype(np.int64) + clock_offset_ns
    out["first_seen_ns"], out["last_seen_ns"] = first, last
    out["duration_ns"] = np.maximum(last - first, 0)
    out["packets"], out["bytes"] = values["packets"], values["bytes"]
    sketched = np.minimum(values["sketch_count"], values["sketch_size"].shape[1]).astype(np.int64)
    column = np.arange(values["sketch_size"].shape[1])
    in_sketch = column[None, :] < sketched[:, None]
    sizes = np.where(in_sketch, values["sketch_size"], 0).astype(np.uint64)
    gaps = np.where(in_sketch & (column[None, :] >= 1), values["sketch_gap_us"],
                    0).astype(np.uint64) * np.uint64(1000)
    out["first_n"] = sketched
    out["first_size_sum"] = sizes.sum(axis=1)
    out["first_size_sumsq"] = (sizes * sizes).sum(axis=1)
    out["first_size_max"] = sizes.max(axis=1)
    out["first_iat_sum_ns"] = gaps.sum(axis=1)
    out["first_iat_max_ns"] = gaps.max(axis=1)
    out["first_tcp_flags"] = values["tcp_flags"]
    out["tcp_flags"] = values["tcp_flags"]
    out["closed"] = values["closed"] != 0
    out["server_id"] = server_id
    return out

