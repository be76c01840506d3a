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
        self.levels = np.full(capacity, cfg.initial_level, np.uint8)
        self.candidate = self.levels.copy()
        self.streak = np.zeros(capacity, np.int32)

    def evaluate(self, bandwidth: np.ndarray, duration: np.ndarray,
                 frequency: np.ndarray, cap: np.ndarray | None = None) -> np.ndarray:
        """One evaluation over all classes; returns (and keeps) the new levels. A class with no
        data yet (any signal NaN) keeps its level: `initial_level` for a new row. `cap` (per
        class, e.g. spread_caps): the proposal never exceeds it, and a class above its cap
        refines at once (no hysteresis margin)."""
        size = len(bandwidth)
        if size > len(self.levels):
            extra = size - len(self.levels)
            start = np.full(extra, self.cfg.initial_level, np.uint8)
            self.levels = np.concatenate([self.levels, start])
            self.candidate = np.concatenate([self.candidate, start])
            self.streak = np.concatenate([self.streak, np.zeros(extra, np.int32)])
        current = self.levels[:size]
        proposed = determine_granularity_level(bandwidth, duration, frequency, self.cfg)
        no_data = np.isnan(np.asarray(bandwidth, np.float64)) | np.isnan(
            np.asarray(duration, np.float64)) | np.isnan(np.asarray(frequency, np.float64))
        proposed = np.where(no_data, current, proposed)
        forced = np.zeros(size, bool)
        if cap is not None:
            cap = np.asarray(cap)[:size]
            forced = cap < current
            proposed = np.minimum(proposed, cap)
        relaxed = level_conditions(bandwidth, duration, frequency, self.cfg,
                                   self.cfg.hysteresis_margin)
        still_ok = np.select([current == 1, current == 2, current == 3], relaxed, True) \
            & ~forced
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


