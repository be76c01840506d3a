"""The LB's level pipeline (docs/policy.md, "Level pipeline"): per traffic class, history ->
controller with hysteresis -> map pressure -> rollout, one evaluation per call. The LB agent and
the simulator drive the same LevelPipeline object with the same signals, all of which the LB
can measure from its own maps:
- bytes seen and new flows of each class since the last evaluation,
- active flows: connections holding a valid lease (policy.coverage),
- duration: the mean age of those connections (the LB sees no flow ends; a class of long
  flows has old live connections),
- occupancy: valid connections / the connection table's capacity."""

from __future__ import annotations

import numpy as np

from connpub.config import Config
from connpub.policy.granularity import (
    ClassHistory,
    GranularityController,
    apply_map_pressure,
    determine_granularity_level,
    spread_caps,
)
from connpub.policy.rollout import RolloutDecision, rollout_levels

NS_PER_S = 1_000_000_000


def class_activity(class_row: np.ndarray, created_ns: np.ndarray, now_ns: int, classes: int,
                   members: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(active flows, mean age in s: NaN if none) per class row, of the valid connections given
    (class_row: their class, created_ns: when the LB created each), plus `members` (per class:
    member flows of valid aggregates the LB forwards without a connection entry, and the sum
    of their ages in s)."""
    rows = np.asarray(class_row, np.int64)
    active = np.bincount(rows, minlength=classes).astype(np.int64)
    ages = np.maximum(np.int64(now_ns) - np.asarray(created_ns).astype(np.int64), 0) / NS_PER_S
    age_sum = np.bincount(rows, weights=ages, minlength=classes)
    if members is not None:
        active = active + np.asarray(members[0], np.int64)
        age_sum = age_sum + np.asarray(members[1], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_age = np.where(active > 0, age_sum / np.maximum(active, 1), np.nan)
    return active, mean_age


class LevelPipeline:
    """History -> spread cap -> controller -> map pressure -> rollout. Rows are class rows the
    caller keeps (they may grow); `evaluate` takes every row's signals and returns the decision
    for `rows` (default: all), whose class keys are given."""

    def __init__(self, cfg: Config, capacity: int = 0) -> None:
        self.cfg = cfg
        self.history = ClassHistory(cfg.granularity.history_half_life_s, capacity)
        self.controller = GranularityController(cfg.granularity, capacity)
        self.loads: np.ndarray | None = None  # EWMA of the what-if loads (history's weight)
        self.caps: np.ndarray | None = None  # the latest spread caps, per row

    def _smoothed_loads(self, now_ns: int, loads: np.ndarray) -> np.ndarray:
        loads = np.asarray(loads, np.float64)
        previous, last_ns = self.loads, self.history.last_ns
        if previous is not None and previous.shape[1:] != loads.shape[1:]:
            previous = None
        if previous is not None and previous.shape[0] < loads.shape[0]:
            previous = np.concatenate([previous, loads[previous.shape[0]:]])
        if previous is None or previous.shape != loads.shape or last_ns is None:
            self.loads = loads.copy()
        else:
            elapsed_s = max(now_ns - last_ns, 0) / NS_PER_S
            weight = 1.0 - 2.0 ** (-elapsed_s / self.history.half_life_s)
            self.loads = previous + weight * (loads - previous)
        return self.loads

    def evaluate(self, now_ns: int, class_keys: np.ndarray, bytes_seen: np.ndarray,
                 new_flows: np.ndarray, active_flows: np.ndarray, mean_age_s: np.ndarray,
                 occupancy: float, rows: np.ndarray | None = None,
                 loads: np.ndarray | None = None, groups: np.ndarray | None = None,
                 members: np.ndarray | None = None,
                 units: np.ndarray | None = None) -> RolloutDecision:
        """loads: policy.granularity.what_if_loads of every row (None: no spread bound);
        groups, members, units: the service of each row, the backends of each service and the
        rows refined together (spread_caps)."""
        history = self.history
        smoothed = None if loads is None else self._smoothed_loads(now_ns, loads)
        history.update(now_ns, bytes_seen, new_flows, active_flows, mean_age_s)
        gran = self.cfg.granularity
        cap = None
        if smoothed is not None:
            wanted = determine_granularity_level(history.bandwidth, history.duration,
                                                 history.frequency, gran)
            size = len(wanted)
            known = self.controller.levels[:size] if len(self.controller.levels) >= size \
                else np.full(size, gran.initial_level, np.uint8)
            no_data = np.isnan(history.bandwidth) | np.isnan(history.duration) \
                | np.isnan(history.frequency)
            wanted = np.where(no_data[:size], known, wanted)
            cap = spread_caps(wanted, smoothed[:size], gran.max_spread, groups, members, known,
                              units)
            # hysteresis: a class below its cap coarsens back only if a bound tighter by
            # hysteresis_margin of the excess over 1 allows it too, so the spread hovering
            # around max_spread does not move a class every evaluation
            tight = 1.0 + (gran.max_spread - 1.0) * (1.0 - gran.hysteresis_margin)
            strict = spread_caps(wanted, smoothed[:size], tight, groups, members, known, units)
            cap = np.minimum(cap, np.maximum(known, strict)).astype(np.uint8)
            self.caps = cap
        proposed = self.controller.evaluate(history.bandwidth, history.duration,
                                            history.frequency, cap)
        if rows is not None:
            proposed = proposed[rows]
        proposed = apply_map_pressure(proposed, occupancy, gran.map_pressure)
        return rollout_levels(class_keys, proposed, self.cfg.rollout)
