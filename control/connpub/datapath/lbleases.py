"""The LB agent's lease writes and reads on an LB attachment's `conns` and `agg_leases` maps
(bpf/lb/lb_maps.h): flow leases, aggregate leases (an aggregate's own entry, or a cover entry for a
backend's flows from before a level change; docs/lb.md "Aggregates"), purges and whole-table
reads. All numpy, one batched syscall per 64k entries. Re-exported by connpub.datapath.lbctl."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from connpub.arrays import join
from connpub.arrays import void_view as _void
from connpub.datapath import masks
from connpub.datapath.abi import (
    AGG_KEY_DTYPE,
    FLOW_KEY_DTYPE,
    LB_AGG_LEASE_KEY_DTYPE,
)
from connpub.datapath.clock import datapath_clock
from connpub.datapath.lbmaps import (
    AGG_OWN_ENTRY,
    CONN_F_CLIENT_CLOSED,
    class_keys_of,
    locked,
    open_map,
    read_vips,
    write_holds_flows,
)
from connpub.datapath.maps import PinnedMap
from connpub.errors import ConnpubError

_LOOKUP_ONE_BY_ONE = 4096  # up to this many keys: one lookup syscall each; above: read the table


def _now_ns(now_ns: int | None) -> int:
    if now_ns is not None:
        return now_ns
    return datapath_clock().now_ns()


def _lookup_many(pmap: PinnedMap, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, values) of many keys of a non-per-CPU map: one lookup syscall per key for a few
    keys, one batched read of the whole table for many."""
    values = np.zeros(len(keys), pmap.value_dtype)
    if len(keys) > _LOOKUP_ONE_BY_ONE:
        table_keys, table_values = pmap.items()
        found, index = join(table_keys, keys)
        values[found] = table_values[index[found]]
        return found, values
    return pmap.lookup_many(keys)


def _latest_per_key(keys: np.ndarray, expiry_ns: np.ndarray) -> np.ndarray:
    """Indices keeping, for each distinct key, the entry with the latest expiry."""
    order = np.argsort(-expiry_ns.astype(np.int64), kind="stable")
    _, first = np.unique(_void(keys)[order], return_index=True)
    return np.sort(order[first])


