"""Predictive mode without root: flow-table features, the renewal planner on a simulated clock
(renewal before expiry, wide intervals, CLOSED after close, fewer publishes than baseline),
aggregate leases, and the model manager (refused files, promotion guard, hot swap)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import onnx
import pytest
from connpub.agents import server as srv
from connpub.bench.predict import bench_predict
from connpub.config import Config, LeaseConfig, LivenessConfig, RolloutConfig
from connpub.datapath.abi import AGG_KEY_DTYPE, AGG_VALUE_DTYPE, FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE
from connpub.datapath.masks import apply_masks
from connpub.errors import ConnpubError
from connpub.model import predictive as pr
from connpub.model.features import N_FEATURES, ClientHistory, compute_features
from connpub.model.quantile import (
    META_PREFIX,
    Predictor,
    TrainConfig,
    default_model_path,
    export_onnx,
    train,
)
from connpub.policy.lease import initial_expiry_ns, lb_lease_expiry_ns, lease_repeats
from connpub.traffic import workload as wl
from connpub.traffic.trace import append_history, history_from_flows

S = 1_000_000_000
MS = 1_000_000
ALL_IN = RolloutConfig(fraction=1.0)
# the lease values these tests were written for (T = 1 s, k = 3, skip < 2 s, width <= 20,
# renew at 0.5), not the defaults
CFG = Config(rollout=ALL_IN, lease=LeaseConfig(skip_threshold_s=2.0, max_interval_width=20.0,
                                               renew_fraction=0.5))


class Fixed:
    """The same quantiles (seconds) for every row: the policy under test, not the model."""

    def __init__(self, p10: float, p50: float, p90: float) -> None:
        self.quantiles = (p10, p50, p90)
        self.rows = 0

    def predict(self, features):
        n = features.shape[0]
        self.rows += n
        return tuple(np.full(n, q) for q in self.quantiles)


def keys_values(count: int, first_seen_ns: int = 0, vip_port: int = 443):
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["client_addr"] = wl.ipv4_mapped(10, 1, 2, 3)
    keys["vip_addr"] = wl.ipv4_mapped(10, 200, 0, 1)
    keys["client_port"] = 30000 + np.arange(count)
    keys["vip_port"] = vip_port
    keys["proto"] = 6
    values = np.zeros(count, FLOW_VALUE_DTYPE)
    values["packets"] = 20
    values["bytes"] = 4000
    values["first_seen_ns"] = first_seen_ns
    values["last_seen_ns"] = first_seen_ns
    values["sketch_count"] = 8
    values["sketch_size"] = 60
    values["tcp_flags"] = 0x1A
    return keys, values


class SimLB:
    """The LB's view of a set of flows: expiry from what the planner publishes (lb side of the
    lease policy), CLOSED drops it; counts lapses of live flows."""

    def __init__(self, count: int, cfg: Config, first_seen_ns: int = 0) -> None:
        self.cfg = cfg
        self.expiry = np.full(count, int(initial_expiry_ns(first_seen_ns, cfg)), np.int64)
        self.publishes = 0
        self.lapses = 0

    def tick(self, planner: pr.PredictivePlanner, keys, values, now_ns: int,
             live: np.ndarray) -> pr.FlowPlan:
        self.lapses += int((live & (self.expiry <= now_ns)).sum())
        plan = planner.plan(keys, values, now_ns, live)
        self.expiry[plan.publish] = lb_lease_expiry_ns(now_ns, plan.lease_ms[plan.publish],
                                                       self.cfg)
        self.expiry[plan.closed] = now_ns
        self.publishes += int(plan.publish.sum())
        return plan


# ---------------------------------------------------------------------------------------------
# observations -> features


def test_sketch_summary_matches_the_agents_history_records():
    from connpub.agents.server import history_records

    rng = np.random.default_rng(1)
    keys, values = keys_values(500)
    values["sketch_count"] = rng.integers(0, 12, 500)  # > 8 means "more packets than sketched"
    values["sketch_size"] = rng.integers(0, 65535, (500, 8))
    values["sketch_gap_us"] = rng.integers(0, 2**32 - 1, (500, 8))
    records = history_records(keys, values, 0, 1)
    summary = pr.sketch_summary(values)
    for name in ("first_n", "first_size_sum", "first_size_sumsq", "first_size_max",
                 "first_iat_sum_ns", "first_iat_max_ns"):
        assert (summary[name] == records[name].astype(np.int64)).all(), name


def test_flow_features_of_a_table_snapshot():
    trace = wl.generate("mixed", 3000, seed=2, window_s=30.0)
    now = 40 * S
    keys, values, rows = pr.table_snapshot(trace, now)
    assert len(rows) > 100
    rec = trace[rows]
    hist = history_from_flows(rec)
    complete = values["sketch_count"] == rec["first_n"]
    summary = pr.sketch_summary(values)
    assert (summary["first_n"][complete] == hist["first_n"][complete]).all()
    assert (summary["first_size_sum"][complete] == hist["first_size_sum"][complete]).all()
    assert (summary["first_iat_max_ns"][complete]
            == (hist["first_iat_max_ns"][complete] // 1000) * 1000).all()
    obs = pr.flow_observations(keys, values, now)
    assert np.array_equal(obs["age_s"], (now - rec["start_ns"]) / S)
    assert np.array_equal(obs["vip_port"], rec["vip_port"].astype(np.int64))
    features = pr.flow_features(keys, values, now)
    assert np.array_equal(features, compute_features(obs))
    assert features.shape == (len(rows), N_FEATURES) and np.isfinite(features).all()


def test_client_prior_index_equals_client_history_lookup():
    hist = history_from_flows(wl.generate("mixed", 5000, seed=3, window_s=100.0))
    exact = ClientHistory.from_history(hist)
    index = pr.ClientPriorIndex.from_client_history(exact)
    strangers = wl.generate("mixed", 1000, seed=4, window_s=200.0)["client_addr"]
    addrs = np.concatenate([hist["client_addr"][:3000], hist["client_addr"][:999], strangers])
    jitter = np.random.default_rng(0).integers(-50 * S, 50 * S, 3000)
    now = np.concatenate([hist["last_seen_ns"][:3000] + jitter, [-5 * S, 0, 10**15] * 333,
                          hist["last_seen_ns"][:1000]])
    count, mean = index.lookup(addrs, now)
    want_count, want_mean = exact.lookup(addrs, now)
    assert np.array_equal(count, want_count)
    assert np.allclose(mean, want_mean, rtol=0, atol=1e-9)
    assert (count > 0).sum() > 100 and (count == 0).sum() > 100
    empty = pr.ClientPriorIndex.from_history(hist[:0])
    assert empty.lookup(addrs[:3], now[:3])[0].tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# the planner on a simulated clock


def test_long_flow_renewed_before_expiry_with_few_publishes():
    """p90 = 400 s -> lease clamped to max_s 300 s, renewal halfway; each lease is published
    again k-1 = 2 times with the same absolute expiry, in the last cycles before the previous
    lease would run out (right away for the first one: the initial lease is short): 19
    publishes in 1000 ticks where the baseline sends 1000, and the LB lease never lapses."""
    keys, values = keys_values(3)
    planner = pr.PredictivePlanner(CFG, Fixed(100.0, 200.0, 400.0))
    lb = SimLB(3, CFG)
    live = np.ones(3, bool)
    publish_ticks = []
    for tick in range(1000):
        values["last_seen_ns"] = tick * S
        plan = lb.tick(planner, keys, values, tick * S, live)
        if plan.publish[0]:
            publish_ticks.append(tick)
            planned_at = tick - tick % 150  # the renewal this publish belongs to
            assert plan.lease_ms.tolist() == [(planned_at + 300 - tick) * 1000] * 3
            assert (lb.expiry == (planned_at + 300) * S).all()
    renewals = list(range(0, 1000, 150))
    repeats = [1, 2] + [r + 147 + i for r in renewals[1:] for i in range(2) if r + 147 < 1000]
    assert publish_ticks == sorted(renewals + repeats)
    assert lb.publishes == 3 * 19 and lb.lapses == 0
    assert planner.counts["decisions"] == 21 and planner.counts["lease_repeats"] == 36
    assert planner.counts["not_due"] == 3 * (1000 - 7)


def test_dropped_publishes_do_not_cause_a_miss():
    """A simulated clock where the publishes of whole cycles are lost: any k-1 = 2 lost cycles
    in a row (first publish, renewals, repeats) leave no live flow without a lease, as with
    the baseline, which needs k = 3 lost cycles in a row."""
    keys, values = keys_values(4)
    for lost_pair in range(0, 160):
        planner = pr.PredictivePlanner(CFG, Fixed(10.0, 20.0, 40.0))
        lb = SimLB(4, CFG)
        live = np.ones(4, bool)
        for tick in range(160):
            now = tick * S
            lb.lapses += int((live & (lb.expiry <= now)).sum())
            plan = planner.plan(keys, values, now, live)
            if tick not in (lost_pair, lost_pair + 1):  # two cycles in a row lost
                lb.expiry[plan.publish] = np.maximum(
                    lb.expiry[plan.publish],
                    lb_lease_expiry_ns(now, plan.lease_ms[plan.publish], CFG))
        assert lb.lapses == 0, lost_pair
    # renewals (40 s leases, renew_fraction 0.5 -> 20 s) and repeats in the last 4 s
    plan_ticks = [t for t in range(160) if t % 20 < 3]
    assert planner.counts["decisions"] == 4 * len([t for t in plan_ticks if t % 20 == 0])
    # without repeats (k = 1) a single lost renewal is a lapse
    one = replace(CFG, lease=replace(CFG.lease, k=1.0, initial_s=1.0))
    planner = pr.PredictivePlanner(one, Fixed(10.0, 20.0, 40.0))
    lb = SimLB(4, one)
    for tick in range(60):
        now = tick * S
        lb.lapses += int((lb.expiry <= now).sum())
        plan = planner.plan(keys, values, now, np.ones(4, bool))
        if tick != 20:
            lb.expiry[plan.publish] = lb_lease_expiry_ns(now, plan.lease_ms[plan.publish], one)
    assert planner.counts["lease_repeats"] == 0 and lb.lapses > 0


def test_jittered_ticks_still_renew_before_expiry():
    rng = np.random.default_rng(7)
    keys, values = keys_values(50)
    p90 = np.geomspace(2.5, 400.0, 50)

    class PerFlow:
        def predict(self, features):
            # flows are decided in key order; port 30000+i -> p90[i]
            n = features.shape[0]
            return (p90[:n] / 4, p90[:n] / 2, p90[:n]) if n == 50 else (
                np.full(n, 10.0), np.full(n, 20.0), np.full(n, 40.0))

    planner = pr.PredictivePlanner(CFG, PerFlow())
    lb = SimLB(50, CFG)
    live = np.ones(50, bool)
    now = 0
    for _ in range(600):
        lb.tick(planner, keys, values, now, live)
        now += int(rng.uniform(0.8, 1.2) * S)
    assert lb.lapses == 0
    assert lb.publishes < 50 * 600 // 2


def test_wide_interval_never_skips_a_live_connection():
    """p90 = 1.5 s is below the skip threshold, but p90/p10 = 1500 is far wider than
    max_interval_width: baseline lease every cycle, nothing skipped, no lapse."""
    keys, values = keys_values(4)
    model = Fixed(0.001, 0.5, 1.5)
    planner = pr.PredictivePlanner(CFG, model)
    lb = SimLB(4, CFG)
    live = np.ones(4, bool)
    for tick in range(30):
        plan = lb.tick(planner, keys, values, tick * S, live)
        assert plan.publish.all() and not plan.skipped.any()
        assert plan.lease_ms.tolist() == [0] * 4
        assert (lb.expiry == tick * S + 3 * S).all()
    assert lb.lapses == 0 and planner.counts["skipped_renewals"] == 0
    # the model runs again once the age grew by a quarter (at least every cycle, decided half
    # a cycle early): ages 0-7, 9, 11, 14, 17, 21, 26 s
    assert planner.counts["fallback"] == model.rows == 4 * 14
    assert planner.counts["fallback_repeats"] == 4 * 16


def test_narrow_interval_below_threshold_skips():
    keys, values = keys_values(2)
    planner = pr.PredictivePlanner(CFG, Fixed(0.5, 0.8, 1.0))
    plan = planner.plan(keys, values, 0, np.ones(2, bool))
    assert plan.skipped.all() and not plan.publish.any()
    # decided again a cycle later; the initial lease (3 s) now leaves no time to correct a
    # wrong "it is over" (a publish next cycle and its repeat would land too late): the
    # baseline lease instead of a second skip
    again = planner.plan(keys, values, S, np.ones(2, bool))
    assert again.decided.all() and again.publish.all() and not again.skipped.any()
    assert again.lease_ms.tolist() == [0, 0] and again.lease_expiry_ns.tolist() == [4 * S] * 2
    assert planner.counts["skipped_renewals"] == 2 and planner.counts["fallback"] == 2


def test_closed_and_idle_flows_expire_soon_after_close():
    """A flow with a long lease that ends by going idle gets one CLOSED entry when the agent
    finishes it (past the idle timeout). One closed by the client's FIN/RST gets none: the LB
    saw the FIN too (DSR) and set its lease to FIN + close_linger (k*T), no aggregate keeps it;
    it is simply never renewed again."""
    keys, values = keys_values(3)
    planner = pr.PredictivePlanner(CFG, Fixed(100.0, 200.0, 400.0))
    lb = SimLB(3, CFG)
    live = np.ones(3, bool)
    for tick in range(50):
        values["last_seen_ns"] = tick * S
        lb.tick(planner, keys, values, tick * S, live)
    assert (lb.expiry > 200 * S).all()
    values["closed"][0] = 1  # FIN seen at 49 s: no longer live, lingers until 52 s
    lb.expiry[0] = 49 * S + 3 * S  # the LB datapath at the FIN: now + close_linger (k*T)
    live = np.array([False, False, True])  # flow 1: idle past the timeout, finished now
    finished = np.array([False, True, False])
    closed_at = {}
    for tick in range(50, 56):
        now = tick * S
        if tick == 53:
            finished = np.array([True, False, False])  # the agent deleted flow 1 by now
        lb.lapses += int((live & (lb.expiry <= now)).sum())
        plan = planner.plan(keys, values, now, live, finished)
        lb.expiry[plan.closed] = now
        for flow in np.flatnonzero(plan.closed):
            closed_at.setdefault(int(flow), []).append(tick)
    assert closed_at == {1: [50]}  # once; none for the FIN-closed flow 0
    assert lb.expiry.tolist()[:2] == [52 * S, 50 * S] and lb.lapses == 0
    assert planner.counts["closed_entries"] == 1 and len(planner.state) == 1


def test_udp_flows_leased_to_their_idle_horizon():
    """UDP flows end only by going idle: the lease reaches last packet + idle timeout + (k-1)*T
    (no model run), is renewed only when a later packet moved that horizon past it, and needs
    no CLOSED when the agent times the flow out (it ends 2 s later, as a baseline lease
    renewed in the cycle before would)."""
    keys, values = keys_values(2)
    keys["proto"] = 17
    model = Fixed(100.0, 200.0, 400.0)
    cfg = replace(CFG, liveness=LivenessConfig(udp_idle_s=60.0, udp_stream_idle_s=60.0))
    planner = pr.PredictivePlanner(cfg, model)
    lb = SimLB(2, cfg)
    sent: dict[int, list[int]] = {0: [], 1: []}
    for tick in range(1, 100):
        now = tick * S
        if tick == 30:
            values["last_seen_ns"][1] = now  # flow 1: one more packet at 30 s
        idle = now - values["last_seen_ns"].astype(np.int64)
        live, finished = idle <= 60 * S, idle > 60 * S
        lb.lapses += int((live & (lb.expiry <= now)).sum())
        plan = planner.plan(keys, values, now, live, finished)
        assert not plan.closed.any()
        lb.expiry[plan.publish] = lb_lease_expiry_ns(now, plan.lease_ms[plan.publish], cfg)
        for flow in np.flatnonzero(plan.publish):
            sent[int(flow)].append(tick)
    assert model.rows == 0 and lb.lapses == 0
    # first lease + 2 repeats; flow 1 renewed (k+1)*T before its first lease ran out
    assert sent == {0: [1, 2, 3], 1: [1, 2, 3, 58, 59, 60]}
    assert lb.expiry.tolist() == [62 * S, 92 * S]
    assert planner.counts["idle_horizon_waits"] > 0


def test_model_protocols_switch_in_the_agents_planner():
    """[lease] model_protocols, the rule the simulator shares (policy.renewal): with tcp+udp
    the model's p90 (400 s, clamped to max_s 300 s) replaces a UDP flow's 62 s idle horizon
    (one lease + 2 repeats, no renewal), and the flow gets CLOSED when the agent times it out
    at 61 s; with none a TCP flow gets the baseline k*T every cycle and no model run."""
    keys, values = keys_values(2)
    keys["proto"] = 17
    model = Fixed(100.0, 200.0, 400.0)
    cfg = replace(CFG, liveness=LivenessConfig(udp_idle_s=60.0, udp_stream_idle_s=60.0),
                  lease=replace(CFG.lease, model_protocols="tcp+udp"))
    planner = pr.PredictivePlanner(cfg, model)
    sent, closed_at = [], []
    for tick in range(1, 100):
        now = tick * S
        idle = now - values["last_seen_ns"].astype(np.int64)
        plan = planner.plan(keys, values, now, idle <= 60 * S, idle > 60 * S)
        if plan.publish[0]:
            sent.append((tick, int(plan.lease_ms[0])))
        if plan.closed[0]:
            closed_at.append(tick)
    assert model.rows == 2
    assert sent == [(1, 300_000), (2, 299_000), (3, 298_000)]
    assert closed_at == [61]

    keys, values = keys_values(1)
    model = Fixed(100.0, 200.0, 400.0)
    planner = pr.PredictivePlanner(replace(CFG, lease=replace(CFG.lease,
                                                             model_protocols="none")), model)
    for tick in range(1, 11):
        plan = planner.plan(keys, values, tick * S, np.ones(1, bool))
        assert plan.publish[0] and plan.lease_ms[0] == 0
    assert model.rows == 0


def test_baseline_lease_flows_get_no_closed_entry():
    keys, values = keys_values(2)
    planner = pr.PredictivePlanner(CFG, Fixed(0.001, 0.5, 1.5))  # fallback: k*T leases
    planner.plan(keys, values, 0, np.ones(2, bool))
    plan = planner.plan(keys, values, S, np.zeros(2, bool))
    assert not plan.closed.any()


def test_model_leases_need_far_fewer_publishes_than_baseline():
    """The shipped model on long flows of the mixed workload, one tick per second for 300 s:
    with no interval-width fallback (the default max_interval_width) the publishes drop by
    more than 10x, and no live flow's lease lapses."""
    trace = wl.generate("mixed", 20_000, seed=5, window_s=60.0)
    long = trace[(trace["end_ns"] - trace["start_ns"]) > 200 * S]
    cfg = replace(CFG, lease=replace(CFG.lease, max_interval_width=1e6))
    planner = pr.PredictivePlanner(cfg, Predictor())
    lb = SimLB(long.size, cfg)
    lb.expiry[:] = initial_expiry_ns(long["start_ns"].astype(np.int64), cfg)
    baseline = 0
    for tick in range(300):
        now = tick * S
        keys, values, rows = pr.table_snapshot(long, now)
        alive = np.zeros(long.size, bool)
        alive[rows] = True
        lb.lapses += int((alive & (lb.expiry <= now)).sum())
        plan = planner.plan(keys, values, now, np.ones(rows.size, bool))
        lb.expiry[rows[plan.publish]] = lb_lease_expiry_ns(now, plan.lease_ms[plan.publish], cfg)
        lb.publishes += int(plan.publish.sum())
        baseline += rows.size
    assert long.size > 300
    assert lb.lapses == 0
    assert lb.publishes * 10 < baseline


