"""Calibrated p10-p90 intervals (docs/model.md, "Calibration"): split-conformal quantile
regression (CQR) offsets per service class, fitted on held-back flows at training time and
carried in the model file, and an online coverage tracker per class for the running agent
that widens or narrows the interval from the outcomes it sees, to hold 80%."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import numpy as np

from connpub.traffic.workload import PROTO_TCP, PROTO_UDP

ALPHA_LOW = 0.1  # target share of truths below p10
ALPHA_HIGH = 0.1  # ... above p90
MIN_CLASS_ROWS = 200  # a (proto, port) class needs this many calibration rows, else its proto's
PORT_SPACE = 65536
PROTO_SLOTS = (PROTO_TCP, PROTO_UDP)
UDP_COLUMN, PORT_COLUMN = 1, 2  # feature columns proto_udp, vip_port (features.FEATURE_NAMES)


def service_class(proto: np.ndarray, vip_port: np.ndarray) -> np.ndarray:
    """(n,) int64 class id proto_slot * 65536 + port (slot 0 TCP and anything else, 1 UDP)."""
    slot = (np.asarray(proto).astype(np.int64) == PROTO_UDP).astype(np.int64)
    return slot * PORT_SPACE + np.asarray(vip_port).astype(np.int64)


def tables_to_dict(by_port: dict, by_proto: dict, overall) -> dict:
    """JSON-able form of per-class values: {"overall", "proto": {"tcp"|"udp"}, "ports":
    {"tcp/443": ...}} (ConformalOffsets and evaluation.ServiceMedians share it)."""
    return {"overall": overall,
            "proto": {("udp" if slot else "tcp"): v for slot, v in by_proto.items()},
            "ports": {f"{'udp' if k // PORT_SPACE else 'tcp'}/{k % PORT_SPACE}": v
                      for k, v in sorted(by_port.items())}}


def tables_from_dict(data: dict, convert) -> tuple[dict, dict, object]:
    """(by_port, by_proto, overall) of tables_to_dict output, values through convert."""
    slots = {"tcp": 0, "udp": 1}
    ports = {}
    for key, value in data.get("ports", {}).items():
        proto, _, port = key.partition("/")
        ports[slots[proto] * PORT_SPACE + int(port)] = convert(value)
    return (ports, {slots[k]: convert(v) for k, v in data.get("proto", {}).items()},
            convert(data["overall"]))


def classes_of_features(features: np.ndarray) -> np.ndarray:
    """service_class of feature rows (their proto_udp and vip_port columns)."""
    udp = features[:, UDP_COLUMN] > 0.5
    port = np.clip(np.rint(features[:, PORT_COLUMN]), 0, PORT_SPACE - 1).astype(np.int64)
    return udp.astype(np.int64) * PORT_SPACE + port


def _conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """Split-conformal quantile: the ceil((n+1)(1-alpha))-th smallest score (finite-sample)."""
    n = scores.size
    rank = min(n, int(np.ceil((n + 1) * (1.0 - alpha))))
    return float(np.partition(scores, rank - 1)[rank - 1])


@dataclass
class ConformalOffsets:
    """Per class (lower, upper) offsets in log seconds: p10 -= lower, p90 += upper."""

    by_port: dict[int, tuple[float, float]] = field(default_factory=dict)  # class id -> offsets
    by_proto: dict[int, tuple[float, float]] = field(default_factory=dict)  # slot -> offsets
    overall: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def fit(cls, predicted_log: np.ndarray, truth: np.ndarray, classes: np.ndarray,
            min_rows: int = MIN_CLASS_ROWS) -> ConformalOffsets:
        """CQR on calibration rows: predicted (n, 3) log quantiles, true log remaining."""
        low = predicted_log[:, 0] - truth  # > 0: truth below p10
        high = truth - predicted_log[:, 2]  # > 0: truth above p90

        def offsets(rows: np.ndarray) -> tuple[float, float]:
            return (_conformal_quantile(low[rows], ALPHA_LOW),
                    _conformal_quantile(high[rows], ALPHA_HIGH))

        out = cls(overall=offsets(np.arange(truth.size)) if truth.size else (0.0, 0.0))
        for slot in (0, 1):
            rows = np.flatnonzero(classes // PORT_SPACE == slot)
            if rows.size >= min_rows:
                out.by_proto[slot] = offsets(rows)
        ids, counts = np.unique(classes, return_counts=True)
        for class_id in ids[counts >= min_rows]:
            out.by_port[int(class_id)] = offsets(np.flatnonzero(classes == class_id))
        return out

    def table(self) -> np.ndarray:
        """(2 * 65536, 2) float32 lookup: class id -> (lower, upper)."""
        out = np.empty((2 * PORT_SPACE, 2), np.float32)
        out[:] = self.overall
        for slot, value in self.by_proto.items():
            out[slot * PORT_SPACE:(slot + 1) * PORT_SPACE] = value
        for class_id, value in self.by_port.items():
            out[class_id] = value
        return out

    def to_json(self) -> str:
        return json.dumps(tables_to_dict(
            {k: list(v) for k, v in self.by_port.items()},
            {k: list(v) for k, v in self.by_proto.items()}, list(self.overall)), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConformalOffsets:
        return cls(*tables_from_dict(json.loads(text), tuple))


def apply_offsets(predicted_log: np.ndarray, classes: np.ndarray, table: np.ndarray
                  ) -> np.ndarray:
    """(n, 3) log quantiles widened (or narrowed) by the class offsets, rows kept sorted."""
    out = np.array(predicted_log, dtype=np.float32, copy=True)
    if out.shape[0] == 0:
        return out
    offsets = table[classes]
    out[:, 0] -= offsets[:, 0]
    out[:, 2] += offsets[:, 1]
    out.sort(axis=1)
    return out


class CoverageTracker:
    """Online coverage control per service class (adaptive conformal inference, Gibbs and
    Candes 2021), for the running agent. `adjust` widens each decision's interval by the
    class's current extra offsets and remembers it (flow, absolute p10/p90 end times);
    `resolve` scores the decisions of flows that ended against their true end and moves the
    offsets of each class seen by step * (miss rate of the batch - alpha) on each side (one
    update per class per call, i.e. per agent tick), so a class whose
    truths fall below p10 (above p90) more than 10% of the time widens, one that never misses
    narrows. Thread-safe; memory is bounded by max_pending decisions (oldest dropped)."""

    def __init__(self, step: float = 0.05, max_offset: float = 4.0,
                 max_pending: int = 2_000_000) -> None:
        self.step = float(step)
        self.max_offset = float(max_offset)
        self.max_pending = int(max_pending)
        self.offsets = np.zeros((2 * PORT_SPACE, 2), np.float64)  # extra lower / upper
        self.decisions = np.zeros(2 * PORT_SPACE, np.int64)  # resolved, per class
        self.covered = np.zeros(2 * PORT_SPACE, np.int64)
        self._lock = threading.Lock()
        self._flow = np.zeros(0, np.uint64)
        self._class = np.zeros(0, np.int64)
        self._low_ns = np.zeros(0, np.int64)
        self._high_ns = np.zeros(0, np.int64)

    def adjust(self, flow_ids: np.ndarray, classes: np.ndarray, now_ns: int,
               p10_s: np.ndarray, p90_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p10, p90) in seconds widened by the class offsets; the decisions are remembered."""
        with self._lock:
            extra = self.offsets[classes]
            low = np.asarray(p10_s, np.float64) * np.exp(-extra[:, 0])
            high = np.asarray(p90_s, np.float64) * np.exp(extra[:, 1])
            valid = np.isfinite(low) & np.isfinite(high)
            now = np.int64(now_ns)
            self._flow = np.concatenate([self._flow, np.asarray(flow_ids, np.uint64)[valid]])
            self._class = np.concatenate([self._class, classes[valid]])
            self._low_ns = np.concatenate(
                [self._low_ns, now + np.minimum(low[valid] * 1e9, 2**62).astype(np.int64)])
            self._high_ns = np.concatenate(
                [self._high_ns, now + np.minimum(high[valid] * 1e9, 2**62).astype(np.int64)])
            if self._flow.size > self.max_pending:
                keep = slice(self._flow.size - self.max_pending, None)
                self._flow, self._class = self._flow[keep], self._class[keep]
                self._low_ns, self._high_ns = self._low_ns[keep], self._high_ns[keep]
        return low, high

    def resolve(self, flow_ids: np.ndarray, end_ns: np.ndarray) -> int:
        """Score the pending decisions of flows that ended at end_ns; returns how many."""
        flow_ids = np.asarray(flow_ids, np.uint64)
        if flow_ids.size == 0:
            return 0
        with self._lock:
            if self._flow.size == 0:
                return 0
            order = np.argsort(flow_ids, kind="stable")
            sorted_ids = flow_ids[order]
            pos = np.minimum(np.searchsorted(sorted_ids, self._flow), sorted_ids.size - 1)
            hit = sorted_ids[pos] == self._flow
            if not hit.any():
                return 0
            end = np.asarray(end_ns, np.int64)[order][pos[hit]]
            classes = self._class[hit]
            below = end < self._low_ns[hit]
            above = end > self._high_ns[hit]
            seen, inverse = np.unique(classes, return_inverse=True)
            count = np.bincount(inverse)
            rate_below = np.bincount(inverse, weights=below) / count
            rate_above = np.bincount(inverse, weights=above) / count
            self.offsets[seen, 0] += self.step * (rate_below - ALPHA_LOW)
            self.offsets[seen, 1] += self.step * (rate_above - ALPHA_HIGH)
            self.offsets[seen] = np.clip(self.offsets[seen], -self.max_offset, self.max_offset)
            self.decisions[seen] += count
            self.covered[seen] += count - np.bincount(inverse, weights=below | above).astype(
                np.int64)
            keep = ~hit
            self._flow, self._class = self._flow[keep], self._class[keep]
            self._low_ns, self._high_ns = self._low_ns[keep], self._high_ns[keep]
            return int(hit.sum())

    def status(self, top: int = 8) -> dict:
        """Resolved decisions and coverage overall, per protocol and for the busiest classes."""
        with self._lock:
            total = int(self.decisions.sum())
            out = {"decisions": total, "pending": int(self._flow.size),
                   "coverage": float(self.covered.sum() / total) if total else None}
            for slot, name in enumerate(("tcp", "udp")):
                part = slice(slot * PORT_SPACE, (slot + 1) * PORT_SPACE)
                n = int(self.decisions[part].sum())
                out[f"coverage_{name}"] = float(self.covered[part].sum() / n) if n else None
            busiest = np.argsort(-self.decisions)[:top]
            out["classes"] = {
                f"{'udp' if c // PORT_SPACE else 'tcp'}/{c % PORT_SPACE}": {
                    "decisions": int(self.decisions[c]),
                    "coverage": float(self.covered[c] / self.decisions[c]),
                    "offsets": [round(float(v), 4) for v in self.offsets[c]]}
                for c in busiest if self.decisions[c] > 0}
        return out
