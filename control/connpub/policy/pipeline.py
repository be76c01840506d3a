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
from connpub.policy.granularity import ClassHistory, GranularityController, apply_map_pressure
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
    """History -> controller -> map pressure -> rollout. Rows are class rows the caller keeps
    (they may grow); `evaluate` takes every row's signals and returns the decision for `rows`
    (default: all), whose class keys are given."""

    def __init__(self, cfg: Config, capacity: int = 0) -> None:
        self.cfg = cfg
        self.history = ClassHistory(cfg.granularity.history_half_life_s, capacity)
        self.controller = GranularityController(cfg.granularity, capacity)

    def evaluate(self, now_ns: int, class_keys: np.ndarray, bytes_seen: np.ndarray,
                 new_flows: np.ndarray, active_flows: np.ndarray, mean_age_s: np.ndarray,
                 occupancy: float, rows: np.ndarray | None = None) -> RolloutDecision:
        history = self.history
        history.update(now_ns, bytes_seen, new_flows, active_flows, mean_age_s)
        proposed = self.controller.evaluate(history.bandwidth, history.duration,
                                            history.frequency)
        if rows is not None:
            proposed = proposed[rows]
        proposed = apply_map_pressure(proposed, occupancy, self.cfg.granularity.map_pressure)
        return rollout_levels(class_keys, proposed, self.cfg.rollout)
