"""The renewal state machine of a server agent's publish cycle (docs/policy.md, "Renewal"):
which live flows to publish now and with which lease, which aggregates to renew, which finished
flows get a CLOSED entry. Pure: arrays in, arrays out, time passed in. The server agent's
planner (model.planner.PredictivePlanner, keyed by flow-table rows) and the simulator (keyed by
flow index) drive the same RenewalPlanner object over their own state arrays.

Per flow the state is a RenewalState row; each cycle `RenewalPlanner.decide` takes the rows of
the live flows, decides and updates them in place:
- due: a new flow, a flow whose level changed, or one whose renewal time is within half a cycle;
- a flow that ends only by going idle (UDP) is leased to its idle horizon and renewed only when
  a later packet moved the horizon past the lease the LB holds;
- outside the rollout cohort: the baseline lease every cycle;
- a fallback (interval too wide) gets the baseline lease every cycle and the model again only
  once its age grew by a quarter (between one cycle and FALLBACK_RECHECK_MAX_NS);
- otherwise the model runs (the caller's `predict`) and policy.lease turns the quantiles into a
  lease, a renewal time or a skipped renewal;
- a model lease just planned is published again in the next lease_repeats cycles with the same
  absolute expiry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from connpub.config import Config
from connpub.policy.lease import (
    aggregate_decision,
    baseline_lease_ns,
    extend_idle_horizon,
    idle_horizon_covered,
    idle_horizon_ns,
    lb_lease_expiry_ns,
    lease_expiry_from_prediction,
    lease_repeats,
    model_protocols,
    repeat_lease_ms,
    repeat_start_ns,
    with_idle_horizon,
)

NS_PER_S = 1_000_000_000
FALLBACK_RECHECK_MAX_NS = 60 * NS_PER_S  # longest wait before the model runs again for a
#                                          flow whose interval was too wide

Quantiles = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class RenewalState:
    """What the renewal state machine remembers per flow (struct of arrays, rows chosen by the
    caller: sorted flow-table hashes in the agent, flow indices in the simulator)."""

    next_renewal_ns: np.ndarray  # int64: publish again then
    next_decision_ns: np.ndarray  # int64: run the model again then
    lease_expiry_ns: np.ndarray  # int64: expiry the LB holds from what was published (estimate)
    lease_ms: np.ndarray  # uint32: last lease published (0 = baseline)
    confidence: np.ndarray  # uint16
    predictive: np.ndarray  # bool: a model lease (not baseline) was published
    repeats_left: np.ndarray  # uint8: cycles in which the planned lease is published again
    repeat_from_ns: np.ndarray  # int64: the repeats start then (policy.lease.repeat_start_ns)

    @classmethod
    def zeros(cls, n: int) -> RenewalState:
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.zeros(n, np.uint32), np.zeros(n, np.uint16), np.zeros(n, bool),
                   np.zeros(n, np.uint8), np.zeros(n, np.int64))

    def __len__(self) -> int:
        return int(self.next_renewal_ns.size)

    def take(self, rows: np.ndarray) -> RenewalState:
        """A copy of `rows` (an index array or a bool mask)."""
        return RenewalState(*(getattr(self, f.name)[rows] for f in fields(self)))

    def put(self, rows: np.ndarray, part: RenewalState) -> None:
        """Write `part` back into `rows`."""
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(part, f.name)

    def reset(self, rows: np.ndarray, lease_expiry_ns) -> None:
        """Forget `rows` (new flows): nothing planned, the LB holds `lease_expiry_ns`."""
        for f in fields(self):
            getattr(self, f.name)[rows] = 0
        self.lease_expiry_ns[rows] = lease_expiry_ns

    @classmethod
    def concatenate(cls, parts: list[RenewalState]) -> RenewalState:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in fields(cls)))


@dataclass
class RenewalDecision:
    """One cycle's decisions for the rows given to RenewalPlanner.decide."""

    publish: np.ndarray  # bool: publish the flow now (level-0 entry, or it wants its aggregate)
    wire_ms: np.ndarray  # uint32: predicted_remaining_ms on the wire (0 = baseline k*T)
    skipped: np.ndarray  # bool: due, but p90 says it is over: renewal skipped
    decided: np.ndarray  # bool: the model (or the idle horizon) decided it this cycle
    due: np.ndarray  # bool