def test_join_survives_reordering_and_tuple_reuse():
    keys, values = keys_values(100)
    model = Fixed(100.0, 200.0, 400.0)
    planner = pr.PredictivePlanner(CFG, model)
    planner.plan(keys, values, 0, np.ones(100, bool))
    order = np.random.default_rng(0).permutation(100)
    keys, values = keys[order], values[order].copy()
    keys["pad"] = 7  # padding bytes never matter
    values["first_seen_ns"][:5] = 3 * S  # the same tuples, reopened: new flows
    plan = planner.plan(keys, values, 3 * S, np.ones(100, bool))
    assert plan.decided.tolist() == [True] * 5 + [False] * 95
    assert model.rows == 105
    lease_ms, confidence = planner(keys[5:], values[5:], 10 * S)
    assert (lease_ms == 290_000).all() and (confidence > 0).all()
    other = values[:1].copy()
    other["first_seen_ns"] = 9 * S
    assert planner(keys[:1], other, 10 * S)[0].tolist() == [0]  # unknown -> baseline


def test_level_change_forces_a_decision():
    keys, values = keys_values(4)
    planner = pr.PredictivePlanner(CFG, Fixed(100.0, 200.0, 400.0))
    planner.plan(keys, values, 0, np.ones(4, bool))
    values["level"][1] = 1
    plan = planner.plan(keys, values, S, np.ones(4, bool))
    assert plan.decided.tolist() == [False, True, False, False]


