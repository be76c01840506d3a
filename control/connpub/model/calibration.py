"""Calibrated p10-p90 intervals (docs/model.md, "Calibration"): split-conformal quantile
regression (CQR) offsets per service class, fitted on held-back flows at training time and
carried in the model file, and an online coverage tracker per class for the running agent
that widens or narrows the interval from the outcomes it sees, to hold 80%."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import numpy as np

from connpub.display import ip_text
from connpub.policy.calibration import (
    TrackerRule,
    class_counts,
    interval_ends_ns,
    score,
    updated_offsets,
    widen,
)
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


def class_keys(proto: np.ndarray, vip_port: np.ndarray, vip_addr: np.ndarray | None = None,
               server: np.ndarray | int = 0) -> np.ndarray:
    """(n,) uint64 key of each decision's traffic class for the CoverageTracker: a hash of
    (VIP address, VIP port, proto, server); without addresses (flow logs, the eval replay)
    every row has the same VIP, so the class is the service (proto, port)."""
    from connpub.model.observations import hash_words  # noqa: PLC0415 - no import cycle

    n = np.asarray(proto).size
    words = np.zeros((n, 3), np.uint64)
    if vip_addr is not None:
        words[:, :2] = np.ascontiguousarray(np.asarray(vip_addr, np.uint8).reshape(n, 16)
                                            ).view(np.uint64)
    words[:, 2] = (np.asarray(vip_port).astype(np.uint64)
                   | (np.asarray(proto).astype(np.uint64) << np.uint64(16))
                   | (np.asarray(server).astype(np.uint64) << np.uint64(24)))
    return hash_words(words)


def _match(pending: np.ndarray, ids: np.ndarray, values: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """(hit, value) per pending flow id: whether it is among ids and that id's value."""
    hit = np.zeros(pending.size, bool)
    value = np.zeros(pending.size, np.int64)
    ids = np.asarray(ids, np.uint64)
    if ids.size == 0 or pending.size == 0:
        return hit, value
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, pending), sorted_ids.size - 1)
    hit = sorted_ids[pos] == pending
    value[hit] = np.asarray(values, np.int64)[order][pos[hit]]
    return hit, value