@dataclass
class AggregateStep:
    """One cycle's decisions for a batch of aggregates (RenewalPlanner.renew_aggregates)."""

    publish: np.ndarray  # bool
    wire_ms: np.ndarray  # uint32
    lease_expiry_ns: np.ndarray  # int64: expiry the LB holds after this cycle's publish
    repeats_left: np.ndarray  # uint8
    repeated: np.ndarray  # bool: published as a repeat of an earlier lease


COUNT_NAMES = ("decisions", "not_due", "skipped_renewals", "shadow_would_skip", "fallback",
               "fallback_repeats", "baseline", "lease_repeats", "idle_horizon_leases",
               "idle_horizon_waits", "aggregate_publishes", "aggregate_repeats")


def closed_wanted(now_ns: int, held_expiry_ns, aggregated, cohort, cfg: Config) -> np.ndarray:
    """The CLOSED rule: a flow that ended without the client's FIN/RST (UDP, TCP gone idle)
    gets a CLOSED entry when the LB would otherwise hold it longer than a baseline lease
    renewed one cycle ago (its own lease runs long) or when it was aggregated (any later
    renewal of its aggregate keeps it alive); only in the rollout cohort. A flow that ended
    with the client's FIN/RST needs none: the LB saw that packet (bpf/lb/lb.c
    note_client_close) and the caller leaves it out."""
    interval_ns = round(cfg.publish.interval_s * NS_PER_S)
    limit = np.int64(now_ns) + baseline_lease_ns(cfg) - interval_ns
    held = np.asarray(held_expiry_ns, np.int64)
    return np.asarray(cohort, bool) & ((held > limit) | np.asarray(aggregated, bool))