def test_rollout_outside_cohort_and_shadow():
    keys, values = keys_values(3)
    outside = replace(CFG, rollout=RolloutConfig(fraction=0.0))
    model = Fixed(100.0, 200.0, 400.0)
    planner = pr.PredictivePlanner(outside, model)
    for tick in range(3):
        plan = planner.plan(keys, values, tick * S, np.ones(3, bool))
        assert plan.publish.all() and (plan.lease_ms == 0).all()
    assert model.rows == 0 and planner.counts["baseline"] == 9
    shadow = replace(CFG, rollout=RolloutConfig(fraction=1.0, shadow=True))
    planner = pr.PredictivePlanner(shadow, Fixed(0.5, 0.8, 1.0))
    for tick in range(3):
        plan = planner.plan(keys, values, tick * S, np.ones(3, bool))
        assert plan.publish.all() and (plan.lease_ms == 0).all() and not plan.skipped.any()
    # would skip at 0 s only (then the initial lease is too short to wait: baseline)
    assert planner.counts["shadow_would_skip"] == 3 and planner.counts["skipped_renewals"] == 0


class OneLongLease:
    """A model predicting p90 400 s for the flow at row `long_row` of each batch, 20 s else."""

    def __init__(self, long_row: int) -> None:
        self.long_row = long_row

    def predict(self, features):
        p90 = np.where(np.arange(features.shape[0]) == self.long_row, 400.0, 20.0)
        return p90 / 4, p90 / 2, p90


