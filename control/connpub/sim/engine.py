"""One simulated mode: the server agents' publish cycles and the LB's lease tables stepped every
publish interval T on a simulated clock, vectorised over the flows alive at each step.

Each step at time t handles the packets of the window (t - T, t] (lease misses, new flows), then
the publish cycle at t (granularity evaluation, lease plans, entries, MTU packets, loss, the LB's
writes), then accounts stale state and table size over (t, t + T]. Leases only change at steps
(or at a miss/new flow, which the LB datapath handles at the packet), so the accounting is exact
for the arrival model of SimFlows.next_arrival_ns. See docs/simulator.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.datapath.abi import PUBLISH_ENTRY_DTYPE
from connpub.datapath.masks import LEVEL_COUNT
from connpub.policy.granularity import ClassHistory, GranularityController, apply_map_pressure
from connpub.policy.lease import (
    aggregate_decision,
    baseline_lease_ns,
    idle_horizon_covered,
    idle_horizon_ns,
    initial_expiry_ns,
    lb_lease_expiry_ns,
    lease_expiry_from_prediction,
    lease_repeats,
    repeat_lease_ms,
    repeat_start_ns,
    with_idle_horizon,
)
from connpub.policy.rollout import rollout_levels
from connpub.protocol.wire import (
    HEADER_LEN,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    TAG_LEN,
    UDP_HEADER_LEN,
    max_entries_per_packet,
)
from connpub.sim.flows import SimFlows
from connpub.sim.predictors import LeasePredictor
from connpub.traffic.workload import NS_PER_S, PROTO_UDP

ENTRY_FLOW, ENTRY_AGGREGATE, ENTRY_CLOSED = 0, 1, 2
SERIES = ("publish_bytes", "publish_packets", "entries", "map_writes", "lease_miss_packets",
          "stale_flow_seconds", "lb_entries")
LB_MAX_CONNS = 1_048_576  # MAX_CONNS of bpf/lb/lb_consts.h: the map-pressure denominator


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


@dataclass
class Entries:
    """One publish cycle's entries (all servers), before packetisation."""

    slot: np.ndarray  # flow index (flow/closed entries) or aggregate slot
    kind: np.ndarray  # ENTRY_FLOW | ENTRY_AGGREGATE | ENTRY_CLOSED
    level: np.ndarray
    lease_ms: np.ndarray  # predicted_remaining_ms on the wire (0 = baseline k*T)
    backend: np.ndarray
    member: np.ndarray  # one member flow of each entry (the flow itself at level 0)

    @property
    def count(self) -> int:
        return int(self.slot.size)