class RenewalPlanner:
    """The renewal state machine (module docstring), one object per server agent or simulated
    mode. `counts` accumulates what it decided."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.interval_ns = round(cfg.publish.interval_s * NS_PER_S)
        self.baseline_ns = baseline_lease_ns(cfg)
        self.initial_ns = round(cfg.lease.initial_s * NS_PER_S)
        self.repeats = lease_repeats(cfg)
        self.model_tcp, self.model_udp = model_protocols(cfg)
        self.shadow = bool(cfg.rollout.shadow)
        self.counts: dict[str, int] = dict.fromkeys(COUNT_NAMES, 0)

    def decide(self, now_ns: int, state: RenewalState, *, new_or_moved: np.ndarray,
               level_changed: np.ndarray, cohort: np.ndarray, idle_only: np.ndarray,
               first_seen_ns: np.ndarray, last_seen: Callable[[np.ndarray], np.ndarray],
               predict: Callable[[np.ndarray], Quantiles],
               idle_limit: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> RenewalDecision:
        """Decide for the rows of `state` (updated in place; a new flow's row holds its
        initial lease as lease_expiry_ns). new_or_moved: the flow is new to the planner or its
        level changed (level_changed); cohort: its class is in the rollout cohort; idle_only:
        it can only end by going idle (UDP, in the cohort); last_seen(positions) -> its last
        packet times, asked only for due idle-only rows; idle_limit(positions) -> how long each
        may be quiet (policy.liveness.idle_limit_ns; None: [lease] idle_timeout_s);
        predict(positions) -> (p10, p50, p90) remaining seconds, asked once for the rows the
        model decides."""
        now_ns = int(now_ns)
        interval = self.interval_ns
        n = len(state)
        new_or_moved = np.asarray(new_or_moved, bool)
        cohort = np.asarray(cohort, bool)
        idle_only = np.asarray(idle_only, bool) & cohort
        expiry = state.lease_expiry_ns
        # a cycle decides what is due before the next one (within half a cycle), so a
        # renewal planned one cycle before expiry survives cycles that come a little late
        horizon = now_ns + interval // 2
        due = new_or_moved | (state.next_renewal_ns <= horizon)
        idle_rows = np.flatnonzero(due & idle_only)
        idle_horizon = np.zeros(n, np.int64)
        if idle_rows.size:
            idle_horizon[idle_rows] = idle_horizon_ns(
                last_seen(idle_rows), self.cfg,
                None if idle_limit is None else idle_limit(idle_rows))
        covered = np.zeros(n, bool)
        covered[idle_rows] = (~new_or_moved[idle_rows]
                              & idle_horizon_covered(expiry[idle_rows], idle_horizon[idle_rows]))
        due &= ~covered
        self.counts["idle_horizon_waits"] += int(covered.sum())
        publish = np.zeros(n, bool)
        skipped = np.zeros(n, bool)
        decided = np.zeros(n, bool)

        # outside the cohort, and fallback flows between two model runs: the baseline lease
        plain = due & ~cohort
        repeat = due & cohort & ~new_or_moved & (state.next_decision_ns > horizon)
        baseline = plain | repeat
        publish[baseline] = True
        state.lease_ms[baseline], state.confidence[baseline] = 0, 0
        state.predictive[baseline] = False
        state.repeats_left[baseline] = 0
        state.next_renewal_ns[baseline] = np.where(plain[baseline], now_ns, now_ns + interval)
        expiry[baseline] = now_ns + self.baseline_ns

        decide = np.flatnonzero(due & cohort & ~repeat)
        if decide.size:
            self._model_decision(now_ns, state, decide, idle_only[decide], idle_horizon[decide],
                                 np.asarray(level_changed, bool)[decide],
                                 np.asarray(first_seen_ns, np.int64)[decide], predict,
                                 publish, skipped)
            decided[decide] = True

        # a model lease planned in an earlier cycle goes out again, same absolute expiry
        wire_ms = state.lease_ms.copy()
        again = np.flatnonzero(~publish & (state.repeats_left > 0) & (expiry > now_ns)
                               & (state.repeat_from_ns <= horizon))
        if again.size:
            publish[again] = True
            wire_ms[again] = repeat_lease_ms(now_ns, expiry[again])
            state.repeats_left[again] -= 1
            self.counts["lease_repeats"] += int(again.size)
        self.counts["not_due"] += int((~due).sum())
        self.counts["baseline"] += int(plain.sum())
        self.counts["fallback_repeats"] += int(repeat.sum())
        return RenewalDecision(publish, wire_ms, skipped, decided, due)

    def _model_decision(self, now_ns: int, state: RenewalState, decide: np.ndarray,
                        horizon_rows: np.ndarray, idle_horizon: np.ndarray,
                        level_changed: np.ndarray, first_seen_ns: np.ndarray,
                        predict: Callable[[np.ndarray], Quantiles], publish: np.ndarray,
                        skipped: np.ndarray) -> None:
        """The model's (or the idle horizon's) lease for the rows `decide` of `state`."""
        cfg, interval = self.cfg, self.interval_ns
        p10, p50, p90 = (np.full(decide.size, np.nan) for _ in range(3))
        # [lease] model_protocols: the model runs for TCP flows (else NaN: the baseline
        # lease) and for UDP flows only if it may extend their idle horizon
        modelled = np.flatnonzero(np.where(horizon_rows, self.model_udp, self.model_tcp))
        if modelled.size:
            q10, q50, q90 = predict(decide[modelled])
            p10[modelled], p50[modelled], p90[modelled] = q10, q50, q90
        expiry = state.lease_expiry_ns
        model = lease_expiry_from_prediction(now_ns, p10, p50, p90, cfg, expiry[decide])
        lease = with_idle_horizon(now_ns, model, idle_horizon, horizon_rows, cfg)
        if self.model_udp:
            lease = extend_idle_horizon(lease, model, horizon_rows)
        self.counts["idle_horizon_leases"] += int(horizon_rows.sum())
        skip = lease.skip_renewal
        send = ~skip
        publish[decide] = send
        skipped[decide] = skip
        next_renewal = np.where(skip, now_ns + interval, lease.next_renewal_ns)
        state.next_renewal_ns[decide] = next_renewal
        # a fallback (too wide interval) is published with the baseline lease every cycle;
        # the model runs for it again only once its age has grown by a quarter (features
        # are logs of age and rates), between one cycle and FALLBACK_RECHECK_MAX_NS
        age_ns = np.maximum(now_ns - first_seen_ns, 0)
        recheck_ns = np.clip(age_ns // 4, interval, max(interval, FALLBACK_RECHECK_MAX_NS))
        state.next_decision_ns[decide] = np.where(lease.fallback & send, now_ns + recheck_ns,
                                                  next_renewal)
        sent = decide[send]
        state.lease_ms[sent] = lease.lease_ms[send]
        state.confidence[sent] = lease.confidence[send]
        state.predictive[sent] = ~lease.fallback[send]
        state.repeats_left[sent] = np.where(lease.fallback[send], 0, self.repeats)
        # a flow whose level changed was held by an aggregate or its own entry, which no
        # longer gets renewed: its repeats start next cycle (previous expiry unknown: 0)
        previous = np.where(level_changed[send], 0, expiry[sent])
        state.repeat_from_ns[sent] = repeat_start_ns(now_ns, previous, cfg)
        expiry[sent] = lease.lease_expiry_ns[send]
        self.counts["fallback"] += int((lease.fallback & send).sum())
        self.counts["decisions"] += int(decide.size)
        self.counts["shadow_would_skip" if self.shadow else "skipped_renewals"] += int(
            skip.sum())

    def renew_aggregates(self, now_ns: int, held_ns: np.ndarray, repeats_left: np.ndarray,
                         wanted_ns: np.ndarray, baseline_member: np.ndarray,
                         known: np.ndarray) -> AggregateStep:
        """Aggregates: renewed by policy.lease.aggregate_decision (only when its own lease is
        due and a member wants more; lease = the longest remaining planned member lease); one
        without a known member gets the baseline every cycle; a model lease is then repeated
        in the next lease_repeats cycles with the same expiry. held_ns: the expiry the LB
        holds from earlier publishes (0 = never); wanted_ns / baseline_member: of its live
        members (see aggregate_decision); known: it has a member the planner knows."""
        now_ns = int(now_ns)
        m = int(np.asarray(held_ns).size)
        held = np.asarray(held_ns, np.int64)
        known = np.asarray(known, bool)
        publish = np.ones(m, bool)
        wire_ms = np.zeros(m, np.uint32)
        k = np.flatnonzero(known)
        if k.size:
            publish[k], wire_ms[k] = aggregate_decision(
                now_ns, held[k], np.asarray(wanted_ns, np.int64)[k],
                np.asarray(baseline_member, bool)[k], self.cfg)
        left = np.asarray(repeats_left, np.uint8).copy()
        expiry = held.copy()
        sent = np.flatnonzero(publish)
        expiry[sent] = np.maximum(held[sent], lb_lease_expiry_ns(now_ns, wire_ms[sent],
                                                                 self.cfg))
        left[sent] = np.where(wire_ms[sent] > 0, self.repeats, 0)
        again = ~publish & (left > 0) & (held > now_ns)
        if again.any():
            publish[again] = True
            wire_ms[again] = repeat_lease_ms(now_ns, held[again])
            left[again] -= 1
            self.counts["aggregate_repeats"] += int(again.sum())
        self.counts["aggregate_publishes"] += int(sent.size)
        return AggregateStep(publish, wire_ms, expiry, left, again)
