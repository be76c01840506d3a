"""One simulated mode: the server agents' publish cycles and the LB's lease tables stepped every
publish interval T on a simulated clock, vectorised over the flows alive at each step.

Each step at time t handles the packets of the window (t - T, t] (lease misses, new flows), then
the publish cycle at t (the servers' idle-out, the LB's level pipeline, the servers' renewal
state machine, entries, MTU packets, loss, the LB's writes), then accounts stale state and table
size over (t, t + T]. The rules are the agents' own objects and functions: policy.coverage (the
LB datapath's verdict), policy.renewal (sim.servers), policy.pipeline. Leases only change at
steps (or at a miss/new flow, which the LB datapath handles at the packet), so the accounting is
exact for the arrival model of SimFlows.next_arrival_ns. See docs/simulator.md."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.datapath.abi import MAX_CONNS, PUBLISH_ENTRY_DTYPE
from connpub.datapath.masks import LEVEL_COUNT, apply_masks, mask_byte_table
from connpub.policy import coverage
from connpub.policy.granularity import aggregate_units, leaves_aggregate, what_if_loads
from connpub.policy.lease import baseline_lease_ns, initial_expiry_ns, lb_lease_expiry_ns
from connpub.policy.pipeline import LevelPipeline, class_activity
from connpub.policy.rollout import rollout_levels
from connpub.protocol.wire import (
    FLAG_CLOSED,
    FLAG_RENEW,
    HEADER_LEN,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    TAG_LEN,
    UDP_HEADER_LEN,
    max_entries_per_packet,
)
from connpub.sim.flows import SimFlows
from connpub.sim.predictors import LeasePredictor
from connpub.sim.servers import (
    ENTRY_AGGREGATE,
    ENTRY_CLOSED,
    ENTRY_CLOSED_AGGREGATE,
    ENTRY_FLOW,
    Entries,
    SimServers,
)
from connpub.traffic.workload import NS_PER_S, PROTO_UDP

__all__ = ["ENTRY_AGGREGATE", "ENTRY_CLOSED", "ENTRY_CLOSED_AGGREGATE", "ENTRY_FLOW",
           "FLOAT_SERIES", "LB_MAX_CONNS", "SERIES", "Entries", "EvalSignals", "ModeRun",
           "SimOptions", "evaluate_levels", "packet_layout", "wire_entries"]

SERIES = ("publish_bytes", "publish_packets", "entries", "map_writes", "lease_miss_packets",
          "stale_flow_seconds", "stale_udp_flow_seconds", "lb_entries")
FLOAT_SERIES = ("stale_flow_seconds", "stale_udp_flow_seconds")
LB_MAX_CONNS = MAX_CONNS  # the LB connection table's default size: map-pressure denominator
COUNTERS = ("closed_entries", "aggregate_entries", "flow_entries", "repeat_entries",
            "baseline_flow_entries", "flow_repeat_entries", "directive_writes", "lost_packets",
            "predictions", "gc_deletes", "idle_outs", "idle_gap_miss_packets", "member_flows",
            "closed_aggregate_entries",
            "transition_flows", "udp_member_repicks", "retired_members",
            "interval_scored", "interval_below", "interval_above")  # the coverage tracker's
RENEWAL_COUNTS = ("skipped_renewals", "idle_horizon_leases", "idle_horizon_waits", "fallback",
                  "fallback_repeats")


@dataclass
class EvalSignals:
    """What the LB agent's level pipeline reads at an evaluation, per class (policy.pipeline):
    bytes and new flows since the last one, connections holding a valid lease and their mean
    age, the valid connections in all, the spread bound's what-if loads."""

    now_ns: int
    bytes_seen: np.ndarray
    new_flows: np.ndarray
    active_flows: np.ndarray
    mean_age_s: np.ndarray
    valid: int
    loads: np.ndarray  # (classes, LEVEL_COUNT, backend columns)


