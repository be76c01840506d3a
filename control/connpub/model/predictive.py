"""Predictive lease management in the running server agent (docs/model.md, "Predictive mode"):
flow-table rows -> model features, a renewal planner that runs the model only for flows due a
decision, and a model manager that retrains in the background and hot-swaps a better model."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from connpub.config import Config
from connpub.datapath.abi import CLASS_KEY_DTYPE, FLOW_KEY_DTYPE, SKETCH_PACKETS
from connpub.datapath.masks import LEVEL_COUNT, apply_masks, mask_byte_table
from connpub.errors import ConnpubError
from connpub.model.calibration import service_class
from connpub.model.features import (
    ClientHistory,
    compute_features,
    is_ipv4_mapped,
    sample_history,
)
from connpub.policy.lease import (
    aggregate_decision,
    baseline_lease_ns,
    idle_horizon_covered,
    idle_horizon_ns,
    lb_lease_expiry_ns,
    lease_expiry_from_prediction,
    lease_repeats,
    repeat_lease_ms,
    repeat_start_ns,
    with_idle_horizon,
)
from connpub.policy.rollout import in_cohort
from connpub.traffic.workload import PROTO_UDP

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
U32_MAX = 2**32 - 1
FALLBACK_RECHECK_MAX_NS = 60 * NS_PER_S  # longest wait before the model runs again for a
#                                          flow whose interval was too wide

# ---------------------------------------------------------------------------------------------
# flow-table rows -> features


def sketch_summary(values: np.ndarray) -> dict[str, np.ndarray]:
    """The first-packet sketch of FLOW_VALUE_DTYPE rows as the model's sums: first_n, size
    sum / sum of squares / max (inner IP lengths), gap sum / max in ns (gap i is the time since
    packet i-1; entry 0 is not a gap). Same mapping as the agent's finished-flow history."""
    count = np.minimum(values["sketch_count"], SKETCH_PACKETS)
    column = np.arange(SKETCH_PACKETS, dtype=np.uint8)
    in_sketch = column[None, :] < count[:, None]
    sizes = values["sketch_size"] * in_sketch  # uint16
    gaps_us = values["sketch_gap_us"] * (in_sketch & (column[None, :] >= 1))  # uint32
    sizes64 = sizes.astype(np.int64)
    return {
        "first_n": count.astype(np.int64),
        "first_size_sum": sizes.sum(axis=1, dtype=np.int64),
        "first_size_sumsq": np.einsum("ij,ij->i", sizes64, sizes64),
        "first_size_max": sizes.max(axis=1, initial=0).astype(np.int64),
        "first_iat_sum_ns": gaps_us.sum(axis=1, dtype=np.int64) * 1000,
        "first_iat_max_ns": gaps_us.max(axis=1, initial=0).astype(np.int64) * 1000,
    }


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_words(words: np.ndarray) -> np.ndarray:
    """(n, w) uint64 -> (n,) uint64, chained splitmix64 over the columns."""
    state = np.zeros(words.shape[0], np.uint64)
    for column in range(words.shape[1]):
        state = _mix64(state ^ words[:, column])
    return state