def apply_flow_leases(pin_dir: Path, keys: np.ndarray, backend_ids: np.ndarray | int,
                      expiry_ns: np.ndarray | int, *, levels: np.ndarray | int | None = None,
                      allow_shorten: bool = False, create: bool = True,
                      now_ns: int | None = None) -> dict[str, int]:
    """Set flow leases in `conns` (one batched write). A key that is not to a VIP is refused;
    so is a key whose entry names another backend (a server renews only its own flows); an
    existing entry's expiry only grows unless allow_shorten; a missing key is created (LB
    restart / resync) when `create`, with created_ns = now_ns (datapath clock; default now).
    levels: the flow's granularity level (default: keep the entry's, 0 for new ones).
    Returns counts."""
    keys = np.asarray(keys, FLOW_KEY_DTYPE).reshape(-1)
    n = len(keys)
    backend_ids = np.broadcast_to(np.asarray(backend_ids, np.uint32), (n,))
    expiry_ns = np.broadcast_to(np.asarray(expiry_ns, np.uint64), (n,))
    level_array = None if levels is None else np.broadcast_to(np.asarray(levels, np.uint8), (n,))
    result = {"written": 0, "extended": 0, "created": 0, "unchanged": 0, "refused_backend": 0,
              "refused_not_vip": 0, "held": 0}
    if n == 0:
        return result
    keep = _latest_per_key(keys, expiry_ns)
    keys, backend_ids, expiry_ns = keys[keep], backend_ids[keep], expiry_ns[keep]
    if level_array is not None:
        level_array = level_array[keep]
    with locked(pin_dir), open_map(pin_dir, "conns") as conns:
        vip_keys, vip_values, _ = read_vips(pin_dir)
        is_vip, vip_row = join(vip_keys, class_keys_of(keys))
        result["refused_not_vip"] = int((~is_vip).sum())
        keys, backend_ids, expiry_ns = keys[is_vip], backend_ids[is_vip], expiry_ns[is_vip]
        vip_index = vip_values["vip_index"][vip_row[is_vip]] if len(vip_values) else vip_row[:0]
        if level_array is not None:
            level_array = level_array[is_vip]
        found, current = _lookup_many(conns, keys)
        refused = found & (current["backend_id"] != backend_ids)
        new_values = current.copy()
        if allow_shorten:
            new_values["lease_expiry_ns"] = expiry_ns
        else:
            # a flow whose client sent FIN/RST keeps the datapath's close-linger lease: a renewal
            # read before the FIN must not stretch it (the race left is one read-to-write gap)
            closed = found & ((current["flags"] & CONN_F_CLIENT_CLOSED) != 0)
            new_values["lease_expiry_ns"] = np.where(
                closed, current["lease_expiry_ns"],
                np.where(found, np.maximum(current["lease_expiry_ns"], expiry_ns), expiry_ns))
        if level_array is not None:
            new_values["level"] = level_array
        missing = ~found
        if missing.any():
            created = _now_ns(now_ns)
            new_values["backend_id"][missing] = backend_ids[missing]
            new_values["created_ns"][missing] = created
            new_values["vip_index"][missing] = vip_index[missing]
        changed = found & ~refused & (
            (new_values["lease_expiry_ns"] != current["lease_expiry_ns"])
            | (new_values["level"] != current["level"]))
        write = changed | (missing & create)
        if write.any():
            conns.update_batch(keys[write], new_values[write])
        holds = (vip_values["holds_flows"][vip_row[is_vip]] != 0 if len(vip_values)
                 else np.zeros(len(keys), bool))
        # a level-0 entry of a class at level >= 1 (a member its server retired, a resync):
        # the class's level places it by its aggregate, maybe on another backend, so an LRU
        # eviction would reset it; it is held, and its VIP looks in `held` (docs/lb.md
        # "Held flows")
        aggregated = (vip_values["level"][vip_row[is_vip]] > 0) & (new_values["level"] == 0) \
            & ~refused & (found | create) if len(vip_values) else np.zeros(len(keys), bool)
        if aggregated.any():
            write_holds_flows(pin_dir, vip_keys, vip_values,
                              np.unique(vip_row[is_vip][aggregated]))
        holds |= aggregated
        shadow = holds & ~refused & (found | create)
        if shadow.any():
            result["held"] = _shadow_held(pin_dir, keys[shadow], new_values[shadow],
                                          expiry_ns[shadow], allow_shorten=allow_shorten,
                                          set_level=level_array is not None)
        result["written"] = int(write.sum())
        result["extended"] = int((changed & (new_values["lease_expiry_ns"]
                                             > current["lease_expiry_ns"])).sum())
        result["created"] = int((missing & create).sum())
        result["unchanged"] = int((found & ~refused & ~changed).sum())
        result["refused_backend"] = int(refused.sum())
    return result


def _shadow_held(pin_dir: Path, keys: np.ndarray, entries: np.ndarray, expiry_ns: np.ndarray,
                 *, allow_shorten: bool, set_level: bool) -> int:
    """The lease writes of apply_flow_leases for the flows of classes that hold them (docs/lb.md
    "Held flows"), done to their held copies too, in the same publish: a held copy is its
    connection entry when the LRU evicted that, so its lease must not lag behind (a copy
    refreshed only every evaluation expires between publishes and counts a lease miss). A flow
    without a held copy gets its entry's; a held copy on another backend is left alone; the
    lease of a copy whose client closed is not stretched. Returns how many it wrote."""
    with open_map(pin_dir, "held") as held:
        found, current = _lookup_many(held, keys)
        values = entries.copy()
        values[found] = current[found]
        same = ~found | (current["backend_id"] == entries["backend_id"])
        closed = found & ((current["flags"] & CONN_F_CLIENT_CLOSED) != 0)
        if allow_shorten:
            values["lease_expiry_ns"] = np.where(found, expiry_ns, entries["lease_expiry_ns"])
        else:
            values["lease_expiry_ns"] = np.where(
                closed, current["lease_expiry_ns"],
                np.maximum(values["lease_expiry_ns"], expiry_ns))
        if set_level:
            values["level"] = entries["level"]
        write = same & (~found | (_void(values) != _void(current)))
        if write.any():
            held.update_batch(keys[write], values[write])
        return int(write.sum())


def agg_lease_keys(levels: np.ndarray | int, masked: np.ndarray,
                   backend_ids: np.ndarray | int = AGG_OWN_ENTRY) -> np.ndarray:
    """LB_AGG_LEASE_KEY_DTYPE keys from (level, masked tuple, backend id) columns; backend id 0
    (the default) is the aggregate's own entry."""
    masked = np.asarray(masked, FLOW_KEY_DTYPE).reshape(-1)
    keys = np.zeros(len(masked), LB_AGG_LEASE_KEY_DTYPE)
    agg = np.zeros(len(masked), AGG_KEY_DTYPE)
    agg["masked"] = masked
    agg["level"] = levels
    keys["agg"] = agg
    keys["backend_id"] = backend_ids
    return keys


