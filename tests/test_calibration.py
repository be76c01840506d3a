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
    service_class,
)
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


def _run_tracker(tracker, spread: float, ticks: int, seed: int):
    """A stream of flows decided with interval [0.5, 2] x true-median remaining, true
    remaining lognormal(spread); returns the coverage of the last half of the ticks."""
    rng = np.random.default_rng(seed)
    pending_end, pending_id, covered, total, next_id = [], [], 0, 0, 0
    classes = service_class(np.array([6]), np.array([443]))
    for tick in range(ticks):
        now = tick * S
        n = 50
        ids = np.arange(next_id, next_id + n, dtype=np.uint64)
        next_id += n
        remaining = 10.0 * np.exp(spread * rng.standard_normal(n))
        low, high = tracker.adjust(ids, np.repeat(classes, n), now, np.full(n, 5.0),
                                   np.full(n, 20.0))
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
    assert _run_tracker(narrow, spread=2.0, ticks=1500, seed=1) > 0.75
    assert (narrow.offsets[443] > 0.5).all()
    wide = CoverageTracker()
    assert _run_tracker(wide, spread=0.2, ticks=1500, seed=2) < 0.9
    assert (wide.offsets[443] < 0).all()
    status = narrow.status()
    assert status["classes"]["tcp/443"]["decisions"] == status["decisions"] > 50_000
    assert status["coverage_udp"] is None


def test_planner_feeds_the_tracker():
    cfg = Config(rollout=RolloutConfig(fraction=1.0),
                 lease=LeaseConfig(skip_threshold_s=2.0, max_interval_width=1e6))

    class Fixed:
        def predict(self, features):
            n = features.shape[0]
            return np.full(n, 5.0), np.full(n, 10.0), np.full(n, 20.0)

    tracker = CoverageTracker()
    planner = pr.PredictivePlanner(cfg, Fixed(), coverage=tracker)
    keys = np.zeros(4, FLOW_KEY_DTYPE)
    keys["client_addr"] = wl.ipv4_mapped(10, 1, 2, 3)
    keys["vip_addr"] = wl.ipv4_mapped(10, 200, 0, 1)
    keys["client_port"] = 30000 + np.arange(4)
    keys["vip_port"], keys["proto"] = 443, 6
    values = np.zeros(4, FLOW_VALUE_DTYPE)
    values["packets"], values["bytes"], values["sketch_count"] = 20, 4000, 8
    values["first_seen_ns"] = values["last_seen_ns"] = 0
    planner.plan(keys, values, 1 * S, np.ones(4, bool))
    assert tracker.status()["pending"] == 4
    values["last_seen_ns"] = [2 * S, 8 * S, 15 * S, 40 * S]  # below, inside, inside, above
    planner.plan(keys, values, 41 * S, np.zeros(4, bool))
    status = planner.status()["coverage"]
    assert status["decisions"] == 4 and status["pending"] == 0
    assert status["coverage"] == 0.5
    assert tracker.offsets[443].tolist() == [0.05 * (0.25 - 0.1), 0.05 * (0.25 - 0.1)]


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