@dataclass
class ClientPriorIndex:
    """ClientHistory prepared once for many lookups: per client (a 64-bit hash of its 16-byte
    address), its flows' end times sorted, with cumulative log durations. `lookup` answers a
    batch with two `searchsorted` (no sort per call), same results as ClientHistory.lookup."""

    client_hash: np.ndarray  # sorted unique client hashes
    client_start: np.ndarray  # first position of each client in `composite`
    composite: np.ndarray  # client rank * span + (end - t_min) // unit, sorted
    cumulative: np.ndarray  # cumulative log duration in `composite` order, leading 0
    t_min: int
    unit: int
    span: int
    records: int

    @classmethod
    def from_client_history(cls, history: ClientHistory) -> ClientPriorIndex:
        n = int(history.end_ns.size)
        if n == 0:
            empty = np.zeros(0, np.int64)
            return cls(np.zeros(0, np.uint64), empty, empty, np.zeros(1), 0, 1, 1, 0)
        hashes = _address_hash(history.client_addr)
        client_hash, rank = np.unique(hashes, return_inverse=True)
        rank = rank.reshape(-1).astype(np.int64)
        end = history.end_ns.astype(np.int64)
        t_min, t_max = int(end.min()), int(end.max())
        # room for the client rank times the time span in int63; a query time is clipped into
        # [t_min - unit, t_max] so it never leaves its client's segment
        unit = max(1, -(-(t_max - t_min + 2) * (client_hash.size + 1) // (2**62)))
        span = (t_max - t_min) // unit + 3
        order = np.lexsort((end, rank))
        composite = rank[order] * span + (end[order] - t_min) // unit + 1
        cumulative = np.concatenate([[0.0], np.cumsum(history.log_duration_s[order])])
        client_start = np.searchsorted(composite, np.arange(client_hash.size) * span)
        return cls(client_hash, client_start, composite, cumulative, t_min, unit, span, n)

    @classmethod
    def from_history(cls, records: np.ndarray) -> ClientPriorIndex:
        """From HISTORY_DTYPE records (times on CLOCK_MONOTONIC, as the agent writes them)."""
        return cls.from_client_history(ClientHistory.from_history(records))

    def lookup(self, client_addr: np.ndarray, now_ns) -> tuple[np.ndarray, np.ndarray]:
        """Per query: (flows of the client that ended at or before now, their mean log
        duration in s; 0 when none)."""
        hashes = _address_hash(client_addr)
        m = hashes.size
        count = np.zeros(m, np.int64)
        mean = np.zeros(m)
        if self.records == 0 or m == 0:
            return count, mean
        rank = np.minimum(np.searchsorted(self.client_hash, hashes), self.client_hash.size - 1)
        known = self.client_hash[rank] == hashes
        if not known.any():
            return count, mean
        rank = rank[known].astype(np.int64)
        now = np.broadcast_to(np.asarray(now_ns, np.int64), (m,))[known]
        offset = (np.clip(now, self.t_min - self.unit, None) - self.t_min) // self.unit + 1
        offset = np.minimum(offset, self.span - 1)
        pos = np.searchsorted(self.composite, rank * self.span + offset, side="right")
        first = self.client_start[rank]
        known_count = pos - first
        total = self.cumulative[pos] - self.cumulative[first]
        count[known] = known_count
        mean[known] = np.divide(total, known_count, out=np.zeros(known_count.size),
                                where=known_count > 0)
        return count, mean


def _address_hash(addrs: np.ndarray) -> np.ndarray:
    words = np.ascontiguousarray(addrs, dtype=np.uint8).reshape(-1, 16).view(np.uint64)
    return _hash_words(words)


def flow_observations(keys: np.ndarray, values: np.ndarray, now_ns: int,
                      client_priors: ClientPriorIndex | None = None,
                      clock_offset_ns: int = 0) -> dict[str, np.ndarray]:
    """compute_features inputs (features.OBSERVATION_FIELDS) of flow-table rows at now_ns
    (datapath clock): age = now - first_seen, bytes/packets so far, the sketch as sums, TCP
    flags seen so far, the client's finished flows before now (the history is on
    CLOCK_MONOTONIC: now + clock_offset_ns)."""
    if len(keys) != len(values):
        raise ConnpubError(f"{len(keys)} keys but {len(values)} values")
    age_ns = np.maximum(np.int64(now_ns) - values["first_seen_ns"].astype(np.int64), 0)
    obs: dict[str, np.ndarray] = {
        "age_s": age_ns / NS_PER_S,
        "proto": keys["proto"],
        "vip_port": keys["vip_port"].astype(np.int64),  # network order in the key
        "first_tcp_flags": values["tcp_flags"],
        "bytes": values["bytes"],
        "packets": values["packets"],
        "client_ipv6": ~is_ipv4_mapped(keys["client_addr"]),
    }
    obs.update(sketch_summary(values))
    if client_priors is not None:
        prior_count, prior_mean = client_priors.lookup(keys["client_addr"],
                                                       np.int64(now_ns + clock_offset_ns))
    else:
        prior_count, prior_mean = np.zeros(len(keys), np.int64), np.zeros(len(keys))
    obs["client_prior_count"], obs["client_prior_log_duration"] = prior_count, prior_mean
    return obs


def flow_features(keys: np.ndarray, values: np.ndarray, now_ns: int,
                  client_priors: ClientPriorIndex | None = None,
                  clock_offset_ns: int = 0) -> np.ndarray:
    """(n, N_FEATURES) float32 model features of FLOW_KEY_DTYPE keys / FLOW_VALUE_DTYPE rows."""
    return compute_features(flow_observations(keys, values, now_ns, client_priors,
                                              clock_offset_ns))


def table_snapshot(trace: np.ndarray, now_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, values, rows of `trace`) of the flows of a FLOW_DTYPE trace alive at now_ns, as
    the server's flow table would hold them (connpub.model.samples.snapshot_rows). Closed
    flows (end <= now) are not included. For tests and bench."""
    from connpub.model.samples import snapshot_rows  # noqa: PLC0415 (cycle)

    alive = np.flatnonzero((trace["start_ns"] <= now_ns) & (trace["end_ns"] > now_ns))
    keys, values = snapshot_rows(trace[alive], np.full(alive.size, now_ns, np.int64))
    return keys, values, alive


# ---------------------------------------------------------------------------------------------
# the planner


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
    next_renewal_ns: np.ndarray  # int64: publish again then
    next_decision_ns: np.ndarray  # int64: run the model again then
    lease_expiry_ns: np.ndarray  # int64: expiry the LB holds from what we published (estimate)
    lease_ms: np.ndarray  # uint32: last lease published (0 = baseline)
    confidence: np.ndarray  # uint16
    predictive: np.ndarray  # bool: a model lease (not baseline) was published
    repeats_left: np.ndarray  # uint8: cycles in which the planned lease is published again
    repeat_from_ns: np.ndarray  # int64: the repeats start then (policy.lease.repeat_start_ns)

    @classmethod
    def empty(cls) -> _FlowState:
        return cls(np.zeros(0, np.uint64), np.zeros((0, 5), np.uint64), np.zeros(0, np.uint64),
                   np.zeros(0, np.uint8), np.zeros(0, bool), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint32),
                   np.zeros(0, np.uint16), np.zeros(0, bool), np.zeros(0, np.uint8),
                   np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.hash.size)

    def sort(self) -> None:
        """Order every array by hash (after a rebuild)."""
        order = np.argsort(self.hash, kind="stable")
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name)[order])

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
        self.repeats = lease_repeats(cfg)
        self.counts: dict[str, int] = {
            "ticks": 0, "decisions": 0, "published": 0, "not_due": 0, "skipped_renewals": 0,
            "fallback": 0, "fallback_repeats": 0, "baseline": 0, "closed_entries": 0,
            "shadow_would_skip": 0, "lease_repeats": 0, "aggregate_publishes": 0,
            "aggregate_repeats": 0, "idle_horizon_leases": 0, "idle_horizon_waits": 0}
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
        if self.coverage is not None:  # widened/narrowed per class; decisions remembered
            p10, p90 = self.coverage.adjust(_hash_words(key_words(keys)), service_class(
                keys["proto"], keys["vip_port"]), now_ns, p10, p90)
        return (np.asarray(p10, np.float64), np.asarray(p50, np.float64),
                np.asarray(p90, np.float64))

    # -- one tick ----------------------------------------------------------------------------

    def plan(self, keys: np.ndarray, values: np.ndarray, now_ns: int, live: np.ndarray,
             finished: np.ndarray | None = None) -> FlowPlan:
        """Decide for every row of the flow table. live: the agent's live mask (own traffic
        excluded); finished: flows the agent removes this tick (closed and lingered, or idle
        past the timeout; default: every flow that is not live). Updates the state to the
        live flows of this table, plus ended flows waiting to be finished for their CLOSED."""
        started = time.perf_counter()
        now_ns = int(now_ns)
        n = len(keys)
        live = np.asarray(live, bool)
        finished = ~live if finished is None else np.asarray(finished, bool)
        words = key_words(keys)
        hashes = _hash_words(words)
        if self.coverage is not None:  # the true end of finished flows scores their decisions
            self.coverage.resolve(hashes[finished], values["last_seen_ns"][finished])
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

        # flows that ended by going idle (UDP, or TCP without FIN/RST) while the LB still holds
        # a lease longer than a baseline lease renewed one cycle ago would be (or that were
        # aggregated): one CLOSED entry once the agent finishes the flow, then forgotten. A flow
        # that ended with the client's FIN/RST (`closed`) needs none: the LB saw the same packet
        # (DSR) and already ended its aggregate cover and set its lease to now + close_linger
        # (k*T; bpf/lb/lb.c note_client_close); it is just no longer renewed
        over = np.flatnonzero(~live & found & (values["closed"] == 0))
        lingering = np.zeros(0, np.int64)
        if over.size:
            held = state.lease_expiry_ns[row[over]]
            limit = now_ns + self.baseline_ns - self.interval_ns
            aggregated = state.level[row[over]] > 0
            wants = state.cohort[row[over]] & ((held > limit) | aggregated)
            out.closed[over[wants & finished[over]]] = True
            lingering = row[over[wants & ~finished[over]]]

        index = by_hash[live[by_hash]]  # live rows, in hash order
        f, r = found[index], row[index]
        level = values["level"][index]
        cohort = np.empty(index.size, bool)
        cohort[f] = state.cohort[r[f]]
        if (~f).any():
            cohort[~f] = self._cohort(keys[index[~f]])
        next_renewal = np.zeros(index.size, np.int64)
        next_renewal[f] = state.next_renewal_ns[r[f]]
        next_decision = np.zeros(index.size, np.int64)
        next_decision[f] = state.next_decision_ns[r[f]]
        expiry = np.zeros(index.size, np.int64)
        expiry[f] = state.lease_expiry_ns[r[f]]
        expiry[~f] = first_seen[index[~f]].astype(np.int64) + self.initial_ns
        lease_ms = np.zeros(index.size, np.uint32)
        lease_ms[f] = state.lease_ms[r[f]]
        confidence = np.zeros(index.size, np.uint16)
        confidence[f] = state.confidence[r[f]]
        predictive = np.zeros(index.size, bool)
        predictive[f] = state.predictive[r[f]]
        repeats_left = np.zeros(index.size, np.uint8)
        repeats_left[f] = state.repeats_left[r[f]]
        repeat_from = np.zeros(index.size, np.int64)
        repeat_from[f] = state.repeat_from_ns[r[f]]
        level_changed = np.zeros(index.size, bool)
        level_changed[f] = state.level[r[f]] != level[f]

        # a tick decides what is due before the next tick (within half a cycle), so a renewal
        # planned one cycle before expiry survives ticks that come a little late
        horizon = now_ns + self.interval_ns // 2
        new_or_moved = ~f | level_changed
        due = new_or_moved | (next_renewal <= horizon)
        # flows that can only end by going idle (UDP): leased up to their idle horizon (last
        # packet + idle timeout + (k-1)*T), renewed only once a later packet has moved the
        # horizon past the lease the LB holds (policy.lease.with_idle_horizon); no CLOSED
        idle_only = cohort & (keys["proto"][index] == PROTO_UDP)
        idle_horizon = idle_horizon_ns(values["last_seen_ns"][index].astype(np.int64),
                                       self.cfg)
        covered = (due & idle_only & ~new_or_moved
                   & idle_horizon_covered(expiry, idle_horizon))
        due &= ~covered
        self.counts["idle_horizon_waits"] += int(covered.sum())
        publish = np.zeros(index.size, bool)
        skipped = np.zeros(index.size, bool)

        # outside the cohort, and fallback flows between two model runs: the baseline lease
        plain = due & ~cohort
        repeat = due & cohort & ~new_or_moved & (next_decision > horizon)
        baseline = plain | repeat
        publish[baseline] = True
        lease_ms[baseline], confidence[baseline], predictive[baseline] = 0, 0, False
        repeats_left[baseline] = 0
        next_renewal[baseline] = np.where(plain[baseline], now_ns, now_ns + self.interval_ns)
        expiry[baseline] = now_ns + self.baseline_ns

        decide = np.flatnonzero(due & cohort & ~repeat)
        if decide.size:
            rows = index[decide]
            horizon_rows = idle_only[decide]
            p10, p50, p90 = (np.full(decide.size, np.nan) for _ in range(3))
            modelled = np.flatnonzero(~horizon_rows)
            if modelled.size:  # the model runs only for flows not leased to the horizon
                p10[modelled], p50[modelled], p90[modelled] = self._predict(
                    keys[rows[modelled]], values[rows[modelled]], now_ns)
            lease = lease_expiry_from_prediction(now_ns, p10, p50, p90, self.cfg,
                                                 expiry[decide])
            lease = with_idle_horizon(now_ns, lease, idle_horizon[decide], horizon_rows,
                                      self.cfg)
            self.counts["idle_horizon_leases"] += int(horizon_rows.sum())
            skip = lease.skip_renewal
            send = ~skip
            publish[decide] = send
            skipped[decide] = skip
            next_renewal[decide] = np.where(skip, now_ns + self.interval_ns,
                                            lease.next_renewal_ns)
            # a fallback (too wide interval) is published with the baseline lease every cycle;
            # the model runs for it again only once its age has grown by a quarter (features
            # are logs of age and rates), between one cycle and FALLBACK_RECHECK_MAX_S
            age_ns = np.maximum(now_ns - first_seen[rows].astype(np.int64), 0)
            recheck_ns = np.clip(age_ns // 4, self.interval_ns,
                                 max(self.interval_ns, FALLBACK_RECHECK_MAX_NS))
            next_decision[decide] = np.where(lease.fallback & send, now_ns + recheck_ns,
                                             next_renewal[decide])
            sent = decide[send]
            lease_ms[sent] = lease.lease_ms[send]
            confidence[sent] = lease.confidence[send]
            predictive[sent] = ~lease.fallback[send]
            repeats_left[sent] = np.where(lease.fallback[send], 0, self.repeats)
            # a flow whose level changed was held by an aggregate or its own entry, which no
            # longer gets renewed: its repeats start next cycle (previous expiry unknown: 0)
            previous = np.where(level_changed[sent], 0, expiry[sent])
            repeat_from[sent] = repeat_start_ns(now_ns, previous, self.cfg)
            expiry[sent] = lease.lease_expiry_ns[send]
            self.counts["fallback"] += int((lease.fallback & send).sum())
            self.counts["decisions"] += int(decide.size)
            out.decided[rows] = True
            if self.cfg.rollout.shadow:
                self.counts["shadow_would_skip"] += int(skip.sum())
            else:
                self.counts["skipped_renewals"] += int(skip.sum())

        # a model lease planned in an earlier cycle goes out again, same absolute expiry
        again = np.flatnonzero(~publish & (repeats_left > 0) & (expiry > now_ns)
                               & (repeat_from <= horizon))
        wire_ms = lease_ms.copy()
        if again.size:
            publish[again] = True
            wire_ms[again] = repeat_lease_ms(now_ns, expiry[again])
            repeats_left[again] -= 1
            self.counts["lease_repeats"] += int(again.size)

        out.publish[index] = publish
        out.lease_ms[index] = wire_ms
        out.confidence[index] = confidence
        out.lease_expiry_ns[index] = expiry
        out.skipped[index] = skipped

        self.state = _FlowState(
            hash=np.concatenate([hashes[index], state.hash[lingering]]),
            words=np.concatenate([words[index], state.words[lingering]]),
            first_seen_ns=np.concatenate([first_seen[index], state.first_seen_ns[lingering]]),
            level=np.concatenate([level, state.level[lingering]]),
            cohort=np.concatenate([cohort, state.cohort[lingering]]),
            next_renewal_ns=np.concatenate([next_renewal, state.next_renewal_ns[lingering]]),
            next_decision_ns=np.concatenate([next_decision,
                                             state.next_decision_ns[lingering]]),
            lease_expiry_ns=np.concatenate([expiry, state.lease_expiry_ns[lingering]]),
            lease_ms=np.concatenate([lease_ms, state.lease_ms[lingering]]),
            confidence=np.concatenate([confidence, state.confidence[lingering]]),
            predictive=np.concatenate([predictive, state.predictive[lingering]]),
            repeats_left=np.concatenate([repeats_left, state.repeats_left[lingering]]),
            repeat_from_ns=np.concatenate([repeat_from, state.repeat_from_ns[lingering]]))
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
        self.counts["not_due"] += int((~due).sum())
        self.counts["baseline"] += int(plain.sum())
        self.counts["fallback_repeats"] += int(repeat.sum())
        self.counts["closed_entries"] += int(out.closed.sum())
        self.last_tick = {"live": int(index.size), "decisions": int(decide.size),
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
        agg_hash = _hash_words(agg_words)
        level = values["level"].astype(np.int64)
        member = np.flatnonzero(plan.live & (level >= 1) & (level < LEVEL_COUNT))
        known = np.zeros(m, bool)
        g = np.zeros(m, np.int64)
        if member.size:
            masked = apply_masks(np.ascontiguousarray(keys[member]), level[member],
                                 self.byte_table)
            member_words = np.column_stack([key_words(masked), level[member].astype(np.uint64)])
            member_hash = _hash_words(member_words)
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
        k = np.flatnonzero(known)
        publish = np.zeros(k.size, bool)
        if k.size:
            publish, lease_ms = aggregate_decision(now_ns, held[k], group_wanted[g[k]],
                                                   group_baseline[g[k]], self.cfg)
            out.lease_ms[k] = lease_ms
            out.confidence[k] = np.where(lease_ms > 0, group_conf[g[k]], 0)
            out.members[k] = group_size[g[k]]
        out.publish[k] = publish
        # an aggregate without a known member: baseline every cycle (out.publish stays True)
        sent = np.flatnonzero(out.publish)
        new_expiry = held.copy()
        new_expiry[sent] = np.maximum(held[sent], lb_lease_expiry_ns(now_ns, out.lease_ms[sent],
                                                                     self.cfg))
        repeats_left[sent] = np.where(out.lease_ms[sent] > 0, self.repeats, 0)
        again = np.flatnonzero(~out.publish & (repeats_left > 0) & (held > now_ns))
        if again.size:
            out.publish[again] = True
            out.lease_ms[again] = repeat_lease_ms(now_ns, held[again])
            repeats_left[again] -= 1
            self.counts["aggregate_repeats"] += int(again.size)
        self.counts["aggregate_publishes"] += int(sent.size)
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
        found, row = self.state.find(_hash_words(words), words, values["first_seen_ns"])
        lease_ms = np.zeros(len(keys), np.uint32)
        confidence = np.zeros(len(keys), np.uint16)
        use = np.flatnonzero(found)
        if use.size and not self.cfg.rollout.shadow:
            r = row[use]
            remaining = self.state.lease_expiry_ns[r] - int(now_ns)
            ok = self.state.predictive[r] & (remaining > self.baseline_ns)
            lease_ms[use[ok]] = np.minimum(-(-remaining[ok] // NS_PER_MS), self.max_lease_ms)
            confidence[use[ok]] = self.state.confidence[r[ok]]
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


# ---------------------------------------------------------------------------------------------
# continuous training


@dataclass(frozen=True)
class RetrainConfig:
    """When and how the ModelManager retrains (single-threaded, small)."""

    interval_s: float = 3600.0  # try a retraining this often
    first_after_s: float = 600.0  # first try this long after start
    min_flows: int = 5_000  # finished flows needed (train + held-back) to try at all
    min_new_flows: int = 5_000  # new finished flows since the last try
    max_flows: int = 200_000  # the most recent flows used
    holdout_fraction: float = 0.2  # most recent share held back for evaluation
    seed: int = 0
    coverage_tolerance: float = 0.02  # of model.should_promote
    priors_refresh_s: float = 60.0  # re-read the history for the client priors this often
    max_prior_records: int = 1_000_000  # most recent records in the client priors
    train: object = None  # model.TrainConfig; None = its defaults

    @classmethod
    def from_config(cls, cfg: Config) -> RetrainConfig:
        """Picks [model] retrain_* keys if the config defines them (else the defaults)."""
        model_cfg = cfg.model
        changes = {name: getattr(model_cfg, key) for name, key in (
            ("interval_s", "retrain_interval_s"), ("min_flows", "retrain_min_flows"),
            ("max_flows", "retrain_max_flows"), ("holdout_fraction", "retrain_holdout_fraction"),
        ) if hasattr(model_cfg, key)}
        return cls(**changes)


Trainer = Callable[[np.ndarray, Path, int], Path]


def default_trainer(config: RetrainConfig) -> Trainer:
    """train(history) -> export_onnx(path): the shipped model's recipe, one thread."""

    def run(history: np.ndarray, out: Path, version: int) -> Path:
        from connpub.model.quantile import TrainConfig, export_onnx, train_samples  # noqa: PLC0415

        samples = sample_history(history)
        fitted = train_samples(samples, seed=config.seed,
                               config=config.train or TrainConfig())
        fitted.training.update({"source": "connpub agent history", "version": version})
        return export_onnx(fitted, out)

    return run


class _HistoryReader:
    """The newest records of a history folder (Parquet part files), parts cached by
    (name, size, mtime); a part that cannot be read yet (being written) is skipped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cache: dict[Path, tuple[tuple[int, int], np.ndarray]] = {}

    def parts(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if self.path.is_dir():
            return sorted(self.path.glob("*.parquet"))
        return []

    def current_signature(self) -> tuple:
        """(name, size, mtime) of every part now, without reading any."""
        stamps = []
        for part in self.parts():
            try:
                stat = part.stat()
            except OSError:
                continue
            stamps.append((part.name, (stat.st_size, stat.st_mtime_ns)))
        return tuple(stamps)

    def read(self, max_records: int) -> np.ndarray:
        from connpub.traffic.trace import HISTORY_DTYPE, read_history  # noqa: PLC0415

        parts = self.parts()
        if not parts:
            return np.zeros(0, HISTORY_DTYPE)
        chosen, total = [], 0
        for part in reversed(parts):
            try:
                stat = part.stat()
            except OSError:
                continue
            stamp = (stat.st_size, stat.st_mtime_ns)
            cached = self._cache.get(part)
            if cached is None or cached[0] != stamp:
                try:
                    cached = (stamp, read_history(part))
                except ConnpubError as err:
                    log.info("history part skipped for now: %s", err)
                    continue
                self._cache[part] = cached
            chosen.append(cached[1])
            total += cached[1].size
            if total >= max_records:
                break
        keep = set(self._cache) & set(parts)
        self._cache = {p: self._cache[p] for p in keep}
        if not chosen:
            return np.zeros(0, HISTORY_DTYPE)
        records = np.concatenate(chosen[::-1])
        return records[-max_records:] if records.size > max_records else records


@dataclass
class RetrainResult:
    outcome: str  # promoted | rejected | skipped
    reason: str
    candidate: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)
    seconds: float = 0.0
    path: str = ""


class ModelManager:
    """Owns the Predictor the planner uses. A background thread (start/stop) refreshes the
    client priors from the agent's history and, on a schedule, trains a candidate on the
    older part of the newest history, evaluates it and the current model on the most recent
    held-back slice, and promotes it only if model.should_promote agrees: the reference to
    the current Predictor is swapped under a lock, so a tick never waits for training."""

    def __init__(self, model_path: str | Path | None = None, *,
                 history_path: str | Path | None = None, model_dir: str | Path | None = None,
                 retrain: RetrainConfig | None = None, trainer: Trainer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from connpub.model.quantile import Predictor  # noqa: PLC0415

        self.retrain_config = retrain or RetrainConfig()
        self._predictor = Predictor(model_path or None)  # ConnpubError if unusable
        self._lock = threading.Lock()
        self.version = 1
        self.promotions = 0
        self.rejections = 0
        self.skipped = 0
        self.last_result: RetrainResult | None = None
        self.last_error = ""
        self.history_path = Path(history_path) if history_path else None
        self.model_dir = Path(model_dir) if model_dir else (
            self.history_path.parent / "models" if self.history_path else None)
        self.trainer = trainer or default_trainer(self.retrain_config)
        self._reader = _HistoryReader(self.history_path) if self.history_path else None
        self._priors: ClientPriorIndex | None = None
        self._priors_signature: tuple = ()
        self._flows_at_last_try = 0
        self._clock = clock
        self._started = clock()
        self._next_retrain = self._started + self.retrain_config.first_after_s
        self._next_priors = self._started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.training = False

    # -- serving -------------------------------------------------------------------------------

    @property
    def predictor(self):
        return self._predictor

    @property
    def model_id(self) -> str:
        return self._predictor.metadata.get("model_id", "")

    @property
    def client_priors(self) -> ClientPriorIndex | None:
        return self._priors

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        predictor = self._predictor  # one reference read: a swap never tears a batch
        return predictor.predict(features)

    def promote(self, predictor) -> int:
        """Make `predictor` the current model (atomic reference swap); returns the version."""
        with self._lock:
            self._predictor = predictor
            self.version += 1
            self.promotions += 1
            return self.version

    # -- history -------------------------------------------------------------------------------

    def refresh_priors(self) -> bool:
        """Rebuild the client priors when the history changed; True if rebuilt."""
        if self._reader is None:
            return False
        signature = self._reader.current_signature()
        if signature == self._priors_signature:
            return False
        records = self._reader.read(self.retrain_config.max_prior_records)
        self._priors = ClientPriorIndex.from_history(records) if records.size else None
        self._priors_signature = signature
        return True

    # -- retraining ----------------------------------------------------------------------------

    def _split(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(records["last_seen_ns"], kind="stable")
        records = records[order]
        held = max(1, int(round(records.size * self.retrain_config.holdout_fraction)))
        return records[:-held], records[-held:]

    def retrain_once(self, records: np.ndarray | None = None) -> RetrainResult:
        """Train, evaluate and maybe promote a candidate now (in the calling thread). `records`:
        HISTORY_DTYPE (default: the newest max_flows of the history folder)."""
        from connpub.model.quantile import Predictor, evaluate_samples, should_promote  # noqa: PLC0415

        started = time.perf_counter()
        config = self.retrain_config
        if records is None:
            if self._reader is None:
                return self._finish(RetrainResult("skipped", "no history path"), started)
            records = self._reader.read(config.max_flows)
        if records.size < config.min_flows:
            return self._finish(RetrainResult(
                "skipped", f"{records.size} finished flows, need {config.min_flows}"), started)
        self._flows_at_last_try = int(records.size)
        train_part, held = self._split(records)
        candidate_version = self.version + 1
        out_dir = self.model_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "connpub-models"
        out = out_dir / f"model-v{candidate_version}-{int(time.time())}.onnx"
        try:
            path = self.trainer(train_part, out, candidate_version)
            candidate = Predictor(path)
            clients = ClientHistory.from_history(records)
            samples = sample_history(held, client_history=clients)
            candidate_metrics = evaluate_samples(samples, candidate)
            current_metrics = evaluate_samples(samples, self._predictor)
            promote = should_promote(candidate_metrics, current_metrics,
                                     config.coverage_tolerance)
        except Exception as err:  # noqa: BLE001 - any failure rejects the candidate
            reason = str(err) if isinstance(err, ConnpubError) else f"{type(err).__name__}: {err}"
            log.warning("candidate model rejected: %s", reason)
            return self._finish(RetrainResult("rejected", reason, path=str(out)), started)
        result = RetrainResult(
            "promoted" if promote else "rejected",
            "beats the current model on the held-back slice" if promote else
            "not better than the current model on the held-back slice (model.should_promote)",
            candidate_metrics, current_metrics, path=str(path))
        if promote:
            self.promote(candidate)
            log.info("model v%d promoted: %s (MAE %.3f vs %.3f)", self.version, path,
                     candidate_metrics["mae"], current_metrics["mae"])
        else:
            log.info("candidate model kept out: MAE %.3f vs %.3f, coverage %.3f vs %.3f",
                     candidate_metrics["mae"], current_metrics["mae"],
                     candidate_metrics["coverage"], current_metrics["coverage"])
        return self._finish(result, started)

    def _finish(self, result: RetrainResult, started: float) -> RetrainResult:
        result.seconds = round(time.perf_counter() - started, 3)
        if result.outcome == "rejected":
            self.rejections += 1
            self.last_error = result.reason
        elif result.outcome == "skipped":
            self.skipped += 1
        self.last_result = result
        return result

    def _retrain_due(self) -> bool:
        if self._clock() < self._next_retrain or self._reader is None:
            return False
        self._next_retrain = self._clock() + self.retrain_config.interval_s
        return True

    def run_pending(self) -> None:
        """What the background thread does on each wake-up (callable directly in tests)."""
        now = self._clock()
        if now >= self._next_priors:
            self._next_priors = now + self.retrain_config.priors_refresh_s
            try:
                self.refresh_priors()
            except Exception as err:  # noqa: BLE001 - keep serving with the old priors
                log.warning("client priors not refreshed: %s", err)
        if self._retrain_due():
            records = self._reader.read(self.retrain_config.max_flows)
            new = records.size - self._flows_at_last_try
            if records.size >= self.retrain_config.max_flows or (
                    new >= self.retrain_config.min_new_flows):
                self.training = True
                try:
                    self.retrain_once(records)
                finally:
                    self.training = False

    def start(self) -> None:
        """Start the background thread (idempotent); lowers its own scheduling priority."""
        if self._thread is not None or self._reader is None:
            return

        def loop() -> None:
            with contextlib.suppress(OSError, AttributeError):  # training yields to the tick
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            while not self._stop.is_set():
                try:
                    self.run_pending()
                except Exception:  # noqa: BLE001 - never let the thread die
                    log.exception("model manager job failed")
                self._stop.wait(min(self.retrain_config.priors_refresh_s, 5.0))

        self._thread = threading.Thread(target=loop, name="connpub-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict:
        last = self.last_result
        return {
            "version": self.version, "model_id": self.model_id,
            "path": str(self._predictor.path), "promotions": self.promotions,
            "rejections": self.rejections, "skipped": self.skipped, "training": self.training,
            "last_error": self.last_error,
            "last_retrain": None if last is None else {
                "outcome": last.outcome, "reason": last.reason, "seconds": last.seconds,
                "path": last.path,
                "candidate_mae_log": last.candidate.get("mae"),
                "current_mae_log": last.current.get("mae")},
            "client_prior_records": 0 if self._priors is None else self._priors.records,
        }


# ---------------------------------------------------------------------------------------------
# benchmark


def bench_predict(rows: int = 1_000_000, model_path: str | Path | None = None,
                  history_flows: int = 200_000, seed: int = 1) -> dict:
    """Features + inference throughput (wall and CPU time) on `rows` live flow-table rows (a
    generated mixed workload at mid-life, client priors from `history_flows` finished flows);
    also the planner's first tick (every flow decided) and the next one (default lease config: flows
    with too wide intervals or short lives are decided again)."""
    from connpub.model.quantile import Predictor  # noqa: PLC0415
    from connpub.traffic import workload  # noqa: PLC0415
    from connpub.traffic.trace import history_from_flows  # noqa: PLC0415

    if rows <= 0:
        raise ConnpubError(f"rows must be positive, got {rows}")
    trace = workload.generate("mixed", rows, seed=seed, window_s=600.0)
    rng = np.random.default_rng(seed)
    start = trace["start_ns"].astype(np.int64)
    end = trace["end_ns"].astype(np.int64)
    now_ns = int(end.max()) + 1
    # shift every flow so that now falls inside it (a full table of live flows)
    point = start + (rng.random(rows) * np.maximum(end - start, 1)).astype(np.int64)
    shifted = trace.copy()
    shifted["start_ns"] = start + (now_ns - point)
    shifted["end_ns"] = end + (now_ns - point) + 1
    keys, values, _ = table_snapshot(shifted, now_ns)
    history = history_from_flows(workload.generate("mixed", history_flows, seed=seed + 1))
    history["first_seen_ns"] += now_ns - int(history["last_seen_ns"].max())
    history["last_seen_ns"] += now_ns - int(history["last_seen_ns"].max())
    priors = ClientPriorIndex.from_history(history)
    predictor = Predictor(model_path or None)
    n = len(keys)

    c0, t0 = time.process_time(), time.perf_counter()
    features = flow_features(keys, values, now_ns, priors)
    c1, t1 = time.process_time(), time.perf_counter()
    predictor.predict(features)
    c2, t2 = time.process_time(), time.perf_counter()

    class _Fixed:
        client_priors = priors

        def predict(self, batch):
            return predictor.predict(batch)

    from connpub.config import RolloutConfig  # noqa: PLC0415

    cfg = Config(rollout=RolloutConfig(fraction=1.0))
    planner = PredictivePlanner(cfg, _Fixed())
    live = np.ones(n, bool)
    t3 = time.perf_counter()
    first = planner.plan(keys, values, now_ns, live)
    t4 = time.perf_counter()
    second = planner.plan(keys, values, now_ns + round(cfg.publish.interval_s * NS_PER_S), live)
    t5 = time.perf_counter()
    features_s, inference_s = t1 - t0, t2 - t1
    return {
        "rows": n, "quantiles": 3, "model_id": predictor.metadata.get("model_id", ""),
        "features_s": round(features_s, 4), "inference_s": round(inference_s, 4),
        "features_per_s": round(n / features_s), "inference_per_s": round(n / inference_s),
        "predictions_per_s": round(n / (features_s + inference_s)),
        # CPU time of this process (one thread): what the rate is on an otherwise idle core
        "features_cpu_s": round(c1 - c0, 4), "inference_cpu_s": round(c2 - c1, 4),
        "predictions_per_cpu_s": round(n / max(c2 - c0, 1e-9)),
        "planner_first_tick_s": round(t4 - t3, 4),
        "planner_first_tick_published": int(first.publish.sum()),
        "planner_next_tick_s": round(t5 - t4, 4),
        "planner_next_tick_decisions": int(second.decided.sum()),
        "planner_next_tick_published": int(second.publish.sum()),
    }