class CoverageTracker:
    """Online coverage control per traffic class for the running agent (and the simulator and
    the eval replay, which drive the same object); the rules are connpub.policy.calibration's.
    `adjust` widens (or narrows) each decision's [p10, p90] by its class's offsets and
    remembers it (flow id, class, absolute low / high end); `resolve` scores pending decisions
    of flows that ended (true end) or that are live with a packet after their high end, and
    moves each class's offsets once per call (one agent tick) so that 80% stay covered.
    Classes are keyed by class_keys (VIP, port, proto); a class unseen so far starts at 0.
    Thread-safe; memory is bounded by max_pending decisions (oldest dropped)."""

    def __init__(self, rule: TrackerRule | None = None, max_pending: int = 2_000_000) -> None:
        self.rule = rule or TrackerRule()
        self.max_pending = int(max_pending)
        self._lock = threading.Lock()
        self.keys = np.zeros(0, np.uint64)  # sorted class keys; the arrays below are per key
        self.offsets = np.zeros((0, 2), np.float64)  # extra log offsets (lower, upper)
        self.decisions = np.zeros(0, np.int64)  # scored decisions
        self.below = np.zeros(0, np.int64)  # ... truth below the widened p10
        self.above = np.zeros(0, np.int64)  # ... above the widened p90
        self.udp = np.zeros(0, bool)
        self.names: dict[int, tuple[str, int, str]] = {}  # key -> (address, port, proto)
        self.scored_total = self.below_total = self.above_total = 0  # all classes, ever
        self._flow = np.zeros(0, np.uint64)
        self._class = np.zeros(0, np.uint64)
        self._low_ns = np.zeros(0, np.int64)
        self._high_ns = np.zeros(0, np.int64)
        self._width = np.zeros(0, np.float32)  # the model's own log p90 / p10

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Row of each known class key (ValueError for an unknown one)."""
        keys = np.asarray(keys, np.uint64)
        pos = np.minimum(np.searchsorted(self.keys, keys), max(self.keys.size - 1, 0))
        if keys.size and (self.keys.size == 0 or (self.keys[pos] != keys).any()):
            raise ValueError("unknown class key")
        return pos

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """(n, 2) current offsets of class keys (0 for a class not seen yet)."""
        keys = np.asarray(keys, np.uint64)
        out = np.zeros((keys.size, 2))
        if self.keys.size:
            pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
            known = self.keys[pos] == keys
            out[known] = self.offsets[pos[known]]
        return out

    def _add_classes(self, keys: np.ndarray, proto: np.ndarray, vip_port: np.ndarray,
                     vip_addr: np.ndarray | None) -> None:
        new, first = np.unique(keys, return_index=True)
        fresh = ~np.isin(new, self.keys)
        if not fresh.any():
            return
        new, first = new[fresh], first[fresh]
        merged = np.concatenate([self.keys, new])
        order = np.argsort(merged, kind="stable")
        self.keys = merged[order]
        self.offsets = np.concatenate([self.offsets, np.zeros((new.size, 2))])[order]
        for name in ("decisions", "below", "above"):
            setattr(self, name, np.concatenate([getattr(self, name),
                                                np.zeros(new.size, np.int64)])[order])
        udp = np.asarray(proto)[first] == PROTO_UDP
        self.udp = np.concatenate([self.udp, udp])[order]
        for key, row, is_udp in zip(new.tolist(), first.tolist(), udp.tolist(), strict=True):
            address = "*" if vip_addr is None else ip_text(np.asarray(vip_addr)[row])
            self.names[key] = (address, int(np.asarray(vip_port)[row]),
                               "udp" if is_udp else "tcp")

    def adjust(self, flow_ids: np.ndarray, now_ns: int | np.ndarray, p10_s: np.ndarray,
               p90_s: np.ndarray,
               *, proto: np.ndarray, vip_port: np.ndarray, vip_addr: np.ndarray | None = None,
               server: np.ndarray | int = 0, p50_s: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(p10, p90) in seconds widened by the class offsets; the decisions are remembered
        with their interval's absolute ends (now_ns: the decision time, or one per flow);
        with p50_s the interval keeps containing the median."""
        now_ns = np.broadcast_to(np.asarray(now_ns, np.int64), np.shape(p10_s))
        keys = class_keys(proto, vip_port, vip_addr, server)
        with self._lock:
            self._add_classes(keys, proto, vip_port, vip_addr)
            low, high = widen(p10_s, p90_s, self.offsets[self.rows(keys)], p50_s)
            valid = np.isfinite(low) & np.isfinite(high)
            low_ns, high_ns = interval_ends_ns(now_ns[valid], low[valid], high[valid])
            self._flow = np.concatenate([self._flow, np.asarray(flow_ids, np.uint64)[valid]])
            self._class = np.concatenate([self._class, keys[valid]])
            self._low_ns = np.concatenate([self._low_ns, low_ns])
            self._high_ns = np.concatenate([self._high_ns, high_ns])
            width = np.log(np.asarray(p90_s, np.float64)[valid]
                           / np.maximum(np.asarray(p10_s, np.float64)[valid], 1e-9))
            self._width = np.concatenate([self._width, width.astype(np.float32)])
            if self._flow.size > self.max_pending:
                self._keep(np.arange(self._flow.size) >= self._flow.size - self.max_pending)
        return low, high

    def _keep(self, keep: np.ndarray) -> None:
        self._flow, self._class = self._flow[keep], self._class[keep]
        self._low_ns, self._high_ns = self._low_ns[keep], self._high_ns[keep]
        self._width = self._width[keep]

    def overdue_ids(self, now_ns: int) -> np.ndarray:
        """Flow ids (unique) with a pending decision whose high end is before now_ns: the
        flows whose last packet the caller may pass to resolve as live."""
        with self._lock:
            return np.unique(self._flow[self._high_ns < np.int64(now_ns)])

    def resolve(self, ended_ids: np.ndarray, end_ns: np.ndarray,
                live_ids: np.ndarray | None = None, last_seen_ns: np.ndarray | None = None
                ) -> int:
        """Score pending decisions: of flows that ended at end_ns (their last packet), and of
        live flows whose last packet (last_seen_ns) came after the decision's high end.
        Returns how many were scored."""
        with self._lock:
            if self._flow.size == 0:
                return 0
            ended, last = _match(self._flow, ended_ids, end_ns)
            if live_ids is not None and np.asarray(live_ids).size:
                latest = np.max(np.asarray(last_seen_ns, np.int64))
                maybe = np.flatnonzero(~ended & (self._high_ns < latest))
                seen, seen_ns = _match(self._flow[maybe], live_ids, last_seen_ns)
                last[maybe[seen]] = seen_ns[seen]
                consider = ended.copy()
                consider[maybe[seen]] = True
            else:
                consider = ended
            at = np.flatnonzero(consider)
            scored, below, above = score(ended[at], last[at], self._low_ns[at],
                                         self._high_ns[at])
            at, below, above = at[scored], below[scored], above[scored]
            if at.size == 0:
                return 0
            rows, count, n_below, n_above, width = class_counts(
                self.rows(self._class[at]), below, above, self._width[at])
            self.offsets[rows] = updated_offsets(self.offsets[rows], count, n_below, n_above,
                                                 width, self.rule)
            self.decisions[rows] += count
            self.below[rows] += n_below
            self.above[rows] += n_above
            self.scored_total += int(at.size)
            self.below_total += int(n_below.sum())
            self.above_total += int(n_above.sum())
            keep = np.ones(self._flow.size, bool)
            keep[at] = False
            self._keep(keep)
            return int(at.size)

    def classes(self) -> list[dict]:
        """Per class with scored decisions, busiest first: address, port, proto, decisions,
        coverage, below / above shares, offsets."""
        with self._lock:
            order = np.argsort(-self.decisions, kind="stable")
            out = []
            for row in order[self.decisions[order] > 0].tolist():
                n = int(self.decisions[row])
                address, port, proto = self.names[int(self.keys[row])]
                out.append({"address": address, "port": port, "proto": proto, "decisions": n,
                            "coverage": (n - int(self.below[row]) - int(self.above[row])) / n,
                            "below_p10": int(self.below[row]) / n,
                            "above_p90": int(self.above[row]) / n,
                            "offsets": [round(float(v), 4) for v in self.offsets[row]]})
            return out

    def status(self, top: int = 8) -> dict:
        """Scored decisions and coverage overall, per protocol and for the busiest classes."""
        with self._lock:
            total = int(self.decisions.sum())
            missed = self.below + self.above
            out = {"decisions": total, "pending": int(self._flow.size), "classes_seen":
                   int(self.keys.size),
                   "coverage": float(1 - missed.sum() / total) if total else None}
            for name, part in (("tcp", ~self.udp), ("udp", self.udp)):
                n = int(self.decisions[part].sum())
                out[f"coverage_{name}"] = float(1 - missed[part].sum() / n) if n else None
        out["classes"] = {f"{c['proto']}/{c['address']}:{c['port']}": c
                          for c in self.classes()[:top]}
        return out