def evaluate_levels(pipeline: LevelPipeline, cfg: Config, class_keys: np.ndarray,
                    signals: EvalSignals, lb_capacity: int, backend_columns: np.ndarray,
                    units: np.ndarray) -> np.ndarray:
    """The classes' effective levels from the LB agent's own pipeline object (one service:
    every backend column of `backend_columns`); occupancy = valid connections / capacity."""
    decision = pipeline.evaluate(signals.now_ns, class_keys, signals.bytes_seen,
                                 signals.new_flows, signals.active_flows, signals.mean_age_s,
                                 signals.valid / lb_capacity, loads=signals.loads,
                                 members=backend_columns, units=units)
    return decision.effective_levels.astype(np.int64)


@dataclass(frozen=True)
class SimOptions:
    """Knobs of the simulated deployment (not of connpub's config)."""

    servers: int = 4  # backends behind the VIPs; aggregates are per backend
    hash_client_only: bool = False  # VIP_F_HASH_CLIENT_ONLY: Maglev on the client address only
    loss: float = 0.0  # probability that a PUBLISH packet is lost
    ip_version: int = 4  # of the publishing path (IP header size on the wire)
    lb_capacity: int = LB_MAX_CONNS  # occupancy = LB connection entries / this
    seed: int = 0
    duration_s: float | None = None  # None: up to the last flow start (whole intervals)


