"""The server agent's lease planner in predictive / full mode (docs/model.md, "Predictive
mode"): joins each tick's flow table to its per-flow state by key hash and runs the renewal
state machine of policy.renewal on it (the simulator drives the same RenewalPlanner); computes
model features only for the flows the state machine asks a prediction for."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from connpub.config import Config
from connpub.datapath.abi import CLASS_KEY_DTYPE, FLOW_KEY_DTYPE
from connpub.datapath.masks import LEVEL_COUNT, apply_masks, mask_byte_table
from connpub.model.observations import ClientPriorIndex, flow_features, hash_words
from connpub.policy.calibration import lease_quantiles
from connpub.policy.lease import baseline_lease_ns
from connpub.policy.liveness import FlowTimes, idle_limit_ns
from connpub.policy.renewal import RenewalPlanner, RenewalState, closed_wanted
from connpub.policy.rollout import in_cohort
from connpub.traffic.workload import PROTO_UDP

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000


class RemainingPredictor(Protocol):
    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p10, p50, p90) remaining seconds per feature row."""


_LAST_WORD_MASK = np.uint64(0x000000FFFFFFFFFF)  # ports + proto; pad bytes ignored


def key_words(keys: np.ndarray) -> np.ndarray:
    """(n, 5) uint64 words of FLOW_KEY_DTYPE keys, pad bytes cleared."""
    keys = np.ascontiguousarray(keys)
    if keys.dtype != FLOW_KEY_DTYPE:
        raise TypeError(f"expected FLOW_KEY_DTYPE keys, got {keys.dtype}")
    words = keys.view(np.uint8).reshape(-1, FLOW_KEY_DTYPE.itemsize).view(np.uint64).copy()
    words[:, 4] &= _LAST_WORD_MASK
    return words


