"""The LB agent: verifies PUBLISH packets and turns them into leases in the LB program's maps
(flow leases for level 0, aggregate leases for levels 1-3, only for flows whose connection
names the publishing server), runs the granularity policy per traffic class (VIP) and sends
DIRECTIVEs to the servers; asks every server for a flow-level resync when it starts.
docs/agents.md."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from connpub.agents.common import (
    AgentSocket,
    SourceFilter,
    StopFlag,
    prefix_filter,
    run_loop,
    status_path,
    write_status,
)
from connpub.agents.lb_plan import (  # noqa: F401 - the planning functions are lb's API too
    LeaseBatch,
    aggregate_expiry_levels,
    aggregate_members_per_vip,
    class_keys_of,
    class_statistics,
    directive_plan,
    entries_for_vips,
    lb_what_if_loads,
    plan_leases,
    service_backends,
    valid_leases,
)
from connpub.agents.metrics import AgentMetrics
from connpub.arrays import join  # noqa: F401 - re-exported (tests join with it)
from connpub.arrays import void_view as _void
from connpub.config import Config
from connpub.datapath import lbctl
from connpub.datapath.abi import (
    CLASS_KEY_DTYPE,
    FLOW_KEY_DTYPE,
    LB_BACKEND_DTYPE,
    LB_CONN_DTYPE,
)
from connpub.datapath.clock import DatapathClock, datapath_clock
from connpub.datapath.masks import LEVEL_COUNT, mask_byte_table
from connpub.policy.granularity import aggregate_units, flow_holding
from connpub.policy.pipeline import LevelPipeline
from connpub.protocol.wire import (
    Decoder,
    Encoder,
    PacketType,
    accepted_entries,
    load_key,
)

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
BACKEND_F_PRESENT = lbctl.BACKEND_F_PRESENT
ADAPTIVE_MODES = ("adaptive", "full")


class LbAgent:
    """One LB node's agent. `handle(datagrams)` applies publishes; `evaluate()` runs the
    granularity policy and sends directives; `housekeeping()` purges expired aggregate leases
    and refreshes metrics and the status file."""

    def __init__(self, cfg: Config, pin_dir: Path, *, key: bytes | None = None,
                 iface: str | None = None, netns: str | None = None,
                 agent_socket: AgentSocket | None = None,
                 clock: DatapathClock | None = None) -> None:
        self.cfg = cfg
        self.pin_dir = Path(pin_dir)
        self.mode = cfg.publish.mode
        self.node_id = cfg.agent.server_id
        self.key = key if key is not None else load_key(cfg.security.key_file)
        self.clock = clock or datapath_clock()
        self.decoder = Decoder.from_config(cfg, self.key, (PacketType.PUBLISH,))
        self.socket = agent_socket or AgentSocket(fabric_address(cfg, self.pin_dir),
                                                  cfg.agent.listen_port)
        self.sources = SourceFilter(prefix_filter(cfg.agent.allowed_sources)
                                    or self.is_backend_address)
        self.encoder = Encoder(self.node_id, self.key, cfg.publish.mtu,
                               ip_version=6 if self.socket.dual_stack else 4)
        self.metrics = AgentMetrics("lb")
        self.status_file = status_path("lb", iface, netns)
        self.iface, self.netns = iface, netns
        self.byte_table = mask_byte_table(cfg.masks.specs)
        self.pipeline = LevelPipeline(cfg)  # the simulator drives the same object
        self.history = self.pipeline.history
        self.class_rows: dict[bytes, int] = {}
        self.previous_vip_totals: dict[bytes, tuple[int, int]] = {}
        self.resync_asked: set[int] = set()
        self.vip_keys = np.zeros(0, CLASS_KEY_DTYPE)
        self.vip_services = np.zeros(0, np.int64)
        self.vip_levels = np.zeros(0, np.uint8)
        self.vip_indexes = np.zeros(0, np.int64)
        self.vip_flags = np.zeros(0, np.int64)
        self.backends = np.zeros(0, LB_BACKEND_DTYPE)
        self.levels: dict[str, dict] = {}
        self.evaluations = 0
        self.serving_s = 0.0
        self.conn_occupancy = 0.0  # leased connections / conns capacity, last evaluation
        self.published: list[tuple] = []  # (ns, keys, backends, expiry): remember_published
        # docs/lb.md "Held flows": when each class started holding its connections (datapath
        # ns; a class holding since before this agent started counts as long ago), and the
        # classes that go on holding them (under pressure, or waiting to change level: retire_held
        # leaves these alone)
        self.held_since: dict[bytes, int] = {}
        self.kept_holds = np.zeros(0, CLASS_KEY_DTYPE)
        # two publish intervals: every server publishes each of its new level-0 flows meanwhile
        self.hold_head_start_ns = int(2 * cfg.publish.interval_s * NS_PER_S)
        self.started_unix = time.time()
        self.last_lease_misses = lbctl.lease_misses(self.pin_dir)  # datapath total, last read
        self.lease_misses_since_start = 0
        # a flow whose client sent FIN/RST keeps k*T of lease, the baseline's bound
        lbctl.set_config(self.pin_dir, initial_lease_s=cfg.lease.initial_s,
                         close_linger_s=cfg.lease.k * cfg.publish.interval_s)
        self.refresh_topology()

    # -- topology -------------------------------------------------------------------------

    def refresh_topology(self) -> None:
        """Re-read the VIPs and backends (the operator may change them at any time)."""
        with lbctl.open_map(self.pin_dir, "vips") as vips:
            keys, values = vips.items()
        self.vip_keys = np.ascontiguousarray(keys)
        self.vip_services = values["service_id"].astype(np.int64)
        self.vip_levels = values["level"].astype(np.uint8)
        self.vip_holds = values["holds_flows"] != 0
        self.vip_indexes = values["vip_index"].astype(np.int64)
        self.vip_flags = values["flags"].astype(np.int64)
        with lbctl.open_map(self.pin_dir, "backends") as backend_map:
            self.backends = backend_map.items()[1]
        self.sources.reset()  # the backends (allowed senders by default) may have changed

    def is_backend_address(self, ip) -> bool:
        """Without [agent] allowed_sources a PUBLISH may come from a present backend's address."""
        present = self.backends["flags"] & BACKEND_F_PRESENT != 0
        return str(ip) in {lbctl.address_text(a) for a in self.backends["addr"][present]}

    def receive(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """The socket's datagrams: senders that are no server are dropped (and counted) before
        any HMAC is computed; the rest go to `handle`. Kernel drops are counted here too."""
        kept = self.sources.keep(datagrams, self.metrics)
        self.metrics.inc("socket_drops", self.socket.take_kernel_drops())
        if kept:
            self.handle(kept)

    def serve_pending(self) -> None:
        """Apply the publishes waiting on the socket now. A class evaluation reads and scans the
        whole connection table (about 1 s at 100k connections on 2 busy cores); called between
        its steps, so that lease renewals never wait behind it (docs/agents.md "LB agent")."""
        started = time.perf_counter()
        batch = self.socket.drain()
        if batch:
            self.receive(batch)
        self.serving_s += time.perf_counter() - started

    def backend_address(self, backend_id: int) -> tuple:
        address = lbctl.address_text(self.backends["addr"][backend_id])
        return self.socket.destination(address, self.cfg.agent.listen_port)

    def present_backends(self) -> list[int]:
        return np.flatnonzero((self.backends["flags"] & BACKEND_F_PRESENT) != 0).tolist()

    def request_resyncs(self) -> int:
        """A RESYNC-REQUEST to every backend not asked yet (all of them at start)."""
        asked = 0
        for backend_id in self.present_backends():
            if backend_id in self.resync_asked:
                continue
            packet = self.encoder.resync_request(self.clock.now_ns())
            if self.socket.send([packet], self.backend_address(backend_id)):
                self.resync_asked.add(backend_id)
                asked += 1
        self.metrics.inc("resync_requests", asked, direction="sent")
        return asked

    # -- receive path ---------------------------------------------------------------------

    def handle(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Verify every waiting datagram in one batch and apply the accepted entries."""
        packets = [data for data, _ in datagrams]
        checks_before = self.decoder.tag_checks
        results = self.decoder.decode_batch(packets)
        self.metrics.inc("tag_checks", self.decoder.tag_checks - checks_before)
        accepted_bytes = 0
        accepted_packets = 0
        for result, packet in zip(results, packets, strict=True):
            if result.reason is None:
                accepted_packets += 1
                accepted_bytes += len(packet)
            else:
                self.metrics.inc("rejected", reason=result.reason.value)
        self.metrics.inc("publish_packets", accepted_packets, direction="received")
        self.metrics.inc("publish_bytes", accepted_bytes, direction="received")
        entries = accepted_entries(results, PacketType.PUBLISH)
        if len(entries):
            counts = np.bincount(entries["level"], minlength=LEVEL_COUNT)
            for level, count in enumerate(counts[:LEVEL_COUNT].tolist()):
                self.metrics.inc("publish_entries", count, direction="received",
                                 level=str(level))
            self.apply(entries, self.clock.now_ns())

    def apply(self, entries: np.ndarray, now_ns: int) -> dict[str, int]:
        """Apply accepted PUBLISH entries to the maps with batched writes."""
        batch = plan_leases(entries, self.vip_keys, now_ns, self.cfg)
        done = {"not_vip": batch.not_vip}
        self.metrics.inc("entries_ignored", batch.not_vip, reason="not_vip")
        if len(batch.flow_keys):
            result = lbctl.apply_flow_leases(self.pin_dir, batch.flow_keys, batch.flow_backends,
                                             batch.flow_expiry_ns, create=True, now_ns=now_ns)
            self._count_flow_result(result, "flow")
            done.update({f"flow_{k}": v for k, v in result.items()})
            self.remember_published(batch, now_ns)
        if len(batch.closed_flow_keys):
            # level 0: an aggregate lease must not keep a flow alive that its server has closed
            result = lbctl.apply_flow_leases(self.pin_dir, batch.closed_flow_keys,
                                             batch.closed_flow_backends, now_ns, levels=0,
                                             allow_shorten=True, create=False, now_ns=now_ns)
            self._count_flow_result(result, "closed_flow")
        if len(batch.agg_keys):
            result = lbctl.apply_aggregate_leases(self.pin_dir, batch.agg_keys,
                                                  batch.agg_expiry_ns,
                                                  flow_counts=batch.agg_flow_counts,
                                                  now_ns=now_ns)
            self.metrics.inc("entries_applied", len(batch.agg_keys), kind="aggregate")
            self.metrics.inc("map_writes", result["written"], map="agg_leases")
            done.update({f"agg_{k}": v for k, v in result.items()})
        if len(batch.closed_agg_keys):
            # an ended aggregate: capped at now + close_linger (k*T), so a member that joined
            # after the server's read keeps its lease until the next publish
            linger_ns = round(self.cfg.lease.k * self.cfg.publish.interval_s * NS_PER_S)
            result = lbctl.apply_aggregate_leases(self.pin_dir, batch.closed_agg_keys,
                                                  now_ns + linger_ns, cap=True, create=False,
                                                  now_ns=now_ns)
            self.metrics.inc("entries_applied", len(batch.closed_agg_keys),
                             kind="closed_aggregate")
            self.metrics.inc("map_writes", result["written"], map="agg_leases")
        return done

    def _count_flow_result(self, result: dict[str, int], kind: str) -> None:
        applied = result["written"] + result["unchanged"]
        self.metrics.inc("entries_applied", applied, kind=kind)
        self.metrics.inc("map_writes", result["written"], map="conns")
        self.metrics.inc("map_writes", result.get("held", 0), map="held")
        self.metrics.inc("entries_ignored", result["refused_backend"], reason="other_backend")
        self.metrics.inc("entries_ignored", result.get("refused_not_vip", 0), reason="not_vip")

    # -- granularity ----------------------------------------------------------------------

    def _rows_for(self, vip_keys: np.ndarray) -> np.ndarray:
        rows = []
        for raw in _void(vip_keys).tolist():
            rows.append(self.class_rows.setdefault(bytes(raw), len(self.class_rows)))
        return np.asarray(rows, np.int64)

    def evaluate(self) -> np.ndarray:
        """One granularity evaluation over every VIP; returns the effective levels per VIP (in
        self.vip_keys order), written to the LB's VIP table and sent to the servers."""
        started = time.perf_counter()
        self.serving_s = 0.0  # publishes applied meanwhile (serve_pending): not evaluation time
        self.refresh_topology()
        self.request_resyncs()
        now_ns = self.clock.now_ns()
        vip_keys = self.vip_keys
        if len(vip_keys) == 0:
            return np.zeros(0, np.uint8)
        conn_keys, conns = lbctl.read_conns(self.pin_dir)
        agg_keys, agg_values = lbctl.read_agg_leases(self.pin_dir)
        self.serve_pending()
        valid = valid_leases(conn_keys, conns, agg_keys, agg_values, now_ns, self.byte_table)
        members = aggregate_members_per_vip(agg_keys, agg_values, self.vip_indexes, now_ns)
        active, mean_age = class_statistics(conn_keys, valid, conns["created_ns"], vip_keys,
                                            now_ns, members)
        bytes_delta, new_delta = self._vip_counter_deltas(vip_keys)
        rows = self._rows_for(vip_keys)
        size = len(self.class_rows)
        column = np.zeros(size)
        full = {name: column.copy() for name in ("bytes", "new", "active")}
        duration = np.full(size, np.nan)
        full["bytes"][rows], full["new"][rows], full["active"][rows] = (bytes_delta, new_delta,
                                                                         active)
        duration[rows] = mean_age
        with lbctl.open_map(self.pin_dir, "conns") as conn_map:
            capacity = conn_map.max_entries
        # Pressure = connections holding a valid lease: the LB never deletes expired entries
        # (the LRU recycles them), so the raw entry count stays at capacity after any burst of
        # short flows and would pin every class at the coarsest level for good.
        occupancy = int(valid.sum()) / max(capacity, 1)
        self.serve_pending()
        self.conn_occupancy = round(occupancy, 4)
        services = int(self.vip_services.max(initial=-1)) + 1
        groups = np.zeros(size, np.int64)
        groups[rows] = self.vip_services
        units = np.arange(size) + size  # rows of VIPs gone: alone
        units[rows] = aggregate_units(vip_keys)
        loads = lb_what_if_loads(
            conn_keys, conns, valid, agg_keys, agg_values, now_ns, vip_keys, rows,
            self.vip_indexes, self.vip_flags, self.vip_services,
            {s: lbctl.maglev_table(self.pin_dir, s) for s in np.unique(self.vip_services).tolist()},
            size, len(self.backends), self.byte_table)
        self.serve_pending()
        decision = self.pipeline.evaluate(now_ns, vip_keys, full["bytes"], full["new"],
                                          full["active"], duration, occupancy, rows,
                                          loads=loads, groups=groups,
                                          members=service_backends(self.backends, services),
                                          units=units)
        self.serve_pending()
        if self.mode in ADAPTIVE_MODES:
            effective = decision.effective_levels
        else:
            effective = np.zeros(len(vip_keys), np.uint8)
        # docs/lb.md "Held flows": a class with connections holds them from the first sign of
        # pressure on, and changes level only after holding them for a head start, so that
        # every entry the LRU evicts meanwhile is re-made into `held` too (the datapath holds
        # its new entries while holds_flows is set) or known from its server's publish
        since = np.array([self.held_since.get(raw, 0) for raw in _void(vip_keys).tolist()],
                         np.int64)
        start, under_pressure, wait = flow_holding(
            self.vip_levels, effective, self.vip_holds, active, since, now_ns, occupancy,
            self.cfg.granularity.map_pressure, self.cfg.granularity.hold_flows_from,
            self.hold_head_start_ns if self.mode in ADAPTIVE_MODES else 0)
        # kept by housekeeping's retire_held: the classes under pressure, and those waiting out
        # their head start (a class at level >= 1 holds no entry in `held`: cleared between
        # two evaluations, it started holding anew at each one and never changed level)
        self.kept_holds = np.ascontiguousarray(vip_keys[under_pressure | wait])
        if start.any():
            self.metrics.inc("map_writes", lbctl.set_vip_holds(self.pin_dir, vip_keys[start]),
                             map="vips")
            for raw in _void(vip_keys[start]).tolist():
                self.held_since[raw] = now_ns
        effective = np.where(wait, self.vip_levels, effective).astype(np.uint8)
        moved = np.ascontiguousarray(vip_keys[effective != self.vip_levels])
        changed = lbctl.set_vip_levels(self.pin_dir, vip_keys, effective)
        self.metrics.inc("map_writes", changed, map="vips")
        if changed:  # connections made between the read above and the level write
            conn_keys, conns = lbctl.read_conns(self.pin_dir)
            self.bridge_level_change(moved, conn_keys, conns, now_ns)
            conn_keys, conns = lbctl.read_conns(self.pin_dir)
            valid = valid_leases(conn_keys, conns, agg_keys, agg_values, now_ns, self.byte_table)
        self.hold_flows(conn_keys, conns, valid, agg_keys, agg_values, now_ns)
        self.serve_pending()
        self.send_directives(effective, now_ns)
        self.evaluations += 1
        self.levels = {}
        for i, raw in enumerate(vip_keys):
            name = f"{lbctl.address_text(raw['vip_addr'])}:{int(raw['vip_port'])}/" \
                   f"{lbctl.PROTOCOL_NAMES.get(int(raw['proto']), int(raw['proto']))}"
            self.levels[name] = {
                "effective": int(effective[i]), "proposed": int(decision.proposed_levels[i]),
                "in_cohort": bool(decision.in_cohort[i]), "active": int(active[i]),
                "mean_age_s": None if math.isnan(mean_age[i]) else round(float(mean_age[i]), 3),
                "bandwidth": _finite(self.history.bandwidth[rows[i]]),
                "frequency": _finite(self.history.frequency[rows[i]]),
                "duration_s": _finite(self.history.duration[rows[i]])}
            self.metrics.set("class_level", int(effective[i]),
                             address=lbctl.address_text(raw["vip_addr"]),
                             port=str(int(raw["vip_port"])),
                             proto=lbctl.PROTOCOL_NAMES.get(int(raw["proto"]),
                                                            str(int(raw["proto"]))))
        self.metrics.set("tracked", len(conn_keys), table="conns")
        self.metrics.set("tracked", int(valid.sum()), table="valid_leases")
        self.metrics.set("tracked", len(agg_keys), table="agg_leases")
        self.metrics.set("tracked", int(members[0].sum()), table="aggregate_members")
        self.metrics.observe("tick_seconds", time.perf_counter() - started - self.serving_s,
                             job="evaluate")
        return effective

    def _vip_counter_deltas(self, vip_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bytes and new flows per VIP since the previous evaluation (datapath per-VIP stats)."""
        totals = {}
        for row in lbctl.list_vips(self.pin_dir):
            key = lbctl.vip_key(row["vip"], row["port"], row["proto"])
            totals[bytes(_void(key)[0])] = (row["bytes"], row["new_flows"])
        bytes_delta = np.zeros(len(vip_keys))
        new_delta = np.zeros(len(vip_keys))
        for i, raw in enumerate(_void(vip_keys).tolist()):
            now_bytes, now_new = totals.get(bytes(raw), (0, 0))
            before = self.previous_vip_totals.get(bytes(raw))
            if before is not None:
                bytes_delta[i] = max(now_bytes - before[0], 0)
                new_delta[i] = max(now_new - before[1], 0)
            self.previous_vip_totals[bytes(raw)] = (now_bytes, now_new)
        return bytes_delta, new_delta

    def send_directives(self, levels: np.ndarray, now_ns: int) -> int:
        """The levels of every class to every server of the class's VIP (idempotent: sent every
        evaluation, so a lost packet or a restarted server agent catches up)."""
        sent = 0
        for backend_id, entries in directive_plan(self.vip_keys, self.vip_services, levels,
                                                  self.backends).items():
            packets = self.encoder.directive(entries, now_ns)
            sent += self.socket.send(packets, self.backend_address(backend_id))
            self.metrics.inc("directive_entries", len(entries), direction="sent")
        self.metrics.inc("directives", sent, direction="sent")
        return sent

    def remember_published(self, batch, now_ns: int) -> None:
        """Keep the published level-0 flows (key, backend, expiry) until their lease ends: a
        flow whose connection entry the LRU evicted is known from them (hold_flows)."""
        self.published = [p for p in self.published if p[0] > now_ns]
        if len(batch.flow_keys):
            self.published.append((int(batch.flow_expiry_ns.max()), batch.flow_keys,
                                   batch.flow_backends, batch.flow_expiry_ns))

    def published_flows(self, now_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """The remembered published flows whose lease holds, as (keys, LB_CONN_DTYPE values)."""
        if not self.published:
            return np.zeros(0, FLOW_KEY_DTYPE), np.zeros(0, LB_CONN_DTYPE)
        keys = np.concatenate([p[1] for p in self.published]).astype(FLOW_KEY_DTYPE)
        values = np.zeros(len(keys), LB_CONN_DTYPE)
        values["backend_id"] = np.concatenate([p[2] for p in self.published])
        values["lease_expiry_ns"] = np.concatenate([p[3] for p in self.published])
        values["created_ns"] = now_ns
        found, index = join(self.vip_keys, class_keys_of(keys))
        values["vip_index"][found] = self.vip_indexes[index[found]]
        live = found & (values["lease_expiry_ns"] > np.uint64(now_ns))
        return keys[live], values[live]

    def bridge_level_change(self, moved: np.ndarray, conn_keys: np.ndarray, conns: np.ndarray,
                            now_ns: int) -> None:
        """docs/lb.md "Held flows": the connections of classes that changed level just now whose
        own lease holds get it to at least now + (k + 1) x T (entries and held copies). Their
        servers stop renewing them one by one (at each one's next packet after the DIRECTIVE)
        and renew their new level's aggregate instead, whose cover entry for their backend
        exists only after that server's next PUBLISH; an own lease that ran out first was a
        lease miss that re-placed the connection by the aggregate, on another backend."""
        if len(moved) == 0:
            return
        until = np.uint64(now_ns + int((self.cfg.lease.k + 1) * self.cfg.publish.interval_s
                                       * NS_PER_S))
        live = join(moved, class_keys_of(conn_keys))[0] & (conns["lease_expiry_ns"]
                                                           > np.uint64(now_ns))
        written = lbctl.apply_flow_leases(self.pin_dir, conn_keys[live],
                                          conns["backend_id"][live], until, create=False,
                                          now_ns=now_ns)["written"]
        held_keys, held = lbctl.read_held(self.pin_dir)
        live = join(moved, class_keys_of(held_keys))[0] & (held["lease_expiry_ns"]
                                                           > np.uint64(now_ns))
        live &= (held["flags"] & lbctl.CONN_F_CLIENT_CLOSED) == 0  # its k*T linger stays
        held = held[live]
        held["lease_expiry_ns"] = np.maximum(held["lease_expiry_ns"], until)
        written += lbctl.hold_flows(self.pin_dir, held_keys[live], held, refresh=False)
        self.metrics.inc("map_writes", written, map="conns")

    def hold_flows(self, conn_keys: np.ndarray, conns: np.ndarray, valid: np.ndarray,
                   agg_keys: np.ndarray, agg_values: np.ndarray, now_ns: int) -> None:
        """docs/lb.md "Held flows": the live connections of the classes that changed level
        (holds_flows) are copied into `held`, where the LRU cannot evict them: a connection-table
        miss of such a class would otherwise be placed by its aggregate, maybe on another
        backend. Their connection entries, and the flows their servers published in the last
        leases that still hold (an entry the LRU evicted before the level change and that no
        packet brought back yet). Held flows that no lease covers any more are released."""
        with lbctl.open_map(self.pin_dir, "vips") as vip_map:
            keys, values = vip_map.items()
        holding = np.ascontiguousarray(keys[values["holds_flows"] != 0])
        if len(holding):
            of_holding = join(holding, class_keys_of(conn_keys))[0] & valid
            written = lbctl.hold_flows(self.pin_dir, conn_keys[of_holding], conns[of_holding])
            published, values = self.published_flows(now_ns)
            missing = join(holding, class_keys_of(published))[0]
            missing &= ~join(conn_keys[of_holding], published)[0]
            # (evicted from conns: their held copy takes the lease their server published)
            written += lbctl.hold_flows(self.pin_dir, published[missing], values[missing],
                                        refresh=False)
            self.metrics.inc("map_writes", written, map="held")
        held_keys, held = lbctl.read_held(self.pin_dir)
        if len(held_keys):
            alive = valid_leases(held_keys, held, agg_keys, agg_values, now_ns, self.byte_table)
            released = lbctl.release_held(self.pin_dir, held_keys[~alive])
            self.metrics.inc("map_writes", released, map="held")
        self.metrics.set("tracked", len(held_keys), table="held")

    # -- housekeeping ---------------------------------------------------------------------

    def housekeeping(self) -> None:
        started = time.perf_counter()
        now_ns = self.clock.now_ns()
        purged = lbctl.purge_expired_aggregates(self.pin_dir, now_ns)
        self.metrics.inc("map_writes", purged, map="agg_leases")
        retired = lbctl.retire_other_levels(self.pin_dir, now_ns)
        retired += lbctl.retire_held(self.pin_dir, keep=self.kept_holds)
        self.metrics.inc("map_writes", retired, map="vips")
        self.count_lease_misses(lbctl.lease_misses(self.pin_dir))
        self.metrics.observe("tick_seconds", time.perf_counter() - started, job="housekeeping")
        self.write_status()

    def count_lease_misses(self, datapath_total: int) -> int:
        """Add the datapath counter's growth since the last read to the since-start count (and
        the lease_misses_total metric). A counter below the last read was reset (the program
        was re-attached): all of it is new. Never negative."""
        grown = datapath_total - self.last_lease_misses
        if grown < 0:
            grown = datapath_total
        self.last_lease_misses = datapath_total
        self.lease_misses_since_start += grown
        self.metrics.inc("lease_misses", grown)
        return grown

    def status(self) -> dict:
        return {"role": "lb", "pid": os.getpid(), "node_id": self.node_id, "mode": self.mode,
                "iface": self.iface, "netns": self.netns, "pin_dir": str(self.pin_dir),
                "started_unix": self.started_unix, "updated_unix": time.time(),
                "evaluations": self.evaluations, "conn_occupancy": self.conn_occupancy,
                "lease_misses": self.last_lease_misses,
                "lease_misses_since_start": self.lease_misses_since_start,
                "resync_asked": sorted(self.resync_asked), "classes": self.levels,
                "metrics_port": self.metrics.port, "decoder": dict(self.decoder.counts),
                "totals": self.metrics.totals, "gauges": self.metrics.gauges}

    def write_status(self) -> None:
        try:
            write_status(self.status_file, self.status())
        except OSError as err:
            log.warning("cannot write %s: %s", self.status_file, err)

    def run(self, stop: StopFlag) -> None:
        self.metrics.serve(self.cfg.agent.metrics_port)
        self.request_resyncs()
        self.write_status()
        try:
            run_loop(self.socket, self.receive,
                     [(self.cfg.granularity.evaluation_interval_s, self.evaluate),
                      (self.cfg.publish.interval_s, self.housekeeping)], stop)
        finally:
            self.write_status()

    def close(self) -> None:
        self.socket.close()


def fabric_address(cfg: Config, pin_dir: Path) -> str:
    """The address the LB agent binds: [agent] listen_address, or by default the program's
    tunnel source (lb_addr4, else lb_addr6), which is the LB's address on the server fabric;
    every address (with a warning) if the program has neither."""
    if cfg.agent.listen_address:
        return cfg.agent.listen_address
    settings = lbctl.config_dict(lbctl.read_config(pin_dir))
    for address in (settings["lb_addr4"], settings["lb_addr6"]):
        if not ipaddress.ip_address(address).is_unspecified:
            return address
    log.warning("no tunnel source address configured: the LB agent listens on every address")
    return "::"


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 3)