def test_aggregate_lease_is_the_longest_member_lease():
    keys, values = keys_values(6)
    keys["client_addr"][3:] = wl.ipv4_mapped(10, 9, 9, 9)
    values["level"] = [1, 1, 1, 1, 1, 0]

    planner = pr.PredictivePlanner(CFG, OneLongLease(1))
    live = np.ones(6, bool)
    plan = planner.plan(keys, values, 0, live)
    agg = np.zeros(3, AGG_KEY_DTYPE)
    agg["masked"] = apply_masks(keys[[0, 3, 5]], 1)
    agg["level"] = 1
    agg["masked"]["vip_port"][2] = 9999  # no member: baseline, every cycle
    out = planner.aggregate_plan(agg, keys, values, plan, 0)
    assert out.lease_ms.tolist() == [300_000, 20_000, 0]
    assert out.publish.tolist() == [True, True, True]
    assert out.members.tolist() == [3, 2, 0]
    # the next k-1 = 2 cycles repeat the model leases with the same absolute expiry
    for tick in (1, 2):
        plan = planner.plan(keys, values, tick * S, live)
        out = planner.aggregate_plan(agg, keys, values, plan, tick * S)
        assert out.publish.tolist() == [True, True, True]
        assert out.lease_ms.tolist() == [300_000 - tick * 1000, 20_000 - tick * 1000, 0]
    # then nothing until the aggregate's own lease is due: only the memberless one goes out
    for tick in range(3, 16):
        plan = planner.plan(keys, values, tick * S, live)
        out = planner.aggregate_plan(agg, keys, values, plan, tick * S)
        assert out.publish.tolist() == [False, False, True], tick
    # the members' renewals at 10 s (20 s leases, renew at 20 - (k+1)T = 16 s at the latest)
    # planned expiries beyond the aggregate's 20 s: renewed when it has (k+1)T + T/2 left
    plan = planner.plan(keys, values, 16 * S, live)
    out = planner.aggregate_plan(agg, keys, values, plan, 16 * S)
    assert out.publish.tolist() == [False, True, True]
    assert out.lease_ms.tolist()[1] == 14_000  # member renewed at 10 s: expiry 30 s
    assert planner.counts["aggregate_repeats"] == 4