@dataclass
class _FlowState:
    """What the planner remembers per live flow, sorted by key hash."""

    hash: np.ndarray  # uint64, sorted
    words: np.ndarray  # (n, 5) uint64 key words
    first_seen_ns: np.ndarray  # uint64: a reused tuple (new first_seen) is a new flow
    level: np.ndarray  # uint8 at the last decision
    cohort: np.ndarray  # bool: class in the predictive cohort (rollout)
    renewal: RenewalState  # the renewal state machine's rows (policy.renewal)

    @classmethod
    def empty(cls) -> _FlowState:
        return cls(np.zeros(0, np.uint64), np.zeros((0, 5), np.uint64), np.zeros(0, np.uint64),
                   np.zeros(0, np.uint8), np.zeros(0, bool), RenewalState.zeros(0))

    def __len__(self) -> int:
        return int(self.hash.size)

    def sort(self) -> None:
        """Order every array by hash (after a rebuild)."""
        order = np.argsort(self.hash, kind="stable")
        for name in ("hash", "words", "first_seen_ns", "level", "cohort"):
            setattr(self, name, getattr(self, name)[order])
        self.renewal = self.renewal.take(order)

    def find(self, hashes: np.ndarray, words: np.ndarray,
             first_seen_ns: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(found, row) per query; a hash match must also match every key word (and first
        seen, when given), so a collision only makes a flow look new."""
        n = hashes.size
        if len(self) == 0 or n == 0:
            return np.zeros(n, bool), np.zeros(n, np.int64)
        row = np.minimum(np.searchsorted(self.hash, hashes), len(self) - 1)
        found = self.hash[row] == hashes
        found &= (self.words[row] == words).all(axis=1)
        if first_seen_ns is not None:
            found &= self.first_seen_ns[row] == first_seen_ns
        return found, row


@dataclass
class FlowPlan:
    """One tick's decisions for every row of the flow table given to PredictivePlanner.plan."""

    publish: np.ndarray  # bool: publish this live flow now (a level-0 entry, or renew its agg.)
    lease_ms: np.ndarray  # uint32: predicted_remaining_ms to publish (0 = baseline k*T)
    confidence: np.ndarray  # uint16 Q0.16
    closed: np.ndarray  # bool: idle-finished (no FIN/RST) with a long lease held: send CLOSED
    lease_expiry_ns: np.ndarray  # int64: expiry the LB holds for the flow after this tick
    decided: np.ndarray  # bool: the model ran for it this tick
    skipped: np.ndarray  # bool: due, but p90 says it is over: renewal skipped
    live: np.ndarray  # bool: the live mask given


@dataclass
class _AggregateState:
    """Per aggregate the planner has published: the expiry the LB holds from it and the
    repeats left of its latest lease, sorted by the hash of (masked key words, level)."""

    hash: np.ndarray  # uint64, sorted
    words: np.ndarray  # (n, 6) uint64
    expiry_ns: np.ndarray  # int64
    repeats_left: np.ndarray  # uint8

    @classmethod
    def empty(cls) -> _AggregateState:
        return cls(np.zeros(0, np.uint64), np.zeros((0, 6), np.uint64), np.zeros(0, np.int64),
                   np.zeros(0, np.uint8))

    def find(self, hashes: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = hashes.size
        if self.hash.size == 0 or n == 0:
            return np.zeros(n, bool), np.zeros(n, np.int64)
        row = np.minimum(np.searchsorted(self.hash, hashes), self.hash.size - 1)
        found = (self.hash[row] == hashes) & (self.words[row] == words).all(axis=1)
        return found, row


@dataclass
class AggregatePlan:
    publish: np.ndarray  # bool per aggregate
    lease_ms: np.ndarray  # uint32
    confidence: np.ndarray  # uint16
    members: np.ndarray  # int64: live member flows known to the planner


class PredictivePlanner:
    """Per-tick lease plan of the server agent in predictive / full mode.

    State per live flow (numpy arrays sorted by a 64-bit key hash; joined to each tick's
    table with `searchsorted`, no per-flow Python): next renewal time, the lease the LB holds.
    Each tick the model runs, in one batch, only for flows that need a decision: new flows,
    flows whose renewal time has come (within half a cycle), flows whose level changed. Classes
    outside the rollout cohort get the baseline (every cycle, lease 0); in shadow mode the plan
    is computed and counted but the output is the baseline.

    Publish loss: a model lease just planned is published again in `lease_repeats(cfg)`
    (ceil(k) - 1) more cycles with the same absolute expiry (the LB keeps the later expiry, so
    a repeat is idempotent): in the next cycles when the previous lease is about to run out,
    else once it has lease_repeats + 1 cycles left (policy.lease.repeat_start_ns; a flow that
    ends before needs none). Renewals are planned at least (k + 1) * T before the previous
    expiry, so losing a lease takes as many consecutive losses as losing a baseline lease.
    Aggregates (aggregate_plan) follow the same rule.
    """

    def __init__(self, cfg: Config, models: RemainingPredictor, clock_offset_ns: int = 0,
                 byte_table: np.ndarray | None = None, coverage=None) -> None:
        self.cfg = cfg
        self.models = models
        self.coverage = coverage  # model.calibration.CoverageTracker: online 80% per class
        self.clock_offset_ns = int(clock_offset_ns)
        self.byte_table = byte_table if byte_table is not None else mask_byte_table(
            cfg.masks.specs)
        self.interval_ns = round(cfg.publish.interval_s * NS_PER_S)
        self.baseline_ns = baseline_lease_ns(cfg)
        self.initial_ns = round(cfg.lease.initial_s * NS_PER_S)
        self.max_lease_ms = round(cfg.lease.max_s * 1000)
        self.state = _FlowState.empty()
        self.aggregates = _AggregateState.empty()
        self.renewal = RenewalPlanner(cfg)
        self.flow_times = FlowTimes.from_config(cfg)  # the agent's idle limits (UDP horizons)
        # one counter dict: the state machine's counts plus the table-level ones
        self.counts = self.renewal.counts
        self.counts.update({"ticks": 0, "published": 0, "closed_entries": 0})
        self.last_tick: dict = {}

    # -- helpers -----------------------------------------------------------------------------

    def _client_priors(self) -> ClientPriorIndex | None:
        return getattr(self.models, "client_priors", None)

    def _cohort(self, keys: np.ndarray) -> np.ndarray:
        class_keys = np.zeros(len(keys), CLASS_KEY_DTYPE)
        class_keys["vip_addr"] = keys["vip_addr"]
        class_keys["vip_port"] = keys["vip_port"]
        class_keys["proto"] = keys["proto"]
        return in_cohort(class_keys, self.cfg.rollout)

    def _predict(self, keys: np.ndarray, values: np.ndarray, now_ns: int):
        features = flow_features(keys, values, now_ns, self._client_priors(),
                                 self.clock_offset_ns)
        p10, p50, p90 = self.models.predict(features)
        if self.coverage is not None:  # scored interval per class; the lease's p90 widened
            _, high = self.coverage.adjust(hash_words(key_words(keys)), now_ns, p10, p90,
                                           proto=keys["proto"], vip_port=keys["vip_port"],
                                           vip_addr=keys["vip_addr"], p50_s=p50)
            p10, p90 = lease_quantiles(p10, p90, high)
        return (np.asarray(p10, np.float64), np.asarray(p50, np.float64),
                np.asarray(p90, np.float64))

    # -- one tick ----------------------------------------------------------------------------

    def plan(self, keys: np.ndarray, values: np.ndarray, now_ns: int, live: np.ndarray,
             finished: np.ndarray | None = None, aggregated: np.ndarray | None = None
             ) -> FlowPlan:
        """Decide for every row of the flow table. live: the agent's live mask (own traffic
        excluded); finished: flows the agent removes this tick (closed and lingered, or idle
        past the timeout; default: every flow that is not live). Updates the state to the
        live flows of this table, plus ended flows waiting to be finished for their CLOSED.
        The decisions are policy.renewal.RenewalPlanner's (the simulator drives the same)."""
        started = time.perf_counter()
        now_ns = int(now_ns)
        n = len(keys)
        live = np.asarray(live, bool)
        finished = ~live if finished is None else np.asarray(finished, bool)
        words = key_words(keys)
        hashes = hash_words(words)
        if self.coverage is not None:  # finished flows' true end, live flows past their p90
            last_seen = values["last_seen_ns"]
            self.coverage.resolve(hashes[finished], last_seen[finished], hashes[live],
                                  last_seen[live])
        first_seen = values["first_seen_ns"]
        # work in hash order: the join's searchsorted runs on sorted queries (cache friendly)
        # and the live flows come out already sorted for the next state
        by_hash = np.argsort(hashes, kind="stable")
        found = np.empty(n, bool)
        row = np.empty(n, np.int64)
        found[by_hash], row[by_hash] = self.state.find(hashes[by_hash], words[by_hash],
                                                       first_seen[by_hash])
        state = self.state

        out = FlowPlan(publish=np.zeros(n, bool), lease_ms=np.zeros(n, np.uint32),
                       confidence=np.zeros(n, np.uint16), closed=np.zeros(n, bool),
                       lease_expiry_ns=np.zeros(n, np.int64), decided=np.zeros(n, bool),
                       skipped=np.zeros(n, bool), live=live)

        # flows that ended by going idle (UDP, or TCP without FIN/RST): the CLOSED rule
        # (policy.renewal.closed_wanted) once the agent finishes the flow, then forgotten; a
        # flow that ended with the client's FIN/RST (`closed`) needs none
        over = np.flatnonzero(~live & found & (values["closed"] == 0))
        lingering = np.zeros(0, np.int64)
        if over.size:
            r = row[over]
            # aggregated (the CLOSED rule): at a level > 0 when last planned, or in the
            # datapath's table (`aggregated`: a member published as a flow of its own, whose
            # connection entry an aggregate of its backend may keep alive)
            in_aggregate = state.level[r] > 0
            if aggregated is not None:
                in_aggregate |= np.asarray(aggregated, bool)[over]
            wants = closed_wanted(now_ns, state.renewal.lease_expiry_ns[r], in_aggregate,
                                  state.cohort[r], self.cfg)
            out.closed[over[wants & finished[over]]] = True
            lingering = r[wants & ~finished[over]]

        index = by_hash[live[by_hash]]  # live rows, in hash order
        f, r = found[index], row[index]
        level = values["level"][index]
        cohort = np.empty(index.size, bool)
        cohort[f] = state.cohort[r[f]]
        if (~f).any():
            cohort[~f] = self._cohort(keys[index[~f]])
        renewal = RenewalState.zeros(index.size)
        renewal.put(f, state.renewal.take(r[f]))
        renewal.lease_expiry_ns[~f] = first_seen[index[~f]].astype(np.int64) + self.initial_ns
        level_changed = np.zeros(index.size, bool)
        level_changed[f] = state.level[r[f]] != level[f]
        # a member leaving its aggregate (agents.server: its class left the level) has no
        # lease of its own at the LB yet: published now, never skipped
        left = np.zeros(index.size, bool)
        left[f] = (state.level[r[f]] > 0) & (level[f] == 0)
        renewal.lease_expiry_ns[left] = 0
        rows_keys = keys[index]

        def last_seen(positions: np.ndarray) -> np.ndarray:
            return values["last_seen_ns"][index[positions]].astype(np.int64)

        def predict(positions: np.ndarray):
            return self._predict(rows_keys[positions], values[index[positions]], now_ns)

        def idle_limit(positions: np.ndarray) -> np.ndarray:  # the agent's UDP horizons
            return idle_limit_ns(rows_keys[positions], values[index[positions]],
                                 self.flow_times)

        decision = self.renewal.decide(
            now_ns, renewal, new_or_moved=~f | level_changed, level_changed=level_changed,
            cohort=cohort, idle_only=cohort & (rows_keys["proto"] == PROTO_UDP),
            first_seen_ns=first_seen[index].astype(np.int64), last_seen=last_seen,
            predict=predict, idle_limit=idle_limit)
        out.decided[index] = decision.decided
        out.publish[index] = decision.publish
        out.lease_ms[index] = decision.wire_ms
        out.confidence[index] = renewal.confidence
        out.lease_expiry_ns[index] = renewal.lease_expiry_ns
        out.skipped[index] = decision.skipped

        self.state = _FlowState(
            hash=np.concatenate([hashes[index], state.hash[lingering]]),
            words=np.concatenate([words[index], state.words[lingering]]),
            first_seen_ns=np.concatenate([first_seen[index], state.first_seen_ns[lingering]]),
            level=np.concatenate([level, state.level[lingering]]),
            cohort=np.concatenate([cohort, state.cohort[lingering]]),
            renewal=RenewalState.concatenate([renewal, state.renewal.take(lingering)]))
        if lingering.size:
            self.state.sort()

        if self.cfg.rollout.shadow:  # computed and counted above; act as the baseline
            out.publish[index] = True
            out.lease_ms[:] = 0
            out.confidence[:] = 0
            out.lease_expiry_ns[index] = now_ns + self.baseline_ns
            out.closed[:] = False
            out.skipped[:] = False

        published = int(out.publish.sum())
        self.counts["ticks"] += 1
        self.counts["published"] += published
        self.counts["closed_entries"] += int(out.closed.sum())
        self.last_tick = {"live": int(index.size), "decisions": int(decision.decided.sum()),
                          "published": published, "skipped": int(out.skipped.sum()),
                          "closed": int(out.closed.sum()),
                          "plan_s": round(time.perf_counter() - started, 6)}
        return out

    # -- aggregates (full mode) --------------------------------------------------------------

    def aggregate_plan(self, agg_keys: np.ndarray, keys: np.ndarray, values: np.ndarray,
                       plan: FlowPlan, now_ns: int) -> AggregatePlan:
        """Leases of aggregates (AGG_KEY_DTYPE keys, levels 1-3) from their live member flows
        (flows whose level is the aggregate's and whose masked key is its key), by
        policy.lease.aggregate_decision (the simulator uses the same rule): an aggregate is
        renewed only when its own lease is due (at most (k + 1) * T left) and a member still
        wants more (a later planned expiry, or a member on the baseline lease); lease = the
        longest remaining planned lease of a member (0 = baseline when that is not longer than
        k*T); a model lease is then published again in the next lease_repeats cycles with the
        same expiry. Confidence = the lowest member's. An aggregate without a known member
        gets the baseline every cycle. In shadow mode: every aggregate, lease 0. The state
        kept is that of the aggregates given (the agent passes every live aggregate)."""
        m = len(agg_keys)
        out = AggregatePlan(np.ones(m, bool), np.zeros(m, np.uint32), np.zeros(m, np.uint16),
                            np.zeros(m, np.int64))
        if m == 0 or self.cfg.rollout.shadow:
            return out
        now_ns = int(now_ns)
        agg_words = np.column_stack([key_words(np.ascontiguousarray(agg_keys["masked"])),
                                     agg_keys["level"].astype(np.uint64)])
        agg_hash = hash_words(agg_words)
        level = values["level"].astype(np.int64)
        member = np.flatnonzero(plan.live & (level >= 1) & (level < LEVEL_COUNT))
        known = np.zeros(m, bool)
        g = np.zeros(m, np.int64)
        if member.size:
            masked = apply_masks(np.ascontiguousarray(keys[member]), level[member],
                                 self.byte_table)
            member_words = np.column_stack([key_words(masked), level[member].astype(np.uint64)])
            member_hash = hash_words(member_words)
            order = np.argsort(member_hash, kind="stable")
            sorted_hash = member_hash[order]
            group_start = np.flatnonzero(np.concatenate([[True],
                                                         sorted_hash[1:] != sorted_hash[:-1]]))
            group_hash = sorted_hash[group_start]
            group_words = member_words[order[group_start]]
            rows = member[order]
            group_wanted = np.maximum.reduceat(plan.lease_expiry_ns[rows], group_start)
            group_baseline = np.logical_or.reduceat(
                (plan.lease_ms[rows] == 0) & ~plan.skipped[rows], group_start)
            group_conf = np.minimum.reduceat(plan.confidence[rows], group_start)
            group_size = np.diff(np.append(group_start, member.size))
            g = np.minimum(np.searchsorted(group_hash, agg_hash), group_hash.size - 1)
            known = (group_hash[g] == agg_hash) & (group_words[g] == agg_words).all(axis=1)

        found, row = self.aggregates.find(agg_hash, agg_words)
        held = np.zeros(m, np.int64)
        repeats_left = np.zeros(m, np.uint8)
        held[found] = self.aggregates.expiry_ns[row[found]]
        repeats_left[found] = self.aggregates.repeats_left[row[found]]
        wanted = np.zeros(m, np.int64)
        baseline = np.zeros(m, bool)
        k = np.flatnonzero(known)
        if k.size:
            wanted[k], baseline[k] = group_wanted[g[k]], group_baseline[g[k]]
            out.members[k] = group_size[g[k]]
        step = self.renewal.renew_aggregates(now_ns, held, repeats_left, wanted, baseline, known)
        out.publish[:] = step.publish
        out.lease_ms[:] = step.wire_ms
        if k.size:  # group_conf exists only when some aggregate has members
            out.confidence[k] = np.where(step.wire_ms[k] > 0, group_conf[g[k]], 0)
        new_expiry, repeats_left = step.lease_expiry_ns, step.repeats_left
        # remember the aggregates given (unique by hash; dropped ones are forgotten)
        order = np.argsort(agg_hash, kind="stable")
        unique = np.concatenate([[True], agg_hash[order][1:] != agg_hash[order][:-1]])
        keep = order[unique]
        self.aggregates = _AggregateState(agg_hash[keep], agg_words[keep], new_expiry[keep],
                                          repeats_left[keep])
        return out

    # -- the agent's lease-hook seam -----------------------------------------------------------

    def __call__(self, keys: np.ndarray, values: np.ndarray, now_ns: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """LeaseHook (agents.server): the lease the LB holds for each flow from the current
        plan, as remaining ms (0 = baseline for flows the plan does not know or that have a
        baseline lease); used for RESYNC answers, changes no state."""
        words = key_words(keys)
        found, row = self.state.find(hash_words(words), words, values["first_seen_ns"])
        lease_ms = np.zeros(len(keys), np.uint32)
        confidence = np.zeros(len(keys), np.uint16)
        use = np.flatnonzero(found)
        if use.size and not self.cfg.rollout.shadow:
            r = row[use]
            held = self.state.renewal
            remaining = held.lease_expiry_ns[r] - int(now_ns)
            ok = held.predictive[r] & (remaining > self.baseline_ns)
            lease_ms[use[ok]] = np.minimum(-(-remaining[ok] // NS_PER_MS), self.max_lease_ms)
            confidence[use[ok]] = held.confidence[r[ok]]
        return lease_ms, confidence

    def status(self) -> dict:
        status = {"tracked": len(self.state), "counts": dict(self.counts),
                  "last_tick": dict(self.last_tick)}
        model_status = getattr(self.models, "status", None)
        if callable(model_status):
            status["model"] = model_status()
        if self.coverage is not None:
            status["coverage"] = self.coverage.status()
        return status
