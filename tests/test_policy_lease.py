"""Lease policy on a simulated clock: baseline, LB clamp, leases from prediction quantiles."""

from __future__ import annotations

import dataclasses

import numpy as np
from connpub.config import Config, LeaseConfig
from connpub.policy.lease import (
    aggregate_decision,
    baseline_expiry_ns,
    clamp_lease_ms,
    confidence_from_width,
    idle_horizon_covered,
    idle_horizon_ns,
    initial_expiry_ns,
    lb_lease_expiry_ns,
    lease_expiry_from_prediction,
    lease_repeats,
    renewal_margin_ns,
    repeat_lease_ms,
    with_idle_horizon,
)

# T = 1 s, k = 3, lease [1, 300] s, skip < 2 s, width <= 20, renew at 0.5 (not the defaults:
# the values these tests were written for)
CFG = Config(lease=LeaseConfig(skip_threshold_s=2.0, max_interval_width=20.0, renew_fraction=0.5))
S = 1_000_000_000
MS = 1_000_000
NOW = 1_000 * S


def test_baseline_and_initial():
    assert baseline_expiry_ns(NOW, CFG) == NOW + 3 * S
    assert baseline_expiry_ns(np.array([0, S]), CFG).tolist() == [3 * S, 4 * S]
    assert initial_expiry_ns(NOW, CFG) == NOW + 3 * S


def test_lb_clamp():
    assert clamp_lease_ms([0, 500, 5_000, 400_000], CFG).tolist() == [1_000, 1_000, 5_000, 300_000]
    assert lb_lease_expiry_ns(NOW, np.array([0, 5_000, 500]), CFG).tolist() == [
        NOW + 3 * S, NOW + 5 * S, NOW + 1 * S]


def test_lease_from_prediction():
    p10 = np.array([10.0, 1.0, 0.5, 50.0, 0.1])
    p50 = np.array([20.0, 1.2, 0.8, 200.0, 0.5])
    p90 = np.array([40.0, 1.5, 1.9, 900.0, 5.0])
    plan = lease_expiry_from_prediction(NOW, p10, p50, p90, CFG)
    # 0: lease 40 s, renew at 20 s. 1: lease clamped up to 1 s, renew no faster than T.
    # 2: p90 < 2 s -> skip. 3: lease clamped to 300 s. 4: p90/p10 = 50 > 20 -> baseline.
    assert plan.fallback.tolist() == [False, False, False, False, True]
    assert plan.skip_renewal.tolist() == [False, True, True, False, False]
    assert plan.lease_ms.tolist() == [40_000, 1_500, 1_900, 300_000, 0]
    assert (plan.lease_expiry_ns - NOW).tolist() == [40 * S, 1_500_000_000, 1_900_000_000,
                                                     300 * S, 3 * S]
    assert (plan.next_renewal_ns - NOW).tolist() == [20 * S, 1 * S, 1 * S, 150 * S, 1 * S]


def test_renewal_lands_before_expiry_even_with_late_fraction():
    cfg = dataclasses.replace(CFG, lease=dataclasses.replace(CFG.lease, renew_fraction=1.0))
    plan = lease_expiry_from_prediction(NOW, np.array([5.0]), np.array([8.0]), np.array([10.0]),
                                        cfg)
    # lease - (k + 1) * T: the renewal and its k - 1 repeats land before the expiry
    assert (plan.next_renewal_ns - NOW).tolist() == [6 * S]


def test_repeats_and_margin_follow_k():
    assert lease_repeats(CFG) == 2 and renewal_margin_ns(CFG) == 4 * S
    for k, repeats in ((1.0, 0), (2.5, 2), (4.0, 3)):
        cfg = dataclasses.replace(CFG, lease=dataclasses.replace(CFG.lease, k=k))
        assert lease_repeats(cfg) == repeats
    # a repeat names the same absolute expiry (the LB keeps the later one)
    ms = repeat_lease_ms(NOW + S, np.array([NOW + 40 * S, NOW + 40 * S + 1]))
    assert ms.tolist() == [39_000, 39_001]
    assert (lb_lease_expiry_ns(NOW + S, ms, CFG) - NOW).tolist() == [40 * S, 40 * S + MS]


def test_aggregate_renewed_only_when_its_own_lease_is_due():
    held = NOW + np.array([100, 4, 4, 4, 0, 10]) * S
    wanted = NOW + np.array([200, 50, 4, 2, 20, 2]) * S
    baseline_member = np.array([True, False, False, True, False, False])
    publish, lease_ms = aggregate_decision(NOW, held, wanted, baseline_member, CFG)
    # 0: 100 s left, not due. 1: due, a member wants 50 s. 2: due, nobody wants more.
    # 3: due, a baseline member. 4: never published (held 0 < now). 5: 10 s left, not due.
    assert publish.tolist() == [False, True, False, True, True, False]
    assert lease_ms.tolist() == [200_000, 50_000, 4_000, 0, 20_000, 0]


def test_bad_quantiles_fall_back_to_baseline():
    nan = np.nan
    plan = lease_expiry_from_prediction(NOW, np.array([0.0, nan, 5.0]), np.array([1.0, 1.0, 2.0]),
                                        np.array([10.0, 3.0, 9.0]), CFG)
    assert plan.fallback.tolist() == [True, True, True]  # p10 = 0, NaN, unordered
    assert plan.skip_renewal.tolist() == [False] * 3
    assert plan.lease_ms.tolist() == [0, 0, 0]
    assert (plan.lease_expiry_ns - NOW).tolist() == [3 * S] * 3


def test_confidence_from_interval_width():
    p10, p90 = np.array([10.0, 10.0, 1.0, 0.0]), np.array([10.0, 20.0, 20.0, 5.0])
    conf = confidence_from_width(p10, p90, 20.0)
    expected_half = round((1 - np.log(2) / np.log(20)) * 65535)
    assert conf.tolist() == [65535, expected_half, 0, 0]
    assert conf.dtype == np.uint16


def test_idle_horizon_lease():
    # last packet + idle timeout (60 s) + (k-1)*T (2 s); the lease never ends past it (floor
    # ms), is renewed (k+1)*T = 4 s before it ends, never skipped; other rows keep the model's
    last_seen = np.array([NOW - 10 * S, NOW - 59 * S - 1, NOW])
    horizon = idle_horizon_ns(last_seen, CFG)
    assert horizon.tolist() == [NOW + 52 * S, NOW + 3 * S - 1, NOW + 62 * S]
    model = lease_expiry_from_prediction(NOW, np.full(3, 0.5), np.full(3, 1.0),
                                         np.full(3, 1.5), CFG)  # short: skipped
    rows = np.array([True, True, False])
    plan = with_idle_horizon(NOW, model, horizon, rows, CFG)
    assert plan.lease_ms.tolist() == [52_000, 2_999, model.lease_ms[2]]
    assert plan.lease_expiry_ns.tolist()[:2] == [NOW + 52 * S, NOW + 2_999 * MS]
    assert plan.next_renewal_ns.tolist()[:2] == [NOW + 48 * S, NOW + S]
    assert plan.skip_renewal.tolist() == [False, False, True]
    assert not plan.fallback[:2].any() and (plan.confidence[:2] == 65535).all()
    # covered (within the wire's 1 ms) until a later packet moves the horizon past the lease
    assert idle_horizon_covered(plan.lease_expiry_ns[:2], horizon[:2]).all()
    assert not idle_horizon_covered(plan.lease_expiry_ns[:1], horizon[:1] + 2 * MS).any()
