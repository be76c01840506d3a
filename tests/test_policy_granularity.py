"""Granularity policy on a simulated clock: level rule, the seed's order, history, hysteresis."""

from __future__ import annotations

import dataclasses

import numpy as np
from connpub.config import GranularityConfig
from connpub.policy.granularity import (
    ClassHistory,
    GranularityController,
    apply_map_pressure,
    determine_granularity_level,
    map_pressure_min_level,
)
from hypothesis import given, settings
from hypothesis import strategies as st

CFG = GranularityConfig()  # bw 1e3 < 1e4 < 1e5; freq 0.1 < 1 < 10; duration 10 < 60 < 300
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