def test_a_new_member_of_a_leased_aggregate_needs_no_publish():
    """At level >= 1 the LB keeps no entry for a member (docs/lb.md "Aggregates"): a new flow
    joining an aggregate whose lease already outlasts the member's planned lease is published
    neither on its own (flows_to_publish keeps level 0 only) nor through its aggregate."""
    keys, values = keys_values(4)
    values["level"] = 1

    planner = pr.PredictivePlanner(CFG, OneLongLease(0))  # member 0 long, the others short
    agg = np.zeros(1, AGG_KEY_DTYPE)
    agg["masked"] = apply_masks(keys[:1], 1)
    agg["level"] = 1
    live = np.array([True, False, False, False])
    for tick in range(3):  # first publish + the k-1 repeats of the 300 s lease
        plan = planner.plan(keys, values, tick * S, live)
        assert planner.aggregate_plan(agg, keys, values, plan, tick * S).publish.tolist() == [True]
    values["first_seen_ns"][1:] = 5 * S
    live[1:] = True  # three new members at 5 s, 20 s leases: inside the aggregate's 300 s
    for tick in range(5, 40):
        plan = planner.plan(keys, values, tick * S, live)
        out = planner.aggregate_plan(agg, keys, values, plan, tick * S)
        assert out.publish.tolist() == [False], tick
        assert srv.flows_to_publish(values, live, "full").size == 0


