"""Online interval calibration: the rules of the server agent's coverage tracker (docs/model.md,
"Online coverage tracker"). Pure functions, time and state passed in; the state they act on
(per traffic class offsets, pending decisions) lives in `connpub.model.calibration.CoverageTracker`,
which the server agent's planner and the simulator both drive.

Each decision's model interval [p10, p90] (remaining seconds) is widened by its class's
offsets in log space: p10 * exp(-lower), p90 * exp(upper) (negative offsets narrow it). A
decision is scored when its flow ends (truth below p10 or above p90), or earlier, as soon as a
packet of the still-live flow arrives after its p90 end (then it is certainly above p90: long
flows would otherwise teach the tracker only after they end). At each tick the offsets of every
class with scored decisions move by gain * w * min(n, batch_cap) * (miss share - alpha) on
each side, w the mean model interval width (log p90 / p10) of those decisions (quantile
tracking / adaptive conformal inference with a scale-aware step: with per-side alpha 0.1 a
class settles where 80% of its decisions are covered); batch_cap bounds one tick's move for a
busy class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrackerRule:
    """Parameters of the online coverage rule (offsets in log seconds)."""

    gain: float = 0.05  # offset move per scored decision, unit of (miss share - alpha) and
    # log second of the model's own interval width (log p90 / p10) of those decisions
    batch_cap: int = 8  # at most this many decisions' worth of move per class and tick
    max_offset: float = 4.0  # |offset| bound (exp(4) = 55x wider or narrower)
    alpha_low: float = 0.1  # target share of truths below p10
    alpha_high: float = 0.1  # ... above p90


def widen(p10_s: np.ndarray, p90_s: np.ndarray, offsets: np.ndarray,
          p50_s: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) seconds: p10 * exp(-offsets[:, 0]), p90 * exp(offsets[:, 1]) (float64);
    with p50 a narrowed interval still contains it (low <= p50 <= high)."""
    offsets = np.asarray(offsets, np.float64).reshape(-1, 2)
    low = np.asarray(p10_s, np.float64) * np.exp(-offsets[:, 0])
    high = np.asarray(p90_s, np.float64) * np.exp(offsets[:, 1])
    if p50_s is not None:
        p50 = np.asarray(p50_s, np.float64)
        low, high = np.minimum(low, p50), np.maximum(high, p50)
    return low, high


def lease_quantiles(p10_s: np.ndarray, p90_s: np.ndarray, high_s: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(p10, p90) the lease policy plans from: the model's p10 and the wider of the model's and
    the tracker's p90. A widened p90 lengthens the lease (over-prediction costs a TCP lease
    almost nothing: the client's FIN/RST or a CLOSED ends it); a narrowed one would cost
    renewals and early "it is over" skips (docs/model.md "Online coverage tracker": +8.7%
    publish bytes in the 200k-flow simulation), so it narrows only the scored interval."""
    p90 = np.asarray(p90_s, np.float64)
    return np.asarray(p10_s, np.float64), np.where(np.isfinite(high_s), np.maximum(
        p90, np.asarray(high_s, np.float64)), p90)


def interval_ends_ns(now_ns: int | np.ndarray, low_s: np.ndarray, high_s: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (low, high) end times of intervals decided at now_ns (a time or one per
    interval; int64, saturating)."""
    now = np.asarray(now_ns, np.int64)
    cap = float(2**62)
    return (now + (np.minimum(np.asarray(low_s, np.float64), cap / 1e9) * 1e9).astype(np.int64),
            now + (np.minimum(np.asarray(high_s, np.float64), cap / 1e9) * 1e9).astype(np.int64))


def score(ended: np.ndarray, last_ns: np.ndarray, low_ns: np.ndarray, high_ns: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scored, below, above) of pending decisions. ended: the decision's flow has finished and
    last_ns is its true end (last packet); else last_ns is its last packet so far. A finished
    flow's decision is scored: below = end < low, above = end > high; a live flow's only once
    a packet came after its high end (above = True, below = False), else it stays pending."""
    ended = np.asarray(ended, bool)
    last_ns = np.asarray(last_ns, np.int64)
    above = last_ns > np.asarray(high_ns, np.int64)
    below = ended & (last_ns < np.asarray(low_ns, np.int64))
    return ended | above, below, above


def class_counts(class_rows: np.ndarray, below: np.ndarray, above: np.ndarray,
                 width: np.ndarray) -> tuple[np.ndarray, ...]:
    """(rows, scored, below, above, mean model width) per class row among scored decisions
    (rows sorted; width: each decision's model log p90 / p10)."""
    rows, inverse = np.unique(np.asarray(class_rows, np.int64), return_inverse=True)
    count = np.bincount(inverse, minlength=rows.size).astype(np.int64)
    return (rows, count,
            np.bincount(inverse, weights=below, minlength=rows.size).astype(np.int64),
            np.bincount(inverse, weights=above, minlength=rows.size).astype(np.int64),
            np.bincount(inverse, weights=width, minlength=rows.size) / count)


def updated_offsets(offsets: np.ndarray, scored: np.ndarray, below: np.ndarray,
                    above: np.ndarray, width: np.ndarray, rule: TrackerRule = TrackerRule()
                    ) -> np.ndarray:
    """New (k, 2) offsets of k classes after one tick that scored `scored` decisions of each,
    `below` / `above` of them missed (counts), their mean model interval width `width` (log):
    offset += gain * width * min(n, cap) * (share - alpha) per side, clipped to
    +-max_offset; a class with no scored decision keeps its offsets. The move scales with the
    model's own spread, so a class of sharply predictable flows is not overshot."""
    offsets = np.asarray(offsets, np.float64).reshape(-1, 2)
    n = np.asarray(scored, np.float64)
    share = np.divide(np.stack([below, above], axis=1).astype(np.float64), n[:, None],
                      out=np.zeros((n.size, 2)), where=n[:, None] > 0)
    step = rule.gain * np.maximum(np.asarray(width, np.float64), 0.0) * np.minimum(
        n, rule.batch_cap)
    move = step[:, None] * (share - np.array([rule.alpha_low, rule.alpha_high]))
    return np.clip(offsets + move, -rule.max_offset, rule.max_offset)
