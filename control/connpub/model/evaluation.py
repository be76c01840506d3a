"""Honest evaluation of a remaining-duration predictor (docs/model.md, "Quality"): MAE of log
remaining seconds against baselines learned on the training data, p10-p90 coverage, by
protocol, by age band and by duration band; the promotion guard of continuous training."""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field

import numpy as np

from connpub.errors import ConnpubError
from connpub.model.calibration import (
    PORT_SPACE,
    CoverageTracker,
    service_class,
    tables_from_dict,
    tables_to_dict,
)
from connpub.model.features import MIN_REMAINING_S
from connpub.model.samples import Samples
from connpub.policy.calibration import interval_ends_ns

NOMINAL_COVERAGE = 0.8
AGE_BANDS_S: tuple[float, ...] = (1.0, 10.0, 100.0)  # edges: <1 s, 1-10, 10-100, >=100
DURATION_BANDS_S: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)


def _band_names(edges: tuple[float, ...]) -> list[str]:
    names = [f"<{edges[0]:g}s"]
    names += [f"{lo:g}-{hi:g}s" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return names + [f">={edges[-1]:g}s"]


def _median(values: np.ndarray, quantile: float = 0.5) -> float:
    return float(np.quantile(values, quantile)) if values.size else 0.0


@dataclass
class ServiceMedians:
    """Per-(proto, vip_port) median of log remaining seconds on training rows: the baseline a
    model must beat. Unknown ports fall back to their protocol's median, then the overall."""

    by_port: dict[int, float] = field(default_factory=dict)  # service_class id -> median
    by_proto: dict[int, float] = field(default_factory=dict)  # 0 TCP / 1 UDP -> median
    overall: float = 0.0

    @classmethod
    def fit(cls, samples: Samples, quantile: float = 0.5) -> ServiceMedians:
        """From rows with proto, vip_port and log_remaining_s; `quantile` other than 0.5
        gives that quantile per service instead of the median (the simulator's per-port
        predictor)."""
        classes = service_class(samples.proto, samples.vip_port)
        target = samples.log_remaining_s
        out = cls(overall=_median(target, quantile))
        for slot in (0, 1):
            rows = classes // PORT_SPACE == slot
            if rows.any():
                out.by_proto[slot] = _median(target[rows], quantile)
        order = np.argsort(classes, kind="stable")
        ids, starts = np.unique(classes[order], return_index=True)
        for class_id, part in zip(ids, np.split(target[order], starts[1:]), strict=True):
            out.by_port[int(class_id)] = _median(part, quantile)
        return out

    def predict(self, proto: np.ndarray, vip_port: np.ndarray) -> np.ndarray:
        classes = service_class(proto, vip_port)
        table = np.full(2 * PORT_SPACE, self.overall)
        for slot, value in self.by_proto.items():
            table[slot * PORT_SPACE:(slot + 1) * PORT_SPACE] = value
        for class_id, value in self.by_port.items():
            table[class_id] = value
        return table[classes]

    def to_dict(self) -> dict:
        return tables_to_dict(self.by_port, self.by_proto, self.overall)

    @classmethod
    def from_dict(cls, data: dict) -> ServiceMedians:
        return cls(*tables_from_dict({"overall": 0.0, **data}, float))


def training_medians(predictor) -> ServiceMedians | None:
    """The per-service medians of the predictor's training rows (model metadata), if any."""
    training = predictor.metadata.get("training", "{}")
    try:
        baseline = json.loads(training).get("baseline")
    except (json.JSONDecodeError, AttributeError):
        return None
    return ServiceMedians.from_dict(baseline) if baseline else None


def service_median_baseline(samples: Samples) -> np.ndarray:
    """Per-row prediction of the in-sample baseline: each (vip_port, proto)'s median of the
    rows' own log remaining (optimistic: it has seen the answers). Any integer service ids."""
    service = (np.asarray(samples.vip_port).astype(np.int64) * 256
               + np.asarray(samples.proto).astype(np.int64))
    _, inverse = np.unique(service, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((samples.log_remaining_s, inverse))
    sorted_ids = inverse[order]
    ids = np.arange(inverse.max() + 1 if inverse.size else 0)
    starts = np.searchsorted(sorted_ids, ids, side="left")
    ends = np.searchsorted(sorted_ids, ids, side="right")
    values = np.asarray(samples.log_remaining_s)[order]
    lower = values[starts + (ends - starts - 1) // 2]
    upper = values[starts + (ends - starts) // 2]
    return ((lower + upper) / 2.0)[inverse]


def _scores(rows: np.ndarray, truth, p, base, own, age_only) -> dict:
    n = int(rows.sum())
    if n == 0:
        return {"rows": 0}
    t = truth[rows]
    return {
        "rows": n,
        "mae": float(np.mean(np.abs(p[rows, 1] - t))),
        "baseline_mae": float(np.mean(np.abs(base[rows] - t))),
        "baseline_own_mae": float(np.mean(np.abs(own[rows] - t))),
        "age_only_mae": float(np.mean(np.abs(age_only[rows] - t))),
        "coverage": float(np.mean((p[rows, 0] <= t) & (t <= p[rows, 2]))),
        "below_p10": float(np.mean(t < p[rows, 0])),
        "above_p90": float(np.mean(t > p[rows, 2])),
    }


def score_predictions(samples: Samples, predicted_log: np.ndarray,
                      baseline: ServiceMedians | None) -> dict:
    """Metrics of (n, 3) log-quantile predictions on samples, overall and by group:
    mae (|p50 - truth| of log remaining seconds), baseline_mae (per-service medians of the
    TRAINING rows; the test rows' own medians when no training baseline is given),
    baseline_own_mae (test rows' own medians), age_only_mae ("remaining = age"), coverage
    (truth in [p10, p90]), below_p10, above_p90, rows."""
    truth = samples.log_remaining_s
    p = np.asarray(predicted_log, np.float64)
    own = service_median_baseline(samples)
    base = own if baseline is None else baseline.predict(samples.proto, samples.vip_port)
    age_only = np.log(np.maximum(samples.age_s, MIN_REMAINING_S))
    every = np.ones(truth.size, bool)
    out = _scores(every, truth, p, base, own, age_only)
    out["baseline_source"] = "test rows (no training baseline)" if baseline is None else "training"
    out["flows"] = int(np.unique(samples.flow_index).size)
    out["nominal_coverage"] = NOMINAL_COVERAGE
    out["by_protocol"] = {name: _scores(samples.proto == number, truth, p, base, own, age_only)
                          for name, number in (("tcp", 6), ("udp", 17))}
    age_band = np.searchsorted(AGE_BANDS_S, samples.age_s, side="right")
    out["by_age"] = {name: _scores(age_band == i, truth, p, base, own, age_only)
                     for i, name in enumerate(_band_names(AGE_BANDS_S))}
    if samples.duration_s is not None:
        band = np.searchsorted(DURATION_BANDS_S, samples.duration_s, side="right")
        out["by_duration"] = {name: _scores(band == i, truth, p, base, own, age_only)
                              for i, name in enumerate(_band_names(DURATION_BANDS_S))}
    return out


def evaluate_samples(samples: Samples, predictor, baseline: ServiceMedians | None = None,
                     online: bool = False, interval_s: float = 1.0) -> dict:
    """score_predictions of a predictor (its calibrated predict_log) on prepared samples; the
    baseline defaults to the medians of the predictor's own training rows. online: the
    intervals as the agent's online coverage tracker would have adjusted them (replay_tracker,
    starting from no history)."""
    if samples.log_remaining_s.size == 0:
        raise ConnpubError("no evaluation rows: every flow ended before its first decision")
    predicted = predictor.predict_log(samples.features)
    if online:
        predicted = replay_tracker(samples, predicted, interval_s)
    out = score_predictions(samples, predicted, baseline or training_medians(predictor))
    out["mae_ratio"] = (out["mae"] / out["baseline_mae"] if out["baseline_mae"] > 0
                        else float("inf"))
    out["model_id"] = predictor.metadata.get("model_id", "")
    return out


def replay_tracker(samples: Samples, predicted_log: np.ndarray, interval_s: float = 1.0,
                   tracker: CoverageTracker | None = None) -> np.ndarray:
    """(n, 3) log quantiles as the running agent's CoverageTracker would have widened them:
    decisions and outcomes replayed in time order, one agent tick per interval_s. At each
    tick the tracker first scores the decisions of flows that ended since the last tick and
    of live flows past their widened p90 end (their last packet taken as the tick: a sample's
    flow sends until it ends), then widens the tick's new decisions. Every sample is its own
    decision, its interval anchored at its own decision time; the class is the service
    (proto, VIP port): flow logs have no VIPs."""
    if samples.decided_ns is None:
        raise ConnpubError("samples lack decision times; make them with sample_flows")
    tracker = tracker or CoverageTracker()
    tick_ns = max(1, round(interval_s * 1e9))
    decided = samples.decided_ns.astype(np.int64)
    end = decided + np.rint(np.exp(samples.log_remaining_s) * 1e9).astype(np.int64)
    decide_tick, end_tick = decided // tick_ns, -(-end // tick_ns)
    ids = np.arange(decided.size, dtype=np.uint64)
    out = np.array(predicted_log, dtype=np.float64, copy=True)
    by_decide, by_end = np.argsort(decide_tick, kind="stable"), np.argsort(end_tick, kind="stable")
    sorted_decide, sorted_end = decide_tick[by_decide], end_tick[by_end]
    checks: dict[int, list[np.ndarray]] = {}  # tick -> samples live past their p90 by then
    ticks = list(np.unique(np.concatenate([decide_tick, end_tick])).tolist())
    heapq.heapify(ticks)
    last_tick = None
    while ticks:
        tick = heapq.heappop(ticks)
        if tick == last_tick:
            continue
        last_tick = tick
        now = tick * tick_ns
        ended = by_end[np.searchsorted(sorted_end, tick):
                       np.searchsorted(sorted_end, tick, side="right")]
        check = checks.pop(tick, [])
        live = np.concatenate(check) if check else np.zeros(0, np.int64)
        tracker.resolve(ids[ended], end[ended], ids[live], np.full(live.size, now, np.int64))
        new = by_decide[np.searchsorted(sorted_decide, tick):
                        np.searchsorted(sorted_decide, tick, side="right")]
        if new.size == 0:
            continue
        low, high = tracker.adjust(ids[new], decided[new], np.exp(out[new, 0]), np.exp(out[new, 2]),
                                   proto=samples.proto[new], vip_port=samples.vip_port[new],
                                   p50_s=np.exp(out[new, 1]))
        out[new, 0], out[new, 2] = np.log(np.maximum(low, 1e-9)), np.log(high)
        _, high_ns = interval_ends_ns(decided[new], low, high)
        past = (end[new] > high_ns) & np.isfinite(high)  # alive past its p90: scored early
        check_tick = high_ns[past] // tick_ns + 1  # the first tick after the p90 end
        for when, group in _groups(check_tick, new[past]):
            checks.setdefault(when, []).append(group)
            heapq.heappush(ticks, when)
    out.sort(axis=1)
    return out


def _groups(keys: np.ndarray, values: np.ndarray):
    """(key, values with that key) for each distinct key."""
    if keys.size == 0:
        return
    order = np.argsort(keys, kind="stable")
    unique, start = np.unique(keys[order], return_index=True)
    yield from zip(unique.tolist(), np.split(values[order], start[1:]), strict=True)


def evaluate(history: np.ndarray, predictor, baseline: ServiceMedians | None = None) -> dict:
    """evaluate_samples on the decision samples of finished-flow HISTORY_DTYPE records."""
    from connpub.model.samples import sample_history  # noqa: PLC0415

    return evaluate_samples(sample_history(history), predictor, baseline)


def should_promote(candidate: dict, current: dict, coverage_tolerance: float = 0.02) -> bool:
    """Promote a candidate only if its MAE is lower and its coverage is not further from the
    nominal p10-p90 coverage than the current model's by more than coverage_tolerance."""
    for metrics, name in ((candidate, "candidate"), (current, "current")):
        for key in ("mae", "coverage"):
            if key not in metrics or not np.isfinite(metrics[key]):
                raise ConnpubError(f"{name} metrics lack a finite {key!r}; run evaluate() first")
    if candidate["mae"] >= current["mae"]:
        return False
    cand_gap = abs(candidate["coverage"] - NOMINAL_COVERAGE)
    curr_gap = abs(current["coverage"] - NOMINAL_COVERAGE)
    return cand_gap <= curr_gap + coverage_tolerance