# ---------------------------------------------------------------------------------------------
# model manager


@pytest.fixture(scope="module")
def history():
    return history_from_flows(wl.generate("mixed", 12_000, seed=11, window_s=600.0))


@pytest.fixture(scope="module")
def weak_model(history, tmp_path_factory):
    weak = TrainConfig(max_iter=1, correction_iter=1, max_leaf_nodes=2, correction_leaf_nodes=2)
    path = tmp_path_factory.mktemp("weak") / "weak.onnx"
    return export_onnx(train(history[:2000], seed=0, config=weak), path)


def test_broken_or_mismatched_model_file_refused(tmp_path):
    with pytest.raises(ConnpubError, match="no such model file"):
        pr.ModelManager(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model" * 20)
    with pytest.raises(ConnpubError, match="junk.onnx: not an ONNX model"):
        pr.ModelManager(junk)
    model = onnx.load_model(str(default_model_path()))
    for entry in model.metadata_props:
        if entry.key == META_PREFIX + "feature_version":
            entry.value = "7"
    other = tmp_path / "v7.onnx"
    onnx.save_model(model, str(other))
    with pytest.raises(ConnpubError, match="feature version '7'.*retrain"):
        pr.ModelManager(other)


def test_better_candidate_promoted_worse_rejected(history, weak_model, tmp_path):
    small = pr.RetrainConfig(min_flows=1000, train=TrainConfig(max_iter=20))
    manager = pr.ModelManager(weak_model, model_dir=tmp_path, retrain=small)
    result = manager.retrain_once(history)
    assert result.outcome == "promoted", result.reason
    assert result.candidate["mae"] < result.current["mae"]
    assert manager.version == 2 and manager.promotions == 1
    assert str(manager.predictor.path) == result.path
    weak_cfg = replace(small, train=TrainConfig(max_iter=1, correction_iter=1,
                                                max_leaf_nodes=2, correction_leaf_nodes=2))
    manager.retrain_config = weak_cfg
    manager.trainer = pr.default_trainer(weak_cfg)
    promoted_id = manager.model_id
    result = manager.retrain_once(history)
    assert result.outcome == "rejected" and "should_promote" in result.reason
    assert manager.version == 2 and manager.rejections == 1 and manager.model_id == promoted_id
    status = manager.status()
    assert status["version"] == 2 and status["promotions"] == 1 and status["rejections"] == 1


def test_broken_candidate_rejected_old_model_keeps_serving(history, tmp_path):
    def broken(records, out, version):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"\x08\x01garbage")
        return out

    manager = pr.ModelManager(None, model_dir=tmp_path, trainer=broken,
                              retrain=pr.RetrainConfig(min_flows=1000))
    before = manager.model_id
    result = manager.retrain_once(history)
    assert result.outcome == "rejected" and "not an ONNX model" in result.reason
    assert manager.model_id == before and manager.version == 1
    assert "not an ONNX model" in manager.status()["last_error"]
    features = pr.flow_features(*keys_values(5), 10 * S)
    assert manager.predict(features)[0].shape == (5,)
    skipped = manager.retrain_once(history[:10])
    assert skipped.outcome == "skipped" and manager.skipped == 1


