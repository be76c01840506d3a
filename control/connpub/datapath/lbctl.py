"""Control of an LB-node attachment: VIPs, backends (Maglev tables swapped atomically), config and
counters. Operates on the pinned maps of bpf/lb/lb_maps.h under one pin folder
(paths.pin_dir(iface, netns)); the LB agent's batched lease writes and reads live in
connpub.datapath.lbleases and are re-exported here."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from connpub.arrays import join as _join
from connpub.arrays import void_view as _void
from connpub.datapath import libbpf, maglev, masks, pinned
from connpub.datapath.abi import (
    CLASS_KEY_DTYPE,
    LB_BACKEND_DTYPE,
    LB_STATS_DTYPE,
    LB_VIP_META_DTYPE,
    U32_DTYPE,
)
from connpub.datapath.lbconfig import (  # noqa: F401 - the settings API is lbctl's too
    DEFAULT_CLOSE_LINGER_S,
    DEFAULT_INITIAL_LEASE_S,
    DEFAULT_MTU,
    config_dict,
    init_lb_maps,
    read_config,
    set_config,
)
from connpub.datapath.lbleases import (  # noqa: F401 - the lease API is lbctl's too
    agg_lease_keys,
    apply_aggregate_leases,
    apply_flow_leases,
    hold_flows,
    own_aggregates,
    purge_expired_aggregates,
    read_agg_leases,
    read_conns,
    read_held,
    release_held,
    vip_index_of_aggregates,
)
from connpub.datapath.lbmaps import (  # noqa: F401 - re-exported
    AGG_OWN_ENTRY,
    BACKEND_F_DRAINING,
    BACKEND_F_PRESENT,
    CONN_F_CLIENT_CLOSED,
    LAYOUTS,
    PROTOCOL_NAMES,
    PROTOCOLS,
    address_bytes,
    address_text,
    class_keys_of,
    locked,
    mac_bytes,
    mac_text,
    open_map,
    protocol_number,
    read_vips,
    vip_key,
    write_holds_flows,
)
from connpub.datapath.maps import PinnedMap
from connpub.errors import ConnpubError

VIP_F_HASH_CLIENT_ONLY = maglev.VIP_F_HASH_CLIENT_ONLY
MAX_SERVICE_BITS = 64


# ---------------------------------------------------------------------------------------------
# VIP filter


def vip_filter_slots(class_keys: np.ndarray, bits: int) -> np.ndarray:
    """vip_filter_slot() of bpf/lb/lb_structs.h for each CLASS_KEY_DTYPE key."""
    class_keys = np.ascontiguousarray(np.asarray(class_keys, CLASS_KEY_DTYPE).reshape(-1))
    raw = class_keys.view(np.uint8).reshape(-1, CLASS_KEY_DTYPE.itemsize)
    word = np.ascontiguousarray(raw[:, 12:16]).view("<u4").reshape(-1).astype(np.uint64)
    port = np.ascontiguousarray(raw[:, 16:18]).view("<u2").reshape(-1).astype(np.uint64)
    proto = raw[:, 18].astype(np.uint64)
    mixed = ((word ^ (port << np.uint64(8)) ^ proto) * np.uint64(0x9E3779B1)) & np.uint64(
        0xFFFFFFFF)
    return (mixed >> np.uint64(32 - bits)).astype(np.int64)


def _rewrite_vip_filter(pin_dir: Path) -> None:
    """vip_filter = number of VIPs per slot, recomputed from the VIP table."""
    keys, _, _ = read_vips(pin_dir)
    with open_map(pin_dir, "vip_filter") as vip_filter:
        slots = vip_filter.max_entries
        counts = np.bincount(vip_filter_slots(keys, slots.bit_length() - 1), minlength=slots)
        vip_filter.update_batch(np.arange(slots, dtype=U32_DTYPE), counts.astype(U32_DTYPE))


# ---------------------------------------------------------------------------------------------
# VIPs


def _service_count(pin_dir: Path) -> int:
    with open_map(pin_dir, "maglev_bank") as bank_map:
        return bank_map.max_entries


def add_vip(pin_dir: Path, address: str, port: int, proto: str | int, service: int = 0,
            flags: int = 0, level: int = 0) -> int:
    """Add a VIP served by `service`; returns its stats slot (vip_index)."""
    key = vip_key(address, port, proto)
    services = _service_count(pin_dir)
    if not 0 <= service < services:
        raise ConnpubError(f"bad service {service}: this program has services 0..{services - 1}")
    if not 0 <= level < masks.LEVEL_COUNT:
        raise ConnpubError(f"bad level {level}: use 0..{masks.LEVEL_COUNT - 1}")
    with locked(pin_dir):
        keys, values, capacity = read_vips(pin_dir)
        if _join(keys, key)[0].any():
            raise ConnpubError(f"VIP {address} {port}/{proto} exists: "
                               "`connpub lb vip del` it first")
        free = np.setdiff1d(np.arange(capacity), values["vip_index"])
        if len(free) == 0:
            raise ConnpubError(f"VIP table full ({capacity}): delete a VIP or raise MAX_VIPS")
        meta = np.zeros(1, LB_VIP_META_DTYPE)
        meta["service_id"], meta["vip_index"] = service, int(free[0])
        meta["flags"], meta["level"] = flags, level
        with open_map(pin_dir, "vip_stats") as stats_map:
            stats_map.update(np.array(free[0], U32_DTYPE), np.zeros(1, LB_STATS_DTYPE))
        with open_map(pin_dir, "vips") as vip_map:
            vip_map.update(key, meta)
        _rewrite_vip_filter(pin_dir)  # after the VIP exists: the filter never hides a VIP
        return int(free[0])


def del_vip(pin_dir: Path, address: str, port: int, proto: str | int) -> int:
    """Delete a VIP and the connections to it (a leased flow is forwarded without a VIP lookup,
    so they must go with it). Returns how many connections were removed."""
    key = vip_key(address, port, proto)
    with locked(pin_dir):
        with open_map(pin_dir, "vips") as vip_map:
            if not vip_map.delete(key):
                raise ConnpubError(f"no VIP {address} {port}/{proto}: see `connpub lb vip list`")
        _rewrite_vip_filter(pin_dir)
        removed = {}
        for name in ("held", "conns"):  # its held flows go too (they are its connections)
            with open_map(pin_dir, name) as conns:
                conn_keys = conns.keys()
                of_vip = _void(class_keys_of(conn_keys)) == _void(key)[0]
                removed[name] = conns.delete_batch(conn_keys[of_vip]) if of_vip.any() else 0
        return removed["conns"]


def set_vip_levels(pin_dir: Path, class_keys: np.ndarray, levels: np.ndarray | int) -> int:
    """The LB agent's granularity decisions: level of each VIP (traffic class). Classes that
    are not VIPs are skipped. A VIP leaving level L >= 1 gets bit L in other_levels: its level-L
    aggregates may still be valid, and their members are found there (docs/lb.md
    "Aggregates"; retire_other_levels clears the bit). A VIP changing level gets holds_flows:
    its connections from before are looked up in `held` when the LRU evicted them (docs/lb.md
    "Held flows"; retire_held clears it). Returns how many VIPs changed level."""
    class_keys = np.asarray(class_keys, CLASS_KEY_DTYPE).reshape(-1)
    levels = np.broadcast_to(np.asarray(levels, np.uint8), class_keys.shape)
    if (levels >= masks.LEVEL_COUNT).any():
        raise ConnpubError(f"bad level in {sorted(set(levels.tolist()))}: use 0..3")
    with locked(pin_dir):
        keys, values, _ = read_vips(pin_dir)
        found, index = _join(keys, class_keys)
        if not found.any():
            return 0
        changed = values[index[found]].copy()
        new_levels = levels[found]
        differs = changed["level"] != new_levels
        old_bit = np.where(changed["level"] > 0, np.left_shift(1, changed["level"]), 0)
        changed["other_levels"] = np.where(
            differs, (changed["other_levels"] | old_bit) & ~np.left_shift(1, new_levels),
            changed["other_levels"]).astype(np.uint8)
        changed["holds_flows"] = np.where(differs, 1, changed["holds_flows"]).astype(np.uint8)
        changed["level"] = new_levels
        with open_map(pin_dir, "vips") as vip_map:
            if differs.any():
                vip_map.update_batch(class_keys[found][differs], changed[differs])
        return int(differs.sum())


def retire_other_levels(pin_dir: Path, now_ns: int) -> int:
    """Clear the other_levels bits of VIPs that have no valid aggregate entry (own or cover) at
    that level any more: their packets stop looking there. An entry is the VIP's when its
    masked tuple names the VIP's address and protocol, and its port or none (a mask that drops
    the VIP port shares one aggregate among the VIP's ports: the entry's vip_index is only the
    class that made it, and matching on it cleared the bit of the other ports' classes while
    their members still lived on the shared aggregate, which re-picked and reset them).
    Returns the bits cleared."""
    with locked(pin_dir):
        keys, values, _ = read_vips(pin_dir)
        busy = values["other_levels"] != 0
        if not busy.any():
            return 0
        agg_keys, agg_values = read_agg_leases(pin_dir)
        valid = agg_values["lease_expiry_ns"] > np.uint64(now_ns)
        masked = agg_keys["agg"]["masked"][valid]
        # (level, VIP address, VIP port (0: dropped by the level's mask), protocol)
        held = set(zip(agg_keys["agg"]["level"][valid].tolist(),
                       [bytes(addr) for addr in masked["vip_addr"]],
                       masked["vip_port"].tolist(), masked["proto"].tolist(), strict=True))
        cleared = 0
        update = np.zeros(len(keys), bool)
        for row in np.flatnonzero(busy).tolist():
            bits = int(values["other_levels"][row])
            addr, port = bytes(keys["vip_addr"][row]), int(keys["vip_port"][row])
            proto = int(keys["proto"][row])
            for level in range(1, masks.LEVEL_COUNT):
                if bits >> level & 1 and (level, addr, port, proto) not in held \
                        and (level, addr, 0, proto) not in held:
                    bits &= ~(1 << level)
                    cleared += 1
            if bits != int(values["other_levels"][row]):
                values["other_levels"][row] = bits
                update[row] = True
        if update.any():
            with open_map(pin_dir, "vips") as vip_map:
                vip_map.update_batch(keys[update], values[update])
        return cleared


def set_vip_holds(pin_dir: Path, class_keys: np.ndarray) -> int:
    """Set holds_flows of these VIPs (before their level changes: docs/lb.md "Held flows").
    Returns how many VIPs it set."""
    class_keys = np.asarray(class_keys, CLASS_KEY_DTYPE).reshape(-1)
    with locked(pin_dir):
        keys, values, _ = read_vips(pin_dir)
        found, index = _join(keys, class_keys)
        return write_holds_flows(pin_dir, keys, values, index[found])


def retire_held(pin_dir: Path, keep: np.ndarray | None = None) -> int:
    """Clear holds_flows of the VIPs with no held flow left and no earlier level's aggregate
    (other_levels 0: no transition flow can be made): their misses stop looking in `held`.
    `keep`: class keys that go on holding (the LB agent's classes under map pressure).
    Returns how many VIPs it cleared."""
    with locked(pin_dir):
        keys, values, _ = read_vips(pin_dir)
        candidates = (values["holds_flows"] != 0) & (values["other_levels"] == 0)
        if keep is not None and len(keep):
            candidates &= ~_join(np.asarray(keep, CLASS_KEY_DTYPE).reshape(-1), keys)[0]
        if not candidates.any():
            return 0
        with open_map(pin_dir, "held") as held:
            _, held_values = held.items()
        busy = np.isin(values["vip_index"], held_values["vip_index"])
        retire = candidates & ~busy
        if retire.any():
            values["holds_flows"][retire] = 0
            with open_map(pin_dir, "vips") as vip_map:
                vip_map.update_batch(keys[retire], values[retire])
        return int(retire.sum())


def list_vips(pin_dir: Path) -> list[dict]:
    keys, values, _ = read_vips(pin_dir)
    with open_map(pin_dir, "vip_stats") as stats_map:
        _, per_cpu = stats_map.items()
    totals = _sum_stats(per_cpu)
    rows = []
    for key, meta in zip(keys, values, strict=True):
        stats = totals[int(meta["vip_index"])]
        rows.append({
            "vip": address_text(key["vip_addr"]), "port": int(key["vip_port"]),
            "proto": PROTOCOL_NAMES.get(int(key["proto"]), str(int(key["proto"]))),
            "service": int(meta["service_id"]), "vip_index": int(meta["vip_index"]),
            "flags": int(meta["flags"]), "level": int(meta["level"]),
            "other_levels": [lv for lv in range(1, masks.LEVEL_COUNT)
                             if int(meta["other_levels"]) >> lv & 1],
            **{name: int(stats[name]) for name in LB_STATS_DTYPE.names},
        })
    return sorted(rows, key=lambda r: r["vip_index"])


def _sum_stats(per_cpu: np.ndarray) -> np.ndarray:
    totals = np.zeros(per_cpu.shape[0], LB_STATS_DTYPE)
    for name in LB_STATS_DTYPE.names:
        totals[name] = per_cpu[name].sum(axis=1)
    return totals


# ---------------------------------------------------------------------------------------------
# backends and Maglev tables


def _read_backends(pin_dir: Path) -> np.ndarray:
    with open_map(pin_dir, "backends") as backend_map:
        return backend_map.items()[1]  # an array: values in id order


def _members(backends: np.ndarray, service: int) -> np.ndarray:
    """Ids of the backends that take new flows of `service`, ascending."""
    usable = (backends["flags"] & (BACKEND_F_PRESENT | BACKEND_F_DRAINING)) == BACKEND_F_PRESENT
    member = (backends["services"] >> np.uint64(service)) & np.uint64(1) == 1
    return np.flatnonzero(usable & member)


def maglev_size(pin_dir: Path) -> int:
    with open_map(pin_dir, "maglev") as table, open_map(pin_dir, "maglev_bank") as banks:
        return table.max_entries // (2 * banks.max_entries)


def _rebuild(pin_dir: Path, backends: np.ndarray, services: Sequence[int]) -> None:
    """Write each service's new Maglev table into its idle bank, then flip the bank index: a
    packet reads either the old or the new table, never a half-written one."""
    size = maglev_size(pin_dir)
    with open_map(pin_dir, "maglev") as table, open_map(pin_dir, "maglev_bank") as banks:
        for service in sorted(set(services)):
            ids = _members(backends, service)
            names = [address_text(backends["addr"][i]) for i in ids]
            slots = maglev.build_table(names, size)
            entries = np.where(slots >= 0, ids[np.maximum(slots, 0)] if len(ids) else 0, 0)
            service_key = np.array(service, U32_DTYPE)
            active = int(banks.lookup(service_key))
            idle = 1 - (active & 1)
            base = (service * 2 + idle) * size
            table.update_batch(np.arange(base, base + size, dtype=U32_DTYPE),
                               entries.astype(U32_DTYPE))
            banks.update(service_key, np.array(idle, U32_DTYPE))


def _services_of(mask: int) -> list[int]:
    return [s for s in range(MAX_SERVICE_BITS) if mask >> s & 1]


def _check_backend_id(backends: np.ndarray, backend_id: int) -> None:
    if not 0 < backend_id < len(backends):
        raise ConnpubError(f"bad backend id {backend_id}: use 1..{len(backends) - 1}")


def add_backend(pin_dir: Path, backend_id: int, address: str, services: Sequence[int] = (0,),
                mac: str | None = None) -> None:
    """Add backend `backend_id` (= the server's id) at `address` to `services`; their Maglev
    tables are rebuilt. mac: next-hop MAC for it (default: the config's gateway MAC)."""
    addr, is_v6 = address_bytes(address)
    service_count = _service_count(pin_dir)
    bad = [s for s in services if not 0 <= s < service_count]
    if bad or not services:
        raise ConnpubError(f"bad services {list(services)}: use 0..{service_count - 1}")
    with locked(pin_dir):
        backends = _read_backends(pin_dir)
        _check_backend_id(backends, backend_id)
        if backends["flags"][backend_id] & BACKEND_F_PRESENT:
            raise ConnpubError(f"backend {backend_id} exists "
                               f"({address_text(backends['addr'][backend_id])}): del it first")
        same = (backends["flags"] & BACKEND_F_PRESENT).astype(bool) & \
            (backends["addr"] == addr).all(axis=1)
        if same.any():
            raise ConnpubError(f"address {address} is backend {int(np.flatnonzero(same)[0])} "
                               "already: one backend per address")
        entry = np.zeros(1, LB_BACKEND_DTYPE)
        entry["addr"], entry["mac"], entry["is_v6"] = addr, mac_bytes(mac), is_v6
        entry["flags"] = BACKEND_F_PRESENT
        entry["services"] = sum(1 << s for s in set(services))
        with open_map(pin_dir, "backend_stats") as stats_map:
            stats_map.update(np.array(backend_id, U32_DTYPE), np.zeros(1, LB_STATS_DTYPE))
        with open_map(pin_dir, "backends") as backend_map:
            backend_map.update(np.array(backend_id, U32_DTYPE), entry)
        backends[backend_id] = entry[0]
        _rebuild(pin_dir, backends, services)


def del_backend(pin_dir: Path, backend_id: int) -> None:
    """Remove a backend: out of its services' Maglev tables first, then its entry. Flows still
    pointing at it are re-picked on their next packet (stat backend_gone)."""
    with locked(pin_dir):
        backends = _read_backends(pin_dir)
        _check_backend_id(backends, backend_id)
        if not backends["flags"][backend_id] & BACKEND_F_PRESENT:
            raise ConnpubError(f"no backend {backend_id}: see `connpub lb backend list`")
        services = _services_of(int(backends["services"][backend_id]))
        gone = backends.copy()
        gone[backend_id] = np.zeros(1, LB_BACKEND_DTYPE)[0]
        _rebuild(pin_dir, gone, services)
        with open_map(pin_dir, "backends") as backend_map:
            backend_map.update(np.array(backend_id, U32_DTYPE), np.zeros(1, LB_BACKEND_DTYPE))


def drain_backend(pin_dir: Path, backend_id: int, draining: bool = True) -> None:
    """Draining: the backend leaves its services' Maglev tables (no new flows) but flows that
    hold a lease on it keep going to it. draining=False puts it back."""
    with locked(pin_dir):
        backends = _read_backends(pin_dir)
        _check_backend_id(backends, backend_id)
        if not backends["flags"][backend_id] & BACKEND_F_PRESENT:
            raise ConnpubError(f"no backend {backend_id}: see `connpub lb backend list`")
        entry = backends[backend_id : backend_id + 1].copy()
        if draining:
            entry["flags"] |= BACKEND_F_DRAINING
        else:
            entry["flags"] &= ~np.uint8(BACKEND_F_DRAINING)
        backends[backend_id] = entry[0]
        # undrain: flag first, then tables; drain: tables first, then flag
        with open_map(pin_dir, "backends") as backend_map:
            if not draining:
                backend_map.update(np.array(backend_id, U32_DTYPE), entry)
            _rebuild(pin_dir, backends, _services_of(int(entry["services"][0])))
            if draining:
                backend_map.update(np.array(backend_id, U32_DTYPE), entry)


def _read_array_range(array_map: PinnedMap, start: int, count: int) -> np.ndarray:
    """Values [start, start + count) of an array map (batched lookups from index start)."""
    values = np.zeros(count, array_map.value_dtype)
    keys = np.zeros(count, U32_DTYPE)
    token = np.zeros(2, U32_DTYPE)
    opts = libbpf.BpfMapBatchOpts(sz=ctypes.sizeof(libbpf.BpfMapBatchOpts))
    done = 0
    while done < count:
        prev = start + done - 1  # an array batch continues after the key in in_batch
        token[0] = max(prev, 0)
        got = ctypes.c_uint32(count - done)
        ret = libbpf.LIB.bpf_map_lookup_batch(
            array_map.fd, None if prev < 0 else token.ctypes.data, token.ctypes.data + 4,
            keys.ctypes.data + done * 4, values.ctypes.data + done * values.dtype.itemsize,
            ctypes.byref(got), ctypes.byref(opts))
        if ret < 0 and ret != -errno.ENOENT:
            libbpf.check(ret, f"batched lookup in {array_map.name}")
        if got.value == 0:
            break
        done += got.value
    return values


def maglev_table(pin_dir: Path, service: int) -> np.ndarray:
    """The active Maglev table of `service`: backend id per slot (0 = none)."""
    size = maglev_size(pin_dir)
    with open_map(pin_dir, "maglev") as table, open_map(pin_dir, "maglev_bank") as banks:
        bank = int(banks.lookup(np.array(service, U32_DTYPE))) & 1
        return _read_array_range(table, (service * 2 + bank) * size, size).astype(np.uint32)


def list_backends(pin_dir: Path) -> list[dict]:
    backends = _read_backends(pin_dir)
    ids = np.flatnonzero(backends["flags"] & BACKEND_F_PRESENT)
    with open_map(pin_dir, "backend_stats") as stats_map:
        _, per_cpu = stats_map.items()
    totals = _sum_stats(per_cpu)
    shares: dict[int, dict[int, float]] = {}
    services = sorted({s for i in ids for s in _services_of(int(backends["services"][i]))})
    for service in services:
        counts = np.bincount(maglev_table(pin_dir, service), minlength=len(backends))
        total = counts.sum()
        shares[service] = {int(i): counts[i] / total for i in ids}
    rows = []
    for i in ids:
        entry = backends[i]
        own = _services_of(int(entry["services"]))
        rows.append({
            "id": int(i), "address": address_text(entry["addr"]), "mac": mac_text(entry["mac"]),
            "draining": bool(entry["flags"] & BACKEND_F_DRAINING), "services": own,
            "maglev_share": {str(s): round(shares[s][int(i)], 6) for s in own},
            **{name: int(totals[i][name]) for name in LB_STATS_DTYPE.names},
        })
    return rows


# ---------------------------------------------------------------------------------------------
# stats


def read_stats(pin_dir: Path) -> dict[str, int]:
    """Global counters (enum lb_stat), summed over CPUs."""
    return pinned.read_stats(pin_dir, "lb")


def lease_misses(pin_dir: Path) -> int:
    """Packets of known flows that found both leases expired and were not a SYN (total)."""
    return read_stats(pin_dir)["lease_miss"]


__all__ = [
    "add_backend", "add_vip", "agg_lease_keys", "apply_aggregate_leases", "apply_flow_leases",
    "del_backend", "del_vip", "drain_backend", "init_lb_maps", "lease_misses", "list_backends",
    "list_vips", "maglev_table", "own_aggregates", "purge_expired_aggregates", "read_agg_leases",
    "read_config", "read_conns", "read_held", "read_stats", "retire_held", "retire_other_levels",
    "hold_flows", "release_held", "set_config",
    "set_vip_holds", "set_vip_levels", "vip_key",
]