class ModeRun:
    """State and step function of one mode (baseline | adaptive | predictive | full): the LB's
    tables here, the server agents in `servers` (sim.servers.SimServers)."""

    # False: keep every ended aggregate member in `active` while its aggregate is valid (the
    # reference the parked fast path is checked against, tests/test_sim_parallel.py)
    park_ended_members = True

    def __init__(self, flows: SimFlows, cfg: Config, mode: str, options: SimOptions,
                 predictor: LeasePredictor | None, mode_index: int = 0) -> None:
        self.flows, self.cfg, self.mode, self.options = flows, cfg, mode, options
        self.adaptive = mode in ("adaptive", "full")
        self.predictive = mode in ("predictive", "full")
        self.interval_ns = round(cfg.publish.interval_s * NS_PER_S)
        self.rng = np.random.default_rng([options.seed, mode_index])
        n = flows.n
        self.counters: dict = dict.fromkeys(COUNTERS, 0)
        self.counters["level_flow_steps"] = np.zeros(LEVEL_COUNT)
        self.servers = SimServers(flows, cfg, predictive=self.predictive,
                                  publish_closed=mode != "baseline", predictor=predictor,
                                  counters=self.counters)
        self.expiry = np.zeros(flows.slot_count, np.int64)  # LB: conns (0..n-1) + agg leases
        self.conn_present = np.zeros(n, bool)
        # aggregate affinity (docs/lb.md "Aggregates"): a flow whose class is at level S >= 1
        # at its first packet gets no LB entry: it goes to its aggregate's backend (Maglev over
        # the masked tuple) and lives on the aggregate's own entry (`own_slot`); the server
        # keeps it in that aggregate until it ends (flow_level). A level-0 flow keeps its entry.
        self.backend, self.slots = self.servers.backend, self.servers.slots
        self.member = np.zeros(n, bool)
        # members whose class left their level: published as flows of their own from then
        # on (policy.granularity.leaves_aggregate; the server agent's rule); a member until
        # the LB has the entry
        self.retired = self.servers.retired
        self.flow_level = np.zeros(n, np.int64)
        self.own_slot = np.zeros(n, np.int64)
        self.slot_last_end = np.zeros(flows.slot_count, np.int64)  # latest end of its members
        self.slot_has_members = np.zeros(flows.slot_count, bool)
        self.udp = flows.trace["proto"] == PROTO_UDP
        self.slot_udp = np.zeros(flows.slot_count, bool)  # an aggregate's members are UDP
        # aggregate slots whose lease may still be valid: those valid at the last step and
        # those written since (a step looks at these, not at every slot of the trace)
        self.agg_slots = np.zeros(0, np.int64)
        self.agg_written: list[np.ndarray] = []
        # held_until of `active` as _account left it (nothing changes the LB between the end
        # of a step and the next step's window of packets)
        self.held_cache: tuple[np.ndarray, np.ndarray] | None = None
        # connections per backend id (1..servers) summed over the steps: time-weighted load
        self.backend_load = np.zeros(max(options.servers, int(flows.backend_by_start.max(
            initial=0))) + 1)
        columns = max(self.backend_load.size, options.servers + 1)
        self.backend_columns = np.ones((1, columns), bool)  # one service: every backend
        self.backend_columns[0, 0] = False  # backend ids start at 1
        self.units = aggregate_units(flows.class_keys)  # classes sharing level-2/3 aggregates
        self.lb_created_ns = np.zeros(n, np.int64)  # the LB's created_ns of the connection
        self.missed = np.zeros(n, bool)
        # the LB datapath saw the client's FIN/RST (CONN_F_CLIENT_CLOSED): no aggregate keeps
        # the flow alive any more, its own lease ends close_linger (k*T) after that packet
        self.lb_closed = np.zeros(n, bool)
        self.close_linger_ns = baseline_lease_ns(cfg)  # the LB agent sets close_linger = k*T
        classes = flows.classes
        self.class_level = np.zeros(classes, np.int64)
        self.class_changed_ns = np.full(classes, np.iinfo(np.int64).min // 2)  # never
        decision = rollout_levels(flows.class_keys, np.zeros(classes, np.uint8), cfg.rollout)
        self.acting = decision.acting
        self.pipeline = LevelPipeline(cfg, classes)  # the LB agent's own pipeline object
        self.eval_ns = round(cfg.granularity.evaluation_interval_s * NS_PER_S)
        self.next_eval_ns = 0
        self.eval_new_from = 0
        self.active = np.zeros(0, np.int64)
        # ended aggregate members the LB still counts (their aggregate is valid), parked out
        # of `active`: they matter only to the evaluation's valid connections (class_activity,
        # occupancy) until their aggregate first expires (docs/simulator.md, "Scale")
        self.parked = np.zeros(0, np.int64)  # ascending flow indices
        self.parked_epoch = np.zeros(0, np.int64)  # slot_epoch of their own slot when parked
        self.parked_new: list[tuple[np.ndarray, np.ndarray]] = []  # parked since, each sorted
        self.slot_epoch = np.zeros(flows.slot_count if self.adaptive else 0, np.int64)
        self.parked_flows = 0  # how many were parked (tests)
        self.next_new = 0
        self.evaluated_valid: list[int] = []  # valid connections at each evaluation
        self.per_packet, self.packet_overhead = packet_layout(cfg, options.ip_version)
        self.last_entries: Entries | None = None  # of the latest step (tests, lab checks)
        # sim.parallel: the shard's evaluation signals -> its classes' levels, decided over
        # every shard's classes (the spread bound and the occupancy couple them)
        self.exchange: Callable[[EvalSignals], np.ndarray] | None = None

    @property
    def totals(self) -> dict:
        """Counters of the run, the renewal state machine's included."""
        out = dict(self.counters)
        counts = self.servers.renewal.counts
        out.update({name: counts[name] for name in RENEWAL_COUNTS})
        return out

    @property
    def predictor(self) -> LeasePredictor | None:
        return self.servers.predictor

    @property
    def quality(self) -> list:
        return self.servers.quality

    # -------------------------------------------------------------------------------------
    # LB view

    def held_until(self, index: np.ndarray) -> np.ndarray:
        """Until when the LB keeps each flow alive (policy.coverage.held_until, the datapath's
        rule): its own lease, or, unless its client closed, an aggregate lease of its tuple at
        any level 1-3 for its backend; a member (no entry of its own) its aggregate's own
        entry; 0 if the LB has no entry."""
        # (levels, n) so that each level's column is contiguous; column 0 unused
        agg = np.zeros((LEVEL_COUNT, index.size), np.int64)
        # without levels (baseline, predictive) no aggregate lease ever exists: all 0
        for level in range(1, LEVEL_COUNT) if self.adaptive else ():
            np.take(self.expiry, self.slots[level, index], out=agg[level])
        held = coverage.held_until(self.expiry[index], self.lb_closed[index], agg.T)
        held[~self.conn_present[index]] = 0
        if not self.adaptive:  # only levels make members
            return held
        member = self.member[index]
        held[member] = self.expiry[self.own_slot[index[member]]]
        return held

    # -------------------------------------------------------------------------------------
    # one step

    def step(self, now_ns: int, series: dict[str, np.ndarray], tick: int) -> None:
        flows, interval = self.flows, self.interval_ns
        self._packets_in_window(now_ns, series, tick)
        new = self._new_flows(now_ns)
        self._client_closes(now_ns)
        self._stale_before_first_step(now_ns, new, series, tick)
        active = self.active
        server_close = flows.server_close_ns[active]
        live, idled_now = self.servers.renewed(now_ns, active[server_close > now_ns])
        ended = active[(server_close <= now_ns) & (server_close > now_ns - interval)]
        ended = ended[self.servers.live[ended]]  # an idled-out flow had its CLOSED then
        self.servers.live[ended] = False
        closing = np.concatenate([ended, idled_now])
        # the LB saw the client's FIN/RST only at a flow's last packet
        fin_seen = flows.client_closed[closing] & (flows.end_ns[closing] <= now_ns)
        if self.adaptive and now_ns >= self.next_eval_ns:
            self._evaluate_granularity(now_ns, live)
        if self.adaptive:  # the server agents' rule, every cycle
            klass = flows.class_id[live]
            retiring = live[~self.retired[live] & leaves_aggregate(
                self.flow_level[live], self.class_level[klass], self.class_changed_ns[klass],
                now_ns, self.cfg.granularity)]
            self.counters["retired_members"] += int(retiring.size)
            self.servers.retire(retiring)
        # a member stays in its aggregate; a level-0 flow follows its class (bpf/server/server.c)
        level = np.where(self.flow_level[live] > 0, self.flow_level[live],
                         self.class_level[flows.class_id[live]])
        level[self.retired[live]] = 0
        entries = self.servers.plan(now_ns, live, level, self.acting, closing, fin_seen,
                                    self.conn_present)
        self._publish(now_ns, entries, series, tick)
        self._account(now_ns, series, tick)

    def _packets_in_window(self, now_ns: int, series: dict, tick: int) -> None:
        """Lease misses: a packet of a known flow after both leases expired (not a SYN: every
        packet after the first one). The LB then treats it as new: initial lease again."""
        active = self.active
        if active.size == 0:
            return
        flows = self.flows
        cached = self.held_cache
        held = cached[1] if cached is not None and cached[0] is active else \
            self.held_until(active)
        window_start = now_ns - self.interval_ns + 1
        candidate = (held <= now_ns) & (flows.end_ns[active] >= window_start)
        index = active[candidate]
        if index.size == 0:
            return
        arrival = flows.next_arrival_ns(index, np.maximum(held[candidate], window_start))
        miss = arrival <= now_ns
        if not miss.any():
            return
        missed, at = index[miss], arrival[miss]
        # a member's packet on its expired aggregate: the datapath re-picks the same backend
        # (Maglev over the masked tuple) into the entry; a lease miss for TCP (not a SYN), not
        # for UDP, which cannot tell a new flow and keeps its backend (pick_in_aggregate)
        member = self.member[missed]
        udp_member = member & (flows.trace["proto"][missed] == PROTO_UDP)
        self.counters["udp_member_repicks"] += int(udp_member.sum())
        np.maximum.at(self.expiry, self.own_slot[missed[member]],
                      initial_expiry_ns(at[member], self.cfg))
        self.agg_written.append(self.own_slot[missed[member]])
        counted = missed[~udp_member]
        series["lease_miss_packets"][tick] += counted.size
        self.counters["idle_gap_miss_packets"] += int(self.servers.idled[counted].sum())
        self.missed[counted] = True
        own = missed[~member]
        self.conn_present[own] = True
        self.expiry[own] = initial_expiry_ns(at[~member], self.cfg)
        self.lb_created_ns[own] = at[~member]

    def _client_closes(self, now_ns: int) -> None:
        """The LB datapath at a flow's last packet when that is the client's FIN/RST
        (note_client_close in bpf/lb/lb.c): the connection is marked closed and its lease set
        to that packet's time + close_linger, even if it was longer. Applied after the window's
        misses (a packet before the FIN may have missed); _account already counted the time
        after the FIN this way."""
        flows, active = self.flows, self.active
        if active.size == 0:
            return
        end = flows.end_ns[active]
        closing = active[flows.client_closed[active] & ~self.lb_closed[active]
                         & ~self.member[active] & (end <= now_ns)]
        if closing.size:
            self.lb_closed[closing] = True
            self.expiry[closing] = flows.end_ns[closing] + self.close_linger_ns

    def _new_flows(self, now_ns: int) -> np.ndarray:
        """Flows whose first packet fell in (t - T, t]: the LB gives them the initial lease."""
        flows = self.flows
        stop = int(np.searchsorted(flows.start_ns, now_ns, side="right"))
        if stop <= self.next_new:
            return np.zeros(0, np.int64)
        new = np.arange(self.next_new, stop)
        self.next_new = stop
        expiry = initial_expiry_ns(flows.start_ns[new], self.cfg)
        start_level = self.class_level[flows.class_id[new]] if self.adaptive else \
            np.zeros(new.size, np.int64)
        entry = self._place(new, start_level, expiry)
        self.conn_present[new[entry]] = True
        self.expiry[new[entry]] = expiry[entry]
        self.lb_created_ns[new] = flows.start_ns[new]
        self.servers.start(new, expiry)
        self.active = np.concatenate([self.active, new])
        return new

    def _place(self, new: np.ndarray, start_level: np.ndarray, expiry: np.ndarray) -> np.ndarray:
        """The LB datapath at new flows' first packets (pick_in_aggregate): at class level
        S >= 1 a flow goes to its aggregate's backend and the aggregate's own entry gets at
        least the initial lease; it gets an entry of its own (True in the result) at level 0,
        or when a valid own entry of its tuple at another level names another backend
        (transition_flow)."""
        flows = self.flows
        at_level = start_level > 0
        index, level = new[at_level], start_level[at_level]
        self.flow_level[index] = level
        self.backend[index] = flows.backend_by_start[level, index]
        self.slots[:, index] = flows.slots_by_start[level, :, index].T
        own = flows.slots_by_start[level, level, index]
        start = flows.start_ns[index]
        conflict = np.zeros(index.size, bool)
        for other in range(1, LEVEL_COUNT):
            other_own = flows.slots_by_start[other, other, index]
            conflict |= ((level != other) & (self.expiry[other_own] > start)
                         & (flows.backend_by_start[other, index] != self.backend[index]))
        np.maximum.at(self.expiry, own, expiry[at_level])
        self.agg_written.append(own)
        member = index[~conflict]
        self.member[member] = True
        self.own_slot[member] = own[~conflict]
        np.maximum.at(self.slot_last_end, own[~conflict], flows.end_ns[member])
        self.slot_has_members[own[~conflict]] = True
        self.slot_udp[own[~conflict]] = self.udp[member]
        self.counters["member_flows"] += int(member.size)
        self.counters["transition_flows"] += int(conflict.sum())
        entry = ~at_level
        entry[np.flatnonzero(at_level)[conflict]] = True
        return entry

    def _stale_before_first_step(self, now_ns: int, new: np.ndarray, series: dict,
                                 tick: int) -> None:
        """Stale time of flows that started and ended inside (t - T, t]: the part of (end, t]
        the LB held them (initial lease, close linger or aggregate), which no earlier step's
        accounting saw. Nothing else changed the LB's view of them before t."""
        ended = new[(self.flows.end_ns[new] < now_ns) & ~self.member[new]]
        if ended.size:
            held = self.held_until(ended)
            stale = np.clip(np.minimum(held, now_ns) - self.flows.end_ns[ended], 0, None)
            _add_stale(series, tick, stale, self.udp[ended])

    def _evaluate_granularity(self, now_ns: int, live: np.ndarray) -> None:
        """The LB agent's evaluation (every evaluation_interval_s), the same LevelPipeline with
        the same signals (policy.pipeline): bytes and new flows per class since the last one,
        the connections holding a valid lease and their mean age, the occupancy; changed
        classes are republished at once."""
        flows = self.flows
        classes = flows.classes
        since = now_ns - self.eval_ns
        active = self.active
        overlap_s = np.clip(np.minimum(flows.end_ns[active], now_ns)
                            - np.maximum(flows.start_ns[active], since), 0, None) / NS_PER_S
        bytes_seen = np.bincount(flows.class_id[active], overlap_s * flows.byte_rate[active],
                                 classes)
        stop = self.next_new
        new_flows = np.bincount(flows.class_id[self.eval_new_from:stop], minlength=classes)
        self.eval_new_from = stop
        valid_active = active[self.held_until(active) > now_ns]
        # with the parked members (valid while their aggregate is), in flow order: the order
        # in which one `active` of every flow would sum their ages
        valid = self._valid_parked(now_ns)
        if valid.size:
            valid = np.concatenate([valid_active, valid])
            valid = valid[valid.argsort(kind="stable")]  # a merge of two ascending runs
        else:
            valid = valid_active
        active_flows, mean_age = class_activity(flows.class_id[valid], self.lb_created_ns[valid],
                                                now_ns, classes)
        self.evaluated_valid.append(valid.size)  # shards' occupancies add up (sim.parallel)
        signals = EvalSignals(now_ns, bytes_seen, new_flows, active_flows, mean_age, valid.size,
                              # parked members are not live: no load
                              self._what_if_loads(valid_active))
        if self.exchange is not None:  # a shard: the LB agent's decision over every shard's
            levels = self.exchange(signals)
        else:
            levels = evaluate_levels(self.pipeline, self.cfg, flows.class_keys, signals,
                                     self.options.lb_capacity, self.backend_columns, self.units)
        changed = levels != self.class_level
        if changed.any():
            self.counters["directive_writes"] += int(changed.sum())
            self.class_level = levels
            self.servers.class_level = levels
            self.class_changed_ns[changed] = now_ns
            moving = changed[flows.class_id[live]] & (self.flow_level[live] == 0)
            self.servers.level_changed(live[moving])
        self.next_eval_ns = now_ns + self.eval_ns

    def _valid_parked(self, now_ns: int) -> np.ndarray:
        """The parked members still in the LB's view (their own slot has not expired since
        they were parked) whose aggregate is valid at now_ns, ascending; compacts the set."""
        if self.parked_new:
            parts = [(self.parked, self.parked_epoch), *self.parked_new]
            self.parked_new = []
            index = np.concatenate([p[0] for p in parts])
            order = index.argsort(kind="stable")  # merge of ascending runs
            self.parked = index[order]
            self.parked_epoch = np.concatenate([p[1] for p in parts])[order]
        slot = self.own_slot[self.parked]
        alive = self.slot_epoch[slot] == self.parked_epoch
        self.parked, self.parked_epoch = self.parked[alive], self.parked_epoch[alive]
        return self.parked[self.expiry[slot[alive]] > now_ns]

    def _what_if_loads(self, valid: np.ndarray) -> np.ndarray:
        """The LB agent's spread input (policy.granularity.what_if_loads, as
        agents.lb_plan.lb_what_if_loads builds it from the maps): every valid connection
        entry (its tuple: every level known), and the members of valid aggregates as the
        entry's flow count (the servers' live members; levels finer than the aggregate's
        unknown); the backend at a level is Maglev's pick over the tuple masked there. TCP
        only: a UDP flow counts as live for its whole idle horizon (30 s after a DNS answer),
        which is no load; TCP liveness is the server kernel's socket."""
        flows = self.flows
        own = valid[~self.member[valid]]
        members = valid[self.member[valid] & self.servers.live[valid]]
        rows = np.concatenate([own, members])
        known = np.concatenate([np.zeros(own.size, np.int64), self.flow_level[members]])
        tcp = flows.trace["proto"][rows] != PROTO_UDP
        rows, known = rows[tcp], known[tcp]
        return what_if_loads(flows.class_id[rows], np.ones(rows.size), known,
                             flows.backend_by_start[:, rows].T, flows.classes,
                             self.backend_columns.shape[1])

    # -------------------------------------------------------------------------------------
    # wire + LB writes

    def _publish(self, now_ns: int, entries: Entries, series: dict, tick: int) -> None:
        self.last_entries = entries
        if entries.count == 0:
            return
        order = np.argsort(entries.backend, kind="stable")
        backend = entries.backend[order]
        first = np.searchsorted(backend, backend, side="left")
        rank = np.arange(backend.size) - first
        per_server = np.bincount(backend)
        packets_per_server = -(-per_server // self.per_packet)
        packets = int(packets_per_server.sum())
        if "backend_entries" in series:  # (ticks + 1, servers + 1): packets of merged shards
            series["backend_entries"][tick, :per_server.size] += per_server
        series["publish_packets"][tick] += packets
        series["entries"][tick] += entries.count
        series["publish_bytes"][tick] += (packets * self.packet_overhead
                                          + entries.count * PUBLISH_ENTRY_DTYPE.itemsize)
        kinds = np.bincount(entries.kind, minlength=4)
        self.counters["flow_entries"] += int(kinds[ENTRY_FLOW])
        self.counters["aggregate_entries"] += int(kinds[ENTRY_AGGREGATE])
        self.counters["closed_entries"] += int(kinds[ENTRY_CLOSED])
        self.counters["closed_aggregate_entries"] += int(kinds[ENTRY_CLOSED_AGGREGATE])
        delivered = np.ones(entries.count, bool)
        if self.options.loss > 0:
            packet_base = np.concatenate([[0], np.cumsum(packets_per_server)[:-1]])
            packet_of = packet_base[backend] + rank // self.per_packet
            lost = self.rng.random(packets) < self.options.loss
            self.counters["lost_packets"] += int(lost.sum())
            delivered[order] = ~lost[packet_of]
        # servers remember what they asked for, delivered or not
        expiry = lb_lease_expiry_ns(now_ns, entries.lease_ms, self.cfg)
        renew = (entries.kind != ENTRY_CLOSED) & (entries.kind != ENTRY_CLOSED_AGGREGATE)
        np.maximum.at(self.servers.server_expiry, entries.slot[renew], expiry[renew])
        writes = 0
        for kind in (ENTRY_FLOW, ENTRY_AGGREGATE):
            sel = delivered & (entries.kind == kind)
            slot, new = entries.slot[sel], expiry[sel]
            grows = new > self.expiry[slot]
            if kind == ENTRY_FLOW:
                absent = ~self.conn_present[slot]
                self.conn_present[slot] = True
                grows |= absent
                # a retired member: the LB agent creates its entry (created_ns now); from
                # now on it is held by that entry, not as a member
                joins = self.retired[slot] & self.member[slot]
                self.member[slot[joins]] = False
                self.lb_created_ns[slot[joins & absent]] = now_ns
            writes += int(grows.sum())
            self.expiry[slot] = np.maximum(self.expiry[slot], new)
            if kind == ENTRY_AGGREGATE:
                self.agg_written.append(slot)
        # a CLOSED aggregate caps its entry at now + close_linger (lbleases cap=True)
        ended = entries.slot[delivered & (entries.kind == ENTRY_CLOSED_AGGREGATE)]
        capped = np.minimum(self.expiry[ended], now_ns + self.close_linger_ns)
        writes += int((capped != self.expiry[ended]).sum())
        self.expiry[ended] = capped
        closed = entries.slot[delivered & (entries.kind == ENTRY_CLOSED)]
        writes += int(self.conn_present[closed].sum())
        self.conn_present[closed] = False
        self.expiry[closed] = 0
        series["map_writes"][tick] += writes

    def _account(self, now_ns: int, series: dict, tick: int) -> None:
        """Stale flow-seconds over (t, t+T], LB table entries at t, then drop finished flows.
        A flow with an entry of its own is stale while held after its end; an aggregate's own
        entry is stale (one entry) while valid after its last member ended."""
        flows, active = self.flows, self.active
        window_end = now_ns + self.interval_ns
        # an aggregate slot left out has expired by now (it is back once written again): it
        # adds no stale time and no table entry
        slots = self.agg_slots
        if self.agg_written:
            slots = np.unique(np.concatenate([slots, *self.agg_written]))
            self.agg_written = []
        still = self.expiry[slots] > now_ns
        if self.slot_epoch.size:  # members parked on an expired slot leave the LB's view
            self.slot_epoch[slots[~still]] += 1
        slots = slots[still]
        self.agg_slots = slots
        member_slots = slots[self.slot_has_members[slots]]
        agg_stale = np.clip(np.minimum(self.expiry[member_slots], window_end)
                            - np.maximum(self.slot_last_end[member_slots], now_ns), 0, None)
        _add_stale(series, tick, agg_stale, self.slot_udp[member_slots])
        self.held_cache = None
        if active.size == 0:
            series["lb_entries"][tick] = slots.size
            return
        held = self.held_until(active)
        end = flows.end_ns[active]
        own = ~self.member[active]
        # a FIN/RST in (t, t + T] sets the lease to that packet + close_linger from then on
        # (_client_closes records it at the next step); stale time only counts after the end
        held_after_end = np.where(flows.client_closed[active] & (end > now_ns)
                                  & (end <= window_end),
                                  end + self.close_linger_ns, held)
        stale = np.clip(np.minimum(held_after_end, window_end) - np.maximum(end, now_ns), 0,
                        None)
        _add_stale(series, tick, stale[own], self.udp[active[own]])
        # the LB agent's garbage collection: a connection no lease holds any more is deleted
        # (else a later renewal of its aggregate would revive a long-closed flow)
        expired = active[own & self.conn_present[active] & (held <= now_ns)]
        self.conn_present[expired] = False
        self.counters["gc_deletes"] += int(expired.size)
        series["map_writes"][tick] += expired.size
        conns = np.count_nonzero(own & (held > now_ns))
        series["lb_entries"][tick] = conns + slots.size
        running = active[(flows.start_ns[active] <= now_ns) & (end > now_ns)]
        self.backend_load += np.bincount(self.backend[running], minlength=self.backend_load.size)
        keep = (flows.server_close_ns[active] > now_ns) | (held > now_ns) | (end > now_ns)
        if self.adaptive and self.park_ended_members:
            # ended members the server is done with, past the last evaluation's byte window:
            # kept only because their aggregate is valid (held > now_ns), see _valid_parked
            park = keep & ~own & (flows.server_close_ns[active] <= now_ns) \
                & (end + self.eval_ns <= now_ns)
            if park.any():
                parked = active[park]
                self.parked_new.append((parked, self.slot_epoch[self.own_slot[parked]]))
                self.parked_flows += parked.size
                keep &= ~park
        self.active = active[keep]
        held[own & (held <= now_ns)] = 0  # the deleted connections (no entry: held_until 0)
        self.held_cache = (self.active, held[keep])



def packet_layout(cfg: Config, ip_version: int) -> tuple[int, int]:
    """(entries per PUBLISH packet, bytes of a packet besides its entries) on the wire."""
    per_packet = max_entries_per_packet(PUBLISH_ENTRY_DTYPE.itemsize, cfg.publish.mtu,
                                        ip_version)
    ip_len = IPV6_HEADER_LEN if ip_version == 6 else IPV4_HEADER_LEN
    return per_packet, ip_len + UDP_HEADER_LEN + HEADER_LEN + TAG_LEN


def _add_stale(series: dict, tick: int, stale_ns: np.ndarray, udp: np.ndarray) -> None:
    """Stale nanoseconds of entries into the step's total and its UDP part, in seconds and
    (when the caller keeps them: `stale_ns`, `stale_udp_ns`, which shards of a run add up
    exactly) in integer nanoseconds."""
    total, of_udp = int(stale_ns.sum()), int(stale_ns[udp].sum())
    series["stale_flow_seconds"][tick] += total / NS_PER_S
    series["stale_udp_flow_seconds"][tick] += of_udp / NS_PER_S
    if "stale_ns" in series:
        series["stale_ns"][tick] += total
        series["stale_udp_ns"][tick] += of_udp


def wire_entries(flows: SimFlows, entries: Entries, now_ns: int, cfg: Config) -> np.ndarray:
    """The PUBLISH_ENTRY_DTYPE records of a cycle's entries, as a server agent would send them
    (keys masked at the entry's level; CLOSED entries flagged), in the order of `entries`.
    flow_count is 1 and bytes are the member flow's: the simulator does not track them."""
    out = np.zeros(entries.count, PUBLISH_ENTRY_DTYPE)
    out["level"] = entries.level
    out["flags"] = np.where((entries.kind == ENTRY_CLOSED)
                            | (entries.kind == ENTRY_CLOSED_AGGREGATE), FLAG_CLOSED, FLAG_RENEW)
    out["backend_id"] = entries.backend
    out["key"] = apply_masks(flows.keys[entries.member], entries.level,
                             mask_byte_table(cfg.masks.specs))
    out["flow_count"] = 1
    out["bytes"] = flows.trace["bytes"][entries.member]
    out["predicted_remaining_ms"] = entries.lease_ms
    return out
