"""Remaining-duration predictors the simulator can plug into the lease policy: the ONNX model
(as the server agent runs it), an oracle that knows every flow's end (the bound), the per-port
quantiles of a training trace (what a model must beat) and a fixed lease (no prediction): the
ablation of docs/model.md, "What prediction buys". `make_predictor("model" | "oracle" |
"per-port" | "fixed" | "fixed:SECONDS", ...)` builds one by name (`connpub sim --predictor`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from connpub.errors import ConnpubError
from connpub.sim.flows import MIN_REMAINING_S, SimFlows
from connpub.traffic.workload import NS_PER_S

PREDICTOR_NAMES = ("model", "oracle", "per-port", "fixed")


class LeasePredictor(Protocol):
    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p10, p50, p90) remaining seconds of flows `index` at now_ns."""


class ModelPredictor:
    """The ONNX model (connpub.model.quantile.Predictor) on features computed like the agent's."""

    def __init__(self, path: str | Path | None = None) -> None:
        from connpub.model.quantile import Predictor

        self.model = Predictor(path or None)
        self.online_coverage = True  # the agents' CoverageTracker adjusts its intervals
        self.name = f"model:{self.model.metadata.get('model_id', '?')}"

    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p10, p50, p90 = self.model.predict(flows.features(index, now_ns))
        return p10.astype(np.float64), p50.astype(np.float64), p90.astype(np.float64)


class OraclePredictor:
    """Knows the truth: p10 = p50 = p90 = remaining seconds + margin_s (a point prediction)."""

    def __init__(self, margin_s: float = 1.0) -> None:
        self.margin_s = margin_s
        self.name = f"oracle(+{margin_s:g}s)"

    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        remaining = np.maximum((flows.end_ns[index] - now_ns) / NS_PER_S, MIN_REMAINING_S)
        value = remaining + self.margin_s
        return value, value.copy(), value.copy()


class PerPortPredictor:
    """The per-service rule: p10 / p50 / p90 = the 10th / 50th / 90th percentile of remaining
    seconds of (proto, VIP port) over the decision samples of a training flow table (the
    agent's decision ages, model.samples.decision_ages_s), whatever the flow's age or traffic;
    an unknown port takes its protocol's quantiles (model.evaluation.ServiceMedians)."""

    def __init__(self, training_flows: np.ndarray, interval_s: float = 1.0,
                 source: str = "trace") -> None:
        from types import SimpleNamespace

        from connpub.model.evaluation import ServiceMedians
        from connpub.model.samples import SAMPLE_SEED, decision_ages_s

        if training_flows.size == 0:
            raise ConnpubError("per-port predictor: the training flow table is empty")
        duration_s = (training_flows["end_ns"] - training_flows["start_ns"]) / NS_PER_S
        rows, age_s = decision_ages_s(duration_s.astype(np.float64), interval_s, SAMPLE_SEED)
        rows_of = training_flows[rows]
        samples = SimpleNamespace(
            proto=rows_of["proto"].astype(np.int64), vip_port=rows_of["vip_port"].astype(np.int64),
            log_remaining_s=np.log(np.maximum(duration_s[rows] - age_s, MIN_REMAINING_S)))
        self.tables = [ServiceMedians.fit(samples, q) for q in (0.1, 0.5, 0.9)]
        self.samples = int(rows.size)
        self.name = f"per-port({source})"

    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        proto = flows.trace["proto"][index].astype(np.int64)
        port = flows.trace["vip_port"][index].astype(np.int64)
        p10, p50, p90 = (np.exp(t.predict(proto, port)) for t in self.tables)
        return p10, p50, p90


class FixedPredictor:
    """No prediction. seconds=None: every decision falls back to the baseline lease k*T
    (NaN quantiles: policy.lease's fallback), renewed every cycle; seconds=S: every flow gets
    the same lease of S seconds (p10 = p50 = p90 = S), renewed by the lease policy."""

    def __init__(self, seconds: float | None = None) -> None:
        if seconds is not None and not seconds > 0:
            raise ConnpubError(f"fixed lease must be positive seconds, got {seconds:g}")
        self.seconds = seconds
        self.name = "fixed(k*T)" if seconds is None else f"fixed({seconds:g}s)"

    def predict(self, flows: SimFlows, index: np.ndarray, now_ns: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        value = np.full(index.size, np.nan if self.seconds is None else self.seconds)
        return value, value.copy(), value.copy()


def make_predictor(spec: str, *, model_path: str | Path | None = None,
                   training_flows: np.ndarray | None = None, interval_s: float = 1.0,
                   training_source: str = "trace") -> LeasePredictor:
    """A predictor by name: model (model_path or the shipped one), oracle, per-port (fitted on
    training_flows), fixed (the baseline lease k*T) or fixed:SECONDS. ConnpubError otherwise."""
    name, _, arg = spec.strip().partition(":")
    if name == "model" and not arg:
        return ModelPredictor(model_path)
    if name == "oracle" and not arg:
        return OraclePredictor()
    if name == "per-port" and not arg:
        if training_flows is None:
            raise ConnpubError("per-port predictor needs a training flow table")
        return PerPortPredictor(training_flows, interval_s, training_source)
    if name == "fixed":
        try:
            return FixedPredictor(float(arg) if arg else None)
        except ValueError:
            raise ConnpubError(f"predictor {spec!r}: want fixed or fixed:SECONDS") from None
    raise ConnpubError(f"unknown predictor {spec!r}; choose from {', '.join(PREDICTOR_NAMES)} "
                       "(or fixed:SECONDS)")