def flow_holding(current: np.ndarray, wanted: np.ndarray, holding: np.ndarray,
                 active: np.ndarray, held_since_ns: np.ndarray, now_ns: int, occupancy: float,
                 thresholds: tuple[float, ...], hold_from: float,
                 head_start_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """docs/lb.md "Held flows": which classes start holding their connections, which hold them
    because of the pressure, and which keep their current level for now. Per class:
    - under pressure: it has connections and the table occupancy reached hold_from x the first
      map-pressure threshold (the LRU evicts live entries long before the table is full);
    - start: not holding yet, and under pressure or about to change level with connections;
    - wait: about to change level with connections, but not holding for head_start_ns yet
      (held_since_ns: when it started, 0 = long ago), so every live connection is re-made by a
      packet or published meanwhile, and copied into `held`, before its class changes level.
    Returns (start, under_pressure, wait) as bool arrays."""
    with_conns = np.asarray(active) > 0
    changing = (np.asarray(wanted) != np.asarray(current)) & with_conns
    under_pressure = with_conns & (occupancy >= hold_from * thresholds[0])
    start = ~np.asarray(holding, bool) & (under_pressure | changing)
    since = np.where(start, now_ns, np.asarray(held_since_ns, np.int64))
    wait = changing & (start | (now_ns - since < head_start_ns))
    return start, under_pressure, wait


def backend_spread(load: np.ndarray) -> float:
    """max / mean of the connections per backend given (the backends of one service, idle ones
    included); 1.0 without load."""
    load = np.asarray(load, np.float64)
    total = load.sum()
    return float(load.max() * load.size / total) if load.size and total > 0 else 1.0


def what_if_loads(class_row: np.ndarray, weight: np.ndarray, known_level: np.ndarray,
                  backend_at: np.ndarray, classes: int, backends: int) -> np.ndarray:
    """(classes, LEVEL_COUNT, backends) connections per backend of each class if the class were
    at each level, from what the LB holds: one row per connection (weight 1, known_level 0) or
    aggregate own entry (weight = its flow count, known_level = its level), `backend_at` (n,
    LEVEL_COUNT) the backend column Maglev picks over the row's key masked at each level (any
    value below known_level: unused). A level finer than a row's known level cannot be
    computed (the members' own tuples are unknown): its weight counts as spread evenly."""
    loads = np.zeros((classes, LEVEL_COUNT, backends))
    rows = np.asarray(class_row, np.int64)
    weight = np.asarray(weight, np.float64)
    known = np.asarray(known_level, np.int64)
    backend_at = np.asarray(backend_at, np.int64).reshape(len(rows), LEVEL_COUNT)
    if backends == 0:
        return loads
    for level in range(LEVEL_COUNT):
        exact = known <= level
        np.add.at(loads[:, level, :], (rows[exact], backend_at[exact, level]), weight[exact])
        even = np.bincount(rows[~exact], weights=weight[~exact], minlength=classes) / backends
        loads[:, level, :] += even[:classes, None]
    return loads


def leaves_aggregate(flow_level: np.ndarray, class_level: np.ndarray,
                     changed_ns: np.ndarray | int, now_ns: int, cfg: GranularityConfig
                     ) -> np.ndarray:
    """Members to publish as flows of their own (level 0, their backend) from now on: flows
    in an aggregate (flow_level >= 1) whose class has been at another level for
    `retire_after_s` (changed_ns: when the class last changed level) (docs/policy.md
    "Retiring an earlier level"). While any member of an earlier level's aggregate lives, that
    aggregate stays valid, and every new flow of its tuple that the new level puts on another
    backend needs a connection entry to be told from the old members (transition_flow); an
    entry per old member instead lets the old aggregate close. Waiting first lets most old
    members end (a class's live flows all at once would be a peak of their own)."""
    flow_level = np.asarray(flow_level, np.int64)
    away_ns = np.int64(now_ns) - np.asarray(changed_ns, np.int64)
    return ((flow_level > 0) & (flow_level != np.asarray(class_level, np.int64))
            & (away_ns >= round(cfg.retire_after_s * 1e9)))


def aggregate_units(class_keys: np.ndarray) -> np.ndarray:
    """Dense id per (VIP address, protocol) of CLASS_KEY_DTYPE keys: the classes whose
    level-2/3 aggregates are shared (those masks drop the VIP port), which spread_caps refines
    together."""
    keys = np.ascontiguousarray(class_keys)
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    addr = np.ascontiguousarray(keys["vip_addr"]).reshape(len(keys), -1)
    columns = np.concatenate([addr, keys["proto"].reshape(-1, 1)], axis=1)
    return np.unique(columns, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def spread_caps(proposed: np.ndarray, loads: np.ndarray, max_spread: float,
                groups: np.ndarray | None = None, members: np.ndarray | None = None,
                current: np.ndarray | None = None, units: np.ndarray | None = None
                ) -> np.ndarray:
    """The coarsest levels (per class, at most `proposed`) that keep every service's predicted
    backend spread within `max_spread`. loads: what_if_loads (classes, LEVEL_COUNT, backend
    columns); groups: the service of each class (default: one service); members: (services,
    backend columns) bool, the backends of each service (default: every column); units: the
    classes refined together (aggregate_units: one VIP address and protocol share their
    level-2/3 aggregates, so a class refined alone would find its siblings' aggregate on
    another backend and every new flow of it would need an entry of its own; default: each
    class alone). Greedy, per service: while the spread of the classes at their levels exceeds
    the bound, refine by one level (its classes at its coarsest level) the unit carrying the
    fewest connections among those whose refinement alone brings the spread within the bound
    (the fewest new entries), else the one whose refinement lowers it most; stop when no
    refinement lowers it. A service within the bound keeps `proposed`. `current` (the levels
    in force) makes the choice sticky: a unit already refined below the level is taken first
    when its refinement suffices (or, if none suffices, lowers the spread), so two similar
    units do not take turns (each turn re-places new flows)."""
    levels = np.asarray(proposed, np.int64).copy()
    classes = len(levels)
    now = levels.copy() if current is None else np.asarray(current, np.int64)[:classes]
    groups = np.zeros(classes, np.int64) if groups is None else np.asarray(groups, np.int64)
    units = np.arange(classes) if units is None else np.asarray(units, np.int64)[:classes]
    if members is None:
        members = np.ones((int(groups.max(initial=0)) + 1, loads.shape[2]), bool)
    for group in np.unique(groups).tolist():
        rows = np.flatnonzero(groups == group)
        columns = np.flatnonzero(members[group])
        if columns.size == 0:
            continue
        part = loads[np.ix_(rows, np.arange(LEVEL_COUNT), columns)]
        mine = levels[rows]
        unit_of = units[rows]
        total = part[np.arange(rows.size), mine].sum(axis=0)
        current = backend_spread(total)
        while current > max_spread:
            steps, trials, weights, sticky = [], [], [], []
            for unit in np.unique(unit_of[mine > 0]).tolist():
                inside = unit_of == unit
                top = int(mine[inside].max())
                step = np.flatnonzero(inside & (mine == top))
                steps.append(step)
                trials.append(total - part[step, top].sum(axis=0)
                              + part[step, top - 1].sum(axis=0))
                weights.append(float(part[step, top].sum()))
                sticky.append(bool((now[rows[step]] < top).any()))
            if not steps:
                break
            trial = np.array(trials)
            sums = trial.sum(axis=1)
            spreads = np.where(sums > 0, trial.max(axis=1) * columns.size
                               / np.maximum(sums, 1e-12), 1.0)
            stuck = np.array(sticky)
            enough = spreads <= max_spread
            if (enough & stuck).any():
                enough &= stuck
            lowers = stuck & (spreads < current)
            if enough.any():  # the cheapest step that suffices: the unit carrying least
                best = int(np.flatnonzero(enough)[np.argmin(np.array(weights)[enough])])
            elif lowers.any():
                best = int(np.flatnonzero(lowers)[np.argmin(spreads[lowers])])
            else:
                best = int(np.argmin(spreads))
            if spreads[best] >= current:
                break
            total = trial[best]
            mine[steps[best]] -= 1
            current = float(spreads[best])
        levels[rows] = mine
    return levels.astype(np.uint8)