def test_hot_swap_during_concurrent_predict(weak_model):
    manager = pr.ModelManager(None)
    models = [Predictor(weak_model), Predictor()]
    features = pr.flow_features(*keys_values(2000), 30 * S)
    expected = {id(m): m.predict(features)[2] for m in models + [manager.predictor]}
    errors, results = [], []
    stop = threading.Event()

    def serve():
        try:
            while not stop.is_set():
                results.append(manager.predict(features)[2])
        except Exception as err:  # noqa: BLE001 - the test reports it
            errors.append(err)

    workers = [threading.Thread(target=serve) for _ in range(2)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 10
    swaps = 0
    while swaps < 200 and time.monotonic() < deadline:
        manager.promote(models[swaps % 2])
        swaps += 1
    stop.set()
    for worker in workers:
        worker.join(10)
    assert not errors and swaps == 200 and manager.version == 201
    assert len(results) > 0
    for p90 in results:  # every batch is one model's answer, never a mix
        assert any(np.array_equal(p90, want) for want in expected.values())


def test_background_thread_refreshes_priors_and_retrains(history, tmp_path):
    folder = tmp_path / "history"
    append_history(history[:6000], folder)
    append_history(history[6000:], folder)
    (folder / "part-000002.parquet").write_bytes(b"PAR1 half written")  # skipped, not fatal
    config = pr.RetrainConfig(first_after_s=0.0, min_flows=1000, min_new_flows=1000,
                              priors_refresh_s=0.05, train=TrainConfig(max_iter=5))
    manager = pr.ModelManager(None, history_path=folder, retrain=config)
    manager.start()
    try:
        deadline = time.monotonic() + 60
        while manager.last_result is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        manager.stop()
    assert manager.last_result is not None
    assert manager.last_result.outcome in ("promoted", "rejected")
    assert manager.client_priors is not None and manager.client_priors.records == history.size
    assert manager.model_dir == tmp_path / "models"
    assert manager.status()["client_prior_records"] == history.size


def test_bench_predict_small():
    result = bench_predict(rows=20_000, history_flows=5_000)
    assert result["rows"] == 20_000 and result["quantiles"] == 3
    assert result["predictions_per_s"] > 0 and result["planner_first_tick_published"] > 0


# ---------------------------------------------------------------------------------------------
# the server agent in predictive / full mode


def _cycle_agent(mode: str, planner: pr.PredictivePlanner):
    """ServerAgent.build_cycle without maps (the object built around the pure parts)."""
    from connpub.agents import server as srv
    from connpub.config import PublishConfig

    agent = object.__new__(srv.ServerAgent)
    agent.cfg = replace(planner.cfg, publish=PublishConfig(mode=mode))
    agent.mode, agent.server_id = mode, 5
    agent.times = srv.FlowTimes(idle_timeout_ns=60 * S, linger_ns=3 * S)
    agent.planner, agent.lease_hook, agent.previous_cycle_ns = planner, planner, None
    agent.closed_repeats = srv.ClosedRepeats(lease_repeats(agent.cfg))
    return agent


def test_agent_predictive_cycle_publishes_only_what_the_plan_says():
    from connpub.protocol.wire import FLAG_CLOSED

    agent = _cycle_agent("predictive", pr.PredictivePlanner(CFG, Fixed(100.0, 200.0, 400.0)))
    keys, values = keys_values(3)
    no_aggs = np.zeros(0, AGG_KEY_DTYPE)
    no_agg_values = np.zeros(0, AGG_VALUE_DTYPE)
    for now in (0, S, 2 * S):
        values["last_seen_ns"] = min(now, S)
        entries, _, _ = agent.build_cycle(keys, values, no_aggs, no_agg_values, now)
        # the lease and its k-1 = 2 repeats with the same absolute expiry (300 s)
        assert entries["predicted_remaining_ms"].tolist() == [300_000 - now // MS] * 3
        assert (entries["confidence"] > 0).all() and (entries["level"] == 0).all()
    values["closed"][1] = 1  # FIN; its last packet at 1 s: lingers until 4 s
    entries, finished, _ = agent.build_cycle(keys, values, no_aggs, no_agg_values, 3 * S)
    assert len(entries) == 0 and len(finished) == 0  # renewal due at 150 s
    entries, finished, _ = agent.build_cycle(keys, values, no_aggs, no_agg_values, 5 * S)
    assert finished.tolist() == [1]
    assert len(entries) == 0  # the LB saw the client's FIN too: no CLOSED entry
    # flow 2 went silent at 1 s without FIN/RST: finished past the idle timeout (60 s) and,
    # the LB not knowing, published as CLOSED
    keys, values = keys[[0, 2]], values[[0, 2]]
    values["last_seen_ns"][0] = 62 * S
    entries, finished, _ = agent.build_cycle(keys, values, no_aggs, no_agg_values, 62 * S)
    assert finished.tolist() == [1]
    assert entries["key"]["client_port"].tolist() == [30002]
    assert entries["flags"].tolist() == [FLAG_CLOSED]
    assert entries["predicted_remaining_ms"].tolist() == [0]
    # the agent deleted the flow: the CLOSED goes out again in the next 2 cycles, then stops
    for now in (63 * S, 64 * S, 65 * S):
        values["last_seen_ns"][0] = now
        entries, _, _ = agent.build_cycle(keys[[0]], values[[0]], no_aggs, no_agg_values, now)
        expected = [] if now == 65 * S else [30002]
        assert entries["key"]["client_port"].tolist() == expected
        assert entries["flags"].tolist() == [FLAG_CLOSED] * len(expected)
    # a RESYNC answer (the lease hook) gives the remaining planned lease
    lease_ms, _ = agent.lease_hook(keys[[0]], values[[0]], 70 * S)
    assert lease_ms.tolist() == [230_000]


def test_agent_full_cycle_aggregate_leases():
    agent = _cycle_agent("full", pr.PredictivePlanner(CFG, Fixed(10.0, 20.0, 40.0)))
    keys, values = keys_values(3)
    values["level"] = [0, 1, 1]
    agg_keys = np.zeros(1, AGG_KEY_DTYPE)
    agg_keys["masked"] = apply_masks(keys[[1]], 1)
    agg_keys["level"] = 1
    agg_values = np.zeros(1, AGG_VALUE_DTYPE)
    agg_values["active_flows"] = 2
    entries, _, _ = agent.build_cycle(keys, values, agg_keys, agg_values, 0)
    assert entries["level"].tolist() == [0, 1]
    assert entries["predicted_remaining_ms"].tolist() == [40_000, 40_000]
    assert entries["flow_count"].tolist() == [1, 2]
    for now in (S, 2 * S):  # repeats of both, same absolute expiry
        entries, _, _ = agent.build_cycle(keys, values, agg_keys, agg_values, now)
        assert entries["predicted_remaining_ms"].tolist() == [40_000 - now // MS] * 2
    entries, _, _ = agent.build_cycle(keys, values, agg_keys, agg_values, 5 * S)
    assert len(entries) == 0  # every member's renewal is at 20 s


def test_agent_refuses_a_broken_model_before_opening_anything(tmp_path):
    from connpub.agents.server import ServerAgent
    from connpub.config import ModelConfig, PublishConfig
    from connpub.datapath.clock import DatapathClock

    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not a model" * 20)
    clock = DatapathClock(hz=250, offset_ns=0, boot_id="test")
    cfg = Config(publish=PublishConfig(mode="predictive"), model=ModelConfig(path=str(junk)))
    with pytest.raises(ConnpubError, match="model.onnx: not an ONNX model"):
        ServerAgent(cfg, tmp_path / "pins", key=bytes(32), clock=clock, history_path="")
    good = replace(cfg, model=ModelConfig(path=""))  # the model loads; then the maps are missing
    with pytest.raises(ConnpubError, match="no server map"):
        ServerAgent(good, tmp_path / "pins", key=bytes(32), clock=clock, history_path="")


@pytest.mark.root
def test_agent_predictive_tick_on_real_maps(tmp_path):
    import uuid

    from connpub.agents.common import AgentSocket
    from connpub.agents.server import ServerAgent
    from connpub.config import AgentConfig, LivenessConfig, PublishConfig
    from connpub.datapath import loader
    from connpub.datapath.clock import datapath_clock
    from connpub.protocol.wire import Decoder
    from datapath_fixtures import scratch

    key = bytes(range(32))
    receiver = AgentSocket("127.0.0.1", 0)
    with scratch("server") as prog:
        loader.init_server_maps(prog.pin_dir)
        cfg = replace(CFG, publish=PublishConfig(interval_s=1.0, mode="predictive"),
                      liveness=LivenessConfig(tcp="packets"),  # synthetic flows: no sockets
                      agent=AgentConfig(server_id=4, lb_addresses=("127.0.0.1",),
                                        listen_port=receiver.sock.getsockname()[1],
                                        metrics_port=0, history_path=str(tmp_path / "h")))
        agent = ServerAgent(cfg, prog.pin_dir, key=key, iface=f"t{uuid.uuid4().hex[:6]}",
                            agent_socket=AgentSocket("127.0.0.1", 0))
        try:
            assert isinstance(agent.planner, pr.PredictivePlanner)
            assert agent.planner.models.version == 1
            agent.planner.models = Fixed(100.0, 200.0, 400.0)
            now = datapath_clock().now_ns()
            keys, values = keys_values(4, first_seen_ns=now - 5 * S)
            values["last_seen_ns"] = now
            with prog.open("flows") as flows:
                flows.update_batch(keys, values)
            first = agent.tick()
            second = agent.tick()
            assert (first["entries"], second["entries"]) == (4, 0)
            got, deadline = [], time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                got += receiver.drain()
            decoded = Decoder(key, max_lease_ms=300_000).decode(got[0][0])
            assert decoded.accepted
            assert decoded.entries["predicted_remaining_ms"].tolist() == [300_000] * 4
            status = agent.status()["predictive"]
            assert status["tracked"] == 4 and status["counts"]["decisions"] == 4
        finally:
            agent.status_file.unlink(missing_ok=True)
            agent.close()
            receiver.close()