class ModeRun:
    """State and step function of one mode (baseline | adaptive | predictive | full)."""

    def __init__(self, flows: SimFlows, cfg: Config, mode: str, options: SimOptions,
                 predictor: LeasePredictor | None, mode_index: int = 0) -> None:
        self.flows, self.cfg, self.mode, self.options = flows, cfg, mode, options
        self.adaptive = mode in ("adaptive", "full")
        self.predictive = mode in ("predictive", "full")
        self.publish_closed = mode != "baseline"
        # flows that can only end by going idle (no FIN/RST): leases to the idle horizon
        self.idle_only = flows.trace["proto"] == PROTO_UDP
        self.predictor = predictor
        self.interval_ns = round(cfg.publish.interval_s * NS_PER_S)
        self.baseline_ns = baseline_lease_ns(cfg)
        self.rng = np.random.default_rng([options.seed, mode_index])
        n = flows.n
        self.expiry = np.zeros(flows.slot_count, np.int64)  # LB: conns (0..n-1) + agg leases
        self.server_expiry = np.zeros(flows.slot_count, np.int64)  # what the servers published
        self.conn_present = np.zeros(n, bool)
        self.conn_level = np.zeros(n, np.int64)
        self.next_renewal = np.zeros(n, np.int64)
        self.plan_lease_ms = np.zeros(n, np.int64)  # the plan's last published lease field
        self.plan_expiry = np.zeros(n, np.int64)  # expiry the server's plan believes the LB holds
        self.repeats = lease_repeats(cfg)  # each new lease / CLOSED is sent 1 + this many times
        self.repeats_left = np.zeros(flows.slot_count, np.int8)  # flows and aggregate slots
        self.repeat_from = np.zeros(n, np.int64)  # a flow's repeats start then
        self.moved = np.zeros(n, bool)  # its class level changed since its last decision
        self.closed_pending = np.zeros(0, np.int64)  # CLOSED entries still to repeat
        self.closed_pending_left = np.zeros(0, np.int64)
        self.missed = np.zeros(n, bool)
        # the LB datapath saw the client's FIN/RST (CONN_F_CLIENT_CLOSED): no aggregate keeps
        # the flow alive any more, its own lease ends close_linger (k*T) after that packet
        self.lb_closed = np.zeros(n, bool)
        self.close_linger_ns = self.baseline_ns  # the LB agent sets close_linger = k*T
        classes = flows.classes
        self.class_level = np.zeros(classes, np.int64)
        decision = rollout_levels(flows.class_keys, np.zeros(classes, np.uint8), cfg.rollout)
        self.acting = decision.acting
        self.history = ClassHistory(cfg.granularity.history_half_life_s, classes)
        self.controller = GranularityController(cfg.granularity, classes)
        self.eval_ns = round(cfg.granularity.evaluation_interval_s * NS_PER_S)
        self.next_eval_ns = 0
        self.eval_new_from = 0
        self.duration_sum = np.zeros(classes)
        self.duration_count = np.zeros(classes)
        self.active = np.zeros(0, np.int64)
        self.next_new = 0
        self.per_packet = max_entries_per_packet(PUBLISH_ENTRY_DTYPE.itemsize, cfg.publish.mtu,
                                                 options.ip_version)
        ip_len = IPV6_HEADER_LEN if options.ip_version == 6 else IPV4_HEADER_LEN
        self.packet_overhead = ip_len + UDP_HEADER_LEN + HEADER_LEN + TAG_LEN
        self.totals = {"closed_entries": 0, "aggregate_entries": 0, "flow_entries": 0,
                       "skipped_renewals": 0, "repeat_entries": 0, "baseline_flow_entries": 0,
                       "flow_repeat_entries": 0, "directive_writes": 0,
                       "lost_packets": 0, "predictions": 0, "gc_deletes": 0,
                       "idle_horizon_leases": 0, "idle_horizon_waits": 0,
                       "level_flow_steps": np.zeros(LEVEL_COUNT)}
        self.quality: list[tuple[np.ndarray, ...]] = []
        self.last_entries: Entries | None = None  # of the latest step (tests, lab checks)

    # -------------------------------------------------------------------------------------
    # LB view

    def held_until(self, index: np.ndarray) -> np.ndarray:
        """Until when the LB keeps each flow alive: its own lease, or the aggregate lease at
        its entry's level or at its class's current level (bpf/lb/lb.c); 0 if deleted."""
        flows = self.flows
        held = self.expiry[index].copy()
        conn_level = self.conn_level[index]
        class_level = self.class_level[flows.class_id[index]]
        open_ = ~self.lb_closed[index]
        for level in (conn_level, class_level):
            agg = (level > 0) & open_
            if agg.any():
                held[agg] = np.maximum(held[agg], self.expiry[flows.slots[level[agg], index[agg]]])
        return np.where(self.conn_present[index], held, 0)

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
        live = active[server_close > now_ns]
        closing = active[(server_close <= now_ns) & (server_close > now_ns - interval)]
        self._observe_closing(closing)
        if self.adaptive and now_ns >= self.next_eval_ns:
            self._evaluate_granularity(now_ns, live)
        entries = self._plan(now_ns, live, closing)
        self._publish(now_ns, entries, series, tick)
        self._account(now_ns, series, tick)

    def _packets_in_window(self, now_ns: int, series: dict, tick: int) -> None:
        """Lease misses: a packet of a known flow after both leases expired (not a SYN: every
        packet after the first one). The LB then treats it as new: initial lease again."""
        active = self.active
        if active.size == 0:
            return
        flows = self.flows
        held = self.held_until(active)
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
        series["lease_miss_packets"][tick] += missed.size
        self.missed[missed] = True
        self.conn_present[missed] = True
        self.expiry[missed] = initial_expiry_ns(at, self.cfg)
        self.conn_level[missed] = self.class_level[flows.class_id[missed]]

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
                         & (end <= now_ns)]
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
        self.conn_present[new] = True
        self.expiry[new] = expiry
        self.server_expiry[new] = expiry
        self.conn_level[new] = self.class_level[flows.class_id[new]]
        self.next_renewal[new] = flows.start_ns[new]
        self.plan_expiry[new] = expiry
        self.active = np.concatenate([self.active, new])
        return new

    def _stale_before_first_step(self, now_ns: int, new: np.ndarray, series: dict,
                                 tick: int) -> None:
        """Stale time of flows that started and ended inside (t - T, t]: the part of (end, t]
        the LB held them (initial lease, close linger or aggregate), which no earlier step's
        accounting saw. Nothing else changed the LB's view of them before t."""
        ended = new[self.flows.end_ns[new] < now_ns]
        if ended.size:
            held = self.held_until(ended)
            stale = np.clip(np.minimum(held, now_ns) - self.flows.end_ns[ended], 0, None)
            series["stale_flow_seconds"][tick] += stale.sum() / NS_PER_S

    def _observe_closing(self, closing: np.ndarray) -> None:
        if closing.size:
            flows = self.flows
            cls = flows.class_id[closing]
            duration_s = (flows.end_ns[closing] - flows.start_ns[closing]) / NS_PER_S
            np.add.at(self.duration_sum, cls, duration_s)
            np.add.at(self.duration_count, cls, 1)

    def _evaluate_granularity(self, now_ns: int, live: np.ndarray) -> None:
        """The LB agent's evaluation (every evaluation_interval_s): class history -> controller
        with hysteresis -> map pressure -> rollout; changed classes are republished at once."""
        flows, cfg = self.flows, self.cfg
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
        active_flows = np.bincount(flows.class_id[live], minlength=classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            duration = np.where(self.duration_count > 0,
                                self.duration_sum / np.maximum(self.duration_count, 1), np.nan)
        self.duration_sum[:] = 0
        self.duration_count[:] = 0
        history = self.history
        history.update(now_ns, bytes_seen, new_flows, active_flows, duration)
        proposed = self.controller.evaluate(history.bandwidth, history.duration,
                                            history.frequency)
        occupancy = np.count_nonzero(self.held_until(active) > now_ns) / self.options.lb_capacity
        proposed = apply_map_pressure(proposed, occupancy, cfg.granularity.map_pressure)
        levels = rollout_levels(flows.class_keys, proposed, cfg.rollout).effective_levels
        levels = levels.astype(np.int64)
        changed = levels != self.class_level
        if changed.any():
            self.totals["directive_writes"] += int(changed.sum())
            moved = live[changed[flows.class_id[live]]]
            # the datapath rewrote the connection's level when its packets hit the class's
            # aggregate: after the change it is still held by that aggregate until it lapses
            old = self.class_level[flows.class_id[moved]]
            self.conn_level[moved[old > 0]] = old[old > 0]
            self.class_level = levels
            self.next_renewal[moved] = 0
            self.moved[moved] = True
        self.next_eval_ns = now_ns + self.eval_ns

    def _plan(self, now_ns: int, live: np.ndarray, closing: np.ndarray) -> Entries:
        """The server agents' publish cycle, with the rules of the agent's planner
        (connpub.model.predictive.PredictivePlanner.plan / aggregate_plan): which flows and
        aggregates to publish, with what lease."""
        flows = self.flows
        level = self.class_level[flows.class_id[live]]
        self.totals["level_flow_steps"] += np.bincount(level, minlength=LEVEL_COUNT)
        lease_ms = np.zeros(live.size, np.int64)
        skipped = np.zeros(live.size, bool)
        if self.predictive:
            publish, lease_ms, skipped = self._decide(now_ns, live)
        else:
            publish = np.ones(live.size, bool)
        flat = publish & (level == 0)
        if self.predictive:  # breakdown of the level-0 flow entries
            self.totals["baseline_flow_entries"] += int((flat & (lease_ms == 0)).sum())
            self.totals["flow_repeat_entries"] += int(
                (flat & (lease_ms > 0) & (self.repeats_left[live] < self.repeats)).sum())
        parts = [Entries(live[flat], np.full(int(flat.sum()), ENTRY_FLOW), level[flat],
                         lease_ms[flat], flows.backend_id[live[flat]], live[flat])]
        grouped = level > 0
        if grouped.any():
            parts.append(self._aggregate_entries(now_ns, live[grouped], level[grouped],
                                                 skipped[grouped]))
        if self.publish_closed and (closing.size or self.closed_pending.size):
            parts.append(self._closed_entries(now_ns, closing))
        return Entries(*(np.concatenate([getattr(p, name) for p in parts])
                         for name in ("slot", "kind", "level", "lease_ms", "backend", "member")))

    def _decide(self, now_ns: int, live: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predictive plans: a flow is due when new, when its class level changed, or when its
        renewal time is within half a cycle; the model runs for the due flows of the cohort
        (others: baseline every cycle). A model lease just planned is published again in each
        of the next lease_repeats cycles with the same absolute expiry. Returns (publish,
        lease field, skipped) over `live`."""
        flows, cfg, interval = self.flows, self.cfg, self.interval_ns
        acting = self.acting[flows.class_id[live]]
        due = ~acting | (self.next_renewal[live] <= now_ns + interval // 2)
        # flows that end only by going idle (UDP): lease to the idle horizon, renewed only
        # when a later packet moved the horizon past the lease the LB holds
        idle_only = due & acting & self.idle_only[live] & ~self.moved[live]
        horizon = np.zeros(live.size, np.int64)
        if idle_only.any():
            pos = np.flatnonzero(idle_only)
            horizon[pos] = idle_horizon_ns(flows.last_arrival_ns(live[pos], now_ns), cfg)
            covered = idle_horizon_covered(self.plan_expiry[live[pos]], horizon[pos])
            due[pos[covered]] = False
            self.totals["idle_horizon_waits"] += int(covered.sum())
        publish = np.zeros(live.size, bool)
        skipped = np.zeros(live.size, bool)
        plain = live[due & ~acting]
        self.repeats_left[plain] = 0
        publish[due & ~acting] = True
        self.plan_lease_ms[plain] = 0
        self.plan_expiry[plain] = now_ns + self.baseline_ns
        decide = np.flatnonzero(due & acting)
        if decide.size:
            predicted = live[decide]
            horizon_rows = self.idle_only[predicted]
            p10, p50, p90 = (np.full(decide.size, np.nan) for _ in range(3))
            modelled = np.flatnonzero(~horizon_rows)
            if modelled.size:
                q10, q50, q90 = self.predictor.predict(flows, predicted[modelled], now_ns)
                p10[modelled], p50[modelled], p90[modelled] = q10, q50, q90
                self._record_quality(predicted[modelled], now_ns, q10, q50, q90)
            if horizon_rows.any():  # a level change (moved) left the horizon uncomputed
                need = np.flatnonzero(horizon_rows & (horizon[decide] == 0))
                horizon[decide[need]] = idle_horizon_ns(
                    flows.last_arrival_ns(predicted[need], now_ns), cfg)
            plan = lease_expiry_from_prediction(now_ns, p10, p50, p90, cfg,
                                                self.plan_expiry[predicted])
            plan = with_idle_horizon(now_ns, plan, horizon[decide], horizon_rows, cfg)
            self.totals["idle_horizon_leases"] += int(horizon_rows.sum())
            skip = plan.skip_renewal
            self.totals["skipped_renewals"] += int(skip.sum())
            self.next_renewal[predicted] = np.where(skip, now_ns + interval, plan.next_renewal_ns)
            publish[decide] = ~skip
            skipped[decide] = skip
            sent = predicted[~skip]
            # a flow whose level changed was held by an aggregate or its own entry, which no
            # longer gets renewed: its repeats start next cycle (previous expiry unknown: 0)
            previous = np.where(self.moved[sent], 0, self.plan_expiry[sent])
            self.moved[predicted] = False
            self.repeat_from[sent] = repeat_start_ns(now_ns, previous, cfg)
            self.plan_lease_ms[sent] = plan.lease_ms[~skip]
            self.plan_expiry[sent] = plan.lease_expiry_ns[~skip]
            self.repeats_left[sent] = np.where(plan.lease_ms[~skip] > 0, self.repeats, 0)
        lease_ms = self.plan_lease_ms[live]
        # repeats of a lease planned in an earlier cycle (same absolute expiry)
        again = np.flatnonzero(~publish & (self.repeats_left[live] > 0)
                               & (self.plan_expiry[live] > now_ns)
                               & (self.repeat_from[live] <= now_ns + interval // 2))
        if again.size:
            repeated = live[again]
            publish[again] = True
            lease_ms[again] = repeat_lease_ms(now_ns, self.plan_expiry[repeated])
            self.repeats_left[repeated] -= 1
        return publish, lease_ms, skipped

    def _aggregate_entries(self, now_ns: int, members: np.ndarray, level: np.ndarray,
                           skipped: np.ndarray) -> Entries:
        """One entry per aggregate slot (level, masked tuple, backend) of live member flows.
        adaptive: every aggregate every cycle, lease field 0 (k*T). predictive/full: the
        agent's aggregate rule (policy.lease.aggregate_decision, as
        PredictivePlanner.aggregate_plan): renewed only when its own lease is due and a member
        wants more (a later planned expiry, or a member on the baseline lease), lease = the
        longest remaining planned member lease; a model lease is then repeated in the next
        lease_repeats cycles with the same expiry."""
        flows = self.flows
        slot = flows.slots[level, members]
        order = np.argsort(slot, kind="stable")
        slot, members, level, skipped = slot[order], members[order], level[order], skipped[order]
        start = np.flatnonzero(np.concatenate([[True], slot[1:] != slot[:-1]]))
        if not self.predictive:
            pick = start
            wire = np.zeros(pick.size, np.int64)
        else:
            wanted = np.maximum.reduceat(self.plan_expiry[members], start)
            baseline = np.logical_or.reduceat((self.plan_lease_ms[members] == 0) & ~skipped,
                                              start)
            group_slot = slot[start]
            held = self.server_expiry[group_slot]
            publish, wire = aggregate_decision(now_ns, held, wanted, baseline, self.cfg)
            wire = wire.astype(np.int64)
            renewed = group_slot[publish]
            self.repeats_left[renewed] = np.where(wire[publish] > 0, self.repeats, 0)
            again = ~publish & (self.repeats_left[group_slot] > 0) & (held > now_ns)
            if again.any():
                wire[again] = repeat_lease_ms(now_ns, held[again])
                self.repeats_left[group_slot[again]] -= 1
                self.totals["repeat_entries"] += int(again.sum())
            chosen = publish | again
            pick = start[chosen]
            wire = wire[chosen]
        return Entries(slot[pick], np.full(pick.size, ENTRY_AGGREGATE), level[pick], wire,
                       flows.backend_id[members[pick]], members[pick])

    def _closed_entries(self, now_ns: int, closing: np.ndarray) -> Entries:
        """CLOSED (level 0) for a flow that closed in this cycle if the LB would otherwise keep it
        longer than a baseline lease renewed one cycle ago would: its own lease runs long, or
        its class is aggregated (any later renewal of its aggregate would keep it alive)."""
        flows = self.flows
        # a flow that ended with the client's FIN/RST needs none: the LB saw it close
        closing = closing[self.conn_present[closing] & self.acting[flows.class_id[closing]]
                          & ~flows.client_closed[closing]]
        level = self.class_level[flows.class_id[closing]]
        held = self.plan_expiry[closing] if self.predictive else self.server_expiry[closing]
        agg = level > 0
        limit = now_ns + self.baseline_ns - self.interval_ns
        send = agg | (held > limit)
        fresh = closing[send]
        # each CLOSED is sent again in the next lease_repeats cycles (a lost one would leave
        # the flow held until its lease or aggregate runs out)
        index = np.concatenate([fresh, self.closed_pending])
        self.totals["repeat_entries"] += int(self.closed_pending.size)
        left = np.concatenate([np.full(fresh.size, self.repeats), self.closed_pending_left - 1])
        self.closed_pending, self.closed_pending_left = index[left > 0], left[left > 0]
        return Entries(index, np.full(index.size, ENTRY_CLOSED), np.zeros(index.size, np.int64),
                       np.zeros(index.size, np.int64), flows.backend_id[index], index)

    def _record_quality(self, index: np.ndarray, now_ns: int, p10, p50, p90) -> None:
        alive = self.flows.end_ns[index] > now_ns
        if alive.any():
            flows = self.flows
            truth = np.log(np.maximum((flows.end_ns[index[alive]] - now_ns) / NS_PER_S, 1e-3))
            predicted = np.log(np.stack([p10[alive], p50[alive], p90[alive]], axis=1))
            service = (flows.trace["vip_port"][index[alive]].astype(np.int64) * 256
                       + flows.trace["proto"][index[alive]])
            self.quality.append((predicted, truth, service))
        self.totals["predictions"] += int(index.size)

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
        series["publish_packets"][tick] += packets
        series["entries"][tick] += entries.count
        series["publish_bytes"][tick] += (packets * self.packet_overhead
                                          + entries.count * PUBLISH_ENTRY_DTYPE.itemsize)
        kinds = np.bincount(entries.kind, minlength=3)
        self.totals["flow_entries"] += int(kinds[ENTRY_FLOW])
        self.totals["aggregate_entries"] += int(kinds[ENTRY_AGGREGATE])
        self.totals["closed_entries"] += int(kinds[ENTRY_CLOSED])
        delivered = np.ones(entries.count, bool)
        if self.options.loss > 0:
            packet_base = np.concatenate([[0], np.cumsum(packets_per_server)[:-1]])
            packet_of = packet_base[backend] + rank // self.per_packet
            lost = self.rng.random(packets) < self.options.loss
            self.totals["lost_packets"] += int(lost.sum())
            delivered[order] = ~lost[packet_of]
        # servers remember what they asked for, delivered or not
        expiry = lb_lease_expiry_ns(now_ns, entries.lease_ms, self.cfg)
        renew = entries.kind != ENTRY_CLOSED
        np.maximum.at(self.server_expiry, entries.slot[renew], expiry[renew])
        writes = 0
        for kind in (ENTRY_FLOW, ENTRY_AGGREGATE):
            sel = delivered & (entries.kind == kind)
            slot, new = entries.slot[sel], expiry[sel]
            grows = new > self.expiry[slot]
            if kind == ENTRY_FLOW:
                absent = ~self.conn_present[slot]
                self.conn_present[slot] = True
                grows |= absent
            writes += int(grows.sum())
            self.expiry[slot] = np.maximum(self.expiry[slot], new)
        closed = entries.slot[delivered & (entries.kind == ENTRY_CLOSED)]
        writes += int(self.conn_present[closed].sum())
        self.conn_present[closed] = False
        self.expiry[closed] = 0
        series["map_writes"][tick] += writes

    def _account(self, now_ns: int, series: dict, tick: int) -> None:
        """Stale flow-seconds over (t, t+T], LB table entries at t, then drop finished flows."""
        flows, active = self.flows, self.active
        if active.size == 0:
            series["lb_entries"][tick] = np.count_nonzero(self.expiry[flows.n:] > now_ns)
            return
        held = self.held_until(active)
        end = flows.end_ns[active]
        window_end = now_ns + self.interval_ns
        # a FIN/RST in (t, t + T] sets the lease to that packet + close_linger from then on
        # (_client_closes records it at the next step); stale time only counts after the end
        held_after_end = np.where(flows.client_closed[active] & (end > now_ns)
                                  & (end <= window_end),
                                  end + self.close_linger_ns, held)
        stale = np.clip(np.minimum(held_after_end, window_end) - np.maximum(end, now_ns), 0,
                        None)
        series["stale_flow_seconds"][tick] += stale.sum() / NS_PER_S
        # the LB agent's garbage collection: a connection no lease holds any more is deleted
        # (else a later renewal of its aggregate would revive a long-closed flow)
        expired = active[self.conn_present[active] & (held <= now_ns)]
        self.conn_present[expired] = False
        self.totals["gc_deletes"] += int(expired.size)
        series["map_writes"][tick] += expired.size
        conns = np.count_nonzero(held > now_ns)
        series["lb_entries"][tick] = conns + np.count_nonzero(self.expiry[flows.n:] > now_ns)
        keep = (flows.server_close_ns[active] > now_ns) | (held > now_ns) | (end > now_ns)
        self.active = active[keep]


def wire_entries(flows: SimFlows, entries: Entries, now_ns: int, cfg: Config) -> np.ndarray:
    """The PUBLISH_ENTRY_DTYPE records of a cycle's entries, as a server agent would send them
    (keys masked at the entry's level; CLOSED entries flagged), in the order of `entries`.
    flow_count is 1 and bytes are the member flow's: the simulator does not track them."""
    from connpub.datapath.masks import apply_masks, mask_byte_table
    from connpub.protocol.wire import FLAG_CLOSED, FLAG_RENEW

    out = np.zeros(entries.count, PUBLISH_ENTRY_DTYPE)
    out["level"] = entries.level
    out["flags"] = np.where(entries.kind == ENTRY_CLOSED, FLAG_CLOSED, FLAG_RENEW)
    out["backend_id"] = entries.backend
    out["key"] = apply_masks(flows.keys[entries.member], entries.level,
                             mask_byte_table(cfg.masks.specs))
    out["flow_count"] = 1
    out["bytes"] = flows.trace["bytes"][entries.member]
    out["predicted_remaining_ms"] = entries.lease_ms
    return out
