"""Granularity policy on a simulated clock: level rule, the seed's order, history, hysteresis."""

from __future__ import annotations

import dataclasses

import numpy as np
from connpub.config import GranularityConfig
from connpub.policy.granularity import (
    ClassHistory,
    GranularityController,
    aggregate_units,
    apply_map_pressure,
    backend_spread,
    determine_granularity_level,
    flow_holding,
    map_pressure_min_level,
    spread_caps,
    what_if_loads,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# the seed's thresholds (the defaults before issue 11): bw 1e3 < 1e4 < 1e5; freq 0.1 < 1 < 10;
# duration 10 < 60 < 300; a new class starts at level 0
CFG = GranularityConfig(bandwidth_very_low=1e3, bandwidth_low=1e4, bandwidth_medium=1e5,
                        frequency_very_low=0.1, frequency_low=1.0, frequency_medium=10.0,
                        duration_long_s=10.0, duration_very_long_s=60.0,
                        duration_extreme_long_s=300.0, initial_level=0)
S = 1_000_000_000

# (bandwidth bytes/s per flow, duration s, new flows/s) -> expected level with coarsest_first
L3 = (500.0, 400.0, 0.05)
L2 = (50_000.0, 100.0, 5.0)
L1 = (5_000.0, 20.0, 0.5)
L0 = (500_000.0, 1.0, 50.0)


def levels(*rows, order=None):
    bandwidth, duration, frequency = (np.array(column) for column in zip(*rows, strict=True))
    return determine_granularity_level(bandwidth, duration, frequency, CFG, order).tolist()


def test_coarsest_first_picks_each_level():
    assert levels(L3, L2, L1, L0) == [3, 2, 1, 0]
    assert levels((np.nan, 400.0, 0.05)) == [0]  # no data: flow level


def test_literal_order_never_reaches_level_3():
    assert levels(L3, L2, L1, L0, order="literal") == [1, 2, 1, 0]


@settings(max_examples=300, deadline=None)
@given(bandwidth=st.floats(0, 1e6), duration=st.floats(0, 1e4), frequency=st.floats(0, 100))
def test_literal_order_with_ordered_thresholds_never_chooses_level_3(bandwidth, duration,
                                                                     frequency):
    literal = levels((bandwidth, duration, frequency), order="literal")[0]
    assert literal != 3
    coarsest = levels((bandwidth, duration, frequency))[0]
    if coarsest == 3:
        assert literal == 1  # every level-3 class meets level 1 first


def test_literal_order_reaches_level_3_only_with_unnatural_thresholds():
    odd = dataclasses.replace(CFG, bandwidth_low=100.0, duration_very_long_s=1000.0)
    result = determine_granularity_level(np.array([500.0]), np.array([400.0]), np.array([0.05]),
                                         odd, "literal")
    assert result.tolist() == [3]


def test_class_history_rates_and_ewma():
    history = ClassHistory(half_life_s=10.0)
    nan = np.nan
    history.update(0, np.array([0, 0]), np.array([0, 0]), np.array([0, 0]), np.array([nan, 30.0]))
    assert np.isnan(history.bandwidth).all() and history.duration.tolist()[1] == 30.0
    history.update(2 * S, np.array([4000, 0]), np.array([4, 1]), np.array([2, 0]),
                   np.array([nan, nan]))
    assert history.bandwidth.tolist() == [1000.0, 0.0]  # 4000 B / 2 s / 2 flows
    assert history.frequency.tolist() == [2.0, 0.5]
    history.update(12 * S, np.array([0, 0]), np.array([0, 0]), np.array([1, 1]),
                   np.array([nan, 10.0]))
    assert history.bandwidth.tolist() == [500.0, 0.0]  # one half-life: halfway to 0
    assert history.frequency.tolist() == [1.0, 0.25]
    assert history.duration.tolist()[1] == 20.0
    history.update(13 * S, np.zeros(3), np.zeros(3), np.zeros(3), np.full(3, nan))  # new class
    assert len(history.bandwidth) == 3 and history.bandwidth[2] == 0.0


def run(controller, rows):
    return [controller.evaluate(*(np.array([value]) for value in row)).tolist()[0]
            for row in rows]


def test_coarsening_waits_for_agreeing_evaluations():
    controller = GranularityController(CFG)  # hysteresis_evaluations = 3
    assert run(controller, [L3, L3, L3, L3]) == [0, 0, 3, 3]
    assert run(GranularityController(CFG), [L3, L2, L3, L3, L3]) == [0, 0, 0, 0, 3]


def test_refining_is_immediate_unless_within_margin():
    controller = GranularityController(dataclasses.replace(CFG, hysteresis_evaluations=1))
    assert run(controller, [L1]) == [1]
    just_over = (CFG.bandwidth_low * 1.1, 20.0, 0.5)  # 10 % over, margin is 20 %
    assert run(controller, [just_over, just_over]) == [1, 1]
    assert run(controller, [L0]) == [0]


def test_no_flapping_around_a_threshold():
    controller = GranularityController(CFG)
    below, above = (9_500.0, 20.0, 0.5), (10_500.0, 20.0, 0.5)
    history = run(controller, [below, below, below] + [above, below] * 10)
    assert history == [0, 0, 1] + [1] * 20
    assert run(GranularityController(CFG), [above, below] * 10) == [0] * 20


def test_controller_is_vectorised_and_grows():
    controller = GranularityController(dataclasses.replace(CFG, hysteresis_evaluations=1))
    rows = np.array([L3, L2, L1, L0]).T
    assert controller.evaluate(*rows).tolist() == [3, 2, 1, 0]
    rows = np.array([L3, L2, L1, L0, L3]).T
    assert controller.evaluate(*rows).tolist() == [3, 2, 1, 0, 3]


def test_map_pressure():
    thresholds = CFG.map_pressure  # 0.75, 0.85, 0.95
    assert [map_pressure_min_level(x, thresholds) for x in (0.1, 0.75, 0.9, 0.99, 1.0)] == [
        0, 1, 2, 3, 3]
    assert apply_map_pressure(np.array([0, 1, 3], np.uint8), 0.9, thresholds).tolist() == [2, 2, 3]


def test_new_class_starts_at_initial_level_and_keeps_it_without_data():
    controller = GranularityController(dataclasses.replace(CFG, initial_level=3))
    nan = (np.nan, np.nan, np.nan)
    assert run(controller, [nan, nan]) == [3, 3]  # no data: the initial level, no change
    assert run(controller, [L0]) == [0]  # data: refining is immediate
    assert run(GranularityController(CFG), [nan]) == [0]


def test_cap_refines_at_once_and_coarsening_waits():
    controller = GranularityController(CFG)  # hysteresis_evaluations = 3
    row = [np.array([value]) for value in L3]
    assert [controller.evaluate(*row).tolist()[0] for _ in range(3)] == [0, 0, 3]
    assert controller.evaluate(*row, cap=np.array([1])).tolist() == [1]  # within margin: yet
    results = [controller.evaluate(*row, cap=np.array([3])).tolist()[0] for _ in range(3)]
    assert results == [1, 1, 3]


def test_backend_spread():
    assert backend_spread(np.array([3.0, 1.0, 1.0, 3.0])) == 1.5
    assert backend_spread(np.zeros(4)) == 1.0
    assert backend_spread(np.array([2.0, 2.0])) == 1.0


def test_what_if_loads_known_levels_and_even_below():
    # class 0: a connection (every level known), class 1: an aggregate of 4 flows at level 2
    backend_at = np.array([[0, 1, 2, 3], [0, 0, 1, 1]])
    loads = what_if_loads(np.array([0, 1]), np.array([1.0, 4.0]), np.array([0, 2]), backend_at,
                          classes=2, backends=4)
    assert loads[0].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert loads[1].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 4, 0, 0], [0, 4, 0, 0]]


