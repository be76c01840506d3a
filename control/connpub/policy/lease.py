"""Lease policy (docs/policy.md), pure and vectorised: baseline leases, the LB's clamp, and lease
length plus renewal time from the model's remaining-duration quantiles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.protocol.wire import CONFIDENCE_SCALE

NS_PER_S = 1_000_000_000


def baseline_lease_ns(cfg: Config) -> int:
    """k * T, the baseline's fixed lease."""
    return round(cfg.lease.k * cfg.publish.interval_s * NS_PER_S)


def baseline_expiry_ns(now_ns, cfg: Config):
    """now + k*T (scalar or array)."""
    return np.asarray(now_ns, dtype=np.int64) + baseline_lease_ns(cfg)


def initial_expiry_ns(now_ns, cfg: Config):
    """Expiry the LB gives a new flow before any publish names it."""
    return np.asarray(now_ns, dtype=np.int64) + round(cfg.lease.initial_s * NS_PER_S)


def clamp_lease_ms(requested_ms, cfg: Config) -> np.ndarray:
    """LB side: a requested lease clamped to [min_s, max_s], in ms (int64)."""
    low, high = round(cfg.lease.min_s * 1000), round(cfg.lease.max_s * 1000)
    return np.clip(np.asarray(requested_ms, dtype=np.int64), low, high)


def lb_lease_expiry_ns(now_ns: int, predicted_remaining_ms, cfg: Config) -> np.ndarray:
    """LB side, per PUBLISH entry: 0 (no prediction) -> baseline k*T, else the clamped request."""
    requested = np.asarray(predicted_remaining_ms, dtype=np.int64)
    lease_ns = np.where(requested == 0, baseline_lease_ns(cfg),
                        clamp_lease_ms(requested, cfg) * 1_000_000)
    return now_ns + lease_ns


def lease_repeats(cfg: Config) -> int:
    """How many more cycles a new or changed lease (or a CLOSED) is published again after its
    first publish: ceil(k) - 1, so that it takes as many consecutive lost packets to lose it as
    to lose a baseline lease (renewed every cycle, k cycles long)."""
    return max(math.ceil(cfg.lease.k - 1e-9) - 1, 0)


def renewal_margin_ns(cfg: Config) -> int:
    """A renewal is planned at least this long before the previous expiry: its publish and
    its lease_repeats repeats (one a cycle) plus one cycle of slack land before it,
    (repeats + 2) * T = (k + 1) * T for integer k."""
    return (lease_repeats(cfg) + 2) * round(cfg.publish.interval_s * NS_PER_S)


