"""Conformal offsets per service class and the agent's online coverage tracker."""

from __future__ import annotations

import numpy as np
from connpub.config import Config, LeaseConfig, RolloutConfig
from connpub.datapath.abi import FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE
from connpub.model import predictive as pr
from connpub.model.calibration import (
    PORT_SPACE,
    ConformalOffsets,
    CoverageTracker,
    apply_offsets,
    class_keys,
    service_class,
)
from connpub.policy import calibration as pc
from connpub.traffic import workload as wl

S = 1_000_000_000


def _coverage(predicted, truth):
    return float(np.mean((predicted[:, 0] <= truth) & (truth <= predicted[:, 2])))


def test_cqr_offsets_give_80_percent_per_class():
    rng = np.random.default_rng(0)
    n = 40_000
    port = rng.choice([443, 53, 8080, 9999], n, p=[0.5, 0.3, 0.199, 0.001])
    proto = np.where(port == 53, 17, 6)
    scale = np.where(port == 443, 2.0, 0.5)  # 443 intervals far too narrow, 53 too wide
    truth = scale * rng.standard_normal(n)
    predicted = np.stack([np.full(n, -1.0), np.zeros(n), np.full(n, 1.0)], axis=1)
    classes = service_class(proto, port)
    half = n // 2
    offsets = ConformalOffsets.fit(predicted[:half], truth[:half], classes[:half])
    assert set(offsets.by_port) == {443, 8080, PORT_SPACE + 53}  # 9999: too few rows
    assert offsets.by_port[443][0] > 1.0 and offsets.by_port[PORT_SPACE + 53][1] < 0
    again = ConformalOffsets.from_json(offsets.to_json())
    assert again == offsets
    calibrated = apply_offsets(predicted[half:], classes[half:], again.table())
    assert (np.diff(calibrated, axis=1) >= 0).all()
    for value in (443, 53, 8080):
        rows = port[half:] == value
        before = _coverage(predicted[half:][rows], truth[half:][rows])
        after = _coverage(calibrated[rows], truth[half:][rows])
        assert abs(after - 0.8) < 0.03, (value, before, after)
    assert abs(_coverage(predicted[half:], truth[half:]) - 0.8) > 0.05