def vip_index_of_aggregates(vip_keys: np.ndarray, vip_values: np.ndarray,
                            masked: np.ndarray) -> np.ndarray:
    """The stats slot of the VIP of each masked tuple: by (vip, port, proto), else (a mask that
    drops the VIP port) the first VIP with that address and protocol; 0 when none."""
    out = np.zeros(len(masked), np.uint16)
    if len(vip_keys) == 0 or len(masked) == 0:
        return out
    found, rows = join(vip_keys, class_keys_of(masked))
    out[found] = vip_values["vip_index"][rows[found]]
    loose_dtype = np.dtype([("vip_addr", "u1", 16), ("proto", "u1")])

    def loose(keys: np.ndarray) -> np.ndarray:
        out_keys = np.zeros(len(keys), loose_dtype)
        out_keys["vip_addr"], out_keys["proto"] = keys["vip_addr"], keys["proto"]
        return out_keys

    first = np.unique(_void(loose(vip_keys)), return_index=True)[1]
    by_addr, rows = join(loose(vip_keys)[first], loose(masked))
    use = ~found & by_addr
    out[use] = vip_values["vip_index"][first[rows[use]]]
    return out


def apply_aggregate_leases(pin_dir: Path, agg_keys: np.ndarray, expiry_ns: np.ndarray | int, *,
                           flow_counts: np.ndarray | int | None = None,
                           allow_shorten: bool = False, cap: bool = False,
                           create: bool = True, now_ns: int | None = None) -> dict[str, int]:
    """Aggregate leases published by servers (one batched write). agg_keys:
    agg_lease_keys(level, masked tuple, the publishing backend). Per aggregate:
    - no own entry (the LB restarted, or the server aggregated first): the own entry is created
      on the publisher, so new members follow the flows it already holds;
    - the own entry names the publisher, or names another backend but has expired: its lease
      (and member count) is set, and the entry is the publisher's;
    - a valid own entry names another backend: the publisher's flows are ones from before a
      level change, still on their old backend: its cover entry (level, masked, publisher) holds
      their lease.
    An existing expiry only grows unless allow_shorten (set as given) or cap (lowered to the
    given expiry, never raised: a CLOSED aggregate); create=False (CLOSED aggregates) only
    changes entries the publisher has. Returns counts."""
    agg_keys = np.asarray(agg_keys, LB_AGG_LEASE_KEY_DTYPE).reshape(-1)
    n = len(agg_keys)
    expiry_ns = np.broadcast_to(np.asarray(expiry_ns, np.uint64), (n,))
    counts = None if flow_counts is None else np.broadcast_to(
        np.asarray(flow_counts, np.uint32), (n,))
    result = {"written": 0, "unchanged": 0, "created": 0, "covers": 0}
    if n == 0:
        return result
    levels = agg_keys["agg"]["level"]
    if (levels == 0).any() or (levels >= masks.LEVEL_COUNT).any():
        raise ConnpubError("aggregate leases are for levels 1..3: level-0 leases are flow leases "
                           "(apply_flow_leases)")
    if (agg_keys["backend_id"] == AGG_OWN_ENTRY).any():
        raise ConnpubError("an aggregate lease names the publishing backend (ids 1..): "
                           "agg_lease_keys(level, masked, backend_id)")
    keep = _latest_per_key(agg_keys, expiry_ns)
    agg_keys, expiry_ns = agg_keys[keep], expiry_ns[keep]
    counts = None if counts is None else counts[keep]
    now = _now_ns(now_ns)
    publisher = agg_keys["backend_id"].copy()
    own_keys = agg_keys.copy()
    own_keys["backend_id"] = AGG_OWN_ENTRY
    with locked(pin_dir), open_map(pin_dir, "agg_leases") as leases:
        own_found, own = _lookup_many(leases, own_keys)
        takes_own = ~own_found | (own["backend_id"] == publisher) | (
            own["lease_expiry_ns"] <= np.uint64(now))
        # the cover entries of the others: their current values
        cover_found, cover = _lookup_many(leases, agg_keys[~takes_own])
        keys = agg_keys.copy()
        keys[takes_own] = own_keys[takes_own]
        found = own_found.copy()
        current = own.copy()
        found[~takes_own], current[~takes_own] = cover_found, cover
        # an own entry taken over from another backend starts afresh (created now)
        fresh = ~found | (takes_own & (own["backend_id"] != publisher))
        new = current.copy()
        if cap:
            grown = np.where(fresh, expiry_ns, np.minimum(current["lease_expiry_ns"], expiry_ns))
        else:
            grown = np.where(fresh | allow_shorten, expiry_ns,
                             np.maximum(current["lease_expiry_ns"], expiry_ns))
        new["lease_expiry_ns"] = grown
        new["backend_id"] = publisher
        if counts is not None:
            new["flow_count"] = counts
        if fresh.any():
            vip_keys, vip_values, _ = read_vips(pin_dir)
            new["created_ns"][fresh] = now
            new["vip_index"][fresh] = vip_index_of_aggregates(
                vip_keys, vip_values, agg_keys["agg"]["masked"][fresh])
        write = fresh | (new["lease_expiry_ns"] != current["lease_expiry_ns"]) | (
            new["flow_count"] != current["flow_count"])
        if not create:
            write &= ~fresh
        if write.any():
            leases.update_batch(np.ascontiguousarray(keys[write]), new[write])
        result["written"] = int(write.sum())
        result["unchanged"] = int((~write).sum())
        result["created"] = int((~found & write).sum())
        result["covers"] = int((~takes_own).sum())
    return result