def _loads(rows):
    """(classes, 4, backends) from per-class {level: load vector}."""
    out = np.zeros((len(rows), 4, len(next(iter(rows[0].values())))))
    for c, per_level in enumerate(rows):
        for level, load in per_level.items():
            out[c, level] = load
    return out


def test_spread_caps_cheapest_sufficient_step():
    even = [1, 1, 1, 1]
    loads = _loads([
        {3: [40, 0, 0, 0], 2: [10, 10, 10, 10]},  # big and skewed at level 3
        {3: [0, 8, 0, 0], 2: [2, 2, 2, 2]},  # small and skewed
        {3: [0, 0, 10, 10], 2: [5, 5, 5, 5]},
        {3: even, 2: even},
    ])
    proposed = np.array([3, 3, 3, 3])
    # all at 3: backends 41, 9, 11, 11 -> 2.23; only refining class 0 gets within 1.3
    assert spread_caps(proposed, loads, 1.3).tolist() == [2, 3, 3, 3]
    assert spread_caps(proposed, loads, 1000.0).tolist() == [3, 3, 3, 3]  # no bound
    assert spread_caps(np.array([2, 3, 3, 3]), loads, 1.3).tolist() == [2, 3, 3, 3]
    # base class C even; A (4 flows) and B (8) both skewed onto backend 0:
    # at 3: 22, 10, 10, 10 (1.69); refining A -> 19, 11, 11, 11 (1.46), B -> 16, 12, 12, 12 (1.23)
    loads = _loads([{3: [10, 10, 10, 10], 2: [10, 10, 10, 10]},
                    {3: [4, 0, 0, 0], 2: [1, 1, 1, 1]},
                    {3: [8, 0, 0, 0], 2: [2, 2, 2, 2]}])
    assert spread_caps(np.array([3, 3, 3]), loads, 1.5).tolist() == [3, 2, 3]  # A: cheaper
    assert spread_caps(np.array([3, 3, 3]), loads, 1.3).tolist() == [3, 3, 2]  # only B does
    assert spread_caps(np.array([3, 3, 3]), loads, 1.0).tolist() == [3, 2, 2]  # B, then A