def test_policy_widen_and_interval_ends_exact():
    low, high = pc.widen(np.array([2.0, 2.0]), np.array([10.0, 10.0]),
                         np.array([[np.log(2.0), 0.0], [-np.log(2.0), np.log(3.0)]]))
    np.testing.assert_allclose(low, [1.0, 4.0])
    np.testing.assert_allclose(high, [10.0, 30.0])
    low, high = pc.widen(np.array([2.0]), np.array([10.0]), np.array([[-2.0, -2.0]]),
                         p50_s=np.array([5.0]))  # narrowed past the median: kept around it
    assert (low[0], high[0]) == (5.0, 5.0)
    low_ns, high_ns = pc.interval_ends_ns(5 * S, np.array([1.0, 0.5]), np.array([3.0, 1e300]))
    assert low_ns.tolist() == [6 * S, 5 * S + S // 2]
    assert high_ns.tolist() == [8 * S, 5 * S + 2**62]  # saturated, no overflow
    low_ns, _ = pc.interval_ends_ns(np.array([0, S]), np.array([1.0, 1.0]), np.ones(2))
    assert low_ns.tolist() == [S, 2 * S]


def test_policy_lease_quantiles_only_widen_the_lease():
    p10, p90 = pc.lease_quantiles(np.array([2.0, 2.0, 2.0]), np.array([10.0, 10.0, 10.0]),
                                  np.array([30.0, 4.0, np.nan]))
    assert p10.tolist() == [2.0, 2.0, 2.0] and p90.tolist() == [30.0, 10.0, 10.0]


def test_policy_score_ended_and_live_exact():
    ended = np.array([True, True, True, False, False])
    last = np.array([1, 5, 12, 9, 11]) * S
    low, high = np.full(5, 2 * S), np.full(5, 10 * S)
    scored, below, above = pc.score(ended, last, low, high)
    assert scored.tolist() == [True, True, True, False, True]  # live: only once past p90
    assert below.tolist() == [True, False, False, False, False]
    assert above.tolist() == [False, False, True, False, True]


def test_policy_offset_update_exact():
    rule = pc.TrackerRule(gain=0.25, batch_cap=2, max_offset=1.0)
    rows, count, n_below, n_above, width = pc.class_counts(
        np.array([7, 3, 7, 7, 3]), np.array([1, 0, 0, 0, 0], bool),
        np.array([0, 1, 0, 1, 1], bool), np.array([2.0, 1.0, 2.0, 2.0, 3.0]))
    assert rows.tolist() == [3, 7] and count.tolist() == [2, 3]
    assert n_below.tolist() == [0, 1] and n_above.tolist() == [2, 1]
    assert width.tolist() == [2.0, 2.0]
    new = pc.updated_offsets(np.array([[0.0, 0.0], [0.9, -0.2]]), count, n_below, n_above,
                             width, rule)
    # class 3: 2 scored, 0 below, 2 above: step 0.25 * width 2 * 2 = 1 -> (-0.1, +0.9)
    # class 7: 3 scored (capped at 2: step 1), 1/3 below, 1/3 above -> 0.9 + 0.2333 (clipped)
    np.testing.assert_allclose(new, [[-0.1, 0.9], [1.0, -0.2 + (1 / 3 - 0.1)]])
    none = np.zeros(2)
    assert (pc.updated_offsets(new, none, none, none, none, rule) == new).all()


def _run_tracker(tracker, spread: float, ticks: int, seed: int):
    """A stream of flows decided with interval [5, 20] s, true remaining 10 s x
    lognormal(spread); each tick scores the ended flows; returns the coverage of the last half
    of the ticks."""
    rng = np.random.default_rng(seed)
    pending_end, pending_id, covered, total, next_id = [], [], 0, 0, 0
    for tick in range(ticks):
        now = tick * S
        n = 50
        ids = np.arange(next_id, next_id + n, dtype=np.uint64)
        next_id += n
        remaining = 10.0 * np.exp(spread * rng.standard_normal(n))
        low, high = tracker.adjust(ids, now, np.full(n, 5.0), np.full(n, 20.0),
                                   proto=np.full(n, 6), vip_port=np.full(n, 443))
        end = now + (remaining * S).astype(np.int64)
        if tick >= ticks // 2:
            covered += int(((remaining >= low) & (remaining <= high)).sum())
            total += n
        pending_end.append(end)
        pending_id.append(ids)
        ends, flow_ids = np.concatenate(pending_end), np.concatenate(pending_id)
        done = ends <= now
        tracker.resolve(flow_ids[done], ends[done])
        pending_end, pending_id = [ends[~done]], [flow_ids[~done]]
    return covered / total


def test_tracker_widens_a_too_narrow_class_and_narrows_a_too_wide_one():
    narrow = CoverageTracker()
    assert abs(_run_tracker(narrow, spread=2.0, ticks=1500, seed=1) - 0.8) < 0.03
    key = class_keys(np.array([6]), np.array([443]))
    assert (narrow.offsets_of(key) > 0.5).all()
    wide = CoverageTracker()
    assert abs(_run_tracker(wide, spread=0.2, ticks=1500, seed=2) - 0.8) < 0.03
    assert (wide.offsets_of(key) < 0).all()
    status = narrow.status()
    assert status["classes"]["tcp/*:443"]["decisions"] == status["decisions"] > 50_000
    assert status["coverage_udp"] is None and status["classes_seen"] == 1


def test_tracker_scores_a_live_flow_once_past_its_p90():
    tracker = CoverageTracker(pc.TrackerRule(gain=1 / np.log(10.0), batch_cap=4))
    ids = np.array([1, 2], np.uint64)
    tracker.adjust(ids, 0, np.array([1.0, 1.0]), np.array([10.0, 10.0]),
                   proto=np.array([6, 17]), vip_port=np.array([443, 53]))
    # tick at 11 s: flow 1 still live with a packet at 10.5 s (> p90 end), flow 2 at 9 s
    assert tracker.overdue_ids(11 * S).tolist() == [1, 2]
    assert tracker.resolve(np.zeros(0, np.uint64), np.zeros(0), ids,
                           np.array([10 * S + S // 2, 9 * S])) == 1
    keys = class_keys(np.array([6, 17]), np.array([443, 53]))
    np.testing.assert_allclose(tracker.offsets_of(keys), [[-0.1, 0.9], [0.0, 0.0]])
    assert tracker.status()["pending"] == 1
    assert tracker.resolve(np.array([2], np.uint64), np.array([9 * S])) == 1  # ends inside
    np.testing.assert_allclose(tracker.offsets_of(keys), [[-0.1, 0.9], [-0.1, -0.1]])
    status = tracker.status()
    assert (status["coverage_tcp"], status["coverage_udp"], status["pending"]) == (0.0, 1.0, 0)
    # the next decision of the TCP class gets a wider interval: 1 * e^0.1, 10 * e^0.9
    low, high = tracker.adjust(np.array([3], np.uint64), 20 * S, np.array([1.0]),
                               np.array([10.0]), proto=np.array([6]), vip_port=np.array([443]))
    np.testing.assert_allclose([low[0], high[0]], [np.exp(0.1), 10 * np.exp(0.9)])


def test_tracker_classes_are_per_vip():
    tracker = CoverageTracker()
    vips = np.stack([wl.ipv4_mapped(10, 200, 0, 1), wl.ipv4_mapped(10, 200, 0, 2)])
    tracker.adjust(np.array([1, 2], np.uint64), 0, np.ones(2), np.full(2, 10.0),
                   proto=np.array([6, 6]), vip_port=np.array([443, 443]), vip_addr=vips)
    tracker.resolve(np.array([1, 2], np.uint64), np.array([5 * S, 50 * S]))
    rows = {(c["address"], c["port"]): (c["decisions"], c["coverage"]) for c in tracker.classes()}
    assert rows == {("10.200.0.1", 443): (1, 1.0), ("10.200.0.2", 443): (1, 0.0)}


def test_planner_feeds_the_tracker():
    cfg = Config(rollout=RolloutConfig(fraction=1.0),
                 lease=LeaseConfig(skip_threshold_s=2.0, max_interval_width=1e6))

    class Fixed:
        def predict(self, features):
            n = features.shape[0]
            return np.full(n, 5.0), np.full(n, 10.0), np.full(n, 20.0)

    tracker = CoverageTracker()
    planner = pr.PredictivePlanner(cfg, Fixed(), coverage=tracker)
    keys = np.zeros(5, FLOW_KEY_DTYPE)
    keys["client_addr"] = wl.ipv4_mapped(10, 1, 2, 3)
    keys["vip_addr"] = wl.ipv4_mapped(10, 200, 0, 1)
    keys["client_port"] = 30000 + np.arange(5)
    keys["vip_port"], keys["proto"] = 443, 6
    values = np.zeros(5, FLOW_VALUE_DTYPE)
    values["packets"], values["bytes"], values["sketch_count"] = 20, 4000, 8
    values["first_seen_ns"] = values["last_seen_ns"] = 0
    planner.plan(keys, values, 1 * S, np.ones(5, bool))
    assert tracker.status()["pending"] == 5  # intervals [6 s, 21 s] after the first tick
    # below, inside, inside, above (ended); the fifth is live with a packet past its p90
    values["last_seen_ns"] = [2 * S, 8 * S, 15 * S, 40 * S, 30 * S]
    planner.plan(keys, values, 41 * S, np.array([False, False, False, False, True]))
    status = planner.status()["coverage"]
    assert status["decisions"] == 5 and status["coverage"] == 0.4
    rule = pc.TrackerRule()
    step = rule.gain * np.log(20.0 / 5.0) * min(5, rule.batch_cap)  # model width log(20/5)
    lower, upper = step * (1 / 5 - 0.1), step * (2 / 5 - 0.1)
    (entry,) = status["classes"].values()
    assert (entry["address"], entry["port"], entry["proto"]) == ("10.200.0.1", 443, "tcp")
    assert entry["offsets"] == [round(lower, 4), round(upper, 4)]


def test_replayed_tracker_repairs_a_too_narrow_model():
    from connpub.model.evaluation import replay_tracker, score_predictions
    from connpub.model.samples import sample_flows

    samples = sample_flows(wl.generate("mixed", 6_000, seed=11), priors_from_flows=False)
    n = samples.log_remaining_s.size
    # a model that knows the median but claims a +-0.3 interval (log seconds)
    center = np.full(n, np.median(samples.log_remaining_s))
    narrow = np.stack([center - 0.3, center, center + 0.3], axis=1)
    before = score_predictions(samples, narrow, None)
    after = score_predictions(samples, replay_tracker(samples, narrow), None)
    assert before["coverage"] < 0.3
    assert after["coverage"] > before["coverage"] + 0.3
    assert abs(after["mae"] - before["mae"]) < 0.01  # p50 untouched (rows stay sorted)
