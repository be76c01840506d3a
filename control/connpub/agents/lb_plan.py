"""The LB agent's pure planning, arrays in and arrays out, time passed in: which accepted PUBLISH
entries become which flow / aggregate leases (plan_leases), which connections a lease covers
(valid_leases, policy.coverage = bpf/lb/lb.c), the activity of each class (connections and
aggregate members), and the DIRECTIVE entries per backend. Used by connpub.agents.lb (which
re-exports every name), the lab and the tests. docs/agents.md."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np

from connpub.arrays import join
from connpub.config import Config
from connpub.datapath import lbctl, maglev
from connpub.datapath.abi import CLASS_KEY_DTYPE, DIRECTIVE_ENTRY_DTYPE, FLOW_KEY_DTYPE
from connpub.datapath.masks import LEVEL_COUNT, apply_masks
from connpub.policy import coverage
from connpub.policy.granularity import what_if_loads
from connpub.policy.lease import lb_lease_expiry_ns
from connpub.policy.pipeline import class_activity
from connpub.protocol.wire import FLAG_CLOSED

NS_PER_S = 1_000_000_000
PROTO_TCP = socket.IPPROTO_TCP
BACKEND_F_PRESENT = lbctl.BACKEND_F_PRESENT
_ADDR_PROTO = np.dtype([("vip_addr", "u1", 16), ("proto", "u1")])


def class_keys_of(flow_keys: np.ndarray) -> np.ndarray:
    """The traffic class (vip, vip port, proto) of every flow key."""
    out = np.zeros(len(flow_keys), CLASS_KEY_DTYPE)
    out["vip_addr"] = flow_keys["vip_addr"]
    out["vip_port"] = flow_keys["vip_port"]
    out["proto"] = flow_keys["proto"]
    return out


def _addr_proto(vip_addr: np.ndarray, proto: np.ndarray) -> np.ndarray:
    out = np.zeros(len(proto), _ADDR_PROTO)
    out["vip_addr"], out["proto"] = vip_addr, proto
    return out


def entries_for_vips(entries: np.ndarray, vip_keys: np.ndarray) -> np.ndarray:
    """True for entries about a VIP of this LB: level 0 by (vip, port, proto); aggregates, whose
    mask may drop the VIP port, by (vip, proto)."""
    keys = np.ascontiguousarray(entries["key"]).astype(FLOW_KEY_DTYPE)
    exact, _ = join(vip_keys, class_keys_of(keys))
    loose, _ = join(_addr_proto(vip_keys["vip_addr"], vip_keys["proto"]),
                    _addr_proto(keys["vip_addr"], keys["proto"]))
    return np.where(entries["level"] == 0, exact, loose)


@dataclass(frozen=True)
class LeaseBatch:
    """What one batch of accepted PUBLISH entries asks of the LB maps (native-order arrays)."""

    flow_keys: np.ndarray  # FLOW_KEY_DTYPE
    flow_backends: np.ndarray  # uint32
    flow_expiry_ns: np.ndarray  # uint64
    closed_flow_keys: np.ndarray
    closed_flow_backends: np.ndarray
    agg_keys: np.ndarray  # LB_AGG_LEASE_KEY_DTYPE (level, masked tuple, publishing backend)
    agg_expiry_ns: np.ndarray
    agg_flow_counts: np.ndarray  # uint32, the server's live members of each aggregate
    closed_agg_keys: np.ndarray
    not_vip: int


def plan_leases(entries: np.ndarray, vip_keys: np.ndarray, now_ns: int, cfg: Config) -> LeaseBatch:
    """Split accepted entries into flow / aggregate leases (and closed ones) with their expiry:
    now + k*T for entries without a prediction, else now + the request clamped to
    [min_s, max_s] (policy.lease.lb_lease_expiry_ns). Entries of non-VIP classes are dropped."""
    vip = entries_for_vips(entries, vip_keys)
    entries = entries[vip]
    keys = np.ascontiguousarray(entries["key"]).astype(FLOW_KEY_DTYPE)
    backends = entries["backend_id"].astype(np.uint32)
    levels = entries["level"].astype(np.uint8)
    closed = (entries["flags"] & FLAG_CLOSED) != 0
    expiry = lb_lease_expiry_ns(now_ns, entries["predicted_remaining_ms"], cfg).astype(np.uint64)
    flow = levels == 0
    agg = ~flow & (levels < LEVEL_COUNT)
    open_flow, closed_flow = flow & ~closed, flow & closed
    open_agg, closed_agg = agg & ~closed, agg & closed
    return LeaseBatch(
        flow_keys=keys[open_flow], flow_backends=backends[open_flow],
        flow_expiry_ns=expiry[open_flow],
        closed_flow_keys=keys[closed_flow], closed_flow_backends=backends[closed_flow],
        agg_keys=lbctl.agg_lease_keys(levels[open_agg], keys[open_agg], backends[open_agg]),
        agg_expiry_ns=expiry[open_agg],
        agg_flow_counts=entries["flow_count"][open_agg].astype(np.uint32),
        closed_agg_keys=lbctl.agg_lease_keys(levels[closed_agg], keys[closed_agg],
                                             backends[closed_agg]),
        not_vip=int((~vip).sum()),
    )


def aggregate_expiry_levels(conn_keys: np.ndarray, conns: np.ndarray, agg_keys: np.ndarray,
                            agg_values: np.ndarray,
                            byte_table: np.ndarray | None = None) -> np.ndarray:
    """(n, LEVEL_COUNT) int64: per connection and level 1-3, the expiry of the aggregate that
    covers it there (bpf/lb/lb.c agg_covers): the aggregate's own entry of its tuple masked at
    that level when it names the connection's backend, or the cover entry for that backend;
    0 where none (column 0 unused). The input of policy.coverage."""
    out = np.zeros((len(conn_keys), LEVEL_COUNT), np.int64)
    if not len(agg_keys) or not len(conn_keys):
        return out
    backend = conns["backend_id"]
    expiry = agg_values["lease_expiry_ns"].astype(np.int64)
    for level in range(1, LEVEL_COUNT):
        levels = np.full(len(conn_keys), level, np.uint8)
        masked = apply_masks(np.ascontiguousarray(conn_keys), levels, byte_table)
        own_found, own_rows = join(agg_keys, lbctl.agg_lease_keys(levels, masked))
        own = own_found & (agg_values["backend_id"][own_rows] == backend)
        cover_found, cover_rows = join(agg_keys, lbctl.agg_lease_keys(levels, masked, backend))
        out[:, level] = np.maximum(np.where(own, expiry[own_rows], 0),
                                   np.where(cover_found, expiry[cover_rows], 0))
    return out


def valid_leases(conn_keys: np.ndarray, conns: np.ndarray, agg_keys: np.ndarray,
                 agg_values: np.ndarray, now_ns: int,
                 byte_table: np.ndarray | None = None) -> np.ndarray:
    """True for connections the LB datapath would forward on their lease now
    (policy.coverage.covered: own lease, or, unless the client closed, a valid aggregate at
    any level 1-3 that covers the connection's backend; bpf/lb/lb.c aggregate_keeps_alive)."""
    client_closed = (conns["flags"] & lbctl.CONN_F_CLIENT_CLOSED) != 0
    agg = aggregate_expiry_levels(conn_keys, conns, agg_keys, agg_values, byte_table)
    return coverage.covered(conns["lease_expiry_ns"].astype(np.int64), client_closed, agg,
                            now_ns)


def aggregate_members_per_vip(agg_keys: np.ndarray, agg_values: np.ndarray,
                              vip_indexes: np.ndarray, now_ns: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """(member flows, sum of their ages in s) per VIP row over the valid own aggregate entries
    (by the entry's vip_index): the flows the LB forwards without a connection entry. A
    member's age is taken as its aggregate's (the LB has no per-member start)."""
    _, own = lbctl.own_aggregates(agg_keys, agg_values, now_ns)
    members = np.zeros(len(vip_indexes), np.int64)
    age_sum = np.zeros(len(vip_indexes))
    if len(own) == 0 or len(vip_indexes) == 0:
        return members, age_sum
    order = np.argsort(vip_indexes, kind="stable")
    pos = np.minimum(np.searchsorted(vip_indexes[order], own["vip_index"]), len(order) - 1)
    found = vip_indexes[order][pos] == own["vip_index"]
    rows = order[pos][found]
    counts = own["flow_count"][found].astype(np.float64)
    ages = np.maximum(np.int64(now_ns) - own["created_ns"][found].astype(np.int64), 0) / NS_PER_S
    members = np.bincount(rows, weights=counts, minlength=len(vip_indexes)).astype(np.int64)
    age_sum = np.bincount(rows, weights=counts * ages, minlength=len(vip_indexes))
    return members, age_sum


def class_statistics(conn_keys: np.ndarray, valid: np.ndarray, created_ns: np.ndarray,
                     vip_keys: np.ndarray, now_ns: int,
                     members: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(active connections, mean age in s of the active ones: NaN if none) per VIP row: the
    level pipeline's activity and duration signals (policy.pipeline.class_activity). members:
    aggregate_members_per_vip's (count, age sum), added to the connections."""
    rows_found, rows = join(vip_keys, class_keys_of(conn_keys))
    use = valid & rows_found
    return class_activity(rows[use], created_ns[use], now_ns, len(vip_keys), members)


def directive_plan(vip_keys: np.ndarray, vip_services: np.ndarray, levels: np.ndarray,
                   backends: np.ndarray) -> dict[int, np.ndarray]:
    """backend id -> DIRECTIVE entries for the classes of every service it is a member of."""
    plan = {}
    present = np.flatnonzero((backends["flags"] & BACKEND_F_PRESENT) != 0)
    for backend_id in present.tolist():
        mask = np.uint64(backends["services"][backend_id])
        member = ((mask >> vip_services.astype(np.uint64)) & np.uint64(1)) == 1
        if not member.any():
            continue
        entries = np.zeros(int(member.sum()), DIRECTIVE_ENTRY_DTYPE)
        entries["class_key"] = vip_keys[member]
        entries["level"] = levels[member]
        plan[backend_id] = entries
    return plan


def lb_what_if_loads(conn_keys: np.ndarray, conns: np.ndarray, valid: np.ndarray,
                     agg_keys: np.ndarray, agg_values: np.ndarray, now_ns: int,
                     vip_keys: np.ndarray, vip_rows: np.ndarray, vip_indexes: np.ndarray,
                     vip_flags: np.ndarray, vip_services: np.ndarray,
                     maglev_tables: dict[int, np.ndarray], classes: int, backends: int,
                     byte_table: np.ndarray | None = None) -> np.ndarray:
    """The level pipeline's spread input from the LB's own maps
    (policy.granularity.what_if_loads; the simulator builds the same from its tables): the
    valid TCP connections (weight 1, every level known: the tuple) and the valid own entries of
    TCP aggregates (weight = the server's member count, levels from the entry's up known); the
    backend at a level is the connection's or entry's own at its level, else the pick of the
    service's Maglev table (`maglev_tables`: service -> backend id per slot) over the tuple
    masked there (the datapath's pick_in_aggregate). UDP is left out: a UDP flow counts as
    live for its whole idle horizon, which is no load. vip_rows: the pipeline row of each VIP;
    columns: backend ids."""
    found, vip_of_conn = join(vip_keys, class_keys_of(conn_keys))
    use = valid & found & (conn_keys["proto"] == PROTO_TCP)
    own_keys, own = lbctl.own_aggregates(agg_keys, agg_values, now_ns)
    order = np.argsort(vip_indexes, kind="stable")
    vip_of_agg = np.zeros(len(own), np.int64)
    agg_use = np.zeros(len(own), bool)
    if len(own) and len(vip_indexes):
        pos = np.minimum(np.searchsorted(vip_indexes[order], own["vip_index"]), len(order) - 1)
        agg_use = (vip_indexes[order][pos] == own["vip_index"]) \
            & (own_keys["agg"]["masked"]["proto"] == PROTO_TCP)
        vip_of_agg = order[pos]
    n_conns = int(use.sum())
    keys = np.zeros(n_conns + int(agg_use.sum()), FLOW_KEY_DTYPE)  # (concatenate would
    keys[:n_conns] = conn_keys[use]  # turn the big-endian ports little-endian)
    keys[n_conns:] = own_keys["agg"]["masked"][agg_use]
    vip = np.concatenate([vip_of_conn[use], vip_of_agg[agg_use]]).astype(np.int64)
    known = np.concatenate([np.zeros(int(use.sum()), np.int64),
                            own_keys["agg"]["level"][agg_use].astype(np.int64)])
    weight = np.concatenate([np.ones(int(use.sum())),
                             own["flow_count"][agg_use].astype(np.float64)])
    actual = np.concatenate([conns["backend_id"][use], own["backend_id"][agg_use]])
    backend_at = np.zeros((len(keys), LEVEL_COUNT), np.int64)
    services = np.asarray(vip_services, np.int64)[vip]
    flags = np.asarray(vip_flags)[vip]
    for level in range(LEVEL_COUNT):
        backend_at[:, level] = np.where(known == level, actual, 0)
        coarser = np.flatnonzero(known < level)
        if coarser.size == 0:
            continue
        masked = apply_masks(keys[coarser], level, byte_table)
        for service in np.unique(services[coarser]).tolist():
            table = maglev_tables.get(service)
            if table is None or len(table) == 0:
                continue
            sel = services[coarser] == service
            slot = maglev.slots_of(masked[sel], len(table), flags[coarser][sel])
            backend_at[coarser[sel], level] = table[slot]
    backend_at = np.clip(backend_at, 0, max(backends - 1, 0))
    return what_if_loads(np.asarray(vip_rows, np.int64)[vip], weight, known, backend_at,
                         classes, backends)


def service_backends(backends: np.ndarray, services: int) -> np.ndarray:
    """(services, backend ids) bool: the present backends of each service (spread_caps'
    members; a draining backend still counts, its live aggregates stay on it)."""
    present = (backends["flags"] & BACKEND_F_PRESENT) != 0
    bits = backends["services"].astype(np.uint64)
    return np.stack([present & (((bits >> np.uint64(s)) & np.uint64(1)) == 1)
                     for s in range(services)]) if services else np.zeros((0, len(backends)), bool)
