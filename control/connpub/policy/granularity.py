"""Adaptive granularity (docs/policy.md): per-class history, the level rule, hysteresis and map
pressure. Pure: time is passed in, everything works on numpy arrays indexed by class."""

from __future__ import annotations

import math

import numpy as np

from connpub.config import GranularityConfig
from connpub.datapath.masks import LEVEL_COUNT


class ClassHistory:
    """Exponentially weighted per-class statistics. Class i is row i; the caller keeps the map
    class key -> row. NaN means "no observation yet" (such a class stays at level 0).

    - bandwidth: bytes/s per active flow of the class
    - duration: seconds, mean duration of the class's flows as observed by the caller
    - frequency: new flows/s of the class
    """

    def __init__(self, half_life_s: float, capacity: int = 0) -> None:
        self.half_life_s = half_life_s
        self.last_ns: int | None = None
        self.bandwidth = np.full(capacity, np.nan)
        self.duration = np.full(capacity, np.nan)
        self.frequency = np.full(capacity, np.nan)

    def _grow(self, size: int) -> None:
        extra = size - len(self.bandwidth)
        if extra > 0:
            pad = np.full(extra, np.nan)
            self.bandwidth = np.concatenate([self.bandwidth, pad])
            self.duration = np.concatenate([self.duration, pad])
            self.frequency = np.concatenate([self.frequency, pad])

    def update(self, now_ns: int, bytes_seen: np.ndarray, new_flows: np.ndarray,
               active_flows: np.ndarray, duration_s: np.ndarray) -> None:
        """Fold in what every class did since the previous update (arrays of equal length, one
        entry per class row; duration_s may be NaN where nothing was observed). The first call
        only starts the clock for the rates."""
        size = len(bytes_seen)
        self._grow(size)
        duration_s = np.asarray(duration_s, dtype=np.float64)
        if self.last_ns is not None and now_ns > self.last_ns:
            elapsed_s = (now_ns - self.last_ns) / 1e9
            weight = 1.0 - math.exp(-math.log(2) * elapsed_s / self.half_life_s)
            flows = np.maximum(np.asarray(active_flows, dtype=np.float64), 1.0)
            bandwidth = np.asarray(bytes_seen, dtype=np.float64) / elapsed_s / flows
            frequency = np.asarray(new_flows, dtype=np.float64) / elapsed_s
            self.bandwidth[:size] = _ewma(self.bandwidth[:size], bandwidth, weight)
            self.frequency[:size] = _ewma(self.frequency[:size], frequency, weight)
        else:
            weight = 1.0
        seen = ~np.isnan(duration_s)
        self.duration[:size][seen] = _ewma(self.duration[:size][seen], duration_s[seen], weight)
        if self.last_ns is None or now_ns > self.last_ns:
            self.last_ns = now_ns


def _ewma(old: np.ndarray, new: np.ndarray, weight: float) -> np.ndarray:
    return np.where(np.isnan(old), new, old + weight * (new - old))


def level_conditions(bandwidth: np.ndarray, duration: np.ndarray, frequency: np.ndarray,
                     t: GranularityConfig, slack: float = 0.0) -> list[np.ndarray]:
    """[cond_level1, cond_level2, cond_level3] of the seed's rules; `slack` relaxes every
    threshold by that fraction (used by hysteresis). NaN never meets a condition."""
    loose, tight = 1.0 + slack, 1.0 - slack
    bandwidth, duration, frequency = (np.asarray(a, dtype=np.float64)
                                      for a in (bandwidth, duration, frequency))
    return [
        (bandwidth < t.bandwidth_low * loose) & (duration > t.duration_long_s * tight)
        & (frequency < t.frequency_low * loose),
        (bandwidth < t.bandwidth_medium * loose) & (duration > t.duration_very_long_s * tight)
        & (frequency < t.frequency_medium * loose),
        (bandwidth < t.bandwidth_very_low * loose) & (duration > t.duration_extreme_long_s * tight)
        & (frequency < t.frequency_very_low * loose),
    ]


def determine_granularity_level(bandwidth: np.ndarray, duration: np.ndarray,
                                frequency: np.ndarray, thresholds: GranularityConfig,
                                order: str | None = None) -> np.ndarray:
    """Level (uint8) per class. order "coarsest_first" (default) tests level 3, 2, 1, then 0;
    "literal" tests 1, 2, 3 as the seed does, so with ordered thresholds level 3 never wins."""
    order = thresholds.order if order is None else order
    cond1, cond2, cond3 = level_conditions(bandwidth, duration, frequency, thresholds)
    if order == "coarsest_first":
        chosen = np.select([cond3, cond2, cond1], [3, 2, 1], 0)
    elif order == "literal":
        chosen = np.select([cond1, cond2, cond3], [1, 2, 3], 0)
    else:
        raise ValueError(f"unknown order {order!r}")
    return chosen.astype(np.uint8)


class GranularityController:
    """Levels per class with hysteresis:
    - coarsening (fewer entries, less precise) waits until the same coarser level has been
      proposed `hysteresis_evaluations` times in a row;
    - refining (the safe direction) is immediate, unless the class still meets its current
      level's conditions with every threshold relaxed by `hysteresis_margin`.
    So a class whose metrics hover around a threshold does not flap every evaluation."""

    def __init__(self, cfg: GranularityConfig, capacity: int = 0) -> None:
        self.cfg = cfg
        self.levels = np.zeros(capacity, np.uint8)
        self.candidate = np.zeros(capacity, np.uint8)
        self.streak = np.zeros(capacity, np.int32)

    def evaluate(self, bandwidth: np.ndarray, duration: np.ndarray,
                 frequency: np.ndarray) -> np.ndarray:
        """One evaluation over all classes; returns (and keeps) the new levels."""
        size = len(bandwidth)
        if size > len(self.levels):
            extra = size - len(self.levels)
            self.levels = np.concatenate([self.levels, np.zeros(extra, np.uint8)])
            self.candidate = np.concatenate([self.candidate, np.zeros(extra, np.uint8)])
            self.streak = np.concatenate([self.streak, np.zeros(extra, np.int32)])
        current = self.levels[:size]
        proposed = determine_granularity_level(bandwidth, duration, frequency, self.cfg)
        relaxed = level_conditions(bandwidth, duration, frequency, self.cfg,
                                   self.cfg.hysteresis_margin)
        still_ok = np.select([current == 1, current == 2, current == 3], relaxed, True)
        refine = (proposed < current) & ~still_ok
        coarsen = proposed > current
        same = coarsen & (proposed == self.candidate[:size])
        streak = np.where(coarsen, np.where(same, self.streak[:size] + 1, 1), 0)
        apply = coarsen & (streak >= self.cfg.hysteresis_evaluations)
        new_levels = np.where(refine | apply, proposed, current).astype(np.uint8)
        self.candidate[:size] = np.where(coarsen, proposed, new_levels)
        self.streak[:size] = np.where(apply, 0, streak)
        self.levels[:size] = new_levels
        return new_levels.copy()


def map_pressure_min_level(occupancy: float, thresholds: tuple[float, ...]) -> int:
    """Coarsest level forced by table occupancy (0..1): one level per threshold reached."""
    return min(int(np.searchsorted(np.asarray(thresholds), occupancy, side="right")),
               LEVEL_COUNT - 1)


def apply_map_pressure(levels: np.ndarray, occupancy: float,
                       thresholds: tuple[float, ...]) -> np.ndarray:
    """Raise every class to at least the level that the occupancy forces."""
    return np.maximum(levels, map_pressure_min_level(occupancy, thresholds)).astype(np.uint8)