def purge_expired_aggregates(pin_dir: Path, now_ns: int) -> int:
    """Delete aggregate entries that expired before now_ns (datapath clock). Returns how many."""
    with locked(pin_dir), open_map(pin_dir, "agg_leases") as leases:
        keys, values = leases.items()
        old = values["lease_expiry_ns"] <= np.uint64(now_ns)
        return leases.delete_batch(keys[old]) if old.any() else 0


def read_conns(pin_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every connection: (FLOW_KEY_DTYPE keys, LB_CONN_DTYPE values)."""
    with open_map(pin_dir, "conns") as conns:
        return conns.items()


def read_held(pin_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every held flow (docs/lb.md "Held flows"): (FLOW_KEY_DTYPE, LB_CONN_DTYPE)."""
    with open_map(pin_dir, "held") as held:
        return held.items()


def hold_flows(pin_dir: Path, keys: np.ndarray, values: np.ndarray, *,
               refresh: bool = True) -> int:
    """Copy connection entries into `held` (a plain hash: never evicted). A held copy that
    equals the entry is not rewritten; without `refresh` a held copy keeps its fields and only
    takes a longer lease (values from PUBLISH entries). Returns how many it wrote."""
    if len(keys) == 0:
        return 0
    values = values.copy()
    with open_map(pin_dir, "held") as held:
        held_keys, held_values = held.items()
        stale = np.ones(len(keys), bool)
        if len(held_keys):
            found, index = join(held_keys, keys)
            rows = np.flatnonzero(found)
            current = held_values[index[found]]
            if refresh:
                stale[rows[_void(values[found]) == _void(current)]] = False
            else:
                longer = values["lease_expiry_ns"][found] > current["lease_expiry_ns"]
                current["lease_expiry_ns"] = np.maximum(current["lease_expiry_ns"],
                                                        values["lease_expiry_ns"][found])
                values[rows] = current
                stale[rows[~longer]] = False
        if stale.any():
            held.update_batch(keys[stale], values[stale])
        return int(stale.sum())


def release_held(pin_dir: Path, keys: np.ndarray) -> int:
    """Delete held flows (their connection ended or no lease covers them). Returns how many."""
    if len(keys) == 0:
        return 0
    with open_map(pin_dir, "held") as held:
        return held.delete_batch(keys)


def read_agg_leases(pin_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every aggregate entry: (LB_AGG_LEASE_KEY_DTYPE keys, LB_AGG_LEASE_DTYPE values)."""
    with open_map(pin_dir, "agg_leases") as leases:
        return leases.items()


def own_aggregates(keys: np.ndarray, values: np.ndarray, now_ns: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The aggregates' own entries (not the cover entries) of read_agg_leases' result; only the
    valid ones when now_ns is given."""
    use = keys["backend_id"] == AGG_OWN_ENTRY
    if now_ns is not None:
        use &= values["lease_expiry_ns"] > np.uint64(now_ns)
    return keys[use], values[use]


__all__ = [
    "agg_lease_keys", "apply_aggregate_leases", "apply_flow_leases", "own_aggregates",
    "purge_expired_aggregates", "read_agg_leases", "read_conns", "vip_index_of_aggregates",
]