def repeat_lease_ms(now_ns: int, expiry_ns) -> np.ndarray:
    """predicted_remaining_ms that makes the LB (which keeps the later expiry) reach the same
    absolute expiry as the first publish: ceil((expiry - now) / 1 ms), at least 1 (uint32)."""
    remaining = np.asarray(expiry_ns, dtype=np.int64) - np.int64(now_ns)
    return np.clip(-(-remaining // 1_000_000), 1, 2**32 - 1).astype(np.uint32)


def repeat_start_ns(now_ns: int, previous_expiry_ns, cfg: Config) -> np.ndarray:
    """When the repeats of a lease published now start: the next cycle when the previous
    lease (the one the LB holds if this publish is lost) is about to run out, else only once
    it has lease_repeats + 1 cycles left, so they still land before it (one a cycle, one cycle
    of slack) but are not sent at all for a flow that ends before then."""
    interval_ns = round(cfg.publish.interval_s * NS_PER_S)
    latest = np.asarray(previous_expiry_ns, np.int64) - (lease_repeats(cfg) + 1) * interval_ns
    return np.maximum(np.int64(now_ns) + interval_ns, latest)


def wire_lease_ms(remaining_ns, cfg: Config) -> np.ndarray:
    """An aggregate's predicted_remaining_ms from the longest remaining lease of its members:
    0 (the LB's k*T) when that is not longer than k*T, else ceil ms clamped to max_s."""
    remaining = np.asarray(remaining_ns, dtype=np.int64)
    max_ms = round(cfg.lease.max_s * 1000)
    return np.where(remaining > baseline_lease_ns(cfg),
                    np.minimum(-(-remaining // 1_000_000), max_ms), 0).astype(np.uint32)


def aggregate_decision(now_ns: int, held_ns, wanted_ns, baseline_member,
                       cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Which aggregates to publish now and with what lease (publish mask, lease ms), the
    aggregate-coverage rule shared by the server agent (PredictivePlanner.aggregate_plan) and
    the simulator. held_ns: the expiry the LB holds for the aggregate from earlier publishes
    (0 = never published); wanted_ns: the latest planned expiry of its live members;
    baseline_member: a live member is on the baseline lease (renewed every cycle).
    An aggregate is renewed only when its own lease is due, i.e. it has at most
    renewal_margin_ns (+ half a cycle of tick jitter) left, and then only if a member still
    wants more: a planned expiry beyond it, or a baseline member. A member's renewal alone
    does not trigger a publish while the aggregate's lease covers it."""
    held = np.asarray(held_ns, dtype=np.int64)
    wanted = np.asarray(wanted_ns, dtype=np.int64)
    half_cycle = round(cfg.publish.interval_s * NS_PER_S) // 2
    due = held - np.int64(now_ns) <= renewal_margin_ns(cfg) + half_cycle
    publish = due & ((wanted > held) | np.asarray(baseline_member, bool))
    return publish, wire_lease_ms(wanted - np.int64(now_ns), cfg)


@dataclass(frozen=True)
class LeasePlan:
    lease_ms: np.ndarray  # uint32, what to publish as predicted_remaining_ms (0 = baseline)
    lease_expiry_ns: np.ndarray  # int64, expiry the LB will set if this is published now
    next_renewal_ns: np.ndarray  # int64, when to publish again
    skip_renewal: np.ndarray  # bool: p90 says the flow ends before skip_threshold_s
    fallback: np.ndarray  # bool: interval too wide/invalid, baseline lease used
    confidence: np.ndarray  # uint16 Q0.16, from the interval width


def confidence_from_width(p10, p90, max_interval_width: float) -> np.ndarray:
    """1 - ln(p90/p10) / ln(max_width), clipped to [0, 1], as Q0.16 (uint16). A point prediction
    gives 65535; a ratio at or above max_interval_width (or p10 <= 0, NaN) gives 0."""
    p10 = np.asarray(p10, dtype=np.float64)
    p90 = np.asarray(p90, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p10 > 0, p90 / p10, np.inf)
        score = 1.0 - np.log(np.maximum(ratio, 1.0)) / np.log(max_interval_width)
    score = np.nan_to_num(score, nan=0.0, neginf=0.0)
    return np.round(np.clip(score, 0.0, 1.0) * CONFIDENCE_SCALE).astype(np.uint16)


def may_wait_ns(now_ns: int, held_expiry_ns, cfg: Config) -> np.ndarray:
    """True where publishing can wait one cycle: the lease the LB holds now (e.g. a new flow's
    initial lease) still outlasts a publish next cycle and lease_repeats - 1 repeats after it,
    held - now > lease_repeats * T."""
    interval_ns = round(cfg.publish.interval_s * NS_PER_S)
    left = np.asarray(held_expiry_ns, np.int64) - np.int64(now_ns)
    return left > lease_repeats(cfg) * interval_ns


def lease_expiry_from_prediction(now_ns: int, p10, p50, p90, cfg: Config,
                                 held_expiry_ns=None) -> LeasePlan:
    """Lease and renewal from remaining-duration quantiles (seconds, arrays):
    - lease = p90 clamped to [min_s, max_s] (covers the flow with ~90 % in one lease);
    - next renewal = now + renew_fraction * lease, or earlier when that leaves less than
      renewal_margin_ns ((k + 1) * T) before the expiry, so the renewal and its
      lease_repeats repeats all land before it; never sooner than one cycle T;
    - skip renewal only when p90 < skip_threshold_s (the upper bound says it is over) and,
      when held_expiry_ns (the expiry the LB holds now) is given, only while may_wait_ns (a
      publish next cycle still lands in time); a skip that may not wait becomes a fallback;
    - p10 <= 0, NaN, unordered quantiles or p90/p10 > max_interval_width: baseline lease k*T,
      renewal every T, never skipped."""
    lease_cfg, interval_s = cfg.lease, cfg.publish.interval_s
    p10 = np.asarray(p10, dtype=np.float64)
    p50 = np.asarray(p50, dtype=np.float64)
    p90 = np.asarray(p90, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p10 > 0, p90 / p10, np.inf)
    ordered = (p10 <= p50) & (p50 <= p90)
    fallback = ~(ordered & (ratio <= lease_cfg.max_interval_width))
    short = p90 < lease_cfg.skip_threshold_s
    if held_expiry_ns is not None:
        # "it is over" with no time left to correct a wrong guess: the baseline lease
        fallback |= short & ~may_wait_ns(now_ns, held_expiry_ns, cfg)
    lease_s = np.clip(np.nan_to_num(p90, nan=0.0), lease_cfg.min_s, lease_cfg.max_s)
    lease_ms = np.where(fallback, 0, np.round(lease_s * 1000)).astype(np.uint32)
    lease_ns = np.where(fallback, baseline_lease_ns(cfg),
                        lease_ms.astype(np.int64) * 1_000_000)
    margin_s = renewal_margin_ns(cfg) / NS_PER_S
    renew_after_s = np.maximum(np.minimum(lease_cfg.renew_fraction * lease_s,
                                          lease_s - margin_s), interval_s)
    renew_ns = np.where(fallback, round(interval_s * NS_PER_S),
                        np.round(renew_after_s * NS_PER_S).astype(np.int64))
    skip = ~fallback & short
    return LeasePlan(
        lease_ms=lease_ms,
        lease_expiry_ns=now_ns + lease_ns,
        next_renewal_ns=now_ns + renew_ns,
        skip_renewal=skip,
        fallback=fallback,
        confidence=confidence_from_width(p10, p90, lease_cfg.max_interval_width),
    )


def idle_horizon_ns(last_seen_ns, cfg: Config, idle_limit_ns=None) -> np.ndarray:
    """Latest expiry a flow that can only end by going idle (UDP) needs: its last packet +
    its idle limit (when the server stops counting it as live: `idle_limit_ns` per flow,
    policy.liveness.idle_limit_ns; default idle_timeout_s) + (k - 1) * T. The baseline's
    last renewal, in the last cycle before the server times the flow out, leaves the LB
    holding it until between that and one cycle more, so a lease to this horizon covers every
    packet the baseline covers and holds the flow no longer than the baseline does (no CLOSED
    needed: it is not longer than a baseline lease renewed one cycle before the timeout)."""
    linger_ns = baseline_lease_ns(cfg) - round(cfg.publish.interval_s * NS_PER_S)
    limit = (round(cfg.lease.idle_timeout_s * NS_PER_S) if idle_limit_ns is None
             else np.asarray(idle_limit_ns, np.int64))
    return np.asarray(last_seen_ns, np.int64) + limit + max(linger_ns, 0)


def idle_horizon_covered(held_expiry_ns, horizon_ns) -> np.ndarray:
    """True where the lease the LB holds already reaches the idle horizon: nothing to renew
    (no packet since has moved the horizon past it; the flow may be over). Within 1 ms: the
    wire's lease resolution (with_idle_horizon rounds down)."""
    return (np.asarray(held_expiry_ns, np.int64) + 1_000_000
            > np.asarray(horizon_ns, np.int64))


def with_idle_horizon(now_ns: int, plan: LeasePlan, horizon_ns, rows, cfg: Config) -> LeasePlan:
    """The plan with the idle-horizon lease on `rows` (bool mask; flows that end only by
    going idle, UDP): lease = horizon - now (floor ms, so its expiry never passes the horizon;
    clamped to [min_s, max_s]), renewed (lease_repeats + 2) * T before it runs out and only if
    a later packet has moved the horizon past it (idle_horizon_covered), never skipped, full
    confidence. A model lease shorter than the horizon would need renewals while the server
    still counts the idle flow as live; a longer one a CLOSED once it times out."""
    rows = np.asarray(rows, bool)
    if not rows.any():
        return plan
    remaining = np.asarray(horizon_ns, np.int64) - np.int64(now_ns)
    low, high = round(cfg.lease.min_s * 1000), round(cfg.lease.max_s * 1000)
    horizon_ms = np.clip(remaining // 1_000_000, low, high)
    expiry = np.int64(now_ns) + horizon_ms * 1_000_000
    interval_ns = round(cfg.publish.interval_s * NS_PER_S)
    renewal = np.maximum(expiry - renewal_margin_ns(cfg), np.int64(now_ns) + interval_ns)
    return LeasePlan(
        lease_ms=np.where(rows, horizon_ms, plan.lease_ms).astype(np.uint32),
        lease_expiry_ns=np.where(rows, expiry, plan.lease_expiry_ns),
        next_renewal_ns=np.where(rows, renewal, plan.next_renewal_ns),
        skip_renewal=plan.skip_renewal & ~rows,
        fallback=plan.fallback & ~rows,
        confidence=np.where(rows, CONFIDENCE_SCALE, plan.confidence).astype(np.uint16),
    )


def model_protocols(cfg: Config) -> tuple[bool, bool]:
    """([lease] model_protocols) whether the model sets the lease of TCP flows (else the
    baseline lease k*T, renewed every cycle) and whether it may extend the idle horizon of UDP
    flows (else the horizon alone): the switch the ablation of docs/model.md ("What
    prediction buys") sets per protocol."""
    setting = cfg.lease.model_protocols
    return setting in ("tcp", "tcp+udp"), setting in ("udp", "tcp+udp")


def extend_idle_horizon(horizon: LeasePlan, model: LeasePlan, rows) -> LeasePlan:
    """The idle-horizon plan, except on `rows` (bool mask: UDP flows the model may lease) where
    the model's plan holds the flow longer than the horizon (not a fallback, not a skip): the
    model then replaces the horizon's renewals by its own (fewer for a long stream) and the
    flow gets the CLOSED rule when the server times it out (policy.renewal.closed_wanted:
    its lease outlasts a baseline one). Never shorter than the horizon: a UDP flow's next
    datagram may come at any time before its idle limit."""
    longer = (np.asarray(rows, bool) & ~model.fallback & ~model.skip_renewal
              & (model.lease_expiry_ns > horizon.lease_expiry_ns))
    if not longer.any():
        return horizon
    return LeasePlan(*(np.where(longer, getattr(model, name), getattr(horizon, name))
                       for name in ("lease_ms", "lease_expiry_ns", "next_renewal_ns",
                                    "skip_renewal", "fallback", "confidence")))
