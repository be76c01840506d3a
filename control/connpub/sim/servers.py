"""The server agents of a simulated mode, vectorised over the flows: which flows each server
still renews (its idle-out: a flow without packets for its idle limit is finished, a later
packet starts a new flow; TCP with kernel truth never idles out, policy.liveness), and each
publish cycle's entries by the agents' own rules: the renewal state machine
(policy.renewal.RenewalPlanner, the same object the server agent's planner drives), aggregate
renewal and the CLOSED rule. docs/simulator.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.datapath.masks import LEVEL_COUNT
from connpub.model.calibration import CoverageTracker
from connpub.policy.calibration import lease_quantiles
from connpub.policy.lease import initial_expiry_ns
from connpub.policy.renewal import RenewalPlanner, RenewalState, closed_wanted
from connpub.sim.flows import SimFlows
from connpub.sim.predictors import LeasePredictor
from connpub.traffic.workload import NS_PER_S, PROTO_UDP

ENTRY_FLOW, ENTRY_AGGREGATE, ENTRY_CLOSED, ENTRY_CLOSED_AGGREGATE = 0, 1, 2, 3


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

    @classmethod
    def concatenate(cls, parts: list[Entries]) -> Entries:
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("slot", "kind", "level", "lease_ms", "backend", "member")))


class SimServers:
    """Server-side state of one mode: per flow the renewal rows, whether the server knows the
    flow (a planner row exists) and still counts it live, per aggregate slot the expiry the
    servers believe the LB holds and the repeats left; the CLOSED repeats pending."""

    def __init__(self, flows: SimFlows, cfg: Config, *, predictive: bool, publish_closed: bool,
                 predictor: LeasePredictor | None, counters: dict) -> None:
        self.flows, self.cfg = flows, cfg
        self.predictive, self.publish_closed = predictive, publish_closed
        self.predictor = predictor
        self.counters = counters
        # the agents' online coverage tracker over the model's intervals (one per server: its
        # classes are keyed by server, VIP, port and proto, so shards by VIP stay independent)
        self.coverage = (CoverageTracker() if predictive and getattr(
            predictor, "online_coverage", False) else None)
        self.renewal = RenewalPlanner(cfg)
        n = flows.n
        self.state = RenewalState.zeros(n)
        self.known = np.zeros(n, bool)  # the planner has a row for the flow
        self.moved = np.zeros(n, bool)  # its class level changed since its last decision
        self.retired = np.zeros(n, bool)  # a member published as a flow (leaves_aggregate)
        self.live = np.zeros(n, bool)  # the server counts it live (not idled out)
        self.first_seen_ns = np.zeros(n, np.int64)  # the server's first_seen of the flow
        self.idled = np.zeros(n, bool)  # the server idled it out at least once mid-life
        self.last_seen_at_idle_ns = np.zeros(n, np.int64)
        self.server_expiry = np.zeros(flows.slot_count, np.int64)  # what the servers published
        self.agg_repeats_left = np.zeros(flows.slot_count, np.uint8)
        self.closed_pending = np.zeros(0, np.int64)  # CLOSED entries still to repeat
        self.closed_pending_left = np.zeros(0, np.int64)
        self.idle_only = flows.trace["proto"] == PROTO_UDP
        self.interval_ns = round(cfg.publish.interval_s * NS_PER_S)
        self.quality: list[tuple[np.ndarray, ...]] = []
        self.class_level = np.zeros(flows.classes, np.int64)  # the LB's directives, as applied
        # per flow, the backend the LB gave it and its lease slot at each level (the engine
        # sets them at the flow's first packet from its class's level then: ModeRun)
        self.backend = flows.backend_id.copy()
        self.slots = flows.slots.copy()
        # aggregate slots with a live member at the last cycle, and what a CLOSED needs of them
        self.agg_live = np.zeros(0, np.int64)  # sorted slots
        self.slot_level = np.zeros(flows.slot_count, np.int64)
        self.slot_member = np.zeros(flows.slot_count, np.int64)

    # -------------------------------------------------------------------------------------
    # which flows the servers renew

    def start(self, new: np.ndarray, expiry_ns: np.ndarray) -> None:
        """Flows whose first packet the servers just saw (the LB gave them `expiry_ns`)."""
        self.live[new] = True
        self.first_seen_ns[new] = self.flows.start_ns[new]
        self.state.reset(new, expiry_ns)
        self.server_expiry[new] = expiry_ns

    def renewed(self, now_ns: int, in_life: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(live, idled_now) among flows the server has not finished by their end: the
        server agent's idle-out (agents.server.flow_states): a flow without packets for
        longer than idle_timeout_s is finished (idled_now: at this cycle; they get the CLOSED
        rule), and a later packet is a new flow to it (new first_seen, no planner row)."""
        flows = self.flows
        may = in_life[flows.may_idle[in_life]]
        if may.size == 0:
            return in_life, np.zeros(0, np.int64)
        last = flows.last_arrival_ns(may, now_ns)
        quiet = np.int64(now_ns) - last > flows.idle_limit_ns[may]
        gone = may[quiet]
        was_live = self.live[gone]
        idled_now = gone[was_live]
        if idled_now.size:
            self.live[idled_now] = False
            self.known[idled_now] = False
            self.idled[idled_now] = True
            self.last_seen_at_idle_ns[idled_now] = last[quiet][was_live]
            self.counters["idle_outs"] += int(idled_now.size)
        back = may[~quiet & ~self.live[may]]
        if back.size:
            first = flows.next_arrival_ns(back, self.last_seen_at_idle_ns[back] + 1)
            self.live[back] = True
            self.first_seen_ns[back] = first
            self.state.reset(back, initial_expiry_ns(first, self.cfg))
        keep = np.ones(in_life.size, bool)
        keep[np.flatnonzero(flows.may_idle[in_life])[quiet]] = False
        return in_life[keep], idled_now

    def level_changed(self, moved: np.ndarray) -> None:
        self.state.next_renewal_ns[moved] = 0
        self.moved[moved] = True

    def retire(self, members: np.ndarray) -> None:
        """Members that leave their aggregate for a flow entry of their own
        (policy.granularity.leaves_aggregate): published at once, with no own lease at the LB
        yet (policy.renewal.leaving_aggregate, as the agent's planner)."""
        self.retired[members] = True
        self.level_changed(members)
        self.state.lease_expiry_ns[members] = 0

    # -------------------------------------------------------------------------------------
    # one publish cycle

    def plan(self, now_ns: int, live: np.ndarray, level: np.ndarray, acting: np.ndarray,
             closing: np.ndarray, fin_seen: np.ndarray, conn_present: np.ndarray) -> Entries:
        """The cycle's entries: level-0 flows to publish, aggregates of the aggregated live
        flows (level > 0), CLOSED entries for `closing` (finished by the servers this cycle;
        fin_seen: the LB saw their client's FIN/RST, no CLOSED needed)."""
        flows = self.flows
        self.counters["level_flow_steps"] += np.bincount(level, minlength=LEVEL_COUNT)
        if self.coverage is not None:
            self._score_intervals(now_ns, live, closing)
        lease_ms = np.zeros(live.size, np.int64)
        skipped = np.zeros(live.size, bool)
        if self.predictive:
            publish, lease_ms, skipped = self._decide(now_ns, live, acting[flows.class_id[live]])
        else:
            publish = np.ones(live.size, bool)
        flat = publish & (level == 0)
        if self.predictive:  # breakdown of the level-0 flow entries
            self.counters["baseline_flow_entries"] += int((flat & (lease_ms == 0)).sum())
            self.counters["flow_repeat_entries"] += int(
                (flat & (lease_ms > 0) & (self.state.repeats_left[live] < self.renewal.repeats)
                 ).sum())
        parts = [Entries(live[flat], np.full(int(flat.sum()), ENTRY_FLOW), level[flat],
                         lease_ms[flat], self.backend[live[flat]], live[flat])]
        grouped = level > 0
        if grouped.any():
            parts.append(self._aggregate_entries(now_ns, live[grouped], level[grouped],
                                                 skipped[grouped]))
        parts.append(self._closed_aggregates(live[grouped], level[grouped]))
        if self.publish_closed and (closing.size or self.closed_pending.size):
            parts.append(self._closed_entries(now_ns, closing, fin_seen, acting, conn_present))
        return Entries.concatenate(parts)

    def _decide(self, now_ns: int, live: np.ndarray, cohort: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The renewal state machine over the live flows (policy.renewal.RenewalPlanner.decide,
        as the agent's planner). Returns (publish, lease field, skipped) over `live`."""
        flows = self.flows
        state = self.state.take(live)
        moved = self.moved[live]

        def last_seen(positions: np.ndarray) -> np.ndarray:
            return flows.last_arrival_ns(live[positions], now_ns)

        def idle_limit(positions: np.ndarray) -> np.ndarray:  # the agent's UDP horizons
            return flows.idle_limit_ns[live[positions]]

        def predict(positions: np.ndarray):
            index = live[positions]
            q10, q50, q90 = self.predictor.predict(flows, index, now_ns)
            if self.coverage is None:
                self._record_quality(index, now_ns, q10, q50, q90)
                return q10, q50, q90
            trace = flows.trace  # as in the agent: the scored interval, the lease's p90
            low, high = self.coverage.adjust(
                index.astype(np.uint64), now_ns, q10, q90, proto=trace["proto"][index],
                vip_port=trace["vip_port"][index], vip_addr=trace["vip_addr"][index],
                server=self.backend[index], p50_s=q50)
            self._record_quality(index, now_ns, low, q50, high)
            q10, q90 = lease_quantiles(q10, q90, high)
            return q10, q50, q90

        decision = self.renewal.decide(
            now_ns, state, new_or_moved=~self.known[live] | moved, level_changed=moved,
            cohort=cohort, idle_only=cohort & self.idle_only[live],
            first_seen_ns=self.first_seen_ns[live], last_seen=last_seen, predict=predict,
            idle_limit=idle_limit)
        self.state.put(live, state)
        self.known[live] = True
        self.moved[live] = False
        return decision.publish, decision.wire_ms.astype(np.int64), decision.skipped

    def _score_intervals(self, now_ns: int, live: np.ndarray, closing: np.ndarray) -> None:
        """The tracker's outcomes this cycle, as the agent's planner gives them: flows the
        servers finish now with their last packet, live flows past a decision's p90 end with
        their last packet so far."""
        flows, coverage = self.flows, self.coverage
        overdue = np.intersect1d(coverage.overdue_ids(now_ns).astype(np.int64), live)
        before = (coverage.scored_total, coverage.below_total, coverage.above_total)
        coverage.resolve(closing.astype(np.uint64), flows.last_arrival_ns(closing, now_ns),
                         overdue.astype(np.uint64), flows.last_arrival_ns(overdue, now_ns))
        for name, was, now in zip(("interval_scored", "interval_below", "interval_above"),
                                  before, (coverage.scored_total, coverage.below_total,
                                           coverage.above_total), strict=True):
            self.counters[name] += now - was

    def _aggregate_entries(self, now_ns: int, members: np.ndarray, level: np.ndarray,
                           skipped: np.ndarray) -> Entries:
        """One entry per aggregate slot (level, masked tuple, backend) of live member flows.
        adaptive: every aggregate every cycle, lease field 0 (k*T). predictive/full: the
        agent's aggregate rule (policy.renewal.RenewalPlanner.renew_aggregates, as
        PredictivePlanner.aggregate_plan)."""
        slot = self.slots[level, members]
        order = np.argsort(slot, kind="stable")
        slot, members, level, skipped = slot[order], members[order], level[order], skipped[order]
        start = np.flatnonzero(np.concatenate([[True], slot[1:] != slot[:-1]]))
        if not self.predictive:
            pick = start
            wire = np.zeros(pick.size, np.int64)
        else:
            state = self.state
            wanted = np.maximum.reduceat(state.lease_expiry_ns[members], start)
            baseline = np.logical_or.reduceat((state.lease_ms[members] == 0) & ~skipped, start)
            group_slot = slot[start]
            step = self.renewal.renew_aggregates(
                now_ns, self.server_expiry[group_slot], self.agg_repeats_left[group_slot],
                wanted, baseline, np.ones(start.size, bool))
            self.agg_repeats_left[group_slot] = step.repeats_left
            self.counters["repeat_entries"] += int(step.repeated.sum())
            pick = start[step.publish]
            wire = step.wire_ms[step.publish].astype(np.int64)
        return Entries(slot[pick], np.full(pick.size, ENTRY_AGGREGATE), level[pick], wire,
                       self.backend[members[pick]], members[pick])

    def _closed_aggregates(self, members: np.ndarray, level: np.ndarray) -> Entries:
        """Predictive/full: a CLOSED entry for every aggregate whose last live member ended
        since the last cycle (the agent's stale aggregates, agents.server): its model lease
        may outlast its members by minutes; the LB caps it to now + close_linger."""
        slot = self.slots[level, members]
        now_live = np.unique(slot)
        self.slot_level[slot], self.slot_member[slot] = level, members
        ended = np.setdiff1d(self.agg_live, now_live, assume_unique=True)
        self.agg_live = now_live
        if not self.predictive:
            ended = ended[:0]
        # the agent deletes the aggregate and its planner forgets it: a later member starts
        # a new one, published as new
        self.server_expiry[ended] = 0
        self.agg_repeats_left[ended] = 0
        return Entries(ended, np.full(ended.size, ENTRY_CLOSED_AGGREGATE), self.slot_level[ended],
                       np.zeros(ended.size, np.int64), self.backend[self.slot_member[ended]],
                       self.slot_member[ended])

    def _closed_entries(self, now_ns: int, closing: np.ndarray, fin_seen: np.ndarray,
                        acting: np.ndarray, conn_present: np.ndarray) -> Entries:
        """CLOSED (level 0) for flows the servers finished this cycle, by the CLOSED rule
        (policy.renewal.closed_wanted); each is sent again in the next lease_repeats cycles."""
        flows = self.flows
        closing = closing[conn_present[closing] & ~fin_seen]
        held = (self.state.lease_expiry_ns[closing] if self.predictive
                else self.server_expiry[closing])
        # aggregated: the class's level (the datapath put the flow there at its last packet)
        aggregated = self.class_level[flows.class_id[closing]] > 0
        send = closed_wanted(now_ns, held, aggregated, acting[flows.class_id[closing]], self.cfg)
        fresh = closing[send]
        index = np.concatenate([fresh, self.closed_pending])
        self.counters["repeat_entries"] += int(self.closed_pending.size)
        repeats = self.renewal.repeats
        left = np.concatenate([np.full(fresh.size, repeats), self.closed_pending_left - 1])
        self.closed_pending, self.closed_pending_left = index[left > 0], left[left > 0]
        return Entries(index, np.full(index.size, ENTRY_CLOSED), np.zeros(index.size, np.int64),
                       np.zeros(index.size, np.int64), self.backend[index], index)

    def _record_quality(self, index: np.ndarray, now_ns: int, p10, p50, p90) -> None:
        alive = self.flows.end_ns[index] > now_ns
        if alive.any():
            flows = self.flows
            truth = np.log(np.maximum((flows.end_ns[index[alive]] - now_ns) / NS_PER_S, 1e-3))
            predicted = np.log(np.stack([p10[alive], p50[alive], p90[alive]], axis=1))
            service = (flows.trace["vip_port"][index[alive]].astype(np.int64) * 256
                       + flows.trace["proto"][index[alive]])
            # (tick order and flow index let shards of a run be put back in the serial order)
            self.quality.append((predicted, truth, service, index[alive], now_ns))
        self.counters["predictions"] += int(index.size)