def test_spread_caps_stops_when_nothing_helps_and_per_service():
    loads = _loads([{3: [10, 0], 2: [10, 0], 1: [10, 0], 0: [10, 0]}])  # one client
    assert spread_caps(np.array([3]), loads, 1.3).tolist() == [3]
    # two services over columns {0, 1} and {2, 3}: only service 1 is skewed
    loads = _loads([
        {3: [5, 5, 0, 0], 2: [5, 5, 0, 0]},
        {3: [0, 0, 10, 0], 2: [0, 0, 5, 5]},
    ])
    members = np.array([[True, True, False, False], [False, False, True, True]])
    caps = spread_caps(np.array([3, 3]), loads, 1.3, groups=np.array([0, 1]), members=members)
    assert caps.tolist() == [3, 2]


def test_spread_caps_sticks_to_the_class_already_refined():
    # A and B carry the same skew; either refinement suffices: the lighter (A) unless B is
    # the one already refined
    loads = _loads([{3: [10, 10, 10, 10], 2: [10, 10, 10, 10]},
                    {3: [8, 0, 0, 0], 2: [2, 2, 2, 2]},
                    {3: [9, 0, 0, 0], 2: [2.25, 2.25, 2.25, 2.25]}])
    # at 3: 27, 10, 10, 10 (1.89); refining A: 21, 12, 12, 12 (1.47); B: 20.25, 12.25, ... (1.42)
    proposed = np.array([3, 3, 3])
    assert spread_caps(proposed, loads, 1.5).tolist() == [3, 2, 3]
    assert spread_caps(proposed, loads, 1.5, current=np.array([3, 3, 2])).tolist() == [3, 3, 2]
    assert spread_caps(proposed, loads, 1.5, current=np.array([3, 2, 3])).tolist() == [3, 2, 3]


def test_spread_caps_refines_a_unit_together_and_units_of_class_keys():
    from connpub.datapath.abi import CLASS_KEY_DTYPE
    keys = np.zeros(4, CLASS_KEY_DTYPE)
    keys["vip_addr"][:, 15] = [1, 1, 1, 2]
    keys["vip_port"] = [443, 80, 443, 443]
    keys["proto"] = [6, 6, 17, 6]
    units = aggregate_units(keys)
    assert units[0] == units[1] and len(set(units.tolist())) == 3  # same address and protocol
    loads = _loads([{3: [30, 0, 0, 0], 2: [8, 8, 7, 7]},  # 443/tcp of VIP 1: skewed
                    {3: [4, 0, 0, 0], 2: [1, 1, 1, 1]},  # 80/tcp of VIP 1
                    {3: [0, 10, 10, 10], 2: [0, 10, 10, 10]},
                    {3: [10, 10, 10, 0], 2: [10, 10, 10, 0]}])
    proposed = np.array([3, 3, 3, 3])
    assert spread_caps(proposed, loads, 1.3).tolist() == [2, 3, 3, 3]
    assert spread_caps(proposed, loads, 1.3, units=units).tolist() == [2, 2, 3, 3]


def test_flow_holding_starts_at_pressure_and_holds_a_level_change_back_for_the_head_start():
    """docs/lb.md "Held flows": rows = (a) level 0, no change, occupancy below the hold
    fraction of the first threshold; the same at/above it: (b) with connections, (c) without;
    (d) changing level, not holding yet; (e) changing, holding for less than the head start;
    (f) changing, holding for longer; (g) changing, holding since before the agent (0)."""
    thresholds, head = (0.4, 0.6, 0.9), 1_000
    now = 10_000
    current = np.zeros(7, np.uint8)
    wanted = np.array([0, 0, 0, 2, 2, 2, 2], np.uint8)
    holding = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    active = np.array([5, 5, 0, 5, 5, 5, 5])
    since = np.array([0, 0, 0, 0, now - head + 1, now - head, 0], np.int64)
    start, pressure, wait = flow_holding(current, wanted, holding, active, since, now, 0.19,
                                         thresholds, 0.5, head)
    assert start.tolist() == [False, False, False, True, False, False, False]
    assert not pressure.any()
    assert wait.tolist() == [False, False, False, True, True, False, False]
    start, pressure, wait = flow_holding(current, wanted, holding, active, since, now, 0.2,
                                         thresholds, 0.5, head)
    assert start.tolist() == [True, True, False, True, False, False, False]
    assert pressure.tolist() == [True, True, False, True, True, True, True]
    assert wait.tolist() == [False, False, False, True, True, False, False]
    # no head start (baseline and predictive modes never change level): only a class that
    # starts holding now waits, one evaluation
    _, _, wait = flow_holding(current, wanted, holding, active, since, now, 0.2, thresholds,
                              0.5, 0)
    assert wait.tolist() == [False, False, False, True, False, False, False]
