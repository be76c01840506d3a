"""Lease policy (DESIGN §5), pure and vectorised: baseline leases, the LB's clamp, and lease length
plus renewal time from the model's remaining-duration quantiles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connpub.config import Config
from connpub.protocol import CONFIDENCE_SCALE

NS_PER_S = 1_000_000_000


def baseline_lease_ns(cfg: Config) -> int:
    """k * T, the patent's fixed lease."""
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


def lease_expiry_from_prediction(now_ns: int, p10, p50, p90, cfg: Config) -> LeasePlan:
    """Lease and renewal from remaining-duration quantiles (seconds, arrays):
    - lease = p90 clamped to [min_s, max_s] (covers the flow with ~90 % in one lease);
    - next renewal = now + renew_fraction * lease, kept within [T, lease - T] so it lands before
      expiry and no faster than the publish cycle;
    - skip renewal only when p90 < skip_threshold_s (the upper bound says it is over);
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
    lease_s = np.clip(np.nan_to_num(p90, nan=0.0), lease_cfg.min_s, lease_cfg.max_s)
    lease_ms = np.where(fallback, 0, np.round(lease_s * 1000)).astype(np.uint32)
    lease_ns = np.where(fallback, baseline_lease_ns(cfg),
                        lease_ms.astype(np.int64) * 1_000_000)
    renew_after_s = np.clip(lease_cfg.renew_fraction * lease_s, interval_s,
                            np.maximum(lease_s - interval_s, interval_s))
    renew_ns = np.where(fallback, round(interval_s * NS_PER_S),
                        np.round(renew_after_s * NS_PER_S).astype(np.int64))
    skip = ~fallback & (p90 < lease_cfg.skip_threshold_s)
    return LeasePlan(
        lease_ms=lease_ms,
        lease_expiry_ns=now_ns + lease_ns,
        next_renewal_ns=now_ns + renew_ns,
        skip_renewal=skip,
        fallback=fallback,
        confidence=confidence_from_width(p10, p90, lease_cfg.max_interval_width),
    )
